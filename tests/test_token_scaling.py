"""token_scaling=True (Liger-Kernel's option, from Dynamic Fine-Tuning): each position's whole
loss times its target's detached probability p_t, the mean's denominators unchanged. Against
the float64 reference (tests/reference.py: PyTorch's per-position loss times p_t.detach()) on
every backend, dtype, option and reduction, through cross_entropy, linear_cross_entropy, the
in-place, compiled and composed paths, and each CUDA path (rows, split) forced on the SIMT
harness; and its errors."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss as fl
import reference as ref
from cuda_kinds import NO_SPLIT, SPLIT_FEW, kind  # noqa: F401  (the fixture)
from helpers import assert_close, logits
from test_cross_entropy import DTYPES, OPTIONS, make_case, run_parity
from test_linear_cross_entropy import check_parity
from test_linear_cross_entropy import make_case as make_linear_case

# (rows, classes), each with the code path it covers
SHAPES = [
    (1, 1),  # one class: p_t is 1, the loss and gradient 0
    (3, 7),  # classes below one vector: tail-only rows
    (4, 17),  # one float vector and a one-element tail
    (4, 33),  # one past two float vectors
    (37, 1000),  # many rows over threads / blocks, a ragged tail
    (0, 5),  # empty batch
]

# The options whose parts the scaling multiplies (every part of the row's loss), and the rows
# it must leave at 0 (ignored, masked).
SCALED_OPTIONS = ["plain", "weight+smoothing", "ignore_index", "float_mask", "bool_mask",
                  "z_loss", "softcap", "everything"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", SCALED_OPTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_and_gradient_are_the_scaled_reference(backend, dtype, shape, option, reduction):
    x, target, kw = make_case(*shape, dtype, backend.device, OPTIONS[option])
    run_parity(x, target, dict(kw, token_scaling=True), reduction, dtype, backend.device)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_vocabulary(backend, dtype, reduction):
    """A Llama-3-sized row (longer than L1 / shared memory; the CUDA kernels' split path on a
    GPU), every option."""
    x, target, kw = make_case(2, 128256, dtype, backend.device, OPTIONS["everything"])
    run_parity(x, target, dict(kw, token_scaling=True), reduction, dtype, backend.device)


CUDA_PATHS = {"rows": (NO_SPLIT, "softmax_ce_rows"),
              "split": (SPLIT_FEW, "softmax_ce_split_finish")}


@pytest.mark.parametrize("path", list(CUDA_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_every_cuda_path(kind, path, dtype, reduction):
    """Each CUDA path forced (SIMT: the launch log checked): the rows kernel and the split
    kernels, forward and the gradient from saved statistics (reduction none; float16's
    gradient written in the backward)."""
    cfg, kernel = CUDA_PATHS[path]
    x, target, kw = make_case(6, 3001, dtype, kind.device, OPTIONS["everything"])
    with kind.run(**cfg):
        run_parity(x, target, dict(kw, token_scaling=True), reduction, dtype, kind.device)
    kind.expect(kernel)


def test_definition_detached_probability_times_cross_entropy(backend):
    """The definition itself, written out: (p_t.detach() * per-position CE), reduced by the
    unscaled denominator; its gradient is p_t times the unscaled gradient (p_t a constant),
    not the gradient of p_t * CE with p_t differentiated."""
    x = logits((11, 29), torch.float64, backend.device)
    t = torch.randint(0, 29, (11,), device=backend.device)
    t[3] = -100
    xa = x.clone().requires_grad_()
    loss = fl.cross_entropy(xa, t, token_scaling=True)
    (grad,) = torch.autograd.grad(loss, xa)

    xr = x.clone().requires_grad_()
    ce = F.cross_entropy(xr, t, reduction="none")
    p_t = torch.softmax(xr, 1).gather(1, t.clamp(min=0)[:, None])[:, 0].detach()
    expected = (p_t * ce).sum() / (t != -100).sum()
    (expected_grad,) = torch.autograd.grad(expected, xr)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    # the unscaled gradient, row by row times p_t (ignored rows: 0)
    (plain,) = torch.autograd.grad(fl.cross_entropy(xr, t), xr)
    torch.testing.assert_close(grad, plain * p_t[:, None])
    assert not torch.allclose(grad, plain)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_everything_padded_or_ignored(backend, reduction):
    """No row read: the mean is 0 with a zero gradient, as without scaling."""
    x = logits((4, 9), torch.float32, backend.device).requires_grad_()
    t = torch.full((4,), -100, device=backend.device)
    loss = fl.cross_entropy(x, t, reduction=reduction, token_scaling=True)
    loss.sum().backward()
    assert not loss.detach().any() and not x.grad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inplace_backward(backend, dtype, reduction):
    """The gradient written over the logits carries the scaling too."""
    x, target, kw = make_case(9, 100, dtype, backend.device, OPTIONS["everything"])
    kw = {k: (v.to(backend.device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    if dtype != torch.float64:
        kw["weight"] = kw["weight"].float()
    w = torch.randn(100, 100, dtype=torch.float64).to(dtype).to(backend.device) / 10
    grads = []
    for inplace in (False, True):
        xa = x.clone().requires_grad_()
        loss = fl.cross_entropy(xa @ w, target, reduction=reduction, token_scaling=True,
                                inplace_backward=inplace, **kw)
        loss.backward()
        grads.append((loss.detach(), xa.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("chunk_loop", ["host", "device"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", ["plain", "everything"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_linear_cross_entropy(backend, dtype, option, reduction, chunk_loop, monkeypatch):
    """Through the fused linear cross-entropy's chunks (several, a short last one; the chunk
    loop as on the CPU, or as on a GPU: FUSEDLOSS_TEST_DEVICE_CHUNKS): loss and the gradients
    of input, weight and bias against the reference on the materialised logits."""
    monkeypatch.setenv("FUSEDLOSS_TEST_DEVICE_CHUNKS", "1" if chunk_loop == "device" else "0")
    x, w, b, target, kw = make_linear_case(37, 16, 50, dtype, backend.device, OPTIONS[option])
    check_parity(x, w, b, target, dict(kw, token_scaling=True), reduction, dtype,
                 backend.device, chunk_size=8)


def test_linear_cross_entropy_module():
    """fl.LinearCrossEntropyLoss(token_scaling=True) is the function's."""
    torch.manual_seed(0)
    module = fl.LinearCrossEntropyLoss(8, 20, bias=True, token_scaling=True, z_loss=1e-3)
    x = torch.randn(6, 8)
    t = torch.randint(0, 20, (6,))
    expected = fl.linear_cross_entropy(x, module.linear.weight, t, linear_bias=module.linear.bias,
                                       z_loss=1e-3, token_scaling=True)
    torch.testing.assert_close(module(x, t), expected)
    assert not torch.allclose(module(x, t), fl.linear_cross_entropy(
        x, module.linear.weight, t, linear_bias=module.linear.bias, z_loss=1e-3))
    assert "token_scaling=True" in repr(module)


