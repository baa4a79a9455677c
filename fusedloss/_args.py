"""Argument checks with the public names, the kernels' (rows, classes) layout, and result
shaping (dtype, shape, CrossEntropyOutput): what every public loss function, the fused linear
cross-entropy and the vocab-parallel paths share. Errors name the argument and its value."""

import contextlib
import os
import threading
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._common import (NO_IGNORE_INDEX, NONE, REDUCTIONS, acc_dtype, auto_chunk_rows,
                      compute_dtype)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


TF_EPSILON = 1e-12  # sequence_loss divides by sum(weights) + 1e-12, as TF r1.4 does


_validate_targets = os.environ.get("FUSEDLOSS_VALIDATE_TARGETS", "0") not in ("", "0")


class CrossEntropyOutput(NamedTuple):
    """What cross_entropy returns when any ``return_*`` is set (None where not asked).

    loss: the loss, as without the flags. z_loss: its z-loss part (per position for
    reduction="none"). token_accuracy: the share of valid positions whose argmax is the target
    (mask-weighted; per position 0/mask for "none"). lse: logsumexp of each position's
    (softcapped) logits, the target's shape; 0 at padded and ignored positions, which are not
    read. These three are float32 (float64 for float64 logits). predicted_tokens: each
    position's argmax over the classes of the (softcapped) logits (the first maximum, as
    torch.argmax), int64, the target's shape; -1 at padded and ignored positions. All are
    computed in the same pass over the logits and carry no gradient."""

    loss: Tensor
    z_loss: Optional[Tensor] = None
    token_accuracy: Optional[Tensor] = None
    lse: Optional[Tensor] = None
    predicted_tokens: Optional[Tensor] = None


def set_target_validation(enabled: bool) -> None:
    """Check class-index targets eagerly on every device (default: off; also set by the
    environment variable FUSEDLOSS_VALIDATE_TARGETS=1).

    On the CPU, targets are always checked. On CUDA the kernel never reads out of bounds but
    only marks a bad target's row NaN, because raising needs the host to wait for the device;
    with validation on, a bad target raises an IndexError naming its value (one
    synchronisation per call)."""
    global _validate_targets
    _validate_targets = bool(enabled)


def targets_validated():
    """Whether set_target_validation (or FUSEDLOSS_VALIDATE_TARGETS) turned validation on."""
    return _validate_targets


def check_targets_eagerly(target, classes, ignore_index):
    bad = ((target < 0) | (target >= classes)) & (target != ignore_index)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"target {int(target[i])} at position {i} is out of bounds for {classes} "
                         f"classes (expected 0 <= target < {classes}, or "
                         f"ignore_index={ignore_index})")


def check_tensor(x, name):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")


def check_logits_dtype(x, name):
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_device(x, name, ref, ref_name):
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def reduction_code(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return REDUCTIONS[reduction]


def check_fraction(value, name):
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0.0 and 1.0, got {value}")
    return value


def softcap_value(softcap):
    if softcap is None:
        return 0.0
    softcap = float(softcap)
    if not softcap > 0.0 or softcap == float("inf"):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    return softcap


def check_loss_args(input, target, reduction, label_smoothing):
    """The checks every loss shares; returns (reduction code, label_smoothing)."""
    check_tensor(input, "input")
    check_tensor(target, "target")
    check_logits_dtype(input, "input")
    check_device(target, "target", input, "input")
    return reduction_code(reduction), check_fraction(label_smoothing, "label_smoothing")


def flag_value(value, name):
    """A boolean option: a bool, nothing else (a truthy string or tensor is refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_token_scaling(token_scaling, prob_target):
    """token_scaling's value; it scales by the target class's probability, so it needs class
    indices."""
    if flag_value(token_scaling, "token_scaling") and prob_target:
        raise ValueError("token_scaling=True needs class-index targets (it scales each "
                         "position by its target class's probability), got a probability "
                         "target")
    return token_scaling


def z_loss_value(z_loss):
    z_loss = float(z_loss)
    if not z_loss >= 0.0 or z_loss == float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    return z_loss


def row_vector(t, name, shape, acc, ref):
    """mask of the positions' shape -> flat vector in the accumulation dtype."""
    if t is None:
        return None
    check_tensor(t, name)
    check_device(t, name, ref, "input")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have the target's shape {tuple(shape)}, "
                         f"got {tuple(t.shape)}")
    if t.is_complex():
        raise TypeError(f"{name} must be a bool, integer or floating tensor, got {t.dtype}")
    return t.reshape(-1).to(acc)


