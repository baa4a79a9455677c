"""The public loss functions: argument checking with the public names, reshaping to the
kernels' (rows, classes) layout, and the TensorFlow-style wrappers."""

import contextlib
import functools
import os
import threading
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import _compiled, _composite, _ops, distributed
from ._ops import REDUCTIONS, acc_dtype

__all__ = [
    "CrossEntropyOutput",
    "set_target_validation",
    "cross_entropy",
    "binary_cross_entropy_with_logits",
    "sequence_loss",
    "sparse_softmax_cross_entropy_with_logits",
    "sigmoid_cross_entropy_with_logits",
]


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# TensorFlow's losses have no ignore_index: a label no int64 can reach disables it.
_NO_IGNORE_INDEX = -(2**63)
_TF_EPSILON = 1e-12  # sequence_loss divides by sum(weights) + 1e-12, as TF r1.4 does


_validate_targets = os.environ.get("FUSEDLOSS_VALIDATE_TARGETS", "0") not in ("", "0")


class CrossEntropyOutput(NamedTuple):
    """What cross_entropy returns when any ``return_*`` is set (None where not asked).

    loss: the loss, as without the flags. z_loss: its z-loss part (per position for
    reduction="none"). token_accuracy: the share of valid positions whose argmax is the target
    (mask-weighted; per position 0/mask for "none"). lse: logsumexp of each position's
    (softcapped) logits, the target's shape; 0 at padded and ignored positions, which are not
    read. The last three are float32 (float64 for float64 logits), computed in the same pass
    over the logits, and carry no gradient."""

    loss: Tensor
    z_loss: Optional[Tensor] = None
    token_accuracy: Optional[Tensor] = None
    lse: Optional[Tensor] = None


def set_target_validation(enabled: bool) -> None:
    """Check class-index targets eagerly on every device (default: off; also set by the
    environment variable FUSEDLOSS_VALIDATE_TARGETS=1).

    On the CPU, targets are always checked. On CUDA the kernel never reads out of bounds but
    only marks a bad target's row NaN, because raising needs the host to wait for the device;
    with validation on, a bad target raises an IndexError naming its value (one
    synchronisation per call)."""
    global _validate_targets
    _validate_targets = bool(enabled)


def _check_targets_eagerly(target, classes, ignore_index):
    bad = ((target < 0) | (target >= classes)) & (target != ignore_index)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"target {int(target[i])} at position {i} is out of bounds for {classes} "
                         f"classes (expected 0 <= target < {classes}, or "
                         f"ignore_index={ignore_index})")


def _check_tensor(x, name):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")


