"""The choice of path for one loss call, made in one place:

- under a torch.func transform or forward-mode AD: the differentiable compositions
  (_composite.py), for which the ops have no batching rules and no jvp;
- under torch.compile, mean/sum cross-entropy whose only differentiable input is the logits:
  the compiled Function (_compiled.py: the gradient over dead logits);
- cross_entropy(inplace_backward=True), where safe: the in-place Function;
- an eager call that records a gradient: the op's autograd.Function (_autograd.py);
- an eager call that records none (torch.no_grad(), or no input requiring grad): the op below
  autograd, which records nothing (no Function, no context);
- while traced otherwise: the registered op.
"""

import functools

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import _args, _compiled, _composite, _handover, _ops
from ._common import MEAN, NONE, is_traced, valid_mask_sum


def saved_by_producer(t):
    """Whether the op that produced t (or t's base, for a view) saved it for its backward."""
    storage = t.untyped_storage().data_ptr()
    for x in (t, t._base):
        fn = x.grad_fn if x is not None else None
        if fn is None:
            continue
        saved = [getattr(fn, n, None) for n in dir(fn) if n.startswith("_saved_")]
        try:
            saved += list(getattr(fn, "saved_tensors", ()))
        except RuntimeError:
            pass
        for s in saved:
            for v in s if isinstance(s, (tuple, list)) else (s,):
                if isinstance(v, Tensor) and v.untyped_storage().data_ptr() == storage:
                    return True
    return False


def inplace_is_safe(input, logits2d):
    """Where writing the gradient into the logits cannot corrupt anything autograd needs."""
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and input.requires_grad):
        return False
    if input.is_leaf or logits2d.is_leaf:  # a parameter or user tensor: never overwrite
        return False
    if logits2d.dim() != 2 or (logits2d.shape[1] > 1 and logits2d.stride(1) != 1):
        return False
    return not (saved_by_producer(logits2d) or saved_by_producer(input))


def compositions_needed():
    """Whether the differentiable compositions (_composite.py) must run instead of the ops:
    under a torch.func transform (grad, vmap, jacrev, ...), for which the ops have no batching
    rules, and under forward-mode AD (torch.autograd.forward_ad), for which they have no jvp.
    torch.compile is not a transform: while dynamo traces, the interpreter stack it shows is
    its own, and reading it here sent every compiled call to the compositions (PyTorch's ops,
    not the kernels)."""
    if torch.compiler.is_compiling():
        return False
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or forward_ad._current_level >= 0)


def needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def forward_writes_grad(x, reduction):
    """Whether the forward computes the gradient of `x`, pre-scaled for the reduction, for the
    backward to hand over (_handover.py): mean/sum, a gradient recorded, and not float16
    (whose gradient the backward writes, rounded once after grad_output)."""
    return (reduction != NONE and torch.is_grad_enabled() and x.requires_grad
            and not _handover.defers(x.dtype))


def compiled_path_applies(logits2d, target, weight, mask, reduction):
    """Under torch.compile, mean/sum with only the logits needing a gradient take the path
    that writes the gradient over dead logits (_compiled.py)."""
    return (forward_writes_grad(logits2d, reduction)
            and not needs_grad(target, weight, mask))


# Leaf logits smaller than this are copied and the copy overwritten under torch.compile: the
# copy costs less than what the out-of-place op adds to a call (its autograd kernel is Python,
# dispatched even where no gradient is recorded: ~15 us; measured crossover between 256 KB and
# 4 MB of float32 logits on the development machine).
_OUT_OF_PLACE_MIN_BYTES = 1 << 19


def gradient_out_of_place(input, logits2d):
    """Under torch.compile: whether the kernel writes the gradient into a buffer of its own
    (softmax_ce) instead of over a copy of the logits that the compiler may elide
    (softmax_ce_inplace; _compiled.py). Leaf logits (a parameter, a user tensor) and views of
    them are never overwritten, so a copy would only move their bytes twice more; except
    small ones (_OUT_OF_PLACE_MIN_BYTES). Read while dynamo traces, where a leaf is a graph
    input (a tensor computed in the graph is not one); sizes that are symbolic (dynamic
    shapes) count as large, without a guard on them."""
    if not (input.is_leaf and (logits2d is input or logits2d._base is input)):
        return False
    small = logits2d.numel() * logits2d.element_size() < _OUT_OF_PLACE_MIN_BYTES
    return not statically_known_true(small)