def class_indices(target, positions, input):
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


def class_weight(weight, classes, acc, ref):
    if weight is None:
        return None
    check_tensor(weight, "weight")
    check_device(weight, "weight", ref, "input")
    if weight.dim() != 1 or weight.shape[0] != classes:
        raise ValueError(f"weight must have shape ({classes},) (one weight per class), "
                         f"got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    return weight.to(acc)


def rows_of(input):
    """(input as (rows, classes) with the class dim last, positions' shape)."""
    if input.dim() == 1:
        return input.unsqueeze(0), ()
    if input.dim() == 2:
        return input, (input.shape[0],)
    positions = (input.shape[0],) + tuple(input.shape[2:])
    return input.movedim(1, -1).reshape(-1, input.shape[1]), positions


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


def loss_dtype(input, promoted=None):
    """PyTorch's dtype for a loss of `input`: the input's (promoted with a floating target's),
    except under torch.autocast, whose policy runs the losses in float32 (16-bit logits are
    still read in place), and within loss_in_accumulation_dtype()."""
    if (torch.is_autocast_enabled(input.device.type)
            or getattr(_accumulation_dtype_loss, "on", False)):
        return acc_dtype(input.dtype)
    return input.dtype if promoted is None else promoted


def with_floating_target(input, target):
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


def with_extra_outputs(loss, row_stats, extras, positions, per_position, return_z_loss,
                       return_token_accuracy, return_lse, predicted=None):
    """loss alone, or CrossEntropyOutput with what was asked for; `predicted`: each row's
    argmax when return_predicted_tokens asked for it, else None."""
    if not (return_z_loss or return_token_accuracy or return_lse or predicted is not None):
        return loss
    extras = extras.detach()
    if per_position:
        extras = extras.reshape((2,) + tuple(positions))
    lse = (row_stats[:, 0] + row_stats[:, 1]).detach().reshape(positions) if return_lse else None
    return CrossEntropyOutput(loss, extras[0] if return_z_loss else None,
                              extras[1] if return_token_accuracy else None, lse,
                              None if predicted is None else predicted.reshape(positions))


class CrossEntropyArgs(NamedTuple):
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
    token_scaling: bool = False


def cross_entropy_args(input, target, weight, ignore_index, reduction, label_smoothing, mask,
                       z_loss, softcap, return_token_accuracy, weight_classes=None,
                       token_scaling=False, return_predicted_tokens=False):
    """Checks cross_entropy's arguments (errors name the argument and value). weight_classes:
    the length the class weight must have (default: the input's classes; the vocab-parallel
    path checks the whole vocabulary's length across ranks instead and passes 0)."""
    red, label_smoothing = check_loss_args(input, target, reduction, label_smoothing)
    flag_value(return_predicted_tokens, "return_predicted_tokens")
    z_loss = z_loss_value(z_loss)
    cap = softcap_value(softcap)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (classes), got a 0-d tensor")
    classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if classes == 0:
        raise ValueError(f"input must have at least one class, got shape {tuple(input.shape)}")
    promoted = None
    if target.is_floating_point() and target.shape == input.shape:
        input, target, promoted = with_floating_target(input, target)
    logits2d, positions = rows_of(input)
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
        target2d, _ = rows_of(target)
        ignore_index = NO_IGNORE_INDEX
    else:
        target2d = class_indices(target, positions, input)
    if weight_classes == 0 and weight is not None:  # any length here; checked across ranks
        check_tensor(weight, "weight")
        if weight.dim() != 1:
            raise ValueError(f"weight must be 1-D (one weight per class of the whole "
                             f"vocabulary), got shape {tuple(weight.shape)}")
        weight_classes = weight.shape[0]
    w = class_weight(weight, classes if weight_classes is None else weight_classes, acc, input)
    m = row_vector(mask, "mask", positions, acc, input)
    token_scaling = check_token_scaling(token_scaling, target.is_floating_point())
    return CrossEntropyArgs(input, logits2d, positions, target2d, w, m, int(ignore_index), red,
                            label_smoothing, z_loss, cap, promoted, token_scaling)


def cross_entropy_result(a, loss, row_stats, extras, return_z_loss, return_token_accuracy,
                         return_lse, predicted=None):
    """The op's outputs as cross_entropy returns them (dtype, shape, extra outputs)."""
    dtype = loss_dtype(a.input, a.promoted)
    if loss.dtype != dtype:
        loss = loss.to(dtype)
    if a.reduction == 0:
        loss = loss.reshape(a.positions)
    return with_extra_outputs(loss, row_stats, extras, a.positions, a.reduction == 0,
                              return_z_loss, return_token_accuracy, return_lse, predicted)


def broadcast_to_rows(t, name, input, rows, cols, acc):
    """weight / pos_weight / mask broadcast to the input, viewed as (rows, cols) (no copy for
    the usual shapes: per-column, per-row, scalar or full)."""
    if t is None:
        return None
    check_tensor(t, name)
    check_device(t, name, input, "input")
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


class SequenceLossArgs(NamedTuple):
    rows: Tensor
    targets: Tensor
    weights: Tensor
    label_smoothing: float
    z_loss: float
    softcap: float
    batch: int
    time: int


def sequence_loss_args(logits, targets, weights, label_smoothing, z_loss, softcap):
    """sequence_loss's checks; the operands laid out for the op."""
    for t, n in ((logits, "logits"), (targets, "targets"), (weights, "weights")):
        check_tensor(t, n)
    check_logits_dtype(logits, "logits")
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
    check_device(targets, "targets", logits, "logits")
    check_device(weights, "weights", logits, "logits")
    label_smoothing = check_fraction(label_smoothing, "label_smoothing")
    z_loss = z_loss_value(z_loss)
    cap = softcap_value(softcap)
    batch, time, classes = logits.shape
    if classes == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    acc = acc_dtype(logits.dtype)
    return SequenceLossArgs(logits.reshape(batch * time, classes),
                            targets.reshape(-1).to(torch.int64), weights.reshape(-1).to(acc),
                            label_smoothing, z_loss, cap, batch, time)


# ---- linear_cross_entropy ----


def check_matrix_operand(t, name, input, shape):
    check_tensor(t, name)
    check_device(t, name, input, "input")
    if t.dtype != input.dtype:
        raise TypeError(f"{name} must have the input's dtype {input.dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_no_grad(t, name, function="linear_cross_entropy", on_logits="cross_entropy"):
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{function} does not differentiate with respect to {name}, "
                           f"which requires grad: pass {name}.detach(), or use "
                           f"fusedloss.{on_logits} on the logits")


def chunk_size_value(chunk_size, rows, hidden, classes, dtype, device):
    if chunk_size is None:
        return auto_chunk_rows(rows, hidden, classes, compute_dtype(dtype, device))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1 (rows per chunk), "
                         f"got {chunk_size!r}")
    return chunk_size


