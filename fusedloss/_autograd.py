"""Autograd of every fusedloss op, registered at import for a namespace by ``install``.

The forward ops return the gradient already scaled for the reduction (mean/sum); the backward
hands it over (_handover.py: multiplied by grad_output in place, no pass when that is 1, the
forward kernel again for a second backward). reduction="none" recomputes the gradient from
the saved row statistics instead: that moves fewer bytes than writing a gradient in the forward
and scaling it later (bench/README.md has the byte counts).

What the fused kernels do not compute (second derivatives, the gradients of targets, masks and
weights) comes from the differentiable compositions in _composite.py.

Under torch.compile, mean/sum cross-entropy whose only differentiable input is the logits takes
the autograd.Function of _compiled.py instead (the gradient over dead logits); the registered
formulas serve the rest (gradients of targets, masks or weights wanted too).
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _compiled, _composite, _fake, _handover
from ._common import NONE, is_traced
from ._ops import OpSet

_INPLACE_CONSUMED = (
    "fusedloss: {} with inplace_backward=True wrote its gradient over the logits, so it can "
    "be differentiated once only: a second backward (retain_graph=True) or a double backward "
    "(create_graph=True) needs the logits. Use inplace_backward=False there.")


def install(namespace):
    """The OpSet of `namespace` with its fake kernels and autograd registered."""
    opset = OpSet(namespace)
    lib = opset.lib
    _fake.register(namespace)
    opset.eager["softmax_ce"] = _register_loss_autograd(namespace, lib, "softmax_ce",
                                                        _SoftmaxSpec)
    opset.eager["sigmoid_ce"] = _register_loss_autograd(namespace, lib, "sigmoid_ce",
                                                        _SigmoidSpec)
    _register_linear_ce_autograd(namespace, lib)
    opset.eager["distill"] = _register_distill_autograd(namespace, lib)
    opset.DistillInplace = _make_distill_inplace_function(lib)
    opset.SoftmaxCEInplace = _make_inplace_function(lib)
    opset.SoftmaxCECompiled = _compiled.make_function(lib)
    return opset


# ---- the loss ops: softmax_ce, sigmoid_ce ---------------------------------------------------

class SoftmaxCEArgs(NamedTuple):
    """softmax_ce's schema (csrc/fusedloss.cpp) -> (loss, row_stats, grad, extras, argmax)."""

    logits: Tensor
    target: Tensor
    weight: Optional[Tensor]
    mask: Optional[Tensor]
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float
    reduction: int
    mean_eps: float
    compute_grad: bool
    want_accuracy: bool = False
    denominators: Optional[Tensor] = None
    token_scaling: bool = False
    want_argmax: bool = False


class SigmoidCEArgs(NamedTuple):
    """sigmoid_ce's schema (csrc/fusedloss.cpp) -> (loss, grad)."""

    input: Tensor
    target: Tensor
    weight: Optional[Tensor]
    pos_weight: Optional[Tensor]
    mask: Optional[Tensor]
    label_smoothing: float
    reduction: int
    compute_grad: bool


def _at(args, name):
    """The position of argument `name` in a schema (a NamedTuple of its arguments)."""
    return args._fields.index(name)


def _span(args, first, last):
    """The positions of arguments `first` to `last` of a schema, as a slice."""
    return slice(_at(args, first), _at(args, last) + 1)


# The specs read the op's inputs by position (a tuple, as autograd passes them: building a
# NamedTuple on every call costs more than the rest of the setup), at the positions the
# schema's names give.

