"""The vocab-parallel arithmetic: what a rank computes from its slice (read 1,
`shard_payload`), how the gathered payloads combine into the whole row's loss and statistics
(`combine`, in float64, in rank order: the same bits on every rank and from run to run), the
reductions (`reduce_rows`), and read 2 of the slice (`slice_grad`: its gradient from the global
row statistics)."""

import itertools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _common
from .._common import MEAN, NONE, acc_dtype, device_values, divide_or_zero, fixed_order_sum


def shard_payload(lib, logits2d, target, weight, mask, ignore_index, label_smoothing, softcap,
                  layout, want_accuracy):
    """Read 1 of the slice: (payload (rows, width) in the accumulation dtype, the slice's
    row statistics)."""
    row_loss, row_stats, row_extras = lib.softmax_ce_shard_stats(
        logits2d, target, weight, mask, ignore_index, label_smoothing, softcap, layout.offset,
        layout.global_classes, want_accuracy)
    columns = [row_stats[:, 0], row_stats[:, 1], row_loss]
    if want_accuracy:
        columns.append(row_extras[1])
    if target.is_floating_point():
        columns.append(row_extras[0])
    return torch.stack(columns, dim=1), row_stats


def _rank_sum(parts):
    """parts (world, rows) summed over ranks in rank order (the same bits on every rank)."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


class SliceTables(NamedTuple):
    """What the combine of class-index targets needs of the layout, on the device: each
    slice's end (int64, the owner lookup's boundaries) and sum of class weights W_r (float64,
    its size without weights), (world,) each. The same for every chunk of a call: made once
    per call (slice_tables), without a host synchronisation."""

    ends: Tensor
    weight_sums: Tensor


def _slice_weight_sums(weight, sizes, device):
    """W_r, float64 (world,): each slice's sum of class weights in a fixed order
    (_common.fixed_order_sum over the slices zero-padded to the widest), or its size without
    weights (copied without a host synchronisation)."""
    if weight is None:
        return device_values(list(sizes), torch.float64, device)
    slices = torch.split(weight.to(torch.float64), list(sizes))
    padded = torch.nn.utils.rnn.pad_sequence(slices, batch_first=True)
    return fixed_order_sum(padded)


def slice_tables(layout, weight, device):
    """The call's SliceTables (class-index targets)."""
    ends = list(itertools.accumulate(layout.sizes))
    return SliceTables(device_values(ends, torch.int64, device),
                       _slice_weight_sums(weight, layout.sizes, device))


class Combined(NamedTuple):
    """Per row, float64: the cross-entropy part (masked), the z-loss part, correct (mask
    weighted), the global (max, log-sum-exp about it) (0 on rows not kept), the global target
    mass Q (probability targets; else None)."""

    ce: Tensor
    z: Tensor
    correct: Optional[Tensor]
    stats: Tensor
    target_mass: Optional[Tensor]


def combine(gathered, layout, target, weight, mask, ignore_index, label_smoothing, z_loss,
            want_accuracy, tables=None):
    """The gathered payloads (world, rows, width) -> Combined, in float64. Per row, with the
    ranks' (m_r, ls_r, loss_r [, correct_r] [, Q_r]), smoothing e, C classes, mask m, W_r the
    slice's sum of class weights:
        M = max_r m_r,  ls = log sum_r exp(m_r - M + ls_r),  lse = M + ls,
        lse - lse_r = (M - m_r) + (ls - ls_r)   (no cancellation of two large numbers);
        class index t:  ce = sum_r loss_r + m [(1-e) w_t (lse - lse_owner(t))
                                                + (e/C) sum_r W_r (lse - lse_r)]
        probabilities:  ce = sum_r loss_r + m sum_r Q_r (lse - lse_r)
    (each slice's loss_r is its part taken about its own lse_r; the bracket moves it to the
    global lse); z part = z_loss m lse^2; correct = the owner's, when no lower rank reached M.
    tables: the call's slice_tables (made here when not given)."""
    g = gathered.to(torch.float64)
    m_r, ls_r, loss_r = g[:, :, 0], g[:, :, 1], g[:, :, 2]
    device = g.device
    rows = g.shape[1]
    prob = target.is_floating_point()
    e = label_smoothing
    classes = layout.global_classes
    m_row = (mask.to(torch.float64) if mask is not None
             else torch.ones(rows, dtype=torch.float64, device=device))
    valid = (torch.ones(rows, dtype=torch.bool, device=device) if prob
             else target != ignore_index)
    kept = valid & (m_row != 0)

    top = m_r.amax(0)
    ls = torch.log(_rank_sum(torch.exp(m_r - top + ls_r)))
    lse = top + ls
    lse_gap = (top - m_r) + (ls - ls_r)  # lse - lse_r, each rank's slice, without cancellation
    ce = _rank_sum(loss_r)
    target_mass = None
    if prob:
        q_r = g[:, :, -1]
        ce = ce + m_row * _rank_sum(q_r * lse_gap)
        target_mass = _rank_sum(q_r)
    else:
        if tables is None:
            tables = slice_tables(layout, weight, device)
        safe = torch.where(valid, target, 0).clamp(0, classes - 1)
        owner = torch.bucketize(safe, tables.ends, right=True)
        owner_gap = lse_gap.gather(0, owner[None])[0]
        w_t = (weight.to(torch.float64)[safe] if weight is not None
               else torch.ones(rows, dtype=torch.float64, device=device))
        smooth = _rank_sum(tables.weight_sums[:, None] * lse_gap)
        ce = ce + m_row * ((1 - e) * w_t * owner_gap + (e / classes) * smooth)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    ce = torch.where(kept, ce, zero)
    z = torch.where(kept, z_loss * m_row * lse * lse, zero)
    correct = None
    if want_accuracy and not prob:
        # the owner's slice holds the row's first argmax only if no lower rank reached the
        # global max (torch.argmax's rule: the first maximal value)
        first_top_rank = (m_r == top).to(torch.int64).argmax(0)
        owner_correct = g[:, :, 3].gather(0, owner[None])[0]
        correct = torch.where(kept & (first_top_rank == owner), owner_correct, zero)
    stats = torch.where(kept[:, None], torch.stack([top, ls], dim=1), zero)
    return Combined(ce, z, correct, stats, target_mass)


