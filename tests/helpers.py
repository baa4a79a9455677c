"""Small helpers shared by the tests."""

import torch

from reference import tolerances


def assert_close(actual, expected, dtype, scale_atol=True, atol_floor=0.0):
    """Compare with a float64 reference at `dtype`'s tolerance. atol scales with the largest
    reference value, so that a gradient whose elements are all ~1/C is still checked closely."""
    rtol, atol = tolerances(dtype)
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    # a result beyond the dtype's range (a float16 sum over many elements) is correctly inf
    overflow = expected.to(dtype).isinf() & expected.isfinite()
    expected = torch.where(overflow, expected.to(dtype).double(), expected)
    if scale_atol and expected.numel() and torch.isfinite(expected).any():
        largest = float(expected[expected.isfinite()].abs().max())
        # an all-zero reference (one class) keeps the dtype's absolute tolerance
        if largest > 0:
            atol = max(atol * 1e-3, rtol * largest * 0.5)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=max(atol, atol_floor),
                               equal_nan=True)


def logits(shape, dtype, device, scale=3.0):
    """Random logits, rounded to dtype; the reference uses the same rounded values."""
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


def grad_output_like(out):
    """A random incoming gradient (never exactly 1, so the scaling path is exercised)."""
    g = torch.rand(out.shape, dtype=torch.float64) * 2 + 0.5
    return g.to(out.dtype).to(out.device)


def assert_loss_and_grad_close(out, expected, x, x_ref, dtype):
    """out (of x) against the float64 reference expected (of x_ref): values, then gradients
    under the same random grad_output."""
    assert out.shape == expected.shape
    assert_close(out, expected, dtype)
    g = grad_output_like(out)
    out.backward(g)
    expected.backward(g.cpu().double())
    assert_close(x.grad, x_ref.grad, dtype)
