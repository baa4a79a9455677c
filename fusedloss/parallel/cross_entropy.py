"""Vocab-parallel softmax cross-entropy: every rank gets the loss of the whole row, as
fusedloss.cross_entropy on the gathered logits would give it.

Per call, on every rank:

1. The header exchange (protocol.agree): every rank checks every rank's arguments, and the
   slice offsets come from the same header.
2. Read 1 of the slice: ``softmax_ce_shard_stats`` reduces each row of the slice once to
   (max m_r, log-sum-exp ls_r about m_r, the slice's part of the loss, the slice's correct flag,
   the slice's target mass Q_r).
3. ONE all_gather of that payload, 3 to 5 values per row in the accumulation dtype: 12 bytes per
   row per rank for float32/bfloat16 logits (16 with token accuracy, 16 with probability
   targets), against Megatron's three all-reduces of 4 bytes per row (max, target logit,
   sum of exp; an all-reduce moves each byte about twice) and flash-attention's all_gather of
   the 4-byte lse per row plus an all-reduce of the loss.
4. The combine (combine.combine): every rank adds the gathered parts in rank order in float64,
   so the result is bitwise identical on every rank and from run to run. The mean's
   denominators and every sum stay on the device (no host synchronisation).
5. Read 2 of the slice (only when the logits need a gradient): ``softmax_ce_backward`` with the
   global row statistics writes the slice's gradient, pre-scaled for the reduction, and the
   backward hands it over (_handover.py), with no communication. reduction="none" instead
   recomputes it in the backward from the saved global statistics (also without
   communication).

Predicted tokens (return_predicted_tokens) take a read of the slice of their own and one more
all_gather of (rows, 2) per rank (combine.slice_argmax / combine_argmax), only when asked for.

Not here: gradients with respect to a probability target, a mask or class weights through the
distributed path (a clear error says so), double backward (a clear error), inplace_backward
(ignored: the slice's gradient is written to its own buffer), token_scaling (a clear error).
"""

import torch

from .. import _args, _handover, _ops
from .._common import NONE, acc_dtype
from .combine import (Options, combine, combine_argmax, mean_denominators, reduce_rows,
                      shard_payload, slice_argmax, slice_grad)
from .protocol import Local, agree, all_gather, refuse_token_scaling, refuse_unsupported

_DOUBLE_BACKWARD = (
    "fusedloss: double backward (create_graph=True) through the distributed cross_entropy "
    "(process_group=...) is not supported: its gradient comes from the fused kernel with the "
    "combined row statistics and is not itself differentiable.")


class VocabParallelCE(torch.autograd.Function):
    """The collectives live in the forward; the backward is local (the pre-scaled gradient
    handed over, or for reduction none the gradient recomputed from the saved global
    statistics)."""

    @staticmethod
    def forward(ctx, logits2d, target, weight, mask, options, layout, group, want_accuracy,
                compute_grad, want_argmax):
        lib = _ops.current().lib
        o = options
        acc = acc_dtype(logits2d.dtype)
        rows = logits2d.shape[0]
        payload, _ = shard_payload(lib, logits2d, target, weight, mask, o.ignore_index,
                                   o.label_smoothing, o.softcap, layout, want_accuracy)
        gathered = all_gather(payload, group)
        c = combine(gathered, layout, target, weight, mask, o.ignore_index, o.label_smoothing,
                    o.z_loss, want_accuracy)
        per_row = o.reduction == NONE
        denominators = (None if per_row else
                        mean_denominators(target, weight, mask, o.ignore_index, rows, o.mean_eps,
                                          logits2d.device))
        loss, extras = reduce_rows(c, o.reduction, denominators, acc)
        argmax = None
        if want_argmax:
            argmax = combine_argmax(
                all_gather(slice_argmax(logits2d.detach(), o.softcap, layout.offset), group),
                target, mask, o.ignore_index)
        stats = c.stats.to(acc)
        target_mass = c.target_mass.to(acc) if c.target_mass is not None else None

        ctx.options, ctx.layout = options, layout
        ctx.save_for_backward(logits2d, target, weight, mask, stats, target_mass, denominators)
        if _handover.defers(logits2d.dtype):
            _handover.defer(ctx)
        elif not per_row and compute_grad:
            one = torch.ones((), dtype=acc, device=logits2d.device)
            _handover.keep(ctx, slice_grad(lib, one, logits2d, target, weight, mask, stats,
                                           target_mass, denominators, options, layout))
        else:
            _handover.keep(ctx)
        ctx.mark_non_differentiable(stats, extras)
        if argmax is not None:
            ctx.mark_non_differentiable(argmax)
        ctx.set_materialize_grads(False)
        return loss, stats, extras, argmax

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_extras, _grad_argmax):
        nones = (None,) * 9
        if grad_loss is None:
            return (None,) + nones
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        lib = _ops.current().lib
        logits2d, target, weight, mask, stats, target_mass, denominators = ctx.saved_tensors
        if ctx.options.reduction == NONE:
            grad = slice_grad(lib, grad_loss.to(stats.dtype), logits2d, target, weight, mask,
                              stats, target_mass, None, ctx.options, ctx.layout)
            return (grad,) + nones

        def write(scale):  # the slice's gradient times `scale`, written once
            return (slice_grad(lib, scale.to(stats.dtype), logits2d, target, weight, mask,
                               stats, target_mass, denominators, ctx.options, ctx.layout),)

        # a second backward (retain_graph=True): the same kernel, the same bits
        (grad,) = _handover.take(ctx, lib, grad_loss,
                                 lambda: write(torch.ones((), device=logits2d.device)), write)
        return (grad,) + nones