class _SoftmaxSpec:
    """How softmax_ce's autograd reads its arguments and outputs."""

    # logits, a probability target, weight, mask
    differentiable = tuple(range(_at(SoftmaxCEArgs, "logits"), _at(SoftmaxCEArgs, "mask") + 1))
    _tensors = _span(SoftmaxCEArgs, "logits", "mask")
    _options = _span(SoftmaxCEArgs, "ignore_index", "mean_eps")
    _denominators = _at(SoftmaxCEArgs, "denominators")
    _token_scaling = _at(SoftmaxCEArgs, "token_scaling")
    reduction = _at(SoftmaxCEArgs, "reduction")
    grad = 2  # the output (loss, row_stats, grad, extras, argmax)

    @classmethod
    def saved(cls, inputs, output):
        """What the backward needs: the tensor arguments, the row statistics, denominators."""
        denominators = inputs[cls._denominators] if len(inputs) > cls._denominators else None
        return (*inputs[cls._tensors], output[1], denominators)

    @classmethod
    def options(cls, inputs):
        """(ignore_index .. mean_eps, token_scaling), as the backward ops take them."""
        token_scaling = len(inputs) > cls._token_scaling and inputs[cls._token_scaling]
        return inputs[cls._options], token_scaling

    @staticmethod
    def backward_kernel(lib, grad_loss, saved, options):
        """The gradient times grad_loss (per row for none, a scalar otherwise), written once."""
        logits, target, weight, mask, row_stats, denominators = saved
        options, token_scaling = options
        return lib.softmax_ce_backward(grad_loss, logits, target, weight, mask, row_stats,
                                       *options, denominators, 0, 0, None, token_scaling)

    @staticmethod
    def recompute_grad(lib, saved, options):
        logits, target, weight, mask, _row_stats, denominators = saved
        options, token_scaling = options
        return lib.softmax_ce(logits, target, weight, mask, *options, True, False,
                              denominators, token_scaling)[2]

    @staticmethod
    def composite(saved, options):
        logits, target, weight, mask, _row_stats, denominators = saved
        options, token_scaling = options
        args = (logits, target, weight, mask, *options, False, denominators, token_scaling)
        return args, lambda *a: _composite.softmax_ce(*a)[0]


class _SigmoidSpec:
    """How sigmoid_ce's autograd reads its arguments and outputs."""

    # input, target, weight, pos_weight, mask
    differentiable = tuple(range(_at(SigmoidCEArgs, "input"), _at(SigmoidCEArgs, "mask") + 1))
    _tensors = _span(SigmoidCEArgs, "input", "mask")
    _options = _span(SigmoidCEArgs, "label_smoothing", "reduction")
    reduction = _at(SigmoidCEArgs, "reduction")
    grad = 1  # the output (loss, grad)

    @classmethod
    def saved(cls, inputs, output):
        return inputs[cls._tensors]

    @classmethod
    def options(cls, inputs):
        """label_smoothing, reduction, as the backward op takes them."""
        return inputs[cls._options]

    @staticmethod
    def backward_kernel(lib, grad_loss, saved, options):
        """The gradient times grad_loss (per element for none, a scalar otherwise)."""
        return lib.sigmoid_ce_backward(grad_loss, *saved, *options)

    @staticmethod
    def recompute_grad(lib, saved, options):
        return lib.sigmoid_ce(*saved, *options, True)[1]

    @staticmethod
    def composite(saved, options):
        return (*saved, *options), _composite.sigmoid_ce


def _composite_grads(composite, args, diff_positions, grad_loss, create_graph):
    """Gradients of composite(*args) with respect to args[i] for i in diff_positions, under the
    incoming grad_loss; differentiable when create_graph."""
    with torch.enable_grad():
        loss = composite(*args)
        inputs = [args[i] for i in diff_positions]
        grads = torch.autograd.grad(loss, inputs, grad_loss, create_graph=create_graph,
                                    allow_unused=True)
    return dict(zip(diff_positions, grads))


def _register_loss_autograd(namespace, lib, op, spec):
    """Registers the autograd of a loss op; returns its eager form (_eager_function)."""

    def setup(ctx, inputs, output):
        # Only the loss is differentiable: no zero-filled N x C gradient for the other outputs.
        ctx.set_materialize_grads(False)
        ctx.n_inputs = len(inputs)
        reduction = ctx.reduction = inputs[spec.reduction]
        # Saved by reference (no copy); read only by a second or double backward and by the
        # gradients of the non-logit inputs. Like PyTorch's own losses, which keep an N x C
        # log-softmax for their backward, this holds the logits until the backward has run.
        ctx.save_for_backward(*spec.saved(inputs, output))
        ctx.options = spec.options(inputs)
        if reduction == NONE:
            return  # the backward kernel, with each row's grad_output
        if _handover.defers(inputs[0].dtype):
            _handover.defer(ctx)
        else:
            grad = output[spec.grad]
            _handover.keep(ctx, grad if grad.numel() else None)

    def backward(ctx, grad_loss, *_grads_of_other_outputs):
        grads = [None] * ctx.n_inputs
        if grad_loss is None:  # no gradient flows into the loss (undefined, not zero-filled)
            return tuple(grads)
        needs = ctx.needs_input_grad
        create_graph = torch.is_grad_enabled() and not is_traced(grad_loss)
        composite_for = [i for i in spec.differentiable if needs[i]
                         and (i != 0 or create_graph)]
        saved = ctx.saved_tensors
        if composite_for:
            args, composite = spec.composite(saved, ctx.options)
            for i, g in _composite_grads(composite, args, composite_for, grad_loss,
                                         create_graph).items():
                grads[i] = g
        if needs[0] and not create_graph:
            if ctx.reduction == NONE:
                grads[0] = spec.backward_kernel(lib, grad_loss, saved, ctx.options)
            else:
                (grads[0],) = _handover.take(
                    ctx, lib, grad_loss,
                    lambda: (spec.recompute_grad(lib, saved, ctx.options),),
                    lambda g: (spec.backward_kernel(lib, g, saved, ctx.options),))
        return tuple(grads)

    torch.library.register_autograd(f"{namespace}::{op}", backward, setup_context=setup)
    return _eager_function(getattr(lib, op), setup, backward)


