"""The fused linear cross-entropy's chunk loop as it runs on a GPU, run on the CPU with the
test-only switch FUSEDLOSS_TEST_DEVICE_CHUNKS=1 (csrc/linear_ce.cpp: chunks in the operands'
own dtype, every row through the GEMMs, the chunk gradient in float16 for float16 operands):
float16 gradients as accurate as PyTorch's under a loss scale, and padding rows that never
poison the head. On every backend: the CPU kernels and the emulated CUDA kernels."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss as fl
from test_mixed_precision import SCALE, TOKENS, TOLERANCE, _relative_error

ROWS, HIDDEN, CLASSES = 4096, 16, 64
# The float16 case: (classes, spread of the logits) per backend, at 16384 tokens. With the
# chunk gradient pre-scaled by 1/N in float16 its weight-gradient error measured 10x PyTorch's
# on the CPU case, 2.9x on the emulated one (the emulator runs fewer elements in its time).
FLOAT16_CASE = {"cpu": (512, 2.0), "simt": (128, 3.0), "cuda": (32000, 2.0)}


@pytest.fixture(params=["host", "device"])
def chunks(request, monkeypatch):
    """Which chunk loop runs: the CPU's (float32 chunks, padding rows left out) or the GPU's."""
    monkeypatch.setenv("FUSEDLOSS_TEST_DEVICE_CHUNKS", "1" if request.param == "device" else "0")
    return request.param


def _case(seed, dtype=torch.float32, rows=ROWS, classes=CLASSES, spread=8.0):
    """hidden (rows, HIDDEN), weight (classes, HIDDEN), targets with 20% ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, HIDDEN, generator=g) * spread / HIDDEN ** 0.5
    w = torch.randn(classes, HIDDEN, generator=g)
    t = torch.randint(0, classes, (rows,), generator=g)
    t[torch.rand(rows, generator=g) < 0.2] = -100
    return h.to(dtype), w.to(dtype), t


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float16_gradients_under_a_loss_scale(backend, chunks, reduction):
    """Under autocast float16 with a 2^16 loss scale, at 16384 tokens (per-row grad_output
    2^16 / N for none, a mean written by hand): the input's and the weight's gradient errors
    against float64 at most TOLERANCE times PyTorch's autocast F.linear + cross_entropy's."""
    classes, spread = FLOAT16_CASE[backend.name]
    h, w, t = _case(0, rows=TOKENS, classes=classes, spread=spread)
    valid = (t != -100).sum()

    def reduce(loss):
        return loss if reduction == "mean" else loss.sum() / valid

    def grads(loss_of, dtype, autocast):
        hh = h.to(dtype).detach().clone().requires_grad_()
        ww = w.to(dtype).detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            loss = reduce(loss_of(hh, ww))
        (loss * SCALE).backward()
        return hh.grad / SCALE, ww.grad / SCALE

    theirs_of = lambda hh, ww: F.cross_entropy(F.linear(hh, ww), t, reduction=reduction)  # noqa: E731
    ours_of = lambda hh, ww: fl.linear_cross_entropy(hh, ww, t, reduction=reduction,  # noqa: E731
                                                     chunk_size=1024)
    reference = grads(theirs_of, torch.float64, False)
    theirs = grads(theirs_of, torch.float32, True)
    ours = grads(ours_of, torch.float16, True)
    for name, o, p, r in zip(("input", "weight"), ours, theirs, reference):
        err_ours, err_torch = _relative_error(o, r), _relative_error(p, r)
        assert err_ours <= TOLERANCE * err_torch, (name, err_ours, err_torch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_padding_rows_never_poison_the_head(backend, chunks, dtype, reduction):
    """NaN and inf in the hidden states of ignored and masked-out positions: every gradient is
    finite and equals the one with those rows zeroed (PyTorch's loss gives a padding row a
    gradient of exactly 0, and 0 times finite weights)."""
    h, w, t = _case(1, dtype)
    mask = torch.ones(ROWS)
    mask[1::7] = 0
    padding = (t == -100) | (mask == 0)
    poisoned = h.clone()
    poisoned[padding] = float("nan")
    poisoned[padding.nonzero()[::3, 0]] = float("inf")
    clean = h.clone()
    clean[padding] = 0

    def grads(x):
        xx = x.clone().requires_grad_()
        ww = w.clone().requires_grad_()
        loss = fl.linear_cross_entropy(xx, ww, t, mask=mask, reduction=reduction, chunk_size=512)
        (loss.sum() if reduction == "none" else loss).float().backward()
        return loss.detach(), xx.grad, ww.grad

    got, want = grads(poisoned), grads(clean)
    for name, g, e in zip(("loss", "input gradient", "weight gradient"), got, want):
        assert torch.isfinite(g).all(), name
        assert torch.equal(g, e), name