def _check_logits_dtype(x, name):
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_device(x, name, ref, ref_name):
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def _reduction_code(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return REDUCTIONS[reduction]


def _check_fraction(value, name):
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0.0 and 1.0, got {value}")
    return value


def _softcap_value(softcap):
    if softcap is None:
        return 0.0
    softcap = float(softcap)
    if not softcap > 0.0 or softcap == float("inf"):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    return softcap


def _check_loss_args(input, target, reduction, label_smoothing):
    """The checks every loss shares; returns (reduction code, label_smoothing)."""
    _check_tensor(input, "input")
    _check_tensor(target, "target")
    _check_logits_dtype(input, "input")
    _check_device(target, "target", input, "input")
    return _reduction_code(reduction), _check_fraction(label_smoothing, "label_smoothing")


def _z_loss_value(z_loss):
    z_loss = float(z_loss)
    if not z_loss >= 0.0 or z_loss == float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    return z_loss


def _row_vector(t, name, shape, acc, ref):
    """mask of the positions' shape -> flat vector in the accumulation dtype."""
    if t is None:
        return None
    _check_tensor(t, name)
    _check_device(t, name, ref, "input")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have the target's shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.is_complex():
        raise TypeError(f"{name} must be a bool, integer or floating tensor, got {t.dtype}")
    return t.reshape(-1).to(acc)


def _class_indices(target, positions, input):
    """A class-index target of the positions' shape, flat and int64."""
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must be class indices (an integer tensor) or class "
                        f"probabilities (a floating tensor), got {target.dtype}")
    if tuple(target.shape) != positions:
        raise ValueError(f"target must have shape {positions} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if target.dim() != 1:
        target = target.reshape(-1)
    return target if target.dtype == torch.int64 else target.to(torch.int64)


def _class_weight(weight, classes, acc, ref):
    if weight is None:
        return None
    _check_tensor(weight, "weight")
    _check_device(weight, "weight", ref, "input")
    if weight.dim() != 1 or weight.shape[0] != classes:
        raise ValueError(f"weight must have shape ({classes},) (one weight per class), "
                         f"got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    return weight.to(acc)


def _rows_of(input):
    """(input as (rows, classes) with the class dim last, positions' shape)."""
    if input.dim() == 1:
        return input.unsqueeze(0), ()
    if input.dim() == 2:
        return input, (input.shape[0],)
    positions = (input.shape[0],) + tuple(input.shape[2:])
    return input.movedim(1, -1).reshape(-1, input.shape[1]), positions


def _saved_by_producer(t):
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


def _inplace_is_safe(input, logits2d):
    """Where writing the gradient into the logits cannot corrupt anything autograd needs."""
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and input.requires_grad):
        return False
    if input.is_leaf or logits2d.is_leaf:  # a parameter or user tensor: never overwrite
        return False
    if logits2d.dim() != 2 or (logits2d.shape[1] > 1 and logits2d.stride(1) != 1):
        return False
    return not (_saved_by_producer(logits2d) or _saved_by_producer(input))


def _compositions_needed():
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


_accumulation_dtype_loss = threading.local()


@contextlib.contextmanager
def loss_in_accumulation_dtype():
    """Within it, the losses come back in their accumulation dtype (float32 for 16-bit logits),
    as under autocast, for a caller that upcasts the loss anyway (transformers' losses are
    float32): the loss is then not rounded to 16 bits first. The logits are still read in
    place."""
    previous = getattr(_accumulation_dtype_loss, "on", False)
    _accumulation_dtype_loss.on = True
    try:
        yield
    finally:
        _accumulation_dtype_loss.on = previous


def _loss_dtype(input, promoted=None):
    """PyTorch's dtype for a loss of `input`: the input's (promoted with a floating target's),
    except under torch.autocast, whose policy runs the losses in float32 (16-bit logits are
    still read in place), and within loss_in_accumulation_dtype()."""
    if (torch.is_autocast_enabled(input.device.type)
            or getattr(_accumulation_dtype_loss, "on", False)):
        return acc_dtype(input.dtype)
    return input.dtype if promoted is None else promoted


def _with_floating_target(input, target):
    """PyTorch computes a loss with a floating target in the promoted dtype of the two
    (bfloat16 logits with float32 soft labels give a float32 loss of the unrounded labels).
    Returns (input, target, promoted dtype): the target in the logits' dtype or in their
    accumulation dtype, both of which the kernels read as they are; the logits are copied to
    the promoted dtype only when it is wider than their accumulation dtype (float64 labels)."""
    promoted = torch.promote_types(input.dtype, target.dtype)
    if promoted != input.dtype and promoted != acc_dtype(input.dtype):
        input = input.to(promoted)
    target = target.to(input.dtype if promoted == input.dtype else acc_dtype(input.dtype))
    return input, target, promoted


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _compiled_path_applies(logits2d, target, weight, mask, reduction):
    """Under torch.compile, mean/sum with only the logits needing a gradient take the path
    that writes the gradient over dead logits (_compiled.py)."""
    return (reduction != 0 and torch.is_grad_enabled() and logits2d.requires_grad
            and not _needs_grad(target, weight, mask))


# Leaf logits smaller than this are copied and the copy overwritten under torch.compile: the
# copy costs less than what the out-of-place op adds to a call (its autograd kernel is Python,
# dispatched even where no gradient is recorded: ~15 us; measured crossover between 256 KB and
# 4 MB of float32 logits on the development machine).
_OUT_OF_PLACE_MIN_BYTES = 1 << 19


def _gradient_out_of_place(input, logits2d):
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


def _softmax_ce(logits2d, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap,
                reduction, mean_eps=0.0, inplace_backward=False, input=None,
                want_accuracy=False):
    """The softmax cross-entropy op on (rows, classes) logits, with its autograd path chosen.
    Returns the op's (loss in the accumulation dtype, row_stats, extras)."""
    input = logits2d if input is None else input
    args = (target, weight, mask, ignore_index, label_smoothing, z_loss, softcap, reduction,
            mean_eps)
    if _compositions_needed():
        return _composite.softmax_ce(logits2d, *args, want_accuracy)
    if _validate_targets and not target.is_floating_point() and not torch.compiler.is_compiling():
        _check_targets_eagerly(target, logits2d.shape[1], ignore_index)
    if torch.compiler.is_compiling() and _compiled_path_applies(logits2d, target, weight, mask,
                                                                reduction):
        out_of_place = _gradient_out_of_place(input, logits2d)
        if inplace_backward and input.is_leaf:
            _compiled.warn_once("leaf", _compiled.INPUT_LOGITS)
        return _ops.current().SoftmaxCECompiled.apply(logits2d, *args, want_accuracy, None,
                                                      out_of_place)
    if (inplace_backward and reduction != 0 and not _needs_grad(target, weight, mask)
            and _inplace_is_safe(input, logits2d)):
        return _ops.current().SoftmaxCEInplace.apply(logits2d, *args, want_accuracy)
    compute_grad = reduction != 0 and torch.is_grad_enabled() and logits2d.requires_grad
    op = _ops.current().loss_op("softmax_ce", logits2d,
                                _needs_grad(logits2d, target, weight, mask))
    loss, row_stats, _grad, extras = op(logits2d, *args, compute_grad, want_accuracy)
    return loss, row_stats, extras


def _with_extra_outputs(loss, row_stats, extras, positions, per_position, return_z_loss,
                        return_token_accuracy, return_lse):
    """loss alone, or CrossEntropyOutput with what was asked for."""
    if not (return_z_loss or return_token_accuracy or return_lse):
        return loss
    extras = extras.detach()
    if per_position:
        extras = extras.reshape((2,) + tuple(positions))
    lse = (row_stats[:, 0] + row_stats[:, 1]).detach().reshape(positions)
    return CrossEntropyOutput(loss, extras[0] if return_z_loss else None,
                              extras[1] if return_token_accuracy else None,
                              lse if return_lse else None)


class _CrossEntropyArgs(NamedTuple):
    """cross_entropy's arguments checked and laid out for the op: logits (rows, classes),
    target (rows,) class indices or (rows, classes) probabilities, weight and mask in the
    accumulation dtype."""

    input: Tensor
    logits2d: Tensor
    positions: tuple
    target: Tensor
    weight: Optional[Tensor]
    mask: Optional[Tensor]
    ignore_index: int
    reduction: int
    label_smoothing: float
    z_loss: float
    softcap: float
    promoted: Optional[torch.dtype]


def _cross_entropy_args(input, target, weight, ignore_index, reduction, label_smoothing, mask,
                        z_loss, softcap, return_token_accuracy, weight_classes=None):
    """Checks cross_entropy's arguments (errors name the argument and value). weight_classes:
    the length the class weight must have (default: the input's classes; the vocab-parallel
    path checks the whole vocabulary's length across ranks instead and passes 0)."""
    red, label_smoothing = _check_loss_args(input, target, reduction, label_smoothing)
    z_loss = _z_loss_value(z_loss)
    cap = _softcap_value(softcap)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (classes), got a 0-d tensor")
    classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if classes == 0:
        raise ValueError(f"input must have at least one class, got shape {tuple(input.shape)}")
    promoted = None
    if target.is_floating_point() and target.shape == input.shape:
        input, target, promoted = _with_floating_target(input, target)
    logits2d, positions = _rows_of(input)
    acc = acc_dtype(input.dtype)

    if target.is_floating_point():  # class probabilities
        if target.shape != input.shape:
            if tuple(target.shape) == positions:
                raise TypeError(f"target of shape {tuple(target.shape)} looks like class "
                                f"indices, which must be an integer tensor, got {target.dtype} "
                                f"(a floating target holds class probabilities and must have "
                                f"the input's shape {tuple(input.shape)})")
            raise ValueError(f"probability target must have the input's shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
        if return_token_accuracy:
            raise ValueError("return_token_accuracy=True needs class-index targets, got a "
                             "probability target")
        target2d, _ = _rows_of(target)
        ignore_index = _NO_IGNORE_INDEX
    else:
        target2d = _class_indices(target, positions, input)
    if weight_classes == 0 and weight is not None:  # any length here; checked across ranks
        _check_tensor(weight, "weight")
        if weight.dim() != 1:
            raise ValueError(f"weight must be 1-D (one weight per class of the whole "
                             f"vocabulary), got shape {tuple(weight.shape)}")
        weight_classes = weight.shape[0]
    w = _class_weight(weight, classes if weight_classes is None else weight_classes, acc, input)
    m = _row_vector(mask, "mask", positions, acc, input)
    return _CrossEntropyArgs(input, logits2d, positions, target2d, w, m, int(ignore_index), red,
                             label_smoothing, z_loss, cap, promoted)


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, mask: Optional[Tensor] = None,
                  z_loss: float = 0.0, softcap: Optional[float] = None,
                  inplace_backward: bool = False, return_z_loss: bool = False,
                  return_token_accuracy: bool = False, return_lse: bool = False,
                  process_group=None):
    """Drop-in for torch.nn.functional.cross_entropy, fused in one pass over the logits.

    Beyond torch: ``mask`` (the target's shape; 0 = padding, multiplies each position's loss),
    ``z_loss`` (adds z_loss * logsumexp^2 per position; ``mean`` divides it by the number of
    valid positions), ``softcap`` (logits become softcap * tanh(logits / softcap)) and
    ``inplace_backward`` (the gradient is written into the logits' storage, so no N x C buffer
    is allocated; the logits must not be used after the call). A ``mean`` over no valid
    position is 0 (torch: NaN). Any ``return_*`` flag makes it return a CrossEntropyOutput.

    ``process_group`` (vocab parallel, fusedloss.distributed): the input holds this rank's
    contiguous slice of the classes (ranks in group order; uneven slices allowed), the target
    global class ids (or this slice of the class probabilities), ``weight`` the whole
    vocabulary's class weights; the result is the same on every rank and equals the loss of
    the gathered logits. Only the logits get a gradient there (target, mask and weight must not
    require grad), and inplace_backward is not used. A DTensor input sharded on the class dim
    (as ``torch.distributed.tensor.parallel.loss_parallel`` takes it) needs no process_group
    (its mesh gives the group) and returns a DTensor, as that context does.
    """
    if distributed.is_dtensor(input):
        if process_group is not None:
            raise ValueError("process_group must be None for a DTensor input (the group is the "
                             "one of the mesh dim that shards the classes)")
        return distributed.dtensor_cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, mask=mask,
            z_loss=z_loss, softcap=softcap, return_z_loss=return_z_loss,
            return_token_accuracy=return_token_accuracy, return_lse=return_lse)
    if process_group is not None:
        return distributed.cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, mask=mask,
            z_loss=z_loss, softcap=softcap, return_z_loss=return_z_loss,
            return_token_accuracy=return_token_accuracy, return_lse=return_lse,
            process_group=process_group)
    a = _cross_entropy_args(input, target, weight, ignore_index, reduction, label_smoothing,
                            mask, z_loss, softcap, return_token_accuracy)
    loss, row_stats, extras = _softmax_ce(
        a.logits2d, a.target, a.weight, a.mask, a.ignore_index, a.label_smoothing, a.z_loss,
        a.softcap, a.reduction, inplace_backward=inplace_backward, input=a.input,
        want_accuracy=return_token_accuracy)
    return _cross_entropy_result(a, loss, row_stats, extras, return_z_loss,
                                 return_token_accuracy, return_lse)