def _eager_function(op, setup, backward):
    """`op` with the registered autograd formula (the same setup and backward), as an
    autograd.Function whose forward calls the op below autograd, for eager calls. The
    registration's generic wrapper (torch.library's) fills in the op's default arguments and
    redispatches in Python on every call: measured with cProfile at 8 x 100 logits, ~90 us of
    a 280 us forward+backward (fill_defaults 60 us, redispatch 32 us), where PyTorch's own
    cross-entropy takes 83 us in all."""

    class EagerLoss(torch.autograd.Function):
        # forward(ctx, ...) rather than a separate setup_context: with one, Function.apply
        # binds the arguments through inspect.signature on every call (~50 us). torch.func
        # transforms never reach this class (_route runs the compositions for them).
        @staticmethod
        def forward(ctx, *inputs):
            with torch._C._AutoDispatchBelowAutograd():
                output = op(*inputs)
            setup(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    return EagerLoss.apply


def _make_inplace_function(lib):
    class SoftmaxCEInplace(torch.autograd.Function):
        """cross_entropy(inplace_backward=True): the forward writes the gradient into the
        logits' storage (no N x C buffer). Autograd sees the write: the logits' version
        counter moves, so any other op that saved them refuses to run its backward rather
        than read the gradient as logits. _route takes this path only where it is safe
        (see _route.inplace_is_safe), and only when the logits are the one input that needs a
        gradient. Returns (loss, row_stats, extras, argmax) like softmax_ce, less the
        gradient."""

        @staticmethod
        def forward(ctx, logits, target, weight, mask, ignore_index, label_smoothing, z_loss,
                    softcap, reduction, mean_eps, want_accuracy, token_scaling, want_argmax):
            version = logits._version
            loss, row_stats, extras, argmax = lib.softmax_ce_inplace(
                logits, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap,
                reduction, mean_eps, want_accuracy, None, token_scaling, want_argmax)
            if logits._version == version:
                torch.autograd.graph.increment_version(logits)
            _handover.keep(ctx, logits)
            ctx.mark_non_differentiable(row_stats, extras, argmax)
            ctx.set_materialize_grads(False)
            return loss, row_stats, extras, argmax

        @staticmethod
        def backward(ctx, grad_loss, *_grads_of_other_outputs):
            none_for_the_rest = (None,) * 12
            if grad_loss is None:
                return (None,) + none_for_the_rest
            if torch.is_grad_enabled() and not is_traced(grad_loss):
                raise RuntimeError(_INPLACE_CONSUMED.format("cross_entropy"))
            (grad,) = _handover.take(ctx, lib, grad_loss, _inplace_consumed)
            return (grad,) + none_for_the_rest

    return SoftmaxCEInplace


def _inplace_consumed(who="cross_entropy"):
    raise RuntimeError(_INPLACE_CONSUMED.format(who))


# ---- the fused linear cross-entropy: linear_ce -----------------------------------------------

class LinearCEArgs(NamedTuple):
    """linear_ce's schema (csrc/fusedloss.cpp) -> (loss, row_stats, grad_input, grad_weight,
    grad_bias, extras)."""

    input: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    target: Tensor
    class_weight: Optional[Tensor]
    mask: Optional[Tensor]
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float
    reduction: int
    denominators: Optional[Tensor]
    chunk_rows: int
    need_input_grad: bool
    need_weight_grad: bool
    need_bias_grad: bool
    need_accuracy: bool
    token_scaling: bool = False
    want_argmax: bool = False


def _register_linear_ce_autograd(ns, lib):
    """The autograd formula of the chunk loop (csrc/linear_ce.cpp): the forward computes every
    gradient, pre-scaled for mean/sum, and the backward hands them over; reduction none
    recomputes the chunks in linear_ce_backward."""

    def setup_context(ctx, inputs, output):
        a = LinearCEArgs(*inputs)
        _loss, stats, gi, gw, gb, _correct, _argmax = output
        ctx.set_materialize_grads(False)
        ctx.reduction = a.reduction
        ctx.options = (a.ignore_index, a.label_smoothing, a.z_loss, a.softcap)
        ctx.token_scaling = a.token_scaling
        ctx.chunk_rows = a.chunk_rows
        ctx.needs = (a.need_input_grad, a.need_weight_grad, a.need_bias_grad)
        ctx.has_bias = a.bias is not None
        # The inputs (input: N x H, the weight, O(N) targets) are kept for reduction none's
        # recompute and for a second backward of mean/sum; never anything N x V.
        ctx.save_for_backward(a.input, a.weight, a.bias, a.target, a.class_weight, a.mask, stats,
                              a.denominators)
        if a.reduction != NONE:
            _handover.keep(ctx, gi, gw, gb)

    def backward(ctx, grad_loss, *_grads_of_other_outputs):
        nones = (None,) * 16
        if grad_loss is None:
            return (None, None, None) + nones
        input, weight, bias, target, class_weight, mask, stats, denominators = ctx.saved_tensors
        if torch.is_grad_enabled() and not is_traced(grad_loss):  # create_graph: double backward
            gi, gw, gb = _linear_definition_grads(ctx, grad_loss, input, weight, bias, target,
                                                  class_weight, mask)
        elif ctx.reduction == NONE:
            gi, gw, gb = lib.linear_ce_backward(grad_loss, input, weight, bias, target,
                                                class_weight, mask, stats, *ctx.options,
                                                ctx.chunk_rows, *ctx.needs, ctx.token_scaling)
        else:
            def recompute():  # a second backward (retain_graph=True): the same forward
                return lib.linear_ce(input, weight, bias, target, class_weight, mask,
                                     *ctx.options, ctx.reduction, denominators, ctx.chunk_rows,
                                     *ctx.needs, False, ctx.token_scaling)[2:5]
            gi, gw, gb = _handover.take(ctx, lib, grad_loss, recompute)
        gi, gw, gb = _handover.narrow((gi, gw, gb), (input, weight, weight))
        need_input_grad, need_weight_grad, need_bias_grad = ctx.needs
        return (gi if need_input_grad else None, gw if need_weight_grad else None,
                gb if need_bias_grad and ctx.has_bias else None) + nones

    torch.library.register_autograd(f"{ns}::linear_ce", backward, setup_context=setup_context)


def _linear_definition_grads(ctx, grad_loss, x, weight, bias, target, class_weight, mask):
    """The gradients of (input, weight, bias) under grad_loss, themselves differentiable: those
    of the definition, the cross-entropy composition of the whole logits F.linear(x, weight,
    bias). For a double backward (a Hessian-vector product, a gradient penalty); the fused
    gradients are not differentiable. The logits exist whole here."""
    ignore_index, label_smoothing, z_loss, softcap = ctx.options
    wanted = [t for t, need in zip((x, weight, bias), ctx.needs) if need]
    with torch.enable_grad():
        logits = torch.nn.functional.linear(x, weight, bias)
        loss = _composite.softmax_ce(logits, target, class_weight, mask, ignore_index,
                                     label_smoothing, z_loss, softcap, ctx.reduction, 0.0,
                                     token_scaling=ctx.token_scaling)[0]
        grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True,
                                         allow_unused=True))
    return tuple(next(grads) if need else None for need in ctx.needs)