def test_cross_entropy_module():
    torch.manual_seed(0)
    x = torch.randn(6, 20)
    t = torch.randint(0, 20, (6,))
    module = fl.CrossEntropyLoss(label_smoothing=0.1, token_scaling=True)
    torch.testing.assert_close(module(x, t),
                               fl.cross_entropy(x, t, label_smoothing=0.1, token_scaling=True))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_func_and_double_backward(reduction):
    """Under torch.func (the compositions) the scaled loss and gradient are the kernels'; a
    double backward differentiates the composition, whose first derivative is the kernels'."""
    x = logits((7, 13), torch.float64, "cpu")
    t = torch.randint(0, 13, (7,))
    t[2] = -100
    m = torch.rand(7, dtype=torch.float64)
    kw = dict(reduction=reduction, mask=m, label_smoothing=0.1, z_loss=1e-2, softcap=5.0,
              token_scaling=True)

    def total(x):
        return fl.cross_entropy(x, t, **kw).sum()

    xa = x.clone().requires_grad_()
    kernel_loss = total(xa)
    (kernel_grad,) = torch.autograd.grad(kernel_loss, xa, create_graph=True)
    func_grad = torch.func.grad(total)(x)
    torch.testing.assert_close(func_grad, kernel_grad.detach())
    torch.testing.assert_close(torch.func.vmap(total)(x[None])[0], kernel_loss.detach())
    # second derivatives: those of the composition with p_t a constant
    hvp = torch.autograd.grad(kernel_grad, xa, torch.ones_like(x))[0]
    expected = torch.func.jvp(torch.func.grad(total), (x,), (torch.ones_like(x),))[1]
    torch.testing.assert_close(hvp, expected)