class LinearCrossEntropyArgs(NamedTuple):
    """linear_cross_entropy's arguments checked and laid out: x (rows, hidden), target (rows,)
    or (rows, classes), class weight and mask in the accumulation dtype."""

    x: Tensor
    target: Tensor
    weight: Optional[Tensor]
    mask: Optional[Tensor]
    ignore_index: int
    reduction: int
    label_smoothing: float
    z_loss: float
    softcap: float
    chunk_rows: Optional[int]
    positions: tuple
    token_scaling: bool = False


def linear_ce_args(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                   label_smoothing, mask, z_loss, softcap, chunk_size, return_token_accuracy,
                   vocab_parallel=False, token_scaling=False, return_predicted_tokens=False):
    """The checks (errors name the argument and value). vocab_parallel: the class weight may
    have any length here (the whole vocabulary's, checked across ranks), and chunk_rows stays
    None when chunk_size is None (the ranks agree on it from every slice's size)."""
    red, label_smoothing = check_loss_args(input, target, reduction, label_smoothing)
    flag_value(return_predicted_tokens, "return_predicted_tokens")
    z_loss = z_loss_value(z_loss)
    cap = softcap_value(softcap)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (in_features), got a 0-d tensor")
    check_tensor(linear_weight, "linear_weight")
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must be 2-D (classes, in_features), got shape "
                         f"{tuple(linear_weight.shape)}")
    classes, hidden = linear_weight.shape
    check_matrix_operand(linear_weight, "linear_weight", input, (classes, input.shape[-1]))
    if classes == 0:
        raise ValueError(f"linear_weight must have at least one class (row), got shape "
                         f"{tuple(linear_weight.shape)}")
    if linear_bias is not None:
        check_matrix_operand(linear_bias, "linear_bias", input, (classes,))
    positions = tuple(input.shape[:-1])
    acc = acc_dtype(input.dtype)
    x = input.reshape(-1, hidden)
    if target.is_floating_point():  # class probabilities
        if tuple(target.shape) != positions + (classes,):
            raise ValueError(f"probability target must have shape {positions + (classes,)} "
                             f"(the logits' shape), got {tuple(target.shape)}")
        if return_token_accuracy:
            raise ValueError("return_token_accuracy needs class-index targets, got class "
                             "probabilities")
        t = target.reshape(-1, classes)
        ignore_index = NO_IGNORE_INDEX
    else:
        t = class_indices(target, positions, input)
        if _validate_targets and not torch.compiler.is_compiling() and not vocab_parallel:
            check_targets_eagerly(t, classes, ignore_index)
    for tensor, name in ((target, "target"), (mask, "mask"), (weight, "weight")):
        check_no_grad(tensor, name)
    if vocab_parallel and weight is not None:
        check_tensor(weight, "weight")
        if weight.dim() != 1:
            raise ValueError(f"weight must be 1-D (one weight per class of the whole "
                             f"vocabulary), got shape {tuple(weight.shape)}")
    w = class_weight(weight, weight.shape[0] if vocab_parallel and weight is not None
                     else classes, acc, input)
    m = row_vector(mask, "mask", positions, acc, input)
    if vocab_parallel and chunk_size is None:
        chunk = None
    else:
        chunk = chunk_size_value(chunk_size, x.shape[0], hidden, classes, input.dtype,
                                 input.device)
    token_scaling = check_token_scaling(token_scaling, target.is_floating_point())
    return LinearCrossEntropyArgs(x, t, w, m, int(ignore_index), red, label_smoothing, z_loss,
                                  cap, chunk, positions, token_scaling)


