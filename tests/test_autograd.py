"""Autograd: gradcheck (default settings) for every option, the handed-over gradient,
inplace_backward's safety, and second backwards that give the same bits as the first."""

import gc
import weakref

import pytest
import torch

import fusedloss as fl
from helpers import assert_close, logits

CE_OPTIONS = {
    "plain": {},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.3},
    "ignore+mask": {"ignore_index": 1, "mask": True},
    "z_loss+softcap": {"z_loss": 0.05, "softcap": 2.0},
}


def ce_kwargs(option, rows, classes, device):
    kw = {k: v for k, v in option.items() if k not in ("weight", "mask")}
    if option.get("weight"):
        kw["weight"] = torch.rand(classes, dtype=torch.float64, device=device) + 0.2
    if option.get("mask"):
        kw["mask"] = torch.tensor([1.0, 0.0, 0.5, 2.0][:rows], dtype=torch.float64, device=device)
    return kw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(CE_OPTIONS), ids=list(CE_OPTIONS))
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_gradcheck_cross_entropy(backend, option, reduction, probs):
    rows, classes = 4, 5
    x = logits((rows, classes), torch.float64, backend.device).requires_grad_()
    kw = ce_kwargs(CE_OPTIONS[option], rows, classes, backend.device)
    if probs:
        kw.pop("ignore_index", None)
        target = torch.softmax(torch.randn(rows, classes, dtype=torch.float64), 1)
    else:
        target = torch.tensor([0, 1, 4, 2])
    target = target.to(backend.device)
    assert torch.autograd.gradcheck(
        lambda x: fl.cross_entropy(x, target, reduction=reduction, **kw), (x,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_bce(backend, reduction):
    x = logits((3, 4), torch.float64, backend.device).requires_grad_()
    y = torch.rand(3, 4, dtype=torch.float64, device=backend.device)
    kw = {"weight": torch.rand(4, dtype=torch.float64, device=backend.device),
          "pos_weight": torch.rand(4, dtype=torch.float64, device=backend.device) * 3,
          "mask": torch.rand(3, 1, dtype=torch.float64, device=backend.device),
          "label_smoothing": 0.1}
    assert torch.autograd.gradcheck(
        lambda x: fl.binary_cross_entropy_with_logits(x, y, reduction=reduction, **kw), (x,))


def test_gradcheck_sequence_loss(backend):
    x = logits((2, 3, 4), torch.float64, backend.device).requires_grad_()
    t = torch.randint(0, 4, (2, 3), device=backend.device)
    w = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.5, 1.0]], dtype=torch.float64, device=backend.device)
    for avg_t in (True, False):
        for avg_b in (True, False):
            assert torch.autograd.gradcheck(lambda x: fl.sequence_loss(x, t, w, avg_t, avg_b), (x,))


def test_grad_output_one_hands_over_the_forward_buffer(backend):
    """grad_output == 1: the backward returns the forward's gradient buffer untouched (no pass)."""
    x = logits((6, 10), torch.float32, backend.device).requires_grad_()
    t = torch.randint(0, 10, (6,), device=backend.device)
    seen = []
    x.register_hook(lambda g: seen.append(g))
    loss = fl.cross_entropy(x, t)
    saved = loss.grad_fn  # the op's node keeps the pre-scaled gradient until backward
    loss.backward()
    assert saved is not None and len(seen) == 1
    expected_x = x.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(expected_x, t).backward()
    assert_close(x.grad, expected_x.grad, torch.float32)


