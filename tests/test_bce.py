"""fusedloss.binary_cross_entropy_with_logits against PyTorch (float64)."""

import pytest
import torch

import fusedloss as fl
import reference as ref
from helpers import assert_close, grad_output_like, logits
from reference import tolerances

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

SHAPES = [
    (1,),  # one element
    (0, 4),  # empty batch
    (7,),  # 1-D, shorter than a vector
    (3, 1),  # one logit per example (binary classifier)
    (5, 33),  # rows with a one-element tail
    (64, 128),  # multi-label, whole vectors
    (3, 5, 7),  # N-d
    (2, 40000),  # more than one fixed reduction chunk (16384 elements) per row
]

# which operand shapes each option uses, as a function of the input shape
OPTIONS = {
    "plain": {},
    "weight_per_class": {"weight": lambda s: s[-1:]},
    "weight_full": {"weight": lambda s: s},
    "pos_weight": {"pos_weight": lambda s: s[-1:]},
    "pos_weight_scalar": {"pos_weight": lambda s: (1,)},
    "mask_full": {"mask": lambda s: s},
    "mask_per_row": {"mask": lambda s: s[:-1] + (1,) if len(s) > 1 else (1,)},
    "bool_mask": {"mask": lambda s: s, "bool_mask": True},
    "smoothing": {"label_smoothing": 0.1},
    "everything": {"weight": lambda s: s[-1:], "pos_weight": lambda s: s[-1:],
                   "mask": lambda s: s, "label_smoothing": 0.2},
}


def make_case(shape, dtype, option):
    x = logits(shape, dtype, "cpu")
    y = torch.rand(shape, dtype=torch.float64)
    kw = {}
    for name in ("weight", "pos_weight"):
        if name in option:
            kw[name] = torch.rand(option[name](shape), dtype=torch.float64) * 2 + 0.1
    if "mask" in option:
        m = torch.rand(option["mask"](shape), dtype=torch.float64)
        m[m < 0.3] = 0
        kw["mask"] = m > 0 if option.get("bool_mask") else m
    if "label_smoothing" in option:
        kw["label_smoothing"] = option["label_smoothing"]
    return x, y, kw


def run_parity(x, y, kw, reduction, dtype, device, target_dtype=None):
    target = y.to(target_dtype or dtype)
    # operands are rounded the way fusedloss rounds them (to the accumulation dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    fl_kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref_kw = {k: (v.to(acc).double() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in kw.items()}
    xa = x.to(device).clone().requires_grad_()
    out = fl.binary_cross_entropy_with_logits(xa, target.to(device), reduction=reduction, **fl_kw)
    xr = x.double().requires_grad_()
    expected = ref.binary_cross_entropy_with_logits(xr, target.double(), reduction=reduction,
                                                    **ref_kw)
    assert out.dtype == dtype and out.shape == expected.shape and out.device == xa.device
    assert_close(out, expected, dtype)
    g = grad_output_like(out)
    out.backward(g)
    expected.backward(g.cpu().double())
    assert_close(xa.grad, xr.grad, dtype,
                 atol_floor=gradient_term_scale(x, target, ref_kw, reduction, g))


def gradient_term_scale(x, target, kw, reduction, g):
    """The size of the two terms whose difference is the gradient, w m g ((1-y) + lw
    sigmoid(-x)) / denominator: where they nearly cancel (y ~ sigmoid(x)) float rounding of
    the terms, not of the result, bounds the error."""
    y = target.double()
    e = kw.get("label_smoothing", 0.0)
    y = y * (1 - e) + e / 2
    pw = kw.get("pos_weight")
    lw = 1 + (pw - 1) * y if pw is not None else torch.ones_like(y)
    scale = (1 - y).abs() + lw.abs()
    for name in ("weight", "mask"):
        if kw.get(name) is not None:
            scale = scale * kw[name].double().abs()
    scale = scale * g.cpu().double().abs()
    if reduction == "mean":
        denom = kw["mask"].double().expand(x.shape).sum() if kw.get("mask") is not None else x.numel()
        scale = scale / max(float(denom), 1.0)
    _, atol = tolerances(x.dtype)
    return atol * float(scale.max()) if scale.numel() else 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity(backend, dtype, shape, option, reduction):
    x, y, kw = make_case(shape, dtype, OPTIONS[option])
    run_parity(x, y, kw, reduction, dtype, backend.device)


@pytest.mark.parametrize("target_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32,
                                          torch.float16], ids=str)
def test_target_of_any_numeric_dtype(backend, target_dtype):
    x = logits((6, 10), torch.float32, "cpu")
    y = (torch.rand(6, 10) < 0.5).double()
    run_parity(x, y, {"pos_weight": torch.rand(10, dtype=torch.float64) + 0.5}, "mean",
               torch.float32, backend.device, target_dtype=target_dtype)


@pytest.mark.parametrize("layout", ["column_slice", "transposed"])
def test_non_contiguous(backend, layout):
    base = logits((20, 30), torch.float32, "cpu")
    x = base[:, 5:25] if layout == "column_slice" else base.t()
    y = torch.rand(x.shape, dtype=torch.float64)
    for reduction in ("mean", "none"):
        run_parity(x, y, {"weight": torch.rand(x.shape[-1], dtype=torch.float64)}, reduction,
                   torch.float32, backend.device)


def test_extreme_logits_stay_finite(backend):
    """softplus is evaluated stably: +-1e4 logits give exact, finite losses and gradients."""
    x = torch.tensor([[-1e4, 1e4, -50.0, 50.0, 0.0]], device=backend.device)
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]], device=backend.device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xa = x.to(dtype).clone().requires_grad_()
        out = fl.binary_cross_entropy_with_logits(xa, y, reduction="none")
        out.sum().backward()
        xr = x.to(dtype).detach().double().requires_grad_()
        expected = ref.binary_cross_entropy_with_logits(xr, y.double(), reduction="none")
        expected.sum().backward()
        assert torch.isfinite(out.float()).all() and torch.isfinite(xa.grad.float()).all()
        assert_close(out, expected, dtype)
        assert_close(xa.grad, xr.grad, dtype)


def test_all_masked_mean_is_zero(backend):
    x = logits((4, 3), torch.float32, backend.device).requires_grad_()
    y = torch.rand(4, 3, device=backend.device)
    out = fl.binary_cross_entropy_with_logits(x, y, mask=torch.zeros(4, 1, device=backend.device))
    out.backward()
    assert out.item() == 0.0 and (x.grad == 0).all()
