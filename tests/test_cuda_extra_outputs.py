"""The extra outputs and accumulation-dtype operands of the CUDA kernels, on each code path:
the token accuracy (first maximum, as torch.argmax, including ties across the chunks of a split
row and NaN rows) and the z-loss part from the same pass, and float32 targets read as they are
beside 16-bit logits (softmax probability targets, BCE targets). Forced onto each path as in
test_cuda_paths.py (the SIMT launch log checked), against float64 references."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402
from helpers import assert_close, logits  # noqa: E402
from test_cuda_paths import NO_SPLIT, SPLIT_FEW, kind  # noqa: E402,F401  (the fixture)

import fusedloss as fl  # noqa: E402

PATHS = {"rows": (NO_SPLIT, "softmax_ce_rows"), "split": (SPLIT_FEW, "softmax_ce_split_finish")}
C = 3001  # split 3 ways under SPLIT_FEW (chunks of 1024 float32 / 2048 16-bit values)


def _first_argmax(z):
    """torch.argmax's pick per row: the first maximum, or the first NaN of a NaN row."""
    nan = z.isnan()
    return torch.where(nan.any(1), nan.int().argmax(1), z.argmax(1))


def _tie_rows(dtype):
    """Rows of small integers (ties everywhere) whose first maximum is placed on purpose: in
    the first or the last chunk, tied with a later one, or a NaN row; and each row's target."""
    x = torch.randint(-3, 3, (6, C)).double()  # below the planted maxima
    x[0, 100] = x[0, 2900] = 5.0
    x[1, 100] = x[1, 2900] = 5.0
    x[2, 2900] = x[2, 2950] = 5.0          # first maximum in the last chunk only
    x[3, 1500] = x[3, 2500] = float("nan")  # a NaN row: its first NaN is the argmax
    x[4] = 1.0                              # every class tied: class 0 is the argmax
    t = torch.tensor([100, 2900, 2900, 1500, 7, -100])  # correct, tie lost, correct, correct, no
    return x.to(dtype), t


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_token_accuracy_and_z_loss_every_path(kind, path, dtype, reduction):
    cfg, kernel = PATHS[path]
    x, t = _tie_rows(dtype)
    m = torch.rand(6, dtype=torch.float64) + 0.5
    with kind.run(**cfg):
        out = fl.cross_entropy(x.to(kind.device), t.to(kind.device), reduction=reduction,
                               mask=m.to(kind.device), z_loss=1e-2, softcap=20.0,
                               return_z_loss=True, return_token_accuracy=True)
    kind.expect(kernel)
    z = 20.0 * torch.tanh(x.double() / 20.0)
    valid = t != -100
    correct = torch.where(valid & (_first_argmax(z) == t), m, 0.0)
    assert correct[[0, 2, 3]].all() and not correct[[1, 4, 5]].any()  # the cases as planted
    lse = torch.logsumexp(z, 1)
    z_rows = torch.where(valid, m * 1e-2 * lse**2, 0.0)
    count = torch.where(valid, m, 0.0).sum()
    if reduction == "none":
        assert_close(out.token_accuracy, correct, torch.float32)
        assert_close(out.z_loss, z_rows, torch.float32)
    else:
        assert_close(out.token_accuracy, correct.sum() / count, torch.float32)
        z_total = z_rows.sum() / count if reduction == "mean" else z_rows.sum()
        assert_close(out.z_loss, z_total, torch.float32)
        # the loss without the NaN row: its cross-entropy part plus the z-loss part
    keep = torch.tensor([True, True, True, False, True, True])
    with kind.run(**cfg):
        part = fl.cross_entropy(x[keep].to(kind.device), t[keep].to(kind.device),
                                reduction=reduction, mask=m[keep].to(kind.device), z_loss=1e-2,
                                softcap=20.0)
    expected = ref.cross_entropy(x[keep].double(), t[keep], reduction=reduction, mask=m[keep],
                                 z_loss=1e-2, softcap=20.0)
    assert part.dtype == dtype
    assert_close(part, expected, dtype)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("layout", ["aligned", "offset"])
def test_float32_probability_target_beside_bfloat16_logits(kind, path, reduction, layout):
    """The target is read in float32 (128-bit where its rows are aligned, element by element
    where not): the loss keeps float32 accuracy, which a bfloat16 copy of it would lose."""
    cfg, kernel = PATHS[path]
    x = logits((5, C), torch.bfloat16, kind.device).requires_grad_()
    big = torch.softmax(torch.randn(5, C + 1, dtype=torch.float64), 1).float()
    y = big[:, :C] if layout == "aligned" else big[:, 1:]
    y = y.to(kind.device)
    with kind.run(**cfg):
        loss = fl.cross_entropy(x, y, reduction=reduction)
        loss.sum().backward()
    kind.expect(kernel)
    assert loss.dtype == torch.float32  # a floating target gives PyTorch's loss dtype
    xr = x.detach().double().cpu().requires_grad_()
    expected = ref.cross_entropy(xr, y.cpu().double(), reduction=reduction)
    expected.sum().backward()
    assert_close(loss, expected, torch.float32)
    assert_close(x.grad, xr.grad, torch.bfloat16)


@pytest.mark.parametrize("layout", ["flat", "strided"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_float32_bce_target_beside_bfloat16_logits(kind, layout, reduction):
    base = logits((301, 130), torch.bfloat16, kind.device)
    x = base[:, :128] if layout == "strided" else base[:, :128].contiguous()
    x = x.detach().requires_grad_()
    y = torch.rand(301, 128).to(kind.device)  # float32: not representable in bfloat16
    with kind.run():
        loss = fl.binary_cross_entropy_with_logits(x, y, reduction=reduction)
        loss.sum().backward()
    kind.expect("sigmoid_ce_strided" if layout == "strided" else "sigmoid_ce_flat")
    assert loss.dtype == torch.float32
    xr = x.detach().double().cpu().requires_grad_()
    expected = ref.binary_cross_entropy_with_logits(xr, y.cpu().double(), reduction=reduction)
    expected.sum().backward()
    assert_close(loss, expected, torch.float32)
    assert_close(x.grad, xr.grad, torch.bfloat16)