def _cross_entropy_result(a, loss, row_stats, extras, return_z_loss, return_token_accuracy,
                          return_lse):
    """The op's outputs as cross_entropy returns them (dtype, shape, extra outputs)."""
    dtype = _loss_dtype(a.input, a.promoted)
    if loss.dtype != dtype:
        loss = loss.to(dtype)
    if a.reduction == 0:
        loss = loss.reshape(a.positions)
    return _with_extra_outputs(loss, row_stats, extras, a.positions, a.reduction == 0,
                               return_z_loss, return_token_accuracy, return_lse)


def _broadcast_to_rows(t, name, input, rows, cols, acc):
    """weight / pos_weight / mask broadcast to the input, viewed as (rows, cols) (no copy for
    the usual shapes: per-column, per-row, scalar or full)."""
    if t is None:
        return None
    _check_tensor(t, name)
    _check_device(t, name, input, "input")
    try:
        shape = torch.broadcast_shapes(t.shape, input.shape)
    except RuntimeError:
        shape = None
    if shape != input.shape:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to the input's "
                         f"shape {tuple(input.shape)}")
    if t.dtype != acc:
        t = t.to(acc)
    return t.expand(input.shape).reshape(rows, cols)


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor,
                                     weight: Optional[Tensor] = None, reduction: str = "mean",
                                     pos_weight: Optional[Tensor] = None, *,
                                     mask: Optional[Tensor] = None,
                                     label_smoothing: float = 0.0) -> Tensor:
    """Drop-in for torch.nn.functional.binary_cross_entropy_with_logits, fused in one pass.

    Beyond torch: ``mask`` (broadcasts to the input; multiplies each element's loss; ``mean``
    then divides by the mask's sum, and is 0 when that is 0) and ``label_smoothing``
    (targets become y * (1 - e) + e / 2). The target may be of any numeric or bool dtype.
    """
    red, label_smoothing = _check_loss_args(input, target, reduction, label_smoothing)
    if target.shape != input.shape:
        raise ValueError(f"Target size {tuple(target.shape)} must be the same as input size "
                         f"{tuple(input.shape)}")
    if target.is_complex():
        raise TypeError(f"target must be a real or bool tensor, got {target.dtype}")
    promoted = None
    if target.is_floating_point():
        input, target, promoted = _with_floating_target(input, target)
    else:
        target = target.to(input.dtype)
    cols = input.shape[-1] if input.dim() >= 1 else 1
    rows = input.numel() // cols if cols else (input.shape[:-1].numel())
    acc = acc_dtype(input.dtype)
    x = input.reshape(rows, cols)
    y = target.reshape(rows, cols)
    w = _broadcast_to_rows(weight, "weight", input, rows, cols, acc)
    pw = _broadcast_to_rows(pos_weight, "pos_weight", input, rows, cols, acc)
    m = _broadcast_to_rows(mask, "mask", input, rows, cols, acc)
    if _compositions_needed():
        loss = _composite.sigmoid_ce(x, y, w, pw, m, label_smoothing, red)
    else:
        compute_grad = red != 0 and torch.is_grad_enabled() and input.requires_grad
        op = _ops.current().loss_op("sigmoid_ce", x, _needs_grad(x, y, w, pw, m))
        loss, _grad = op(x, y, w, pw, m, label_smoothing, red, compute_grad)
    loss = loss.to(_loss_dtype(input, promoted))
    return loss.reshape(input.shape) if red == 0 else loss


