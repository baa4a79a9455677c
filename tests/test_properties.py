"""Property tests (hypothesis): random shapes, options and dtypes, against the float64
reference."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedloss as fl
import reference as ref
from helpers import assert_close, logits

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def ce_cases(draw):
    rows = draw(st.integers(0, 40))
    classes = draw(st.integers(1, 300))
    dtype = draw(DTYPES)
    probs = draw(st.booleans())
    kw = {"reduction": draw(st.sampled_from(["none", "mean", "sum"])),
          "label_smoothing": draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))}
    if draw(st.booleans()):
        kw["weight"] = torch.rand(classes, dtype=torch.float64) + 0.05
    if draw(st.booleans()):
        kw["mask"] = (torch.rand(rows, dtype=torch.float64) * 2).round() / 2  # 0, 0.5, 1
    if draw(st.booleans()):
        kw["z_loss"] = draw(st.sampled_from([1e-4, 0.1]))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.sampled_from([1.0, 30.0]))
    if not probs and draw(st.booleans()):
        kw["ignore_index"] = draw(st.sampled_from([-100, 0, classes - 1]))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    return rows, classes, dtype, probs, kw, scale


@SETTINGS
@given(case=ce_cases())
def test_cross_entropy_property(backend, case):
    rows, classes, dtype, probs, kw, scale = case
    x = logits((rows, classes), dtype, backend.device, scale=scale)
    if probs:
        target = torch.softmax(torch.randn(rows, classes, dtype=torch.float64), 1).to(dtype)
    else:
        target = torch.randint(0, classes, (rows,))
        if "ignore_index" in kw:
            target[torch.rand(rows) < 0.2] = kw["ignore_index"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ref_kw = {k: (v.to(acc).double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    fl_kw = {k: (v.to(backend.device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    xa = x.clone().requires_grad_()
    out = fl.cross_entropy(xa, target.to(backend.device), **fl_kw)
    xr = x.detach().cpu().double().requires_grad_()
    expected = ref.cross_entropy(xr, target, **ref_kw)
    assert_close(out, expected, dtype)
    out.sum().backward()
    expected.sum().backward()
    # the target element's gradient is a difference of O(row scale) terms (p_t (1 + z-loss
    # term) - 1): float rounding of those terms, not of the result, bounds its error
    row_scale = max([float(v.abs().max()) for k, v in ref_kw.items()
                     if k in ("weight", "mask") and v.numel()] + [1.0]) ** 2
    _, atol = ref.tolerances(dtype)
    assert_close(xa.grad, xr.grad, dtype, atol_floor=atol * row_scale)


@st.composite
def bce_cases(draw):
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=3)))
    if draw(st.booleans()):
        shape = shape[:-1] + (draw(st.integers(1, 200)),)
    dtype = draw(DTYPES)
    kw = {"reduction": draw(st.sampled_from(["none", "mean", "sum"])),
          "label_smoothing": draw(st.sampled_from([0.0, 0.1]))}
    # operands broadcast from a random suffix of the shape, or the full shape
    for name in ("weight", "pos_weight", "mask"):
        if draw(st.booleans()):
            k = draw(st.integers(0, len(shape)))
            kw[name] = torch.rand(shape[len(shape) - k:], dtype=torch.float64) + 0.1
    return shape, dtype, kw


@SETTINGS
@given(case=bce_cases())
def test_bce_property(backend, case):
    shape, dtype, kw = case
    x = logits(shape, dtype, backend.device)
    y = torch.rand(shape, dtype=torch.float64).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ref_kw = {k: (v.to(acc).double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    fl_kw = {k: (v.to(backend.device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    xa = x.clone().requires_grad_()
    out = fl.binary_cross_entropy_with_logits(xa, y.to(backend.device), **fl_kw)
    xr = x.detach().cpu().double().requires_grad_()
    expected = ref.binary_cross_entropy_with_logits(xr, y.double(), **ref_kw)
    assert_close(out, expected, dtype)
    if out.numel():
        out.sum().backward()
        expected.sum().backward()
        # the gradient is a difference of O(1) terms: compare at the terms' scale
        _, atol = ref.tolerances(dtype)
        assert_close(xa.grad, xr.grad, dtype, atol_floor=atol * 4 * max(
            [float(v.max()) for v in ref_kw.values() if torch.is_tensor(v) and v.numel()] + [1.0]) ** 3)