def slice_argmax(logits2d, softcap, offset):
    """(rows, 2) float64: the slice's max of each row's (softcapped) logits and the global id of
    its first maximum (torch.argmax's pick), for combine_argmax. Read of the slice of its own
    (the shard kernel does not return the index): only when predicted tokens are asked for."""
    z = logits2d.to(acc_dtype(logits2d.dtype))
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    if z.shape[0] == 0:
        return z.new_zeros((0, 2), dtype=torch.float64)
    top, first = z.max(dim=1)  # (NaN rows: the first NaN, as torch.argmax)
    return torch.stack([top.to(torch.float64), (first + offset).to(torch.float64)], dim=1)


def combine_argmax(gathered, target, mask, ignore_index):
    """The gathered slice_argmax (world, rows, 2) -> each row's first argmax over the whole
    vocabulary, int64: the first rank, in rank (class) order, whose slice reached the row's max
    (a NaN, if any slice holds one); -1 for rows not read (ignored or mask 0)."""
    m_r, first_r = gathered[:, :, 0], gathered[:, :, 1]
    nan_row = m_r.isnan().any(0)
    top = m_r.amax(0)
    hit = torch.where(nan_row[None], m_r.isnan(), m_r == top[None])
    owner = hit.to(torch.int64).argmax(0)
    predicted = first_r.gather(0, owner[None])[0].to(torch.int64)
    kept = torch.ones_like(predicted, dtype=torch.bool)
    if not target.is_floating_point():
        kept = target != ignore_index
    if mask is not None:
        kept = kept & (mask != 0)
    return torch.where(kept, predicted, -1)


def mean_denominators(target, weight, mask, ignore_index, rows, mean_eps, device):
    """(weighted denominator, count of valid positions), float64 on the device, as the
    single-device op computes them (+ mean_eps each)."""
    return _common.mean_denominators(target, weight, mask, ignore_index, rows, device) + mean_eps


def reduce_rows(combined, reduction, denominators, acc):
    """(loss, extras) as softmax_ce returns them: per row for none, else the sums (divided for
    mean); extras = (z-loss part, correct) per row, or (z-loss part, token accuracy)."""
    c = combined
    correct = c.correct if c.correct is not None else torch.zeros_like(c.z)
    if reduction == NONE:
        return (c.ce + c.z).to(acc), torch.stack([c.z, correct]).to(acc)
    ce_total, z_total, correct_total = fixed_order_sum(torch.stack([c.ce, c.z, correct]))
    if reduction == MEAN:
        ce_total = divide_or_zero(ce_total, denominators[0])
        z_total = divide_or_zero(z_total, denominators[1])
    accuracy = divide_or_zero(correct_total, denominators[1])
    return (ce_total + z_total).to(acc), torch.stack([z_total, accuracy]).to(acc)


class Options(NamedTuple):
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float
    reduction: int
    mean_eps: float


def slice_grad(lib, grad_loss, logits2d, target, weight, mask, stats, target_mass,
               denominators, options, layout):
    """Read 2 of the slice: its gradient from the global row statistics, scaled for the
    reduction (by grad_loss: per row for none, a scalar otherwise)."""
    o = options
    return lib.softmax_ce_backward(grad_loss, logits2d, target, weight, mask, stats,
                                   o.ignore_index, o.label_smoothing, o.z_loss, o.softcap,
                                   o.reduction, o.mean_eps, denominators, layout.offset,
                                   layout.global_classes, target_mass)