def linear_ce_result(a, input, loss, extras, return_z_loss, return_token_accuracy,
                     predicted=None):
    """The op's outputs as linear_cross_entropy returns them; `predicted`: each row's argmax
    when return_predicted_tokens asked for it, else None."""
    red, positions = a.reduction, a.positions
    per_position = red == NONE
    loss = loss.to(loss_dtype(input))
    if per_position:
        loss = loss.reshape(positions)
    if not (return_z_loss or return_token_accuracy or predicted is not None):
        return loss
    extras = extras.detach()
    if per_position:
        extras = extras.reshape((2,) + positions)
    return CrossEntropyOutput(loss, extras[0] if return_z_loss else None,
                              extras[1] if return_token_accuracy else None, None,
                              None if predicted is None else predicted.reshape(positions))


# ---- binary_cross_entropy_with_logits and the TensorFlow names ----

class SigmoidCrossEntropyArgs(NamedTuple):
    """binary_cross_entropy_with_logits's arguments laid out for the op: (rows, cols) views of
    the input and target; weight, pos_weight and mask broadcast to them in the accumulation
    dtype."""

    input: Tensor
    x: Tensor
    y: Tensor
    weight: Optional[Tensor]
    pos_weight: Optional[Tensor]
    mask: Optional[Tensor]
    label_smoothing: float
    reduction: int
    promoted: Optional[torch.dtype]


