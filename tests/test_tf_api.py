"""The TensorFlow-named functions and sequence_loss, against TF r1.4's documented formulas."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss as fl
import reference as ref
from helpers import assert_close, assert_loss_and_grad_close, logits

SEQ_SHAPES = [(3, 5, 11), (1, 1, 1), (4, 7, 33), (2, 3, 1000), (0, 4, 6)]


@pytest.mark.parametrize("avg_t", [True, False], ids=["avg_t", "no_avg_t"])
@pytest.mark.parametrize("avg_b", [True, False], ids=["avg_b", "no_avg_b"])
@pytest.mark.parametrize("shape", SEQ_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_sequence_loss(backend, dtype, shape, avg_t, avg_b):
    b, t, c = shape
    x = logits(shape, dtype, backend.device)
    targets = torch.randint(0, c, (b, t), device=backend.device)
    # padding weights: a prefix of ones per row, like the seeds' binary padding mask
    lengths = torch.randint(0, t + 1, (b,))
    weights = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.float32)
    weights[0:1, :1] = 0.5 if b else 0  # TF weights need not be 0/1
    weights = weights.to(backend.device)

    xa = x.clone().requires_grad_()
    out = fl.sequence_loss(xa, targets, weights, avg_t, avg_b)
    xr = x.detach().cpu().double().requires_grad_()
    expected = ref.sequence_loss(xr, targets.cpu(), weights.cpu(), avg_t, avg_b)
    assert_loss_and_grad_close(out, expected, xa, xr, dtype)


def test_sequence_loss_module(backend):
    x = logits((2, 4, 9), torch.float32, backend.device)
    targets = torch.randint(0, 9, (2, 4), device=backend.device)
    weights = torch.ones(2, 4, device=backend.device)
    m = fl.SequenceLoss(average_across_timesteps=False)
    assert_close(m(x, targets, weights),
                 ref.sequence_loss(x.cpu().double(), targets.cpu(), weights.cpu(), False, True),
                 torch.float32)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 10), (4, 1), (6,), (0, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sparse_softmax_cross_entropy_with_logits(backend, dtype, shape):
    x = logits(shape, dtype, backend.device)
    labels = torch.randint(0, shape[-1], shape[:-1], device=backend.device)
    xa = x.clone().requires_grad_()
    out = fl.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=xa)
    xr = x.detach().cpu().double().requires_grad_()
    expected = F.cross_entropy(xr.reshape(-1, shape[-1]), labels.cpu().reshape(-1),
                               reduction="none").reshape(labels.shape)
    assert out.shape == labels.shape
    assert_loss_and_grad_close(out, expected, xa, xr, dtype)


def test_sparse_softmax_label_minus_100_is_not_ignored(backend):
    """TensorFlow has no ignore_index: -100 is an out-of-range label, not padding. Like TF, the
    CPU raises and the CUDA kernel (also emulated: simt) makes that position's loss NaN."""
    x = logits((2, 4), torch.float32, backend.device)
    labels = torch.tensor([1, -100], device=backend.device)
    if backend.name == "cpu":
        with pytest.raises(IndexError, match="-100"):
            fl.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=x)
    else:
        loss = fl.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=x)
        assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


@pytest.mark.parametrize("shape", [(5, 7), (3,), (2, 3, 4), (0,)], ids=str)
def test_sigmoid_cross_entropy_with_logits(backend, shape):
    x = logits(shape, torch.float32, backend.device)
    labels = (torch.rand(shape) < 0.5).float().to(backend.device)
    xa = x.clone().requires_grad_()
    out = fl.sigmoid_cross_entropy_with_logits(labels=labels, logits=xa)
    xr = x.detach().cpu().double().requires_grad_()
    # TF's documented formula: max(x, 0) - x * z + log(1 + exp(-abs(x)))
    expected = xr.clamp(min=0) - xr * labels.cpu().double() + torch.log1p(torch.exp(-xr.abs()))
    assert_loss_and_grad_close(out, expected, xa, xr, torch.float32)


def test_sigmoid_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        fl.sigmoid_cross_entropy_with_logits(labels=torch.zeros(3, 2), logits=torch.zeros(2, 3))
