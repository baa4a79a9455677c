"""The class-slice (vocab-parallel) mode of the softmax kernels, op by op, on every backend and
CUDA path: `softmax_ce_shard_stats` returns a slice's part of each row exactly as
csrc/fusedloss.cpp defines it, and `softmax_ce_backward` given the whole rows' statistics returns
the slice of the whole rows' gradient. Checked against float64 formulas written from the
definitions (the slice's sums) and against PyTorch's gradient of the whole rows; how the slices'
parts are combined across devices is fusedloss/parallel/combine.py's, tested in
test_distributed.py."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402
from cuda_kinds import NO_SPLIT, SPLIT_FEW, kind  # noqa: E402, F401  (the fixture)
from helpers import assert_close, logits  # noqa: E402

from fusedloss import _ops  # noqa: E402

SLICES = {  # (global classes, slice offsets): even, uneven, a one-class slice
    "even": (24, [0, 12, 24]),
    "uneven": (23, [0, 5, 6, 23]),
}
OPTIONS = {
    "plain": {},
    "smooth+weight+mask+softcap": dict(label_smoothing=0.2, weight=True, mask=True, softcap=4.0),
}


def _case(dtype, classes, rows=7, probs=False, opts=None, device="cpu"):
    opts = opts or {}
    x = logits((rows, classes), dtype, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if probs:  # in the accumulation dtype: read as they are (not rounded to 16 bits)
        target = torch.softmax(torch.randn(rows, classes, dtype=torch.float64), 1).to(acc)
        target = target.to(device)
    else:
        target = torch.randint(0, classes, (rows,))
        target[1] = -100  # an ignored row
        target[2] = classes - 1
        target = target.to(device)
    weight = (torch.rand(classes, dtype=torch.float64) + 0.5).to(acc).to(device) \
        if opts.get("weight") else None
    mask = torch.tensor([1.0, 1.0, 0.0, 0.5, 1.0, 2.0, 1.0][:rows], dtype=acc).to(device) \
        if opts.get("mask") else None
    return x, target, weight, mask


def _z(x, softcap):
    z = x.double().cpu()
    return softcap * torch.tanh(z / softcap) if softcap else z


def _expected_slice(x, target, weight, mask, smoothing, softcap, lo, hi, classes):
    """A slice's (row_loss, row_stats, Q) from its definition, float64."""
    z = _z(x, softcap)[:, lo:hi]
    rows = z.shape[0]
    w = weight.double().cpu() if weight is not None else torch.ones(classes, dtype=torch.float64)
    m = mask.double().cpu() if mask is not None else torch.ones(rows, dtype=torch.float64)
    zmax = z.max(1).values
    log_sum = torch.log(torch.exp(z - zmax[:, None]).sum(1))
    ws = w[lo:hi]
    e = smoothing
    if target.is_floating_point():
        q = (1 - e) * target.double().cpu()[:, lo:hi] + e / classes
        mass = (ws * q).sum(1)
        loss = mass * log_sum - (ws * q * (z - zmax[:, None])).sum(1)
        active = m != 0
    else:
        t = target.cpu()
        active = (m != 0) & (t != -100)
        here = (t >= lo) & (t < hi)
        tl = torch.where(here, t - lo, 0)
        z_t = z.gather(1, tl[:, None])[:, 0]
        w_t = torch.where(here, w[t.clamp(min=0)], 0.0)
        loss = (1 - e) * w_t * (log_sum - torch.where(here, z_t - zmax, 0.0)) + \
            e / classes * (ws.sum() * log_sum - (ws * (z - zmax[:, None])).sum(1))
        mass = torch.zeros(rows, dtype=torch.float64)
    zero = torch.zeros(rows, dtype=torch.float64)
    stats = torch.stack([torch.where(active, zmax, zero), torch.where(active, log_sum, zero)], 1)
    return torch.where(active, m * loss, zero), stats, torch.where(active, mass, zero)


def _run_slices(ops, x, target, weight, mask, smoothing, softcap, offsets, classes, want_accuracy):
    out = []
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        tgt = target[:, lo:hi] if target.is_floating_point() else target
        out.append(ops.softmax_ce_shard_stats(x[:, lo:hi], tgt, weight, mask, -100, smoothing,
                                              softcap or 0.0, lo, classes, want_accuracy))
    return out