def sparse_softmax_cross_entropy_with_logits(*, labels: Tensor, logits: Tensor) -> Tensor:
    """tf.nn.sparse_softmax_cross_entropy_with_logits: logits (..., C), labels (...) of class
    indices; returns the loss of every position, labels' shape. Labels outside [0, C) raise."""
    _check_tensor(labels, "labels")
    _check_tensor(logits, "logits")
    _check_logits_dtype(logits, "logits")
    _check_device(labels, "labels", logits, "logits")
    if logits.dim() < 1:
        raise ValueError("logits must have at least 1 dimension (classes), got a 0-d tensor")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels must have the logits' shape without the last (class) "
                         f"dimension, {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    classes = logits.shape[-1]
    if classes == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    loss, _row_stats, _extras = _softmax_ce(
        logits.reshape(-1, classes), labels.reshape(-1).to(torch.int64), None, None,
        _NO_IGNORE_INDEX, 0.0, 0.0, 0.0, 0, input=logits)
    return loss.to(_loss_dtype(logits)).reshape(labels.shape)


def sigmoid_cross_entropy_with_logits(*, labels: Tensor, logits: Tensor) -> Tensor:
    """tf.nn.sigmoid_cross_entropy_with_logits: the elementwise loss, logits' shape."""
    _check_tensor(labels, "labels")
    _check_tensor(logits, "logits")
    if labels.shape != logits.shape:
        raise ValueError(f"logits and labels must have the same shape, got logits "
                         f"{tuple(logits.shape)} and labels {tuple(labels.shape)}")
    return binary_cross_entropy_with_logits(logits, labels, reduction="none")


