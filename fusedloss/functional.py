"""The public loss functions: PyTorch's and TensorFlow's names, their arguments checked with
the public names (_args), the path chosen per call (_route), or the vocab-parallel paths
(parallel/) where a process group or a DTensor input asks for them."""

import functools
from typing import Optional

import torch
from torch import Tensor

from . import _args, _route
from ._args import CrossEntropyOutput, loss_in_accumulation_dtype, set_target_validation
from ._common import MEAN, NO_IGNORE_INDEX, NONE
from .parallel import cross_entropy as vocab_parallel
from .parallel import dtensor, protocol

__all__ = [
    "CrossEntropyOutput",
    "set_target_validation",
    "loss_in_accumulation_dtype",
    "cross_entropy",
    "binary_cross_entropy_with_logits",
    "sequence_loss",
    "sparse_softmax_cross_entropy_with_logits",
    "sigmoid_cross_entropy_with_logits",
]


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, mask: Optional[Tensor] = None,
                  z_loss: float = 0.0, softcap: Optional[float] = None,
                  inplace_backward: bool = False, return_z_loss: bool = False,
                  return_token_accuracy: bool = False, return_lse: bool = False,
                  return_predicted_tokens: bool = False, token_scaling: bool = False,
                  process_group=None):
    """Drop-in for torch.nn.functional.cross_entropy, fused in one pass over the logits.

    Beyond torch: ``mask`` (the target's shape; 0 = padding, multiplies each position's loss),
    ``z_loss`` (adds z_loss * logsumexp^2 per position; ``mean`` divides it by the number of
    valid positions), ``softcap`` (logits become softcap * tanh(logits / softcap)) and
    ``inplace_backward`` (the gradient is written into the logits' storage, so no N x C buffer
    is allocated; the logits must not be used after the call). A ``mean`` over no valid
    position is 0 (torch: NaN). Any ``return_*`` flag makes it return a CrossEntropyOutput;
    ``return_predicted_tokens`` adds each position's argmax (int64, -1 where not read).

    ``token_scaling`` (class-index targets; Liger-Kernel's option, from Dynamic Fine-Tuning):
    each position's whole loss (every part: smoothing and z-loss included) is multiplied by
    its target's probability p_t = softmax(z)_t, detached: the gradient is p_t times the
    unscaled one. ``mean`` still divides by the unscaled denominators.

    ``process_group`` (vocab parallel, fusedloss.parallel): the input holds this rank's
    contiguous slice of the classes (ranks in group order; uneven slices allowed), the target
    global class ids (or this slice of the class probabilities), ``weight`` the whole
    vocabulary's class weights; the result is the same on every rank and equals the loss of
    the gathered logits. Only the logits get a gradient there (target, mask and weight must not
    require grad), and inplace_backward is not used. A DTensor input sharded on the class dim
    (as ``torch.distributed.tensor.parallel.loss_parallel`` takes it) needs no process_group
    (its mesh gives the group) and returns a DTensor, as that context does.
    """
    if dtensor.is_dtensor(input):
        if process_group is not None:
            raise ValueError("process_group must be None for a DTensor input (the group is the "
                             "one of the mesh dim that shards the classes)")
        call = dtensor.unwrap(input, target, weight, mask, reduction)
        return call.rewrap(cross_entropy(
            call.input, call.target, call.weight, ignore_index, reduction, label_smoothing,
            mask=call.mask, z_loss=z_loss, softcap=softcap, return_z_loss=return_z_loss,
            return_token_accuracy=return_token_accuracy, return_lse=return_lse,
            return_predicted_tokens=return_predicted_tokens, token_scaling=token_scaling,
            process_group=call.group))
    if process_group is not None:
        return vocab_parallel.cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, mask=mask,
            z_loss=z_loss, softcap=softcap, return_z_loss=return_z_loss,
            return_token_accuracy=return_token_accuracy, return_lse=return_lse,
            return_predicted_tokens=return_predicted_tokens, token_scaling=token_scaling,
            process_group=process_group)
    a = _args.cross_entropy_args(input, target, weight, ignore_index, reduction,
                                 label_smoothing, mask, z_loss, softcap, return_token_accuracy,
                                 token_scaling=token_scaling,
                                 return_predicted_tokens=return_predicted_tokens)
    loss, row_stats, extras, predicted = _route.softmax_ce(
        a.logits2d, a.target, a.weight, a.mask, a.ignore_index, a.label_smoothing, a.z_loss,
        a.softcap, a.reduction, inplace_backward=inplace_backward, input=a.input,
        want_accuracy=return_token_accuracy, token_scaling=a.token_scaling,
        want_argmax=return_predicted_tokens)
    return _args.cross_entropy_result(a, loss, row_stats, extras, return_z_loss,
                                      return_token_accuracy, return_lse, predicted)


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
    a = _args.sigmoid_ce_args(input, target, weight, reduction, pos_weight, mask,
                              label_smoothing)
    loss = _route.sigmoid_ce(a.x, a.y, a.weight, a.pos_weight, a.mask, a.label_smoothing,
                             a.reduction, a.input)
    loss = loss.to(_args.loss_dtype(a.input, a.promoted))
    return loss.reshape(a.input.shape) if a.reduction == NONE else loss


