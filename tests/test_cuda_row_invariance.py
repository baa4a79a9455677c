"""A row's results are a function of that row alone, bit for bit, on every path of the CUDA
kernels: rolling the batch or changing the number of rows moves a row to another block, lane
group, launch (the L2 groups of long rows) or chunk of the deterministic sums, and must change
none of its bits (loss, row statistics, gradient row). The parity tests compare with a
tolerance; they cannot see a reduction whose order follows where the row sits (a stage-2 merge
taking the chunks in an order that depends on the block, say): each order rounds differently,
each within tolerance, every run the same.

The rows of one call are compared with the rows of another: reduction="none" (per-row loss,
the statistics, and the gradient recomputed from them with a per-row grad_loss) and "sum" (the
forward's gradient, and in place). "mean" is left out: its 1/denominator is a sum over the
batch, which another batch rounds otherwise.

kind "simt": the kernels on the SIMT harness, each path forced and its kernels checked in the
launch log; kind "cuda": the same calls on a GPU (skipped without one)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_kinds import NO_SPLIT, SMALL_L2, kind  # noqa: E402, F401
from helpers import logits  # noqa: E402

import fusedloss as fl  # noqa: E402

# path -> (device parameters, rows, classes, kernel that must run, subset of the rows). The
# subset changes N without changing the plan: few rows are cut into 2 * SMs / N chunks, each
# rounded up to 256 packs, which with 128 SMs is 256 packs at any N <= 7 (20 chunks of a
# float32 row of 20001, 10 of a 16-bit one); long rows into the largest chunks (5 here).
SOFTMAX_PATHS = {
    "rows_several_per_block": (NO_SPLIT, 67, 100, "softmax_ce_rows", slice(5, 43)),
    "rows_block_per_row": (NO_SPLIT, 7, 3001, "softmax_ce_rows", slice(2, 6)),
    "split_few_rows": (dict(num_sms=128, min_split_classes=512), 7, 20001,
                       "softmax_ce_split_finish", slice(2, 6)),
    "split_long_rows": (SMALL_L2, 3, 40000, "softmax_ce_split_stats", slice(1, 3)),
}


def softmax_inputs(rows, classes, dtype, device, probs):
    """Logits, targets (class indices with ignored rows, or probabilities), class weights, a
    fractional mask with padding rows, and a per-row grad_loss."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = logits((rows, classes), dtype, device, scale=10.0)
    if probs:
        t = torch.softmax(torch.randn(rows, classes, dtype=torch.float64) * 2, 1).to(dtype)
    else:
        t = torch.randint(0, classes, (rows,))
        t[torch.rand(rows) < 0.2] = -100
    w = torch.rand(classes, dtype=acc) + 0.1
    mask = torch.rand(rows, dtype=acc) * 0.9 + 0.1
    mask[torch.rand(rows) < 0.2] = 0.0
    grad_loss = torch.rand(rows, dtype=acc) + 0.5
    return [v.to(device) for v in (x, t, w, mask, grad_loss)]


# ignore_index, label smoothing, z-loss, softcap. Logits of a wide spread (scale 10) under a
# loose cap keep sum exp(z - max) near 1, where log_sum shows every bit of that sum: with
# hundreds of comparable terms a last-bit change of the sum mostly vanishes in the log.
OPTIONS = (-100, 0.1, 2e-3, 30.0)
NONE, SUM = 0, 2


def same_phase_rows(values, lead=3):
    """`values` (rows, C) as a view whose every row starts `lead` elements past a 16-byte
    boundary (a row stride of whole 16-element blocks). A row's phase decides which thread
    holds which of its elements, hence its rounding; contiguous rows of odd length would each
    have their own, so a row moved in the batch would change phase, not just position."""
    rows, classes = values.shape
    stride = (classes + lead + 15) // 16 * 16
    storage = torch.empty(rows, stride, dtype=values.dtype, device=values.device)
    x = storage[:, lead:lead + classes]
    x.copy_(values)
    return x


def softmax_rows(kind, cfg, x, t, w, mask, grad_loss):
    """Every per-row result of the softmax ops on one batch: row loss and statistics
    (forward, reduction none), gradient recomputed from those statistics, gradient of the
    forward (sum), and in place (sum): the gradient over the logits, and its statistics."""
    x = same_phase_rows(x)
    if t.is_floating_point():
        t = same_phase_rows(t)
    with kind.run(**cfg):
        ops = kind.ops()
        # want_accuracy: the per-row extras (z-loss part, correct) are row results too
        loss, stats, _, extras, _ = ops.softmax_ce(x, t, w, mask, *OPTIONS, NONE, 0.0, False,
                                                not t.is_floating_point())
        recomputed = ops.softmax_ce_backward(grad_loss, x, t, w, mask, stats, *OPTIONS, NONE, 0.0)
        _, stats_sum, grad, _, _ = ops.softmax_ce(x, t, w, mask, *OPTIONS, SUM, 0.0, True)
        y = same_phase_rows(x)
        _, stats_inplace, _, _ = ops.softmax_ce_inplace(y, t, w, mask, *OPTIONS, SUM, 0.0)
    return dict(loss=loss, stats=stats, extras=extras.t(), recomputed=recomputed,
                stats_sum=stats_sum, grad=grad, inplace=y, stats_inplace=stats_inplace)


def assert_same_rows(got, expected, what):
    for name in expected:
        a, b = got[name], expected[name]
        same = ((a == b) | (a.isnan() & b.isnan())).reshape(len(a), -1).all(1)
        assert same.all(), f"{what}: {name} differs in rows {(~same).nonzero().flatten().tolist()}"


