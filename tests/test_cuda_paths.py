"""Every code path of the CUDA kernels, each forced and checked against the float64 reference:
softmax CE on the rows path (several rows per block; a block per row), the split path (few
rows; rows too long for a block, in L2-sized groups), misaligned rows, probability targets,
in place, recomputed from the saved statistics, bad targets, skipped rows, the two-stage
sums; sigmoid CE on the 128-bit and the strided path with every broadcast operand;
scale_grad_. Each softmax path runs with every option at once (class weights, label
smoothing, z-loss, softcap, a fractional mask with padding, ignored rows or probability
targets) under mean (the forward's gradient) and none (the gradient recomputed from the
saved statistics), so that a term dropped on one path fails that path's test.

kind "simt": the kernels on the SIMT harness, with the device parameters the launch plans see
set so that small shapes take each path, and the launch log checked (a path that was not taken
fails the test). kind "cuda": the same cases on a GPU with its real parameters (skipped
without one)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402
from cuda_kinds import NO_SPLIT, SMALL_L2, SPLIT_FEW, kind  # noqa: E402, F401
from helpers import assert_close, grad_output_like, logits  # noqa: E402

import fusedloss as fl  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def ce_case(kind, rows, classes, dtype, reduction="mean", probs=False, cfg=None, view=None,
            expect=(), **kw):
    """cross_entropy forward and backward against the reference, on this kind's kernels;
    `view` maps a leaf to the logits actually passed (a slice keeps its strides)."""
    view = view or (lambda t: t)
    base = logits((rows, classes), dtype, kind.device)
    x = view(base)
    rows, classes = x.shape
    if probs:
        target = torch.softmax(torch.randn(rows, classes, dtype=torch.float64), 1).to(dtype)
    else:
        target = torch.randint(0, classes, (rows,))
        if "ignore_index" in kw:  # row 0 always counts
            target[1:][torch.rand(rows - 1) < 0.3] = kw["ignore_index"]
    target = target.to(kind.device)
    fl_kw = {k: (v.to(kind.device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref_kw = dict(kw)
    for name in ("weight", "mask"):  # float32 in the kernels unless the logits are float64
        if name in kw and dtype != torch.float64:
            fl_kw[name] = fl_kw[name].float()
            ref_kw[name] = ref_kw[name].float().double()
    check(kind, base, view, cfg, expect,
          lambda xa: fl.cross_entropy(xa, target, reduction=reduction, **fl_kw),
          lambda xr: ref.cross_entropy(xr, target.cpu(), reduction=reduction, **ref_kw))


def check(kind, base, view, cfg, expect, call, reference):
    """call(view(leaf)) forward and backward (random grad_output) on this kind's kernels
    against reference(float64 copy) on the CPU: loss and gradient."""
    leaf = base.detach().clone().requires_grad_()
    xa = view(leaf)
    x = view(base)
    assert xa.stride() == x.stride()  # the layout under test reaches the op
    with kind.run(**(cfg or {})):
        out = call(xa)
        g = grad_output_like(out)
        out.backward(g)
    kind.expect(*expect)
    xr = x.detach().cpu().double().requires_grad_()
    expected = reference(xr)
    expected.backward(g.cpu().double())
    assert_close(out, expected, x.dtype)
    assert_close(view(leaf.grad), xr.grad, x.dtype)


def every_option(rows, classes, probs):
    """Every option at once, so that a term dropped on any path shows in its loss or gradient:
    class weights, label smoothing, z-loss, softcap, a fractional mask with padding rows (0),
    and for class-index targets ignored rows (ce_case sets ~30% to ignore_index)."""
    mask = torch.rand(rows, dtype=torch.float64) * 0.9 + 0.1
    mask[1:][torch.rand(rows - 1) < 0.2] = 0.0  # row 0 always counts
    kw = dict(weight=torch.rand(classes, dtype=torch.float64) + 0.1, label_smoothing=0.1,
              z_loss=2e-3, softcap=8.0, mask=mask)
    if not probs:
        kw["ignore_index"] = -100
    return kw


TARGETS = pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
# mean: the forward's gradient, pre-scaled by the mean's 1/denominator; none: the gradient
# recomputed from the saved row statistics (every path has both)
REDUCTIONS = pytest.mark.parametrize("reduction", ["mean", "none"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [1, 7, 30, 250], ids=lambda c: f"C{c}")
@TARGETS
@REDUCTIONS
def test_rows_path_several_rows_per_block(kind, dtype, classes, probs, reduction):
    """Up to 32 threads per row, rows of one warp reduced with shuffles of their lane group."""
    ce_case(kind, 67, classes, dtype, reduction=reduction, probs=probs, cfg=NO_SPLIT,
            expect=("softmax_ce_rows",), **every_option(67, classes, probs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [1000, 3001, 8001], ids=lambda c: f"C{c}")
@TARGETS
@REDUCTIONS
def test_rows_path_block_per_row(kind, dtype, classes, probs, reduction):
    """64..1024 threads per row, reduced through shared memory; odd C: misaligned rows."""
    if probs and dtype == torch.float64 and classes == 8001:
        classes = 4001  # float64 logits and targets: 4096 a row at most, longer rows split
    ce_case(kind, 5, classes, dtype, reduction=reduction, probs=probs, cfg=NO_SPLIT,
            expect=("softmax_ce_rows",), **every_option(5, classes, probs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@TARGETS
@REDUCTIONS
def test_split_path_few_rows(kind, dtype, probs, reduction):
    """Too few rows to fill the device: each row cut into chunks, merged by a second stage
    (the backward of reduction='none' recomputes from the saved statistics on the same path)."""
    ce_case(kind, 5, 3001, dtype, reduction=reduction, probs=probs, cfg=SPLIT_FEW,
            expect=("softmax_ce_split_finish",), **every_option(5, 3001, probs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@TARGETS
@REDUCTIONS
def test_split_path_long_rows_in_l2_groups(kind, dtype, probs, reduction):
    """Rows longer than a block holds (here 40000 > 32768 classes), in groups of rows that fit
    half the L2 (64 KB in the harness: one row a group, so one launch of each stage per row;
    the recompute of class-index targets needs no stage 1)."""
    ce_case(kind, 3, 40000, dtype, reduction=reduction, probs=probs, cfg=SMALL_L2,
            expect=("softmax_ce_split_finish",), **every_option(3, 40000, probs))
    # forward and recompute, or forward: the backward recomputes for reduction none, and for
    # float16, whose gradient the backward writes once grad_output is known (_handover.defers)
    recompute = reduction == "none" or dtype == torch.float16
    stage1 = 6 if probs and recompute else 3
    kind.expect("softmax_ce_split_stats", "softmax_ce_split_finish", count=stage1)


@pytest.mark.parametrize("path", ["rows", "split"])
@pytest.mark.parametrize("layout", ["column_slice", "row_step"])
@TARGETS
def test_misaligned_and_strided_rows(kind, path, layout, probs):
    """Rows whose 16-byte phase differs from the gradient's (element stores), row strides."""
    view = (lambda t: t[:, 3:3004]) if layout == "column_slice" else (lambda t: t[::2])
    cfg = SPLIT_FEW if path == "split" else NO_SPLIT
    ce_case(kind, 7, 3005, torch.float32, probs=probs, cfg=cfg, view=view,  # 7 rows < 8 SMs
            expect=("softmax_ce_split_finish" if path == "split" else "softmax_ce_rows",),
            **every_option(*((7, 3001) if layout == "column_slice" else (4, 3005)), probs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["rows", "split"])
@TARGETS
def test_inplace_matches_out_of_place(kind, dtype, path, probs):
    """softmax_ce_inplace writes the gradient over the logits: the same bits as the
    out-of-place op (each element is read before it is written, z_target before any store),
    whose gradient is checked against the reference by the tests above."""
    cfg = SPLIT_FEW if path == "split" else NO_SPLIT
    x = logits((6, 3001), dtype, kind.device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if probs:
        t = torch.softmax(torch.randn(6, 3001, dtype=torch.float64), 1).to(dtype)
    else:
        t = torch.randint(0, 3001, (6,))
        t[1] = -100
    o = every_option(6, 3001, probs)
    weight, mask = (o[name].to(acc).to(kind.device) for name in ("weight", "mask"))
    args = (t.to(kind.device), weight, mask, -100, o["label_smoothing"], o["z_loss"], o["softcap"],
            1, 0.0)  # mean
    with kind.run(**cfg):
        loss, stats, grad, extras, _argmax = kind.ops().softmax_ce(x, *args, True, True)
        y = x.clone()
        loss2, stats2, extras2, _argmax2 = kind.ops().softmax_ce_inplace(y, *args, True)
    kind.expect("softmax_ce_split_finish" if path == "split" else "softmax_ce_rows")
    assert torch.equal(loss, loss2) and torch.equal(stats, stats2)
    assert torch.equal(extras, extras2)
    assert torch.equal(y, grad)


@pytest.mark.parametrize("path", ["rows", "split"])
def test_bad_targets_make_their_row_nan_without_reading_out_of_bounds(kind, path):
    """A target outside [0, C) (not ignore_index) is never an index: the SIMT buffers are
    guard-paged, so a read at weight[t] or x[t] would fail the launch. The row's loss, row
    statistics and gradient are NaN; the other rows are untouched."""
    cfg = SPLIT_FEW if path == "split" else NO_SPLIT
    C = 3001
    x = logits((5, C), torch.float32, kind.device)
    t = torch.tensor([1, C, 2, -5, 2**40], device=kind.device)
    w = torch.rand(C, device=kind.device) + 0.5
    with kind.run(**cfg):
        loss, stats, grad, _extras, _argmax = kind.ops().softmax_ce(x, t, w, None, -100, 0.1, 0.0, 0.0, 0,
                                                           0.0, False)
        grad = kind.ops().softmax_ce_backward(torch.ones(5, device=kind.device), x, t, w, None,
                                              stats, -100, 0.1, 0.0, 0.0, 0, 0.0)
    bad = torch.tensor([False, True, False, True, True])
    assert loss.cpu()[bad].isnan().all() and loss.cpu()[~bad].isfinite().all()
    assert grad.cpu()[bad].isnan().all() and grad.cpu()[~bad].isfinite().all()
    good = ref.cross_entropy(x.cpu().double()[~bad], t.cpu()[~bad], weight=w.cpu().double(),
                             label_smoothing=0.1, reduction="none")
    assert_close(loss.cpu()[~bad], good, torch.float32)


@pytest.mark.parametrize("path", ["rows", "split"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_skipped_rows_and_all_skipped(kind, path, reduction):
    """mask 0 and ignore_index rows: loss 0, gradient 0; a mean over nothing is 0."""
    cfg = SPLIT_FEW if path == "split" else NO_SPLIT
    ce_case(kind, 7, 3001, torch.float32, reduction=reduction, cfg=cfg, ignore_index=-100,
            mask=(torch.rand(7) < 0.6).double())
    x = logits((4, 3001), torch.float32, kind.device).requires_grad_()
    with kind.run(**cfg):
        out = fl.cross_entropy(x, torch.full((4,), -100, device=kind.device), reduction=reduction)
        out.sum().backward()
    assert (out == 0).all() and (x.grad == 0).all()


def test_two_stage_sums(kind):
    """More rows than one block of the deterministic sum takes (16384): partial sums, then
    their sum, for the mean's denominator and for the loss."""
    ce_case(kind, 20000, 3, torch.float32, cfg=NO_SPLIT, expect=("sum_stage1", "sum_stage2"),
            weight=torch.rand(3, dtype=torch.float64) + 0.1, mask=torch.rand(20000, dtype=torch.float64))


def bce_case(kind, x, y, reduction="mean", expect=(), view=None, **kw):
    """`view` maps a leaf of x's shape to the input passed."""
    fl_kw = {k: (v.to(kind.device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    check(kind, x, view or (lambda t: t), None, expect,
          lambda xa: fl.binary_cross_entropy_with_logits(xa, y, reduction=reduction, **fl_kw),
          lambda xr: ref.binary_cross_entropy_with_logits(xr, y.cpu(), reduction=reduction, **kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("operands", ["none", "column", "row_mask", "full_mask", "all"])
def test_sigmoid_flat_path(kind, dtype, reduction, operands):
    """Contiguous input: 16-byte accesses; broadcast operands tracked per element; 4133
    elements: the last chunk ends inside a pack."""
    rows, cols = 4133 // 33, 33
    x = logits((rows, cols), dtype, kind.device)
    y = torch.rand(rows, cols, dtype=torch.float64).to(dtype).to(kind.device)
    kw = {}
    if operands in ("column", "all"):
        kw["weight"] = torch.rand(cols, dtype=torch.float64) + 0.5
        kw["pos_weight"] = torch.rand(cols, dtype=torch.float64) * 3
    if operands in ("row_mask", "all"):  # fractional, with padding rows
        kw["mask"] = torch.rand(rows, 1, dtype=torch.float64) * (torch.rand(rows, 1) < 0.7)
    if operands == "full_mask":
        kw["mask"] = torch.rand(rows, cols, dtype=torch.float64)
    if operands == "all":
        kw["label_smoothing"] = 0.1
    bce_case(kind, x, y, reduction, expect=("sigmoid_ce_flat",), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cols", [1, 3, 130])
def test_sigmoid_strided_path(kind, dtype, cols):
    """Rows with a stride (a column slice): element accesses, (row, col) walked per element;
    one column: every element starts a new row."""
    base = logits((301, cols + 2), dtype, kind.device)
    y = torch.rand(301, cols, dtype=torch.float64).to(dtype).to(kind.device)
    bce_case(kind, base, y, "mean", expect=("sigmoid_ce_strided",),
             view=lambda t: t[:, 1:cols + 1],
             weight=torch.rand(cols, dtype=torch.float64) + 0.5,
             pos_weight=torch.rand(cols, dtype=torch.float64) * 2,
             mask=torch.rand(301, 1, dtype=torch.float64), label_smoothing=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad(kind, dtype):
    """grad *= scale on the device: a no-op pass when the scale is exactly 1; contiguous,
    row-strided and (fallback) arbitrary layouts."""
    g = logits((37, 1001), dtype, kind.device)
    with kind.run():
        for view in (g, g[:, 1:1000], g.t()[:500]):
            before = view.clone()
            kind.ops().scale_grad_(view, torch.tensor(1.0, device=kind.device))
            assert torch.equal(view, before)
            kind.ops().scale_grad_(view, torch.tensor(-0.75, dtype=dtype, device=kind.device))
            assert_close(view, before.double() * -0.75, dtype)
    kind.expect("scale_grad")



def _far_rows(values, stride):
    """`values` (rows, classes) as a view whose rows are `stride` elements apart, in a storage
    of which only the rows are ever touched (the rest stays virtual memory)."""
    rows, classes = values.shape
    storage = torch.empty((rows - 1) * stride + classes, dtype=values.dtype)
    x = storage.as_strided((rows, classes), (stride, 1))
    x.copy_(values)
    return x


@pytest.mark.parametrize("path", ["rows", "split"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_row_offsets_beyond_2_to_the_31(kind, path, dtype):
    """The SIMT-sized counterpart of test_large.py: rows 2^30 + 8 elements apart, the last one
    starting past element 2^31: loss and gradient of the rows and the split path (out of place,
    and in place: the gradient written back at those offsets), and the strided sigmoid path."""
    if kind.name == "cuda":
        pytest.skip("on a GPU, test_large.py and test_cuda_native.py use real 2^31-element inputs")
    stride, rows, classes = 2**30 + 8, 3, 3001
    assert (rows - 1) * stride > 2**31
    cfg = SPLIT_FEW if path == "split" else NO_SPLIT
    x0 = logits((rows, classes), dtype, "cpu")
    y0 = logits((rows, classes), dtype, "cpu")
    z = torch.rand(rows, classes).to(dtype)
    t = torch.randint(0, classes, (rows,))
    x = _far_rows(x0, stride)
    args = (t, None, None, -100, 0.1, 0.0, 0.0, 1, 0.0)
    with kind.run(**cfg):
        loss, _stats, grad, _extras, _argmax = kind.ops().softmax_ce(x, *args, True)
        kind.ops().softmax_ce_inplace(x, *args)
        bce = fl.binary_cross_entropy_with_logits(_far_rows(y0, stride), z, reduction="none")
    kind.expect("softmax_ce_split_finish" if path == "split" else "softmax_ce_rows",
                "sigmoid_ce_strided")
    xr = x0.double().requires_grad_()
    expected = ref.cross_entropy(xr, t, label_smoothing=0.1)
    expected.backward()
    assert_close(loss, expected, dtype)
    assert_close(grad, xr.grad, dtype)
    assert torch.equal(x, grad)  # in place: the same bits, at the far offsets
    assert_close(bce, ref.binary_cross_entropy_with_logits(y0.double(), z, reduction="none"),
                 dtype)