def sparse_softmax_cross_entropy_with_logits(*, labels: Tensor, logits: Tensor) -> Tensor:
    """tf.nn.sparse_softmax_cross_entropy_with_logits: logits (..., C), labels (...) of class
    indices; returns the loss of every position, labels' shape. Labels outside [0, C) raise."""
    logits2d, labels1d = _args.sparse_softmax_args(labels, logits)
    loss, _row_stats, _extras, _argmax = _route.softmax_ce(
        logits2d, labels1d, None, None, NO_IGNORE_INDEX, 0.0, 0.0, 0.0, NONE, input=logits)
    return loss.to(_args.loss_dtype(logits)).reshape(labels.shape)


def sigmoid_cross_entropy_with_logits(*, labels: Tensor, logits: Tensor) -> Tensor:
    """tf.nn.sigmoid_cross_entropy_with_logits: the elementwise loss, logits' shape."""
    _args.sigmoid_tf_args(labels, logits)
    return binary_cross_entropy_with_logits(logits, labels, reduction="none")


def sequence_loss(logits: Tensor, targets: Tensor, weights: Tensor,
                  average_across_timesteps: bool = True, average_across_batch: bool = True, *,
                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: Optional[float] = None, return_z_loss: bool = False,
                  return_token_accuracy: bool = False, return_lse: bool = False,
                  return_predicted_tokens: bool = False, process_group=None):
    """tf.contrib.seq2seq.sequence_loss (TF r1.4): weighted cross-entropy of logits
    (batch, time, classes) against targets (batch, time), weights (batch, time).

    Averaged across both: sum(ce * w) / (sum(w) + 1e-12), a scalar; across timesteps only:
    shape (batch,), each row divided by its own weight sum (+1e-12); across the batch only:
    shape (time,); neither: ce * w, shape (batch, time). Any ``return_*`` flag makes it return
    a CrossEntropyOutput whose z-loss part and (weighted) token accuracy are averaged the same
    way, and whose lse and predicted tokens (each position's argmax, -1 where its weight is 0)
    have shape (batch, time). ``process_group``: the logits hold this rank's slice of the
    classes, as in cross_entropy (fusedloss.parallel)."""
    _args.flag_value(return_predicted_tokens, "return_predicted_tokens")
    if process_group is not None:
        def prepare():
            a = _args.sequence_loss_args(logits, targets, weights, label_smoothing, z_loss,
                                         softcap)
            protocol.refuse_unsupported(a.targets, None, a.weights, "sequence_loss")
            return a, protocol.Local(a.rows, a.targets, None, NO_IGNORE_INDEX,
                                     return_token_accuracy)

        a, layout = protocol.agree(process_group, prepare, "sequence_loss",
                                   logits.device if isinstance(logits, Tensor) else None)
        softmax_ce = functools.partial(vocab_parallel.softmax_ce, layout=layout,
                                       group=process_group)
    else:
        a = _args.sequence_loss_args(logits, targets, weights, label_smoothing, z_loss, softcap)
        softmax_ce = _route.softmax_ce
    batch, time = a.batch, a.time
    args = (a.targets, None, a.weights, NO_IGNORE_INDEX, a.label_smoothing, a.z_loss, a.softcap)
    extra_outputs = dict(return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                         return_lse=return_lse)
    outputs = dict(input=logits, want_accuracy=return_token_accuracy,
                   want_argmax=return_predicted_tokens)
    if average_across_timesteps and average_across_batch:
        loss, row_stats, extras, predicted = softmax_ce(a.rows, *args, MEAN,
                                                        mean_eps=_args.TF_EPSILON, **outputs)
        return _args.with_extra_outputs(loss.to(_args.loss_dtype(logits)), row_stats, extras,
                                        (batch, time), False, **extra_outputs,
                                        predicted=predicted)
    weighted, row_stats, extras, predicted = softmax_ce(a.rows, *args, NONE, **outputs)
    weighted = weighted.to(_args.loss_dtype(logits)).reshape(batch, time)

    def average(per_position):
        w = weights.to(per_position.dtype)
        if average_across_timesteps:
            return per_position.sum(1) / (w.sum(1) + _args.TF_EPSILON)
        if average_across_batch:
            return per_position.sum(0) / (w.sum(0) + _args.TF_EPSILON)
        return per_position

    extras = torch.stack([average(e.reshape(batch, time)) for e in extras.detach()])
    return _args.with_extra_outputs(average(weighted), row_stats, extras, (batch, time), False,
                                    **extra_outputs, predicted=predicted)
