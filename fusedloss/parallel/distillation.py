"""Vocab-parallel distillation: the student's and the teacher's logits sliced by the same class
ranges across the ranks (a dense teacher); every rank gets the loss of the whole rows, as
fusedloss.distillation_loss on the gathered logits would give it.

Per call, on every rank:

1. The header exchange (protocol.agree): every rank checks every rank's arguments.
2. The slice's part of each row, in the accumulation dtype: the maxima and exp sums of u = s/T
   and v = t/T about the slice's own maxima, the forward (or reverse) KL's weighted log-ratio
   sum about them, and, with a hard part, the max and exp sum of s and the target's logit
   where the slice holds it.
3. ONE all_gather of that payload; every rank combines the parts in rank order in float64
   (the sums re-based on the whole row's maxima), so the result is bitwise identical on every
   rank. jsd needs the whole rows' statistics before its mixture's log can be formed: its two
   KLs' slice parts are then gathered and added the same way, its second collective.
4. The slice's gradients: the distill_backward kernel with the whole rows' statistics (and the
   slice's class offset), pre-scaled for mean/sum in the forward and handed over
   (_handover.py); reduction none writes them in the backward. No communication there.

Only the logits get gradients here (the mask must not require grad); no double backward.
"""

import torch

from .. import _args, _handover, _ops
from .._args import FORWARD_KL, JSD, REVERSE_KL
from .._common import MEAN, NONE, acc_dtype, divide_or_zero, valid_mask_sum
from .._composite import jsd_log_mixture, weighted_sum
from .protocol import Local, agree, all_gather, refuse_unsupported

_DOUBLE_BACKWARD = (
    "fusedloss: double backward (create_graph=True) through the distributed distillation_loss "
    "(process_group=...) is not supported: its gradient comes from the fused kernel with the "
    "combined row statistics and is not itself differentiable.")

# The payload's columns.
_MU, _ZU, _MV, _ZV, _RATIO, _MS, _ZS, _ST, _WIDTH = range(9)


def _slice_payload(s, t, target, kept, o, offset):
    """(rows, _WIDTH) accumulation dtype: this slice's part of each kept row (0 elsewhere)."""
    acc = acc_dtype(s.dtype)
    x = torch.where(kept[:, None], s.to(acc), 0)
    u = x / o.temperature
    v = torch.where(kept[:, None], t.to(acc), 0) / o.temperature
    mu, mv = u.amax(dim=1), v.amax(dim=1)
    du, dv = u - mu[:, None], v - mv[:, None]
    eu, ev = du.exp(), dv.exp()
    zero = x.new_zeros(())
    if o.divergence == FORWARD_KL:
        ratio = weighted_sum(ev, dv - du)
    elif o.divergence == REVERSE_KL:
        ratio = weighted_sum(eu, du - dv)
    else:
        ratio = torch.zeros_like(mu)
    ms = x.amax(dim=1)
    zs = (x - ms[:, None]).exp().sum(dim=1)
    st = torch.zeros_like(mu)
    if target is not None:
        local = target - offset
        here = (local >= 0) & (local < s.shape[1]) & kept
        st = torch.where(here, x.gather(1, torch.where(here, local, 0)[:, None])[:, 0], zero)
    return torch.stack([mu, eu.sum(dim=1), mv, ev.sum(dim=1), ratio, ms, zs, st], dim=1)


def _rebased(max_parts, sum_parts):
    """The whole row's max and exp sum from every slice's (world, rows)."""
    m = max_parts.amax(dim=0)
    return m, (sum_parts * (max_parts - m).exp()).sum(dim=0)


def _combine(gathered, o, hard):
    """gathered (world, rows, _WIDTH) in float64 -> the whole rows' (mu, log Zu, mv, log Zv,
    ms, log Zs, D or Dp, the hard CE), all (rows,); the same on every rank."""
    g = gathered.to(torch.float64)
    mu, zu = _rebased(g[..., _MU], g[..., _ZU])
    mv, zv = _rebased(g[..., _MV], g[..., _ZV])
    log_zu, log_zv = zu.log(), zv.log()
    shift = (g[..., _MV] - mv) - (g[..., _MU] - mu)  # each slice's maxima against the row's
    if o.divergence == FORWARD_KL:
        a = ((g[..., _RATIO] + g[..., _ZV] * shift) * (g[..., _MV] - mv).exp()).sum(dim=0)
        d = a / zv + (log_zu - log_zv)
    elif o.divergence == REVERSE_KL:
        a = ((g[..., _RATIO] - g[..., _ZU] * shift) * (g[..., _MU] - mu).exp()).sum(dim=0)
        d = a / zu + (log_zv - log_zu)
    else:
        d = torch.zeros_like(mu)
    ms, zs = _rebased(g[..., _MS], g[..., _ZS])
    log_zs = zs.log()
    ce = log_zs - (g[..., _ST].sum(dim=0) - ms) if hard else torch.zeros_like(mu)
    return mu, log_zu, mv, log_zv, ms, log_zs, d, ce


def _jsd_parts(s, t, kept, o, mu, log_zu, mv, log_zv):
    """This slice's sums of p (log p - log m) and q (log q - log m), (2, rows) float64."""
    acc = acc_dtype(s.dtype)
    u = torch.where(kept[:, None], s.to(acc), 0) / o.temperature
    v = torch.where(kept[:, None], t.to(acc), 0) / o.temperature
    log_q = (u.double() - mu[:, None]) - log_zu[:, None]
    log_p = (v.double() - mv[:, None]) - log_zv[:, None]
    log_m = jsd_log_mixture(log_p, log_q, o.beta)
    return torch.stack([weighted_sum(log_p.exp(), log_p - log_m),
                        weighted_sum(log_q.exp(), log_q - log_m)])