# ---- the distillation losses: distill ---------------------------------------------------------

class DistillArgs(NamedTuple):
    """distill's schema (csrc/fusedloss.cpp) -> (loss, row_stats, grad_student, grad_teacher)."""

    student: Tensor
    teacher: Tensor
    teacher_indices: Optional[Tensor]
    target: Optional[Tensor]
    mask: Optional[Tensor]
    divergence: int
    temperature: float
    beta: float
    hard_weight: float
    ignore_index: int
    reduction: int
    denominator: Optional[Tensor]
    student_grad: bool
    teacher_grad: bool


_DISTILL_STUDENT = _at(DistillArgs, "student")
_DISTILL_TEACHER = _at(DistillArgs, "teacher")
_DISTILL_MASK = _at(DistillArgs, "mask")
_DISTILL_OPTIONS = _span(DistillArgs, "divergence", "reduction")


def _register_distill_autograd(namespace, lib):
    """The autograd of distill: as the loss ops', with two differentiable logits. The forward
    computes the gradients it was asked for (the student's; the teacher's when it requires
    grad), pre-scaled for mean/sum, and the backward hands them over (_handover.py);
    reduction none and float16 write them in the backward from the saved row statistics. The
    mask's gradient and second derivatives come from the composition (_composite.distill)."""

    def setup(ctx, inputs, output):
        a = DistillArgs(*inputs)
        _loss, stats, gs, gt = output
        ctx.set_materialize_grads(False)
        ctx.n_inputs = len(inputs)
        ctx.options = inputs[_DISTILL_OPTIONS]
        ctx.reduction = a.reduction
        ctx.save_for_backward(a.student, a.teacher, a.teacher_indices, a.target, a.mask, stats,
                              a.denominator)
        if a.reduction == NONE:
            return
        if _handover.defers(a.student.dtype) or _handover.defers(a.teacher.dtype):
            _handover.defer(ctx)
        else:
            _handover.keep(ctx, gs if a.student_grad else None, gt if a.teacher_grad else None)

    def backward(ctx, grad_loss, *_grads_of_other_outputs):
        grads = [None] * ctx.n_inputs
        if grad_loss is None:
            return tuple(grads)
        needs = ctx.needs_input_grad
        create_graph = torch.is_grad_enabled() and not is_traced(grad_loss)
        student, teacher, indices, target, mask, stats, denominator = ctx.saved_tensors
        composite_for = [i for i in (_DISTILL_STUDENT, _DISTILL_TEACHER, _DISTILL_MASK)
                         if needs[i] and (i == _DISTILL_MASK or create_graph)]
        if composite_for:
            # the mean's denominator from the mask itself when the mask is differentiated
            args = (student, teacher, indices, target, mask, *ctx.options,
                    None if needs[_DISTILL_MASK] else denominator)
            for i, g in _composite_grads(_composite.distill, args, composite_for, grad_loss,
                                         create_graph).items():
                grads[i] = g
        want_s = needs[_DISTILL_STUDENT] and not create_graph
        want_t = needs[_DISTILL_TEACHER] and not create_graph
        if not (want_s or want_t):
            return tuple(grads)
        tensors = (student, teacher, indices, target, mask)

        def write(g):
            return lib.distill_backward(g, *tensors, stats, *ctx.options, denominator, want_s,
                                        want_t)

        if ctx.reduction == NONE:
            gs, gt = write(grad_loss)
        else:
            gs, gt = _handover.take(
                ctx, lib, grad_loss,
                lambda: lib.distill(*tensors, *ctx.options, denominator, want_s, want_t)[2:],
                write)
        if want_s:
            grads[_DISTILL_STUDENT] = gs
        if want_t:
            grads[_DISTILL_TEACHER] = gt
        return tuple(grads)

    torch.library.register_autograd(f"{namespace}::distill", backward, setup_context=setup)
    return _eager_function(lib.distill, setup, backward)