def sigmoid_ce_args(input, target, weight, reduction, pos_weight, mask, label_smoothing):
    """binary_cross_entropy_with_logits's checks; the operands laid out for the op."""
    red, label_smoothing = check_loss_args(input, target, reduction, label_smoothing)
    if target.shape != input.shape:
        raise ValueError(f"Target size {tuple(target.shape)} must be the same as input size "
                         f"{tuple(input.shape)}")
    if target.is_complex():
        raise TypeError(f"target must be a real or bool tensor, got {target.dtype}")
    promoted = None
    if target.is_floating_point():
        input, target, promoted = with_floating_target(input, target)
    else:
        target = target.to(input.dtype)
    cols = input.shape[-1] if input.dim() >= 1 else 1
    rows = input.numel() // cols if cols else (input.shape[:-1].numel())
    acc = acc_dtype(input.dtype)
    return SigmoidCrossEntropyArgs(
        input, input.reshape(rows, cols), target.reshape(rows, cols),
        broadcast_to_rows(weight, "weight", input, rows, cols, acc),
        broadcast_to_rows(pos_weight, "pos_weight", input, rows, cols, acc),
        broadcast_to_rows(mask, "mask", input, rows, cols, acc), label_smoothing, red, promoted)


def sparse_softmax_args(labels, logits):
    """tf.nn.sparse_softmax_cross_entropy_with_logits's checks: (logits (rows, classes),
    labels (rows,) int64)."""
    check_tensor(labels, "labels")
    check_tensor(logits, "logits")
    check_logits_dtype(logits, "logits")
    check_device(labels, "labels", logits, "logits")
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
    return logits.reshape(-1, classes), labels.reshape(-1).to(torch.int64)


def sigmoid_tf_args(labels, logits):
    """tf.nn.sigmoid_cross_entropy_with_logits's checks."""
    check_tensor(labels, "labels")
    check_tensor(logits, "logits")
    if labels.shape != logits.shape:
        raise ValueError(f"logits and labels must have the same shape, got logits "
                         f"{tuple(logits.shape)} and labels {tuple(labels.shape)}")


# ---- the distillation losses ----

DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2


class DistillationArgs(NamedTuple):
    """distillation_loss's arguments, checked: the logits as (rows, classes) (teacher: (rows,
    K) for a sparse teacher), flat target, indices and mask (accumulation dtype), and the
    options as the op takes them (jsd at beta 0 or 1 is the KL it equals)."""

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
    positions: tuple


