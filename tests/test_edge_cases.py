"""Edge cases: empty batch, everything ignored or masked, extreme logits, one class."""

import pytest
import torch

import fusedloss as fl
import reference as ref
from helpers import assert_close

REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(backend, reduction):
    x = torch.randn(0, 7, device=backend.device, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=backend.device)
    out = fl.cross_entropy(x, t, reduction=reduction)
    assert out.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert out.item() == 0.0  # torch: NaN for mean
    out.sum().backward()
    assert x.grad.shape == (0, 7)
    y = torch.zeros(0, 7, device=backend.device)
    xb = torch.randn(0, 7, device=backend.device, requires_grad=True)
    outb = fl.binary_cross_entropy_with_logits(xb, y, reduction=reduction)
    outb.sum().backward()
    assert xb.grad.shape == (0, 7)


@pytest.mark.parametrize("how", ["ignored", "masked"])
def test_nothing_valid_mean_is_zero_with_zero_gradient(backend, how):
    x = torch.randn(5, 9, device=backend.device, requires_grad=True)
    if how == "ignored":
        out = fl.cross_entropy(x, torch.full((5,), -100, device=backend.device))
    else:
        out = fl.cross_entropy(x, torch.randint(0, 9, (5,), device=backend.device),
                               mask=torch.zeros(5, device=backend.device))
    out.backward()
    assert out.item() == 0.0 and not torch.isnan(out)
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_sequence_loss_all_zero_weights(backend):
    x = torch.randn(2, 3, 5, device=backend.device, requires_grad=True)
    out = fl.sequence_loss(x, torch.zeros(2, 3, dtype=torch.long, device=backend.device),
                           torch.zeros(2, 3, device=backend.device))
    out.backward()
    assert out.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extreme_logits(backend, dtype, reduction):
    """+-1e4 logits: the softmax is taken in float32 from the row max; nothing overflows."""
    x = torch.tensor([[1e4, -1e4, 0.0, 1e4 - 1],
                      [-1e4, -1e4, -1e4, -1e4 + 3],
                      [1e4, 1e4, 1e4, 1e4]], device=backend.device).to(dtype)
    t = torch.tensor([1, 3, 0], device=backend.device)
    xa = x.clone().requires_grad_()
    out = fl.cross_entropy(xa, t, reduction=reduction, label_smoothing=0.1)
    xr = x.detach().cpu().double().requires_grad_()
    expected = ref.cross_entropy(xr, t.cpu(), reduction=reduction, label_smoothing=0.1)
    assert_close(out, expected, dtype)
    out.sum().backward()
    expected.sum().backward()
    assert torch.isfinite(xa.grad.float()).all()
    assert_close(xa.grad, xr.grad, dtype)


def test_one_class_loss_is_zero(backend):
    x = torch.randn(6, 1, device=backend.device, requires_grad=True)
    out = fl.cross_entropy(x, torch.zeros(6, dtype=torch.long, device=backend.device))
    out.backward()
    assert out.item() == 0.0
    assert x.grad.abs().max().item() < 1e-7