class VocabParallelDistillation(torch.autograd.Function):
    """The collectives live in the forward; the backward is local."""

    @staticmethod
    def forward(ctx, s, t, target, mask, o, offset, group, want_s, want_t):
        lib = _ops.current().lib
        acc = acc_dtype(s.dtype)
        rows = s.shape[0]
        valid = (target != o.ignore_index if target is not None
                 else torch.ones(rows, dtype=torch.bool, device=s.device))
        kept = valid & (mask != 0) if mask is not None else valid
        hard = o.hard_weight > 0
        payload = _slice_payload(s, t, target, kept, o, offset)
        mu, log_zu, mv, log_zv, ms, log_zs, d, ce = _combine(all_gather(payload, group), o,
                                                             hard)
        dq = torch.zeros_like(d)
        if o.divergence == JSD:
            # gathered and added in rank order: the same bits on every rank
            parts = all_gather(_jsd_parts(s, t, kept, o, mu, log_zu, mv, log_zv), group)
            d, dq = parts.sum(dim=0)
        divergence = o.beta * d + (1 - o.beta) * dq if o.divergence == JSD else d
        row = o.temperature ** 2 * divergence
        if hard:
            row = (1 - o.hard_weight) * row + o.hard_weight * ce
        zero = row.new_zeros(())
        m = mask.to(torch.float64) if mask is not None else 1.0
        row = torch.where(kept, m * row, zero)
        stats = torch.stack([mu, log_zu, mv, log_zv, ms if hard else torch.zeros_like(mu),
                             log_zs if hard else torch.zeros_like(mu), d, dq], dim=1)
        stats = torch.where(kept[:, None], stats, zero).to(acc)
        denominator = None
        if o.reduction == NONE:
            loss = row.to(acc)
        else:
            loss = row.sum()
            if o.reduction == MEAN:
                denominator = valid_mask_sum(target, mask, o.ignore_index, rows, s.device)
                loss = divide_or_zero(loss, denominator)
            loss = loss.to(acc)
        ctx.o, ctx.offset = o, offset
        ctx.want = (want_s, want_t)
        ctx.save_for_backward(s, t, target, mask, stats, denominator)
        deferred = _handover.defers(s.dtype) or _handover.defers(t.dtype)
        if o.reduction != NONE and not deferred and (want_s or want_t):
            one = torch.ones((), dtype=acc, device=s.device)
            _handover.keep(ctx, *_slice_grads(lib, one, s, t, target, mask, stats, denominator,
                                              o, offset, want_s, want_t))
        elif deferred:
            _handover.defer(ctx)
        else:
            _handover.keep(ctx)
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        nones = (None,) * 7
        if grad_loss is None:
            return (None, None) + nones
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        lib = _ops.current().lib
        s, t, target, mask, stats, denominator = ctx.saved_tensors
        o, offset = ctx.o, ctx.offset
        want_s, want_t = ctx.want

        def write(g):
            return _slice_grads(lib, g.to(stats.dtype), s, t, target, mask, stats, denominator,
                                o, offset, want_s, want_t)

        if o.reduction == NONE:
            gs, gt = write(grad_loss)
        else:
            gs, gt = _handover.take(ctx, lib, grad_loss,
                                    lambda: write(torch.ones((), device=s.device)), write)
        return (gs if want_s else None, gt if want_t else None) + nones


def _slice_grads(lib, grad_loss, s, t, target, mask, stats, denominator, o, offset, want_s,
                 want_t):
    gs, gt = lib.distill_backward(grad_loss, s, t, None, target, mask, stats, o.divergence,
                                  o.temperature, o.beta, o.hard_weight, o.ignore_index,
                                  o.reduction, denominator, want_s, want_t, offset)
    return (gs if want_s else None, gt if want_t else None)


@torch.compiler.disable  # collectives and a host read of the header: run eagerly
def distillation_loss(student_logits, teacher_logits, target=None, *, divergence, temperature,
                      beta, hard_weight, ignore_index, mask, reduction, teacher_indices,
                      process_group):
    """fusedloss.distillation_loss(..., process_group=...) (see its docstring)."""
    who = "distillation_loss"

    def prepare():
        if teacher_indices is not None:
            raise ValueError("distillation_loss(process_group=...) takes a dense teacher only "
                             "(teacher_indices must be None)")
        a = _args.distillation_args(student_logits, teacher_logits, target, divergence,
                                    temperature, beta, hard_weight, ignore_index, mask,
                                    reduction, None)
        refuse_unsupported(None, None, a.mask, who)
        rows = a.student.shape[0]
        t = (a.target if a.target is not None else
             torch.full((rows,), a.ignore_index, dtype=torch.int64, device=a.student.device))
        return a, Local(a.student, t, None, a.ignore_index, False)

    device = student_logits.device if isinstance(student_logits, torch.Tensor) else None
    a, layout = agree(process_group, prepare, who, device)
    grad_on = torch.is_grad_enabled()
    loss = VocabParallelDistillation.apply(
        a.student, a.teacher, a.target, a.mask, a, layout.offset, process_group,
        grad_on and a.student.requires_grad, grad_on and a.teacher.requires_grad)
    return _args.distillation_result(a, loss)