class _SequenceLossArgs(NamedTuple):
    rows: Tensor
    targets: Tensor
    weights: Tensor
    label_smoothing: float
    z_loss: float
    softcap: float
    batch: int
    time: int


def _sequence_loss_args(logits, targets, weights, label_smoothing, z_loss, softcap):
    """sequence_loss's checks; the operands laid out for the op."""
    for t, n in ((logits, "logits"), (targets, "targets"), (weights, "weights")):
        _check_tensor(t, n)
    _check_logits_dtype(logits, "logits")
    if logits.dim() != 3:
        raise ValueError(f"logits must be a 3-D tensor (batch, time, classes), got shape "
                         f"{tuple(logits.shape)}")
    if targets.dim() != 2:
        raise ValueError(f"targets must be a 2-D tensor (batch, time), got shape "
                         f"{tuple(targets.shape)}")
    if weights.dim() != 2:
        raise ValueError(f"weights must be a 2-D tensor (batch, time), got shape "
                         f"{tuple(weights.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:2])} (batch, time of "
                         f"the logits), got {tuple(targets.shape)}")
    if tuple(weights.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"weights must have shape {tuple(logits.shape[:2])} (batch, time of "
                         f"the logits), got {tuple(weights.shape)}")
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating tensor, got {weights.dtype}")
    _check_device(targets, "targets", logits, "logits")
    _check_device(weights, "weights", logits, "logits")
    label_smoothing = _check_fraction(label_smoothing, "label_smoothing")
    z_loss = _z_loss_value(z_loss)
    cap = _softcap_value(softcap)
    batch, time, classes = logits.shape
    if classes == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    acc = acc_dtype(logits.dtype)
    return _SequenceLossArgs(logits.reshape(batch * time, classes),
                             targets.reshape(-1).to(torch.int64), weights.reshape(-1).to(acc),
                             label_smoothing, z_loss, cap, batch, time)