@torch.compiler.disable  # collectives and a host read of the header: run eagerly
def softmax_ce(logits2d, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap,
               reduction, mean_eps=0.0, inplace_backward=False, input=None, want_accuracy=False,
               token_scaling=False, want_argmax=False, *, layout, group):
    """_route.softmax_ce's counterpart (same arguments and outputs), once agree() has made
    the layout: logits2d (rows, local classes) is this rank's slice, target (rows,) global
    class ids or (rows, local classes) this slice of the probabilities, weight the whole
    vocabulary's. Returns (loss in the accumulation dtype, the global row statistics, extras,
    argmax or None), identical on every rank. inplace_backward is not used (see the module
    docstring); token_scaling is refused before any collective (refuse_token_scaling)."""
    del inplace_backward, input
    assert not token_scaling, "refused by protocol.refuse_token_scaling"
    options = Options(int(ignore_index), float(label_smoothing), float(z_loss), float(softcap),
                      int(reduction), float(mean_eps))
    compute_grad = torch.is_grad_enabled() and logits2d.requires_grad
    return VocabParallelCE.apply(logits2d, target, weight, mask, options, layout, group,
                                 bool(want_accuracy), compute_grad, bool(want_argmax))


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, *, mask=None, z_loss=0.0, softcap=None,
                  return_z_loss=False, return_token_accuracy=False, return_lse=False,
                  return_predicted_tokens=False, token_scaling=False, process_group):
    """fusedloss.cross_entropy(..., process_group=...) (see its docstring)."""

    def prepare():
        a = _args.cross_entropy_args(input, target, weight, ignore_index, reduction,
                                     label_smoothing, mask, z_loss, softcap,
                                     return_token_accuracy, weight_classes=0,
                                     token_scaling=token_scaling,
                                     return_predicted_tokens=return_predicted_tokens)
        refuse_unsupported(a.target, a.weight, a.mask, "cross_entropy")
        refuse_token_scaling(a.token_scaling, "cross_entropy")
        return a, Local(a.logits2d, a.target, a.weight, a.ignore_index, return_token_accuracy)

    a, layout = agree(process_group, prepare, "cross_entropy",
                      input.device if isinstance(input, torch.Tensor) else None)
    loss, row_stats, extras, predicted = softmax_ce(
        a.logits2d, a.target, a.weight, a.mask, a.ignore_index, a.label_smoothing, a.z_loss,
        a.softcap, a.reduction, want_accuracy=return_token_accuracy,
        want_argmax=return_predicted_tokens, layout=layout, group=process_group)
    return _args.cross_entropy_result(a, loss, row_stats, extras, return_z_loss,
                                      return_token_accuracy, return_lse, predicted)