def _make_distill_inplace_function(lib):
    class DistillInplace(torch.autograd.Function):
        """distillation_loss(inplace_backward=True): the forward writes the student's gradient
        into the student's logits (no N x C buffer), as SoftmaxCEInplace does; _route takes it
        only where that is safe and the student's logits are the one input needing a
        gradient. Returns the loss."""

        @staticmethod
        def forward(ctx, student, teacher, teacher_indices, target, mask, divergence,
                    temperature, beta, hard_weight, ignore_index, reduction, denominator):
            version = student._version
            loss, _stats = lib.distill_inplace(student, teacher, teacher_indices, target, mask,
                                               divergence, temperature, beta, hard_weight,
                                               ignore_index, reduction, denominator)
            if student._version == version:
                torch.autograd.graph.increment_version(student)
            _handover.keep(ctx, student)
            ctx.set_materialize_grads(False)
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            none_for_the_rest = (None,) * 11
            if grad_loss is None:
                return (None,) + none_for_the_rest
            if torch.is_grad_enabled() and not is_traced(grad_loss):
                _inplace_consumed("distillation_loss")
            (grad,) = _handover.take(ctx, lib, grad_loss,
                                     lambda: _inplace_consumed("distillation_loss"))
            return (grad,) + none_for_the_rest

    return DistillInplace