def test_scale_grad_inplace(backend):
    g = torch.randn(5, 7, device=backend.device)
    before = g.clone()
    torch.ops.fusedloss.scale_grad_(g, torch.tensor(1.0, device=backend.device))
    assert torch.equal(g, before)
    torch.ops.fusedloss.scale_grad_(g, torch.tensor(-0.5, device=backend.device))
    assert torch.equal(g, before * -0.5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss_fn", ["cross_entropy", "bce"])
@pytest.mark.parametrize("grad_output", [1.0, 0.3])
def test_second_backward_gives_the_same_bits(backend, loss_fn, reduction, grad_output):
    """retain_graph=True: the first backward hands its buffer over, the second recomputes it
    with the forward kernel, so both give the same bits (gradcheck's reentrancy check), also
    when nothing but the graph holds the logits."""
    h = logits((5, 37), torch.float32, backend.device).requires_grad_()
    if loss_fn == "cross_entropy":
        t = torch.randint(0, 37, (5,), device=backend.device)
        loss = fl.cross_entropy(h * 2, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    else:
        y = torch.rand(5, 37, device=backend.device)
        loss = fl.binary_cross_entropy_with_logits(h * 2, y, reduction=reduction)
    g = torch.full(loss.shape, grad_output, device=backend.device)
    (first,) = torch.autograd.grad(loss, h, g, retain_graph=True)
    (second,) = torch.autograd.grad(loss, h, g)
    assert torch.equal(first, second)


def test_second_backward_after_inplace_raises_clear_error(backend):
    h = logits((3, 4), torch.float32, backend.device).requires_grad_()
    z = h * 2
    loss = fl.cross_entropy(z, torch.tensor([0, 1, 2], device=backend.device),
                            inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_second_backward_works_with_reduction_none(backend):
    x = logits((3, 4), torch.float32, backend.device).requires_grad_()
    loss = fl.cross_entropy(x, torch.tensor([0, 1, 2], device=backend.device), reduction="none")
    loss.sum().backward(retain_graph=True)
    first = x.grad.clone()
    loss.sum().backward()
    assert_close(x.grad, 2 * first, torch.float32)


def test_input_without_grad_computes_no_gradient(backend):
    x = logits((3, 4), torch.float32, backend.device)
    loss = fl.cross_entropy(x, torch.tensor([0, 1, 2], device=backend.device))
    assert not loss.requires_grad
    with torch.no_grad():
        loss2 = fl.cross_entropy(x.requires_grad_(), torch.tensor([0, 1, 2], device=backend.device))
    assert not loss2.requires_grad and torch.equal(loss, loss2)


# --- inplace_backward ------------------------------------------------------------------------


def linear_logits(device, dtype=torch.float32):
    torch.manual_seed(3)
    h = torch.randn(8, 6, dtype=dtype, device=device, requires_grad=True)
    lin = torch.nn.Linear(6, 11).to(device=device, dtype=dtype)
    return h, lin


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inplace_backward_matches_and_bumps_version(backend, reduction):
    h, lin = linear_logits(backend.device)
    t = torch.randint(0, 11, (8,), device=backend.device)
    out = lin(h)
    version = out._version
    loss = fl.cross_entropy(out, t, reduction=reduction, label_smoothing=0.1,
                            inplace_backward=True)
    assert out._version > version  # autograd sees the write
    loss.backward(torch.tensor(0.7, device=backend.device))
    g_inplace = (h.grad.clone(), lin.weight.grad.clone())
    h.grad = None
    lin.weight.grad = None
    ref = torch.nn.functional.cross_entropy(lin(h), t, reduction=reduction, label_smoothing=0.1)
    (ref * 0.7).backward()
    assert_close(g_inplace[0], h.grad, torch.float32)
    assert_close(g_inplace[1], lin.weight.grad, torch.float32)


def test_inplace_backward_never_overwrites_a_leaf(backend):
    x = logits((4, 6), torch.float32, backend.device).requires_grad_()
    before = x.detach().clone()
    fl.cross_entropy(x, torch.tensor([0, 1, 2, 3], device=backend.device),
                     inplace_backward=True).backward()
    assert torch.equal(x.detach(), before)


def test_inplace_backward_falls_back_when_producer_saved_the_logits(backend):
    """tanh saves its output for its backward: writing the gradient there would corrupt it."""
    x = logits((4, 6), torch.float32, backend.device).requires_grad_()
    t = torch.tensor([0, 1, 2, 3], device=backend.device)
    z = torch.tanh(x)
    before = z.detach().clone()
    fl.cross_entropy(z, t, inplace_backward=True).backward()
    assert torch.equal(z.detach(), before)
    expected_x = x.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(torch.tanh(expected_x), t).backward()
    assert_close(x.grad, expected_x.grad, torch.float32)


def test_inplace_backward_other_consumer_refuses_instead_of_corrupting(backend):
    """Another op that saved the logits raises at its backward: never a silent wrong answer."""
    h, lin = linear_logits(backend.device)
    out = lin(h)
    other = (out * out).sum()  # mul saves `out`
    loss = fl.cross_entropy(out, torch.randint(0, 11, (8,), device=backend.device),
                            inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_inplace_backward_with_nd_input(backend):
    """(N, C, T) input: the kernel works on a transposed copy, which it may overwrite freely."""
    h = torch.randn(2, 5, 3, device=backend.device, requires_grad=True)
    t = torch.randint(0, 5, (2, 3), device=backend.device)
    (fl.cross_entropy(h * 2, t, inplace_backward=True)).backward()
    g = h.grad.clone()
    h.grad = None
    torch.nn.functional.cross_entropy(h * 2, t).backward()
    assert_close(g, h.grad, torch.float32)


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "bce", "cross_entropy_inplace"])
def test_backward_is_free_when_grad_output_is_one(backend, loss_fn):
    """The backward hands over the forward's buffer: no N x C allocation, fill or copy, and the
    gradient carries no autograd history."""
    if backend.name == "simt":
        pytest.skip("the SIMT emulator copies every buffer into and out of guarded memory")
    h = logits((64, 300), torch.float32, backend.device).requires_grad_()
    x = h * 1  # a non-leaf, so the in-place variant may take its fast path
    t = torch.randint(0, 300, (64,), device=backend.device)
    if loss_fn == "bce":
        loss = fl.binary_cross_entropy_with_logits(x, torch.rand(64, 300, device=backend.device))
    else:
        loss = fl.cross_entropy(x, t, inplace_backward=loss_fn.endswith("inplace"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        (g,) = torch.autograd.grad(loss, x)
    # the engine's own scalar ones_like(loss) is fine; anything touching 64 x 300 is not
    big = [(e.name, e.input_shapes) for e in prof.events()
           if any(len(s) == 2 and s[0] * s[1] == x.numel() for s in e.input_shapes
                  if isinstance(s, (list, tuple)))
           and e.name in {"aten::zeros", "aten::fill_", "aten::zero_", "aten::copy_",
                          "aten::clone", "aten::mul", "aten::mul_", "aten::empty_like"}]
    assert not big, big
    assert not g.requires_grad and g.grad_fn is None


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "bce"])
def test_dropping_the_loss_frees_the_gradient_at_once(backend, loss_fn):
    """No reference cycle through the autograd node: a loss dropped without a backward frees
    its saved gradient immediately, not at the next garbage collection."""
    x = logits((64, 32), torch.float32, backend.device).requires_grad_()
    probe = []

    def run():
        if loss_fn == "bce":
            loss = fl.binary_cross_entropy_with_logits(x, torch.rand(64, 32, device=backend.device))
        else:
            loss = fl.cross_entropy(x, torch.randint(0, 32, (64,), device=backend.device))
        probe.append(weakref.ref(loss.grad_fn))

    gc.disable()
    try:
        run()
        assert probe[0]() is None, "the loss's autograd node outlived the loss"
    finally:
        gc.enable()