def test_compiled_equals_eager():
    t = torch.randint(0, 40, (16,))
    h = torch.randn(16, 16)
    w = torch.randn(40, 16, requires_grad=True)

    def step(h, w):
        return fl.cross_entropy(h @ w.t(), t, label_smoothing=0.1, token_scaling=True)

    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        w.grad = None
        loss = fn(h, w)
        loss.backward()
        results.append((loss.detach(), w.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_errors():
    x = torch.randn(3, 5)
    t = torch.randint(0, 5, (3,))
    with pytest.raises(ValueError, match="token_scaling=True needs class-index targets"):
        fl.cross_entropy(x, torch.softmax(x, 1), token_scaling=True)
    with pytest.raises(ValueError, match="token_scaling=True needs class-index targets"):
        fl.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.softmax(x, 1),
                                token_scaling=True)
    for bad in ("yes", 1, None, torch.tensor(True)):
        with pytest.raises(TypeError, match=r"token_scaling must be True or False, got "):
            fl.cross_entropy(x, t, token_scaling=bad)
        with pytest.raises(TypeError, match=r"token_scaling must be True or False, got "):
            fl.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), t, token_scaling=bad)
    with pytest.raises(TypeError, match=r"token_scaling must be True or False, got 'yes'"):
        fl.cross_entropy(x, t, token_scaling="yes")


def test_op_refuses_probability_targets_and_class_slices():
    """The ops themselves (called directly) refuse what the option cannot mean."""
    from fusedloss import _ops
    ops = _ops.current()
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="token_scaling needs class-index targets"):
        ops.softmax_ce(x, torch.softmax(x, 1), None, None, -100, 0.0, 0.0, 0.0, 1, 0.0, False,
                       False, None, True)
    stats = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="token_scaling is not supported on a class slice"):
        ops.softmax_ce_backward(torch.ones(3), x, torch.tensor([0, 1, 7]), None, None, stats,
                                -100, 0.0, 0.0, 0.0, 0, 0.0, None, 5, 10, None, True)


def test_reference_scales_by_detached_target_probability():
    """The reference's own definition, checked against a direct computation."""
    x = torch.randn(5, 6, dtype=torch.float64)
    t = torch.randint(0, 6, (5,))
    per = ref.cross_entropy(x, t, reduction="none", token_scaling=True)
    p_t = torch.softmax(x, 1)[torch.arange(5), t]
    torch.testing.assert_close(per, -torch.log(p_t) * p_t)
    assert_close(ref.cross_entropy(x, t, token_scaling=True), per.mean(), torch.float64)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_linear_targets_at_both_ends_and_ignored(backend, reduction):
    """Targets 0 and V - 1 beside ignored ones, through the fused linear cross-entropy: the
    loss and gradients are finite and the reference's (the ignored rows contribute 0)."""
    x, w, b, _, kw = make_linear_case(6, 8, 1000, torch.float32, backend.device,
                                      OPTIONS["plain"])
    target = torch.tensor([0, 100, -100, 500, -100, 999], device=backend.device)
    check_parity(x, w, b, target, dict(kw, token_scaling=True), reduction, torch.float32,
                 backend.device)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mask_that_requires_grad(backend, reduction):
    """A floating mask that requires grad gets d loss / d mask_i, p_t times position i's loss
    term (a masked-out position's too), beside the logits' gradient."""
    x = logits((6, 11), torch.float64, backend.device).requires_grad_()
    t = torch.randint(0, 11, (6,), device=backend.device)
    t[1] = -100
    m = torch.rand(6, dtype=torch.float64, device=backend.device)
    m[2] = 0
    m.requires_grad_()
    w = torch.rand(11, dtype=torch.float64, device=backend.device) + 0.5
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2, token_scaling=True)
    out = fl.cross_entropy(x, t, w, mask=m, **kw)
    grads = torch.autograd.grad(out.sum(), (x, m))
    xr, mr = (v.detach().cpu().requires_grad_() for v in (x, m))
    expected = ref.cross_entropy(xr, t.cpu(), w.cpu(), mask=mr, read_masked=True, **kw)
    expected_grads = torch.autograd.grad(expected.sum(), (xr, mr))
    assert_close(out, expected, torch.float64)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, torch.float64)
