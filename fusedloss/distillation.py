"""Distillation losses: a student's logits learn a teacher's softened distribution (forward or
reverse KL, or the generalised Jensen-Shannon divergence, at a temperature), optionally mixed
with the hard-label cross-entropy, in one pass over both models' logits (the distill op,
csrc/common/distill.h). ``linear_distillation_loss`` is the same loss of two linear heads,
computed in chunks of rows so that neither model's (N, V) logits exist whole.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _args, _composite, _handover, _ops, _route
from ._common import MEAN, NONE, acc_dtype, compute_dtype, valid_mask_sum
from ._fake import DISTILL_STATS
from .parallel import distillation as vocab_parallel

__all__ = ["distillation_loss", "linear_distillation_loss"]


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor,
                      target: Optional[Tensor] = None, *, divergence: str = "forward_kl",
                      temperature: float = 1.0, beta: float = 0.5, hard_weight: float = 0.0,
                      ignore_index: int = -100, mask: Optional[Tensor] = None,
                      reduction: str = "mean", teacher_indices: Optional[Tensor] = None,
                      inplace_backward: bool = False, process_group=None) -> Tensor:
    """The distillation loss of ``student_logits`` (..., C) against ``teacher_logits``.

    Per position, with P the teacher's and Q the student's softmax of the logits divided by
    ``temperature`` T: ``forward_kl`` T^2 KL(P || Q) (Hinton's soft-target loss),
    ``reverse_kl`` T^2 KL(Q || P), ``jsd`` T^2 [beta KL(P || M) + (1 - beta) KL(Q || M)],
    M = beta P + (1 - beta) Q (beta = 0 is forward KL, beta = 1 reverse KL, as in the
    generalised JSD of on-policy distillation). ``hard_weight`` a mixes in the cross-entropy
    with ``target`` (class indices of the positions' shape) at temperature 1: a CE + (1 - a)
    divergence.

    A position whose target is ``ignore_index`` or whose ``mask`` is 0 is left out (loss and
    gradient 0); a floating mask weighs the position. ``mean`` divides by the mask's sum over
    the valid positions (0 when there is none), ``sum`` adds, ``none`` returns one loss per
    position. The loss is float32 (float64 for float64 logits), whatever the logits' dtypes,
    which may differ (a bfloat16 teacher beside a float32 student).

    ``teacher_indices`` (..., K) integer: a sparse teacher, ``teacher_logits`` (..., K) being
    its logits (or log-probabilities) at those classes; P is their softmax at T, renormalised
    over the K classes. forward_kl only; indices must be distinct within a position.

    Gradients go to the student's logits, the teacher's when they require grad (both models
    trained), and a floating mask that requires grad. ``inplace_backward`` (as
    cross_entropy's): the student's gradient is written into its logits' storage where that
    is safe (mean/sum, a dense teacher, only the student's logits need a gradient, not
    float16, logits that no other op saved), so no N x C buffer is allocated; the logits must not be used after the
    call. ``process_group`` (vocab parallel,
    fusedloss.parallel.distillation): both logits hold this rank's slice of the classes; dense
    teacher only.
    """
    if process_group is not None:
        return vocab_parallel.distillation_loss(
            student_logits, teacher_logits, target, divergence=divergence,
            temperature=temperature, beta=beta, hard_weight=hard_weight,
            ignore_index=ignore_index, mask=mask, reduction=reduction,
            teacher_indices=teacher_indices, process_group=process_group)
    a = _args.distillation_args(student_logits, teacher_logits, target, divergence, temperature,
                                beta, hard_weight, ignore_index, mask, reduction,
                                teacher_indices)
    loss = _route.distill(a.student, a.teacher, a.teacher_indices, a.target, a.mask,
                          a.divergence, a.temperature, a.beta, a.hard_weight, a.ignore_index,
                          a.reduction, inplace_backward=inplace_backward,
                          input=student_logits)
    return _args.distillation_result(a, loss)


def linear_distillation_loss(student_input: Tensor, student_weight: Tensor,
                             teacher_input: Tensor, teacher_weight: Tensor,
                             target: Optional[Tensor] = None, *,
                             student_bias: Optional[Tensor] = None,
                             teacher_bias: Optional[Tensor] = None,
                             chunk_size: Optional[int] = None, divergence: str = "forward_kl",
                             temperature: float = 1.0, beta: float = 0.5,
                             hard_weight: float = 0.0, ignore_index: int = -100,
                             mask: Optional[Tensor] = None, reduction: str = "mean",
                             process_group=None) -> Tensor:
    """``distillation_loss(F.linear(student_input, student_weight, student_bias),
    F.linear(teacher_input, teacher_weight, teacher_bias), target, ...)`` in chunks of rows
    (``chunk_size``, default :func:`fusedloss.linear.auto_chunk_rows`), so that neither
    model's (N, V) logits exist whole.

    student_input (..., Hs) with student_weight (V, Hs); teacher_input (..., Ht) with
    teacher_weight (V, Ht): the hidden sizes may differ, the classes must agree. The forward
    computes the gradients of whatever requires grad, pre-scaled for mean/sum (the backward
    multiplies them by grad_output); a frozen teacher (the usual case) costs no gradient GEMM.
    reduction ``none`` recomputes the chunks in the backward. The mask and target must not
    require grad. Under torch.func transforms, forward-mode AD and a double backward, the
    definition runs on the whole logits. ``process_group``: the weights (and biases) hold this
    rank's slice of the vocabulary; each rank's slice of the logits is formed whole there.
    """
    options = dict(divergence=divergence, temperature=temperature, beta=beta,
                   hard_weight=hard_weight, ignore_index=ignore_index, mask=mask,
                   reduction=reduction)
    if process_group is not None:
        return distillation_loss(
            torch.nn.functional.linear(student_input, student_weight, student_bias),
            torch.nn.functional.linear(teacher_input, teacher_weight, teacher_bias), target,
            process_group=process_group, **options)
    a = _args.linear_distillation_args(student_input, student_weight, student_bias,
                                       teacher_input, teacher_weight, teacher_bias, target,
                                       chunk_size, **options)
    if _route.compositions_needed():
        return distillation_loss(
            torch.nn.functional.linear(student_input, student_weight, student_bias),
            torch.nn.functional.linear(teacher_input, teacher_weight, teacher_bias), target,
            **options)
    loss = _LinearDistillation.apply(a.xs, student_weight, student_bias, a.xt, teacher_weight,
                                     teacher_bias, a)
    return loss.reshape(a.positions) if a.reduction == NONE else loss


class _LinearDistillation(torch.autograd.Function):
    """The chunk loop. Per chunk: both heads' logits (GEMMs by ATen), the distill kernel (loss,
    row statistics, and the logits' gradients, pre-scaled for mean/sum with the whole loss's
    denominator), then the logits' gradients turned into the inputs', weights' and biases'
    (accumulated in float32 for 16-bit weights, rounded once in the backward after
    grad_output: _handover.narrow)."""

    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, a):
        ctx.set_materialize_grads(False)
        ctx.a = a
        ctx.needs = tuple(ctx.needs_input_grad[:6])
        lib = _ops.current().lib
        denominator = (valid_mask_sum(a.target, a.mask, a.ignore_index, xs.shape[0], xs.device)
                       if a.reduction == MEAN else None)
        ctx.denominator = denominator
        pre_scale = a.reduction != NONE and any(ctx.needs)
        loss, stats, grads = _chunk_loop(lib, a, (xs, ws, bs, xt, wt, bt), ctx.needs,
                                         denominator, grad_loss=None, with_grads=pre_scale)
        ctx.save_for_backward(xs, ws, bs, xt, wt, bt, stats)
        if a.reduction != NONE:
            _handover.keep(ctx, *grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return (None,) * 7
        a = ctx.a
        xs, ws, bs, xt, wt, bt, stats = ctx.saved_tensors
        operands = (xs, ws, bs, xt, wt, bt)
        lib = _ops.current().lib
        if torch.is_grad_enabled():  # create_graph: the definition's differentiable gradients
            grads = _definition_grads(a, operands, ctx.needs, grad_loss)
        elif a.reduction == NONE:
            grads = _chunk_loop(lib, a, operands, ctx.needs, None, grad_loss=grad_loss,
                                stats=stats)[2]
        else:
            grads = _handover.take(
                ctx, lib, grad_loss,
                lambda: _chunk_loop(lib, a, operands, ctx.needs, ctx.denominator,
                                    grad_loss=None, with_grads=True)[2])
        grads = _handover.narrow(grads, operands)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs)) + (None,)


def _chunk_loop(lib, a, operands, needs, denominator, grad_loss, with_grads=False, stats=None):
    """Forward (grad_loss None): (loss, row statistics, gradients when with_grads); backward of
    reduction none (grad_loss per row, stats the forward's): (None, None, gradients)."""
    xs, ws, bs, xt, wt, bt = operands
    rows, classes = xs.shape[0], ws.shape[0]
    want_s, want_t = any(needs[:3]), any(needs[3:])
    grads_now = with_grads or grad_loss is not None
    cs, ct = _chunk_dtypes(xs, xt)
    ws_c, wt_c = ws.to(cs), wt.to(ct)
    bs_c = bs.to(cs) if bs is not None else None
    bt_c = bt.to(ct) if bt is not None else None
    wide = acc_dtype(ws.dtype)
    gxs = torch.empty(xs.shape, dtype=wide, device=xs.device) if grads_now and needs[0] else None
    gws = torch.zeros(ws.shape, dtype=wide, device=ws.device) if grads_now and needs[1] else None
    gbs = (torch.zeros(classes, dtype=wide, device=ws.device)
           if grads_now and needs[2] and bs is not None else None)
    gxt = torch.empty(xt.shape, dtype=wide, device=xt.device) if grads_now and needs[3] else None
    gwt = torch.zeros(wt.shape, dtype=wide, device=wt.device) if grads_now and needs[4] else None
    gbt = (torch.zeros(classes, dtype=wide, device=wt.device)
           if grads_now and needs[5] and bt is not None else None)
    losses, all_stats = [], []
    options = (a.divergence, a.temperature, a.beta, a.hard_weight, a.ignore_index, a.reduction)
    for start in range(0, rows, a.chunk_rows):
        end = min(rows, start + a.chunk_rows)
        xs_c, xt_c = xs[start:end].to(cs), xt[start:end].to(ct)
        zs = torch.nn.functional.linear(xs_c, ws_c, bs_c)
        zt = torch.nn.functional.linear(xt_c, wt_c, bt_c)
        t = a.target[start:end] if a.target is not None else None
        m = a.mask[start:end] if a.mask is not None else None
        if grad_loss is None:
            loss, st, gs, gt = lib.distill(zs, zt, None, t, m, *options, denominator,
                                           grads_now and want_s, grads_now and want_t)
            losses.append(loss)
            all_stats.append(st)
        else:
            gs, gt = lib.distill_backward(grad_loss.reshape(-1)[start:end], zs, zt, None, t, m,
                                          stats[start:end], *options, None, want_s, want_t)
        # freed now, not when the next chunk's replace them: one chunk's logits at a time
        del zs, zt
        if not grads_now:
            continue
        for g, x_c, w_c, gx, gw, gb in ((gs, xs_c, ws_c, gxs, gws, gbs),
                                        (gt, xt_c, wt_c, gxt, gwt, gbt)):
            if gx is not None:
                gx[start:end] = g @ w_c
            if gw is not None:
                gw.addmm_(g.t().to(wide), x_c.to(wide))
            if gb is not None:
                gb += g.sum(0, dtype=wide)
        del gs, gt
    grads = (gxs, gws, gbs, gxt, gwt, gbt)
    if grad_loss is not None:
        return None, None, grads
    if a.reduction == NONE:
        loss = torch.cat(losses) if losses else xs.new_zeros(0, dtype=acc_dtype(xs.dtype))
    else:
        loss = (torch.stack(losses).sum() if losses else xs.new_zeros((), dtype=acc_dtype(xs.dtype)))
    stats = (torch.cat(all_stats) if all_stats
             else xs.new_zeros((0, DISTILL_STATS), dtype=acc_dtype(xs.dtype)))
    return loss, stats, grads


def _chunk_dtypes(xs, xt):
    """The dtypes of a chunk's two logits: compute_dtype's (float32 for 16-bit on the CPU),
    float32 for float16 anywhere (its pre-scaled mean gradient (q - p) / N would lose the
    entries below float16's subnormals), and float64 on both sides when either is float64
    (the kernel's one accumulation dtype)."""
    if torch.float64 in (xs.dtype, xt.dtype):
        return torch.float64, torch.float64
    dtypes = [compute_dtype(x.dtype, x.device) for x in (xs, xt)]
    return tuple(torch.float32 if d == torch.float16 else d for d in dtypes)


def _definition_grads(a, operands, needs, grad_loss):
    """The gradients of the definition (whole logits), differentiable: for a double backward."""
    xs, ws, bs, xt, wt, bt = operands
    wanted = [t for t, need in zip(operands, needs) if need]
    with torch.enable_grad():
        zs = torch.nn.functional.linear(xs, ws, bs)
        zt = torch.nn.functional.linear(xt, wt, bt)
        loss = _composite.distill(zs, zt, None, a.target, a.mask, a.divergence, a.temperature,
                                  a.beta, a.hard_weight, a.ignore_index, a.reduction)
        grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True,
                                         allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)

