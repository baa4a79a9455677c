"""fusedloss.cross_entropy against PyTorch (float64), on every backend, dtype, option and size."""

import pytest
import torch

import fusedloss as fl
import reference as ref
from helpers import assert_close, grad_output_like, logits

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# (rows, classes), each with the code path it covers
SHAPES = [
    (1, 1),  # one row, one class: the loss is 0 and the gradient 0
    (3, 7),  # classes below one vector: tail-only rows
    (5, 16),  # exactly one AVX512 float vector, no tail
    (4, 33),  # one past two float vectors: a one-element tail
    (9, 100),  # several vectors and a ragged tail, several rows per thread
    (37, 1000),  # many rows: rows spread over threads / blocks
    (0, 5),  # empty batch
    (2, 128256),  # Llama-3 vocabulary: a row far larger than L1 / shared memory
]

OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.25},
    "ignore_index": {"ignore": -100},
    "ignore_index_in_range": {"ignore": 1},  # a real class id used as ignore_index
    "float_mask": {"mask": "float"},
    "bool_mask": {"mask": "bool"},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 4.0},
    "everything": {"weight": True, "label_smoothing": 0.2, "ignore": -100, "mask": "float",
                   "z_loss": 1e-3, "softcap": 8.0},
}


def make_case(rows, classes, dtype, device, option, probs=False):
    """Inputs and keyword arguments for one parity case."""
    x = logits((rows, classes), dtype, device)
    kw = {}
    if probs:
        target = torch.softmax(torch.randn(rows, classes, dtype=torch.float64), 1).to(dtype)
    else:
        target = torch.randint(0, classes, (rows,))
        if "ignore" in option:
            kw["ignore_index"] = option["ignore"]
            drop = torch.rand(rows) < 0.3
            target[drop] = option["ignore"]
    if option.get("weight"):
        kw["weight"] = torch.rand(classes, dtype=torch.float64) + 0.1
    if "label_smoothing" in option:
        kw["label_smoothing"] = option["label_smoothing"]
    if option.get("mask") == "float":
        m = torch.rand(rows, dtype=torch.float64)
        m[torch.rand(rows) < 0.3] = 0
        kw["mask"] = m
    elif option.get("mask") == "bool":
        kw["mask"] = torch.rand(rows) < 0.7
    for k in ("z_loss", "softcap"):
        if k in option:
            kw[k] = option[k]
    return x, target.to(device), kw


def run_parity(x, target, kw, reduction, dtype, device):
    """fusedloss vs the float64 reference: loss and gradient, with a random grad_output."""
    fl_kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    if "weight" in fl_kw:
        fl_kw["weight"] = fl_kw["weight"].float() if dtype != torch.float64 else fl_kw["weight"]
    ref_kw = dict(kw)
    if "weight" in ref_kw and dtype != torch.float64:  # the reference sees the same rounding
        ref_kw["weight"] = ref_kw["weight"].float().double()

    xa = x.clone().requires_grad_()
    out = fl.cross_entropy(xa, target, reduction=reduction, **fl_kw)
    xr = x.detach().cpu().double().requires_grad_()
    expected = ref.cross_entropy(xr, target.cpu(), reduction=reduction, **ref_kw)
    assert out.dtype == dtype
    assert out.shape == expected.shape
    assert out.device == x.device
    assert_close(out, expected, dtype)

    g = grad_output_like(out)
    out.backward(g)
    expected.backward(g.cpu().double())
    assert xa.grad.shape == x.shape and xa.grad.dtype == dtype
    assert_close(xa.grad, xr.grad, dtype,
                 atol_floor=gradient_term_floor(xr, target.cpu(), ref_kw, reduction, g, dtype))


