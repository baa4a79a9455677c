"""float16 mixed precision: a 16-bit gradient is rounded once, after every factor (softmax minus
target, the reduction's denominator, grad_output), as PyTorch's is. The recipe of
torch.autocast + a GradScaler: a linear head in float16 into the loss, the loss times 2^16
backwards, the weight's gradient divided by 2^16 and compared with a float32 run. A gradient
pre-scaled by the mean's 1/N in float16 loses every entry below float16's smallest subnormal
(6e-8) before the scale could bring it back: with 16384 tokens that is most of them."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss as fl

SCALE = 2.0 ** 16
TOKENS = 16384
# (classes, hidden) per backend: the emulated CUDA kernels run 2^18 elements in reasonable time
SIZES = {"cpu": (512, 32), "simt": (16, 8), "cuda": (8000, 64)}
TOLERANCE = 1.2  # fusedloss's error at most this times PyTorch's


def _relative_error(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


def _head(backend, seed, spread):
    """hidden (tokens, H), weight (C, H) in float32; logits hidden @ weight.T spread by `spread`
    so that most softmax entries are small (a language model's are)."""
    classes, hidden = SIZES[backend.name]
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(TOKENS, hidden, generator=g) * spread / hidden ** 0.5
    w = torch.randn(classes, hidden, generator=g)
    return h.to(backend.device), w.to(backend.device)


def _weight_grad(loss_of_logits, h, w, autocast):
    w = w.clone().requires_grad_()
    with torch.autocast(h.device.type, dtype=torch.float16, enabled=autocast):
        loss = loss_of_logits(h @ w.t())
    (loss * SCALE).backward()
    return w.grad / SCALE


def _ce_target(backend, seed):
    classes, _ = SIZES[backend.name]
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, classes, (TOKENS,), generator=g)
    t[torch.rand(TOKENS, generator=g) < 0.2] = -100  # 20% ignored
    return t.to(backend.device)


def _bce_target(backend, seed):
    classes, _ = SIZES[backend.name]
    g = torch.Generator().manual_seed(seed + 2)
    return (torch.rand(TOKENS, classes, generator=g) < 0.05).float().to(backend.device)


@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
def test_autocast_float16_weight_gradient(backend, loss):
    h, w = _head(backend, 0, spread=8.0)
    if loss == "cross_entropy":
        t = _ce_target(backend, 0)
        ours, theirs = (lambda x: fl.cross_entropy(x, t)), (lambda x: F.cross_entropy(x, t))
    else:
        y = _bce_target(backend, 0)
        ours = lambda x: fl.binary_cross_entropy_with_logits(x, y)  # noqa: E731
        theirs = lambda x: F.binary_cross_entropy_with_logits(x, y)  # noqa: E731
    reference = _weight_grad(theirs, h.double(), w.double(), autocast=False)
    err_torch = _relative_error(_weight_grad(theirs, h, w, autocast=True), reference)
    err_ours = _relative_error(_weight_grad(ours, h, w, autocast=True), reference)
    assert err_ours <= TOLERANCE * err_torch, (err_ours, err_torch)


def test_linear_cross_entropy_float16_weight_gradient(backend):
    """The fused linear head on float16 operands under autocast (which leaves the op's operands
    as they are and makes the loss float32): the weight's and the input's gradients against
    PyTorch's autocast float16 F.linear + loss, both compared with float64."""
    h, w = _head(backend, 1, spread=8.0)
    t = _ce_target(backend, 1)

    def grads(loss_of, dtype, autocast=False):
        hh = h.to(dtype).detach().clone().requires_grad_()
        ww = w.to(dtype).detach().clone().requires_grad_()
        with torch.autocast(h.device.type, dtype=torch.float16, enabled=autocast):
            loss = loss_of(hh, ww)
        (loss * SCALE).backward()
        return hh.grad / SCALE, ww.grad / SCALE

    torch_loss = lambda hh, ww: F.cross_entropy(F.linear(hh, ww), t)  # noqa: E731
    ours_loss = lambda hh, ww: fl.linear_cross_entropy(hh, ww, t, chunk_size=4096)  # noqa: E731
    reference = grads(torch_loss, torch.float64)
    theirs = grads(torch_loss, torch.float32, autocast=True)
    ours = grads(ours_loss, torch.float16, autocast=True)
    for name, o, p, r in zip(("input", "weight"), ours, theirs, reference):
        err_ours, err_torch = _relative_error(o, r), _relative_error(p, r)
        assert err_ours <= TOLERANCE * err_torch, (name, err_ours, err_torch)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
def test_float16_logits_with_a_grad_output(backend, loss, reduction):
    """float16 logits without autocast and grad_output != 1: the logits' gradient within
    TOLERANCE of PyTorch's error against float64, and every backward the same bits."""
    classes, _ = SIZES[backend.name]
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(TOKENS, classes, generator=g) * 6).to(backend.device)
    if loss == "cross_entropy":
        t = _ce_target(backend, 3)
        ours = lambda z: fl.cross_entropy(z, t, reduction=reduction)  # noqa: E731
        theirs = lambda z: F.cross_entropy(z, t, reduction=reduction)  # noqa: E731
    else:
        y = _bce_target(backend, 3)
        ours = lambda z: fl.binary_cross_entropy_with_logits(z, y, reduction=reduction)  # noqa: E731
        theirs = lambda z: F.binary_cross_entropy_with_logits(z, y, reduction=reduction)  # noqa: E731
    scale = 1000.0 if reduction == "mean" else 1 / 64

    def grad(fn, dtype, retain=False):
        z = x.to(dtype).requires_grad_()
        out = fn(z) * scale
        out.backward(retain_graph=retain)
        first = z.grad.clone()
        if retain:
            z.grad = None
            out.backward()
            assert torch.equal(z.grad, first), "a second backward gave other bits"
        return first

    reference = grad(theirs, torch.float64)
    err_torch = _relative_error(grad(theirs, torch.float16), reference)
    err_ours = _relative_error(grad(ours, torch.float16, retain=True), reference)
    assert err_ours <= TOLERANCE * err_torch, (err_ours, err_torch)