def sequence_loss(logits: Tensor, targets: Tensor, weights: Tensor,
                  average_across_timesteps: bool = True, average_across_batch: bool = True, *,
                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: Optional[float] = None, return_z_loss: bool = False,
                  return_token_accuracy: bool = False, return_lse: bool = False,
                  process_group=None):
    """tf.contrib.seq2seq.sequence_loss (TF r1.4): weighted cross-entropy of logits
    (batch, time, classes) against targets (batch, time), weights (batch, time).

    Averaged across both: sum(ce * w) / (sum(w) + 1e-12), a scalar; across timesteps only:
    shape (batch,), each row divided by its own weight sum (+1e-12); across the batch only:
    shape (time,); neither: ce * w, shape (batch, time). Any ``return_*`` flag makes it return
    a CrossEntropyOutput whose z-loss part and (weighted) token accuracy are averaged the same
    way, and whose lse has shape (batch, time). ``process_group``: the logits hold this rank's
    slice of the classes, as in cross_entropy (fusedloss.distributed)."""
    if process_group is not None:
        def prepare():
            a = _sequence_loss_args(logits, targets, weights, label_smoothing, z_loss, softcap)
            distributed.refuse_unsupported(a.targets, None, a.weights, "sequence_loss")
            return a, distributed.Local(a.rows, a.targets, None, _NO_IGNORE_INDEX,
                                        return_token_accuracy)

        a, layout = distributed.agree(process_group, prepare, "sequence_loss")
        softmax_ce = functools.partial(distributed.softmax_ce, layout=layout,
                                       group=process_group)
    else:
        a = _sequence_loss_args(logits, targets, weights, label_smoothing, z_loss, softcap)
        softmax_ce = _softmax_ce
    batch, time = a.batch, a.time
    args = (a.targets, None, a.weights, _NO_IGNORE_INDEX, a.label_smoothing, a.z_loss, a.softcap)
    extra_outputs = dict(return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                         return_lse=return_lse)
    if average_across_timesteps and average_across_batch:
        loss, row_stats, extras = softmax_ce(a.rows, *args, REDUCTIONS["mean"],
                                             mean_eps=_TF_EPSILON, input=logits,
                                             want_accuracy=return_token_accuracy)
        return _with_extra_outputs(loss.to(_loss_dtype(logits)), row_stats, extras,
                                   (batch, time), False, **extra_outputs)
    weighted, row_stats, extras = softmax_ce(a.rows, *args, REDUCTIONS["none"], input=logits,
                                             want_accuracy=return_token_accuracy)
    weighted = weighted.to(_loss_dtype(logits)).reshape(batch, time)

    def average(per_position):
        w = weights.to(per_position.dtype)
        if average_across_timesteps:
            return per_position.sum(1) / (w.sum(1) + _TF_EPSILON)
        if average_across_batch:
            return per_position.sum(0) / (w.sum(0) + _TF_EPSILON)
        return per_position

    extras = torch.stack([average(e.reshape(batch, time)) for e in extras.detach()])
    return _with_extra_outputs(average(weighted), row_stats, extras, (batch, time), False,
                               **extra_outputs)