@pytest.mark.parametrize("slices", list(SLICES))
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_shard_stats_are_the_slices_part(backend, slices, option, probs, dtype):
    classes, offsets = SLICES[slices]
    opts = OPTIONS[option]
    smoothing, softcap = opts.get("label_smoothing", 0.0), opts.get("softcap")
    x, target, weight, mask = _case(dtype, classes, probs=probs, opts=opts, device=backend.device)
    parts = _run_slices(_ops.current(), x, target, weight, mask, smoothing, softcap, offsets,
                        classes, want_accuracy=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for (lo, hi), (row_loss, row_stats, extras) in zip(zip(offsets[:-1], offsets[1:]), parts):
        loss_ref, stats_ref, mass_ref = _expected_slice(x, target, weight, mask, smoothing,
                                                        softcap, lo, hi, classes)
        assert row_loss.dtype == row_stats.dtype == extras.dtype == acc
        assert extras.shape == (2, x.shape[0])
        assert_close(row_loss, loss_ref, acc)
        assert_close(row_stats, stats_ref, acc)
        assert_close(extras[0], mass_ref, acc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_shard_stats_accuracy_counts_the_slice_holding_the_target(backend, dtype):
    classes, offsets = 12, [0, 5, 12]
    x = torch.arange(classes, dtype=dtype).repeat(4, 1).to(backend.device)  # argmax 11
    x[1, 2] = 50.0  # argmax 2, in the first slice
    target = torch.tensor([11, 2, 3, -100], device=backend.device)
    parts = _run_slices(_ops.current(), x, target, None, None, 0.0, None, offsets, classes, True)
    correct = torch.stack([p[2][1].cpu() for p in parts])  # (slice, row)
    # row 0: target 11 is the second slice's max; row 1: target 2 the first slice's max;
    # row 2: target 3 is in the first slice but not its max; row 3 ignored
    assert correct.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def _whole_row_stats(x, target, mask, softcap):
    z = _z(x, softcap)
    zmax = z.max(1).values
    return torch.stack([zmax, torch.log(torch.exp(z - zmax[:, None]).sum(1))], 1)


@pytest.mark.parametrize("slices", list(SLICES))
@pytest.mark.parametrize("option", list(OPTIONS) + ["z_loss"])
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_shard_backward_is_the_slice_of_the_whole_gradient(backend, slices, option, probs,
                                                           reduction, dtype):
    classes, offsets = SLICES[slices]
    opts = OPTIONS.get(option, {})
    z_loss = 1e-2 if option == "z_loss" else 0.0
    smoothing, softcap = opts.get("label_smoothing", 0.0), opts.get("softcap")
    x, target, weight, mask = _case(dtype, classes, probs=probs, opts=opts, device=backend.device)
    red = {"none": 0, "mean": 1, "sum": 2}[reduction]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    go = torch.rand(x.shape[0], dtype=torch.float64).to(acc) + 0.5 if reduction == "none" \
        else torch.tensor(1.5, dtype=acc)

    x_ref = x.detach().double().cpu().requires_grad_()
    loss_ref = ref.cross_entropy(x_ref, target.cpu(), weight=None if weight is None else
                                 weight.cpu(), reduction=reduction, label_smoothing=smoothing,
                                 mask=None if mask is None else mask.cpu(), z_loss=z_loss,
                                 softcap=softcap)
    loss_ref.backward(go.double())

    stats = _whole_row_stats(x, target, mask, softcap).to(acc).to(backend.device)
    mass = None
    if probs:
        w = weight.double().cpu() if weight is not None else torch.ones(classes, dtype=torch.float64)
        q = (1 - smoothing) * target.double().cpu() + smoothing / classes
        mass = (w * q).sum(1).to(acc).to(backend.device)
    ops = _ops.current()
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        tgt = target[:, lo:hi] if probs else target
        g = ops.softmax_ce_backward(go.to(backend.device), x[:, lo:hi], tgt, weight, mask, stats,
                                    -100, smoothing, z_loss, softcap or 0.0, red, 0.0, None, lo,
                                    classes, mass)
        assert g.dtype == x.dtype and g.shape == (x.shape[0], hi - lo)
        assert_close(g, x_ref.grad[:, lo:hi], dtype)


def test_shard_arguments_are_checked(backend):
    ops = _ops.current()
    x = torch.randn(3, 4, device=backend.device)
    t = torch.tensor([0, 9, 2], device=backend.device)
    with pytest.raises(ValueError, match="class_offset=7 must lie inside global_classes=10"):
        ops.softmax_ce_shard_stats(x, t, None, None, -100, 0.0, 0.0, 7, 10, False)
    with pytest.raises(ValueError, match="weight must have shape \\(10,\\)"):
        ops.softmax_ce_shard_stats(x, t, torch.ones(4, device=backend.device), None, -100, 0.0,
                                   0.0, 4, 10, False)
    y = torch.softmax(x, 1)
    stats = torch.zeros(3, 2, device=backend.device)
    with pytest.raises(ValueError, match="row_target_mass is required"):
        ops.softmax_ce_backward(torch.ones(3, device=backend.device), x, y, None, None, stats,
                                -100, 0.0, 0.0, 0.0, 0, 0.0, None, 4, 10, None)
    if backend.name == "cpu":  # the CUDA entries mark a bad target's row NaN instead
        with pytest.raises(IndexError, match="target 12 at position 1 is out of bounds for 10"):
            ops.softmax_ce_shard_stats(x, torch.tensor([0, 12, 2]), None, None, -100, 0.0, 0.0,
                                       4, 10, False)


@pytest.mark.parametrize("path", ["rows", "split"])
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shard_every_cuda_path(kind, path, probs, dtype):
    """A slice long enough to be split (SPLIT_FEW) or not: the split path's partials hold the
    target's z only in the chunk, and the slice, that has it."""
    cfg = NO_SPLIT if path == "rows" else SPLIT_FEW
    classes, offsets = 5003, [0, 1200, 5003]
    opts = dict(label_smoothing=0.1, weight=True, mask=True, softcap=8.0)
    x, target, weight, mask = _case(dtype, classes, rows=4, probs=probs, opts=opts,
                                    device=kind.device)
    if not probs:
        target[0] = 3000  # in the second slice's second chunk
    acc = torch.float32
    stats = _whole_row_stats(x, target, mask, 8.0).to(acc).to(kind.device)
    mass = None
    if probs:
        q = 0.9 * target.double().cpu() + 0.1 / classes
        mass = (weight.double().cpu() * q).sum(1).to(acc).to(kind.device)
    x_ref = x.detach().double().cpu().requires_grad_()
    ref.cross_entropy(x_ref, target.cpu(), weight=weight.cpu(), reduction="sum",
                      label_smoothing=0.1, mask=mask.cpu(), softcap=8.0).backward()
    with kind.run(**cfg):
        ops = kind.ops()
        parts = _run_slices(ops, x, target, weight, mask, 0.1, 8.0, offsets, classes, True)
        grads = []
        for lo, hi in zip(offsets[:-1], offsets[1:]):
            tgt = target[:, lo:hi] if probs else target
            grads.append(ops.softmax_ce_backward(torch.tensor(1.0, device=kind.device),
                                                 x[:, lo:hi], tgt, weight, mask, stats, -100,
                                                 0.1, 0.0, 8.0, 2, 0.0, None, lo, classes, mass))
    kind.expect("softmax_ce_split_finish" if path == "split" else "softmax_ce_rows")
    for (lo, hi), (row_loss, row_stats, extras), g in zip(zip(offsets[:-1], offsets[1:]), parts,
                                                          grads):
        loss_ref, stats_ref, mass_ref = _expected_slice(x, target, weight, mask, 0.1, 8.0, lo, hi,
                                                        classes)
        assert_close(row_loss, loss_ref, acc)
        assert_close(row_stats, stats_ref, acc)
        assert_close(extras[0], mass_ref, acc)
        assert_close(g, x_ref.grad[:, lo:hi], dtype)