def distillation_options(divergence, temperature, beta, hard_weight, target, sparse):
    """(divergence code, temperature, beta, hard_weight), checked with the public names."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be 'forward_kl', 'reverse_kl' or 'jsd', got "
                         f"{divergence!r}")
    if sparse and divergence != "forward_kl":
        raise ValueError(f"a sparse teacher (teacher_indices) is defined for "
                         f"divergence='forward_kl' only, got divergence={divergence!r}")
    temperature = float(temperature)
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    beta = check_fraction(beta, "beta")
    hard_weight = check_fraction(hard_weight, "hard_weight")
    if hard_weight > 0 and target is None:
        raise ValueError(f"hard_weight={hard_weight} needs a target (the hard labels), got "
                         f"target=None")
    code = DIVERGENCES[divergence]
    if code == JSD and beta in (0.0, 1.0):  # the generalised JSD's ends: the two KLs
        code = FORWARD_KL if beta == 0.0 else REVERSE_KL
    return code, temperature, beta, hard_weight


def distillation_logits(student_logits, teacher_logits, teacher_indices):
    """(student (rows, C), teacher (rows, C or K), indices (rows, K) or None, positions)."""
    check_tensor(student_logits, "student_logits")
    check_tensor(teacher_logits, "teacher_logits")
    check_logits_dtype(student_logits, "student_logits")
    check_logits_dtype(teacher_logits, "teacher_logits")
    check_device(teacher_logits, "teacher_logits", student_logits, "student_logits")
    if student_logits.dim() == 0:
        raise ValueError("student_logits must have at least 1 dimension (classes), got a 0-d "
                         "tensor")
    positions = tuple(student_logits.shape[:-1])
    classes = student_logits.shape[-1]
    if classes == 0:
        raise ValueError(f"student_logits must have at least one class, got shape "
                         f"{tuple(student_logits.shape)}")
    if teacher_indices is None:
        if tuple(teacher_logits.shape) != tuple(student_logits.shape):
            raise ValueError(f"teacher_logits must have the student_logits' shape "
                             f"{tuple(student_logits.shape)}, got "
                             f"{tuple(teacher_logits.shape)}")
        indices = None
    else:
        check_tensor(teacher_indices, "teacher_indices")
        check_device(teacher_indices, "teacher_indices", student_logits, "student_logits")
        if teacher_indices.is_floating_point() or teacher_indices.dtype == torch.bool:
            raise TypeError(f"teacher_indices must be an integer tensor, got "
                            f"{teacher_indices.dtype}")
        if (teacher_indices.dim() != len(positions) + 1
                or tuple(teacher_indices.shape[:-1]) != positions
                or tuple(teacher_logits.shape) != tuple(teacher_indices.shape)):
            raise ValueError(f"teacher_indices and teacher_logits must both have shape "
                             f"{positions + ('K',)} (the student's positions, K classes), got "
                             f"{tuple(teacher_indices.shape)} and "
                             f"{tuple(teacher_logits.shape)}")
        if teacher_indices.shape[-1] == 0 and student_logits.numel() > 0:
            raise ValueError("a sparse teacher needs at least one class per position (K >= 1)")
        indices = teacher_indices.reshape(-1, teacher_indices.shape[-1]).to(torch.int64)
    student = student_logits.reshape(-1, classes)
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    # float64 pairs with float64 only (one accumulation dtype): the other side is widened
    if (student.dtype == torch.float64) != (teacher.dtype == torch.float64):
        student, teacher = student.to(torch.float64), teacher.to(torch.float64)
    return student, teacher, indices, positions


def check_teacher_indices(indices, classes):
    """Indices in [0, classes) and no class twice in a row (eagerly: reads the values)."""
    if indices.numel() == 0:
        return
    bad = (indices < 0) | (indices >= classes)
    if bool(bad.any()):
        r, k = (int(i) for i in bad.nonzero()[0])
        raise IndexError(f"teacher_indices[{r}, {k}] = {int(indices[r, k])} is out of bounds "
                         f"for {classes} classes")
    ordered = indices.sort(dim=1).values
    repeats = ordered[:, 1:] == ordered[:, :-1]
    if bool(repeats.any()):
        r, k = (int(i) for i in repeats.nonzero()[0])
        raise IndexError(f"teacher_indices row {r} repeats class {int(ordered[r, k])}")


def distillation_args(student_logits, teacher_logits, target, divergence, temperature, beta,
                      hard_weight, ignore_index, mask, reduction, teacher_indices):
    red = reduction_code(reduction)
    code, temperature, beta, hard_weight = distillation_options(
        divergence, temperature, beta, hard_weight, target, teacher_indices is not None)
    student, teacher, indices, positions = distillation_logits(student_logits, teacher_logits,
                                                               teacher_indices)
    classes = student.shape[1]
    t = None
    if target is not None:
        check_tensor(target, "target")
        check_device(target, "target", student_logits, "student_logits")
        t = class_indices(target, positions, student_logits)
    if indices is not None and not torch.compiler.is_compiling() and (
            student.device.type == "cpu" or _validate_targets):
        check_teacher_indices(indices, classes)
    if (t is not None and hard_weight > 0 and _validate_targets
            and not torch.compiler.is_compiling()):
        check_targets_eagerly(t, classes, ignore_index)
    m = row_vector(mask, "mask", positions, acc_dtype(student.dtype), student_logits)
    return DistillationArgs(student, teacher, indices, t, m, code, temperature, beta,
                            hard_weight, int(ignore_index), red, positions)


def distillation_result(a, loss):
    """The loss per position (none) in the positions' shape, else the scalar."""
    return loss.reshape(a.positions) if a.reduction == NONE else loss