def roll(inputs, k):
    """The batch rolled by k rows (class weights are per class, not per row)."""
    x, t, w, mask, grad_loss = inputs
    return [x.roll(k, 0), t.roll(k, 0), w, mask.roll(k, 0), grad_loss.roll(k, 0)]


def rows_of(inputs, rows):
    x, t, w, mask, grad_loss = inputs
    return [x[rows], t[rows], w, mask[rows], grad_loss[rows]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("path", list(SOFTMAX_PATHS))
def test_softmax_row_results_do_not_depend_on_position_or_batch_size(kind, path, probs, dtype):
    cfg, rows, classes, kernel, subset = SOFTMAX_PATHS[path]
    inputs = softmax_inputs(rows, classes, dtype, kind.device, probs)
    base = softmax_rows(kind, cfg, *inputs)
    kind.expect(kernel)
    k = rows // 2 + 1
    rolled = softmax_rows(kind, cfg, *roll(inputs, k))
    kind.expect(kernel)
    assert_same_rows(rolled, {n: v.roll(k, 0) for n, v in base.items()}, f"batch rolled by {k}")
    part = softmax_rows(kind, cfg, *rows_of(inputs, subset))
    kind.expect(kernel)
    assert_same_rows(part, {n: v[subset] for n, v in base.items()},
                     f"rows {subset.start}..{subset.stop - 1} alone")


@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("path", list(SOFTMAX_PATHS))
def test_forward_gradient_is_the_one_recomputed_from_its_statistics(kind, path, probs):
    """Every block of a row (each chunk of the split path) computes the row's statistics the
    same way, so the forward's gradient equals, bit for bit, the gradient recomputed from the
    saved statistics with grad_loss 1; and in place equals out of place."""
    cfg, rows, classes, _kernel, _subset = SOFTMAX_PATHS[path]
    x, t, w, mask, _ = softmax_inputs(rows, classes, torch.float32, kind.device, probs)
    got = softmax_rows(kind, cfg, x, t, w, mask, torch.ones(rows, device=kind.device))
    assert torch.equal(got["stats"], got["stats_sum"])
    assert torch.equal(got["grad"], got["recomputed"])
    assert torch.equal(got["grad"], got["inplace"]) and torch.equal(got["stats_sum"],
                                                                    got["stats_inplace"])


def sigmoid_rows(kind, layout, x, y, weight, pos_weight, mask, grad_loss):
    """Per-element loss (reduction none), its gradient from a per-element grad_loss, and the
    forward's gradient (sum). The input is laid out as the path wants: contiguous in fresh
    (16-byte aligned) storage, or a column slice of rows two elements longer."""
    cols = x.shape[1]
    kw = dict(weight=weight, pos_weight=pos_weight, mask=mask, label_smoothing=0.1)
    results = {}
    for reduction in ("none", "sum"):
        if layout == "strided":
            leaf = torch.zeros(x.shape[0], cols + 2, dtype=x.dtype, device=x.device)
            leaf[:, 1:cols + 1] = x
            leaf.requires_grad_()
            xin = leaf[:, 1:cols + 1]
        else:
            leaf = x.clone().requires_grad_()
            xin = leaf
        with kind.run():
            loss = fl.binary_cross_entropy_with_logits(xin, y, reduction=reduction, **kw)
            if reduction == "none":
                loss.backward(grad_loss)
                results["loss"] = loss.detach()
            else:
                loss.backward()
        results["recomputed" if reduction == "none" else "grad"] = (
            leaf.grad[:, 1:cols + 1] if layout == "strided" else leaf.grad)
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["flat", "strided"])
def test_sigmoid_row_results_do_not_depend_on_position_or_batch_size(kind, layout, dtype):
    """Elementwise, so every element's bits are its own, wherever a chunk, a pack or a block
    boundary falls (rows of 33 elements straddle packs and chunks)."""
    rows, cols = 301, 33
    x = logits((rows, cols), dtype, kind.device)
    y = torch.rand(rows, cols, dtype=torch.float64).to(dtype).to(kind.device)
    weight = (torch.rand(cols, dtype=torch.float64) + 0.5).to(kind.device)
    pos_weight = (torch.rand(cols, dtype=torch.float64) * 3).to(kind.device)
    mask = (torch.rand(rows, 1, dtype=torch.float64) * (torch.rand(rows, 1) < 0.8)).to(kind.device)
    grad_loss = (torch.rand(rows, cols, dtype=torch.float64) + 0.5).to(dtype).to(kind.device)

    def batch(pick):
        """The rows `pick` selects, each operand in fresh storage."""
        return [pick(v).clone() for v in (x, y)] + [weight, pos_weight] + [
            pick(v).clone() for v in (mask, grad_loss)]

    first = sigmoid_rows(kind, layout, *batch(lambda v: v))
    kernel = "sigmoid_ce_flat" if layout == "flat" else "sigmoid_ce_strided"
    kind.expect(kernel)
    k = 150
    rolled = sigmoid_rows(kind, layout, *batch(lambda v: v.roll(k, 0)))
    kind.expect(kernel)
    assert_same_rows(rolled, {n: v.roll(k, 0) for n, v in first.items()}, f"batch rolled by {k}")
    part = slice(37, 260)
    alone = sigmoid_rows(kind, layout, *batch(lambda v: v[part]))
    kind.expect(kernel)
    assert_same_rows(alone, {n: v[part] for n, v in first.items()}, "rows 37..259 alone")