def softmax_ce(logits2d, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap,
               reduction, mean_eps=0.0, inplace_backward=False, input=None,
               want_accuracy=False, token_scaling=False, want_argmax=False):
    """The softmax cross-entropy op on (rows, classes) logits, with its autograd path chosen.
    Returns the op's (loss in the accumulation dtype, row_stats, extras, argmax), argmax None
    unless want_argmax."""
    input = logits2d if input is None else input
    args = (target, weight, mask, ignore_index, label_smoothing, z_loss, softcap, reduction,
            mean_eps)
    if compositions_needed():
        return _composite.softmax_ce(logits2d, *args, want_accuracy, None, token_scaling,
                                     want_argmax)
    if (_args.targets_validated() and not target.is_floating_point()
            and not torch.compiler.is_compiling()):
        _args.check_targets_eagerly(target, logits2d.shape[1], ignore_index)
    if torch.compiler.is_compiling() and compiled_path_applies(logits2d, target, weight, mask,
                                                               reduction):
        out_of_place = gradient_out_of_place(input, logits2d)
        if inplace_backward and input.is_leaf:
            _compiled.warn_once("leaf", _compiled.INPUT_LOGITS)
        loss, row_stats, extras, argmax = _ops.current().SoftmaxCECompiled.apply(
            logits2d, *args, want_accuracy, None, token_scaling, want_argmax, out_of_place)
        return loss, row_stats, extras, argmax if want_argmax else None
    compute_grad = forward_writes_grad(logits2d, reduction)
    if (inplace_backward and compute_grad and not needs_grad(target, weight, mask)
            and inplace_is_safe(input, logits2d)):
        loss, row_stats, extras, argmax = _ops.current().SoftmaxCEInplace.apply(
            logits2d, *args, want_accuracy, token_scaling, want_argmax)
        return loss, row_stats, extras, argmax if want_argmax else None
    op = loss_op("softmax_ce", logits2d, needs_grad(logits2d, target, weight, mask))
    loss, row_stats, _grad, extras, argmax = op(logits2d, *args, compute_grad, want_accuracy,
                                                None, token_scaling, want_argmax)
    return loss, row_stats, extras, argmax if want_argmax else None


def sigmoid_ce(x, y, weight, pos_weight, mask, label_smoothing, reduction, input):
    """The sigmoid cross-entropy op on (rows, cols) operands, with its autograd path chosen.
    Returns the loss in the accumulation dtype."""
    if compositions_needed():
        return _composite.sigmoid_ce(x, y, weight, pos_weight, mask, label_smoothing, reduction)
    compute_grad = forward_writes_grad(input, reduction)
    op = loss_op("sigmoid_ce", x, needs_grad(x, y, weight, pos_weight, mask))
    loss, _grad = op(x, y, weight, pos_weight, mask, label_smoothing, reduction, compute_grad)
    return loss


def distill(student, teacher, teacher_indices, target, mask, divergence, temperature, beta,
            hard_weight, ignore_index, reduction, denominator=None, inplace_backward=False,
            input=None):
    """The distillation op on (rows, classes) logits, with its autograd path chosen. Returns
    the loss in the accumulation dtype. `denominator`: the mean's, when the rows are part of a
    larger loss (the chunks of the fused linear variant); else the mask's sum over the valid
    rows. inplace_backward: the student's gradient over its logits where that is safe (as
    cross_entropy's; `input` is the caller's student tensor)."""
    options = (divergence, temperature, beta, hard_weight, ignore_index, reduction)
    if compositions_needed():
        return _composite.distill(student, teacher, teacher_indices, target, mask, *options,
                                  denominator)
    if reduction == MEAN and denominator is None:
        denominator = valid_mask_sum(target, None if mask is None else mask.detach(),
                                     ignore_index, student.shape[0], student.device)
    # float16 on either side: every gradient is written in the backward (_handover.defers)
    deferred = _handover.defers(student.dtype) or _handover.defers(teacher.dtype)
    student_grad = not deferred and forward_writes_grad(student, reduction)
    teacher_grad = not deferred and forward_writes_grad(teacher, reduction)
    if (inplace_backward and student_grad and teacher_indices is None
            and not needs_grad(teacher, mask)
            and not torch.compiler.is_compiling()
            and inplace_is_safe(student if input is None else input, student)):
        return _ops.current().DistillInplace.apply(student, teacher, teacher_indices, target,
                                                   mask, *options, denominator)
    op = loss_op("distill", student, needs_grad(student, teacher, mask))
    loss, _stats, _gs, _gt = op(student, teacher, teacher_indices, target, mask, *options,
                                denominator, student_grad, teacher_grad)
    return loss


def loss_op(name, input, needs_grad):
    """The form of loss op `name` to call on `input`: the registered op while tracing, else
    (eager) the autograd.Function of _autograd when a gradient is recorded, and otherwise the
    op below autograd, which records nothing (no Function, no context)."""
    opset = _ops.current()
    if is_traced(input):
        return getattr(opset, name)
    if needs_grad:
        return opset.eager[name]
    return functools.partial(_below_autograd, getattr(opset.lib, name))


def _below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