class LinearDistillationArgs(NamedTuple):
    """linear_distillation_loss's arguments, checked: both inputs as (rows, hidden), the flat
    target and mask, the options as the op takes them, the rows per chunk."""

    xs: Tensor
    xt: Tensor
    target: Optional[Tensor]
    mask: Optional[Tensor]
    divergence: int
    temperature: float
    beta: float
    hard_weight: float
    ignore_index: int
    reduction: int
    chunk_rows: int
    positions: tuple


def linear_head(input, weight, bias, side):
    """(input as (rows, hidden), classes) of one model's head; errors name `side`'s arguments."""
    names = (f"{side}_input", f"{side}_weight", f"{side}_bias")
    check_tensor(input, names[0])
    check_logits_dtype(input, names[0])
    if input.dim() == 0:
        raise ValueError(f"{names[0]} must have at least 1 dimension (hidden), got a 0-d tensor")
    check_tensor(weight, names[1])
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{names[1]} must be 2-D (classes, hidden) with at least one class, "
                         f"got shape {tuple(weight.shape)}")
    for t, name, shape in ((weight, names[1], (weight.shape[0], input.shape[-1])),
                           (bias, names[2], (weight.shape[0],))):
        if t is None:
            continue
        check_tensor(t, name)
        check_device(t, name, input, names[0])
        if t.dtype != input.dtype:
            raise TypeError(f"{name} must have {names[0]}'s dtype {input.dtype}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return input.reshape(-1, input.shape[-1]), weight.shape[0]


def linear_distillation_args(student_input, student_weight, student_bias, teacher_input,
                             teacher_weight, teacher_bias, target, chunk_size, divergence,
                             temperature, beta, hard_weight, ignore_index, mask, reduction):
    red = reduction_code(reduction)
    code, temperature, beta, hard_weight = distillation_options(
        divergence, temperature, beta, hard_weight, target, False)
    xs, classes = linear_head(student_input, student_weight, student_bias, "student")
    xt, teacher_classes = linear_head(teacher_input, teacher_weight, teacher_bias, "teacher")
    check_device(teacher_input, "teacher_input", student_input, "student_input")
    positions = tuple(student_input.shape[:-1])
    if tuple(teacher_input.shape[:-1]) != positions:
        raise ValueError(f"teacher_input must have the student_input's positions {positions} "
                         f"(hidden sizes may differ), got shape {tuple(teacher_input.shape)}")
    if teacher_classes != classes:
        raise ValueError(f"teacher_weight has {teacher_classes} classes, student_weight "
                         f"{classes}: the two heads must predict the same classes")
    t = None
    if target is not None:
        check_tensor(target, "target")
        check_device(target, "target", student_input, "student_input")
        t = class_indices(target, positions, student_input)
        if hard_weight > 0 and _validate_targets and not torch.compiler.is_compiling():
            check_targets_eagerly(t, classes, ignore_index)
    check_no_grad(mask, "mask", "linear_distillation_loss", "distillation_loss")
    acc = torch.float64 if torch.float64 in (student_input.dtype, teacher_input.dtype) \
        else torch.float32
    m = row_vector(mask, "mask", positions, acc, student_input)
    hidden = max(xs.shape[1], xt.shape[1])
    chunk = chunk_size_value(chunk_size, xs.shape[0], hidden, classes, student_input.dtype,
                             student_input.device)
    return LinearDistillationArgs(xs, xt, t, m, code, temperature, beta, hard_weight,
                                  int(ignore_index), red, chunk, positions)