def gradient_term_floor(x, target, kw, reduction, g, dtype):
    """The size of the terms whose difference is a gradient element, g m (w (1 + e) +
    2 z_loss |lse|) / denominator: where they nearly cancel (one class, p_t near 1) the
    rounding of the terms, not of the result, bounds the error."""
    x = x.detach()
    positions = x.shape[:1] + x.shape[2:] if x.dim() > 1 else ()
    class_dim = 1 if x.dim() > 1 else 0
    lse = x.logsumexp(class_dim).abs()
    w = kw.get("weight")
    m = kw["mask"].double() if kw.get("mask") is not None else torch.ones(positions)
    if target.is_floating_point():
        valid = torch.ones(positions, dtype=torch.bool)
        w_t = torch.ones(positions)
    else:
        valid = target != kw.get("ignore_index", -100)
        w_t = w[target.clamp(0, x.shape[class_dim] - 1)] if w is not None else torch.ones(positions)
    w_max = float(w.max()) if w is not None else 1.0
    scale = g.detach().cpu().double().abs() * m.abs() * valid * (
        w_max * (1 + kw.get("label_smoothing", 0.0)) + 2 * kw.get("z_loss", 0.0) * lse)
    if reduction == "mean":
        denom = float((m * w_t * valid).sum()) if not target.is_floating_point() else float(m.sum())
        scale = scale / denom if denom else scale * 0
    # a few units of rounding of the terms (8 eps), accumulation dtype for 16-bit inputs
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return 8 * eps * float(scale.max()) if scale.numel() else 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_class_index_targets(backend, dtype, shape, option, reduction):
    x, target, kw = make_case(*shape, dtype, backend.device, OPTIONS[option])
    run_parity(x, target, kw, reduction, dtype, backend.device)


PROB_OPTIONS = {k: v for k, v in OPTIONS.items() if "ignore" not in v}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(PROB_OPTIONS), ids=list(PROB_OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_probability_targets(backend, dtype, shape, option, reduction):
    x, target, kw = make_case(*shape, dtype, backend.device, PROB_OPTIONS[option], probs=True)
    run_parity(x, target, kw, reduction, dtype, backend.device)


# N-d input with the class dim 1, as torch: (N, C, d1, ..., dk)
ND_SHAPES = [(2, 5, 3), (3, 17, 2, 4), (1, 3, 1), (2, 4, 0)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", ND_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_nd_input(backend, dtype, shape, reduction, probs):
    x = logits(shape, dtype, backend.device)
    positions = (shape[0],) + shape[2:]
    if probs:
        target = torch.softmax(torch.randn(shape, dtype=torch.float64), 1).to(dtype)
    else:
        target = torch.randint(0, shape[1], positions)
    mask = torch.rand(positions, dtype=torch.float64)
    run_parity(x, target.to(backend.device), {"mask": mask, "label_smoothing": 0.1}, reduction,
               dtype, backend.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_dimensional_input(backend, dtype):
    """input (C,) with a 0-d target, as torch allows."""
    x = logits((11,), dtype, backend.device)
    target = torch.tensor(4, device=backend.device)
    for reduction in ("mean", "sum", "none"):
        run_parity(x, target, {}, reduction, dtype, backend.device)


@pytest.mark.parametrize("layout", ["column_slice", "transposed", "row_step", "expanded_rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_input(backend, dtype, layout):
    base = logits((12, 70), dtype, backend.device)
    x = {
        "column_slice": base[:, 3:40],  # row stride 70, unit class stride
        "transposed": base.t()[:30, :12].t(),  # class stride != 1: copied by the op
        "row_step": base[::3],  # row stride 210
        "expanded_rows": base[:1].expand(5, 70),  # row stride 0
    }[layout]
    target = torch.randint(0, x.shape[1], (x.shape[0],), device=backend.device)
    for reduction in ("mean", "none"):
        run_parity(x, target, {"label_smoothing": 0.1}, reduction, dtype, backend.device)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8], ids=str)
def test_any_integer_target_dtype(backend, dtype):
    x = logits((6, 9), torch.float32, backend.device)
    target = torch.randint(0, 9, (6,)).to(dtype).to(backend.device)
    run_parity(x, target, {}, "mean", torch.float32, backend.device)


def test_large_vocab_bfloat16_sum_close_to_float32(backend):
    """The bfloat16 path accumulates in float32: its loss is the float32 loss, rounded once."""
    x = logits((4, 50000), torch.bfloat16, backend.device)
    target = torch.randint(0, 50000, (4,), device=backend.device)
    lo16 = fl.cross_entropy(x, target, reduction="sum")
    lo32 = fl.cross_entropy(x.float(), target, reduction="sum")
    assert lo16.item() == lo32.to(torch.bfloat16).item()
