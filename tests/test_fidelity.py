"""Drop-in fidelity: what works with torch.nn.functional works the same with fusedloss.

Gradients of every input PyTorch differentiates (and of a floating mask, class weights and
pos_weight), gradcheck and gradgradcheck with default settings, torch.func transforms,
autocast, the z-loss convention, the extra outputs, and the inputs users actually pass."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss as fl
import reference as ref
from helpers import assert_close, grad_output_like, logits

REDUCTIONS = ["mean", "sum", "none"]


def _index_case(rows, classes, device, dtype=torch.float64):
    x = logits((rows, classes), dtype, device).requires_grad_()
    t = torch.randint(0, classes, (rows,), device=device)
    return x, t


def _check_grads(out, expected, ours, theirs, dtype):
    """Values, then the gradients of every pair (ours[i], theirs[i]) under one grad_output."""
    assert_close(out, expected, dtype)
    g = grad_output_like(out)
    got = torch.autograd.grad(out, ours, g)
    want = torch.autograd.grad(expected, theirs, g.double().cpu())
    for a, b in zip(got, want):
        assert_close(a, b, dtype)


# --- 1. no silently dropped gradient ----------------------------------------------------------

CE_EXTRA = {
    "plain": {},
    "weight+smoothing": {"label_smoothing": 0.2, "weight": True},
    "z_loss+softcap": {"z_loss": 1e-2, "softcap": 3.0},
}


def _on_cpu(kw):
    """Keyword arguments for the float64 reference, on the CPU."""
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _ce_kwargs(option, classes, device):
    kw = {k: v for k, v in CE_EXTRA[option].items() if k != "weight"}
    if CE_EXTRA[option].get("weight"):
        kw["weight"] = (torch.rand(classes, dtype=torch.float64) + 0.2).to(device)
    return kw


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(CE_EXTRA))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probability_target_gets_its_gradient(backend, reduction, option, dtype):
    """Distillation from a teacher that is trained too: d loss / d target, as PyTorch."""
    rows, classes = 7, 13
    x = logits((rows, classes), dtype, backend.device).requires_grad_()
    y = torch.softmax(torch.randn(rows, classes, dtype=torch.float64), 1).to(dtype)
    y = y.to(backend.device).requires_grad_()
    kw = _ce_kwargs(option, classes, backend.device)
    out = fl.cross_entropy(x, y, reduction=reduction, **kw)
    xr = x.detach().cpu().double().requires_grad_()
    yr = y.detach().cpu().double().requires_grad_()
    kw_ref = _on_cpu(kw)
    expected = ref.cross_entropy(xr, yr, reduction=reduction, **kw_ref)
    _check_grads(out, expected, (x, y), (xr, yr), dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(CE_EXTRA))
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_float_mask_gets_its_gradient(backend, reduction, option, probs):
    """Learned per-token weights: d loss / d mask_i is position i's loss term under the
    reduction, also where mask_i is 0 (and the mean's denominator depends on the mask)."""
    rows, classes = 9, 11
    x = logits((rows, classes), torch.float64, backend.device).requires_grad_()
    if probs:
        t = torch.softmax(torch.randn(rows, classes, dtype=torch.float64), 1).to(backend.device)
    else:
        t = torch.randint(0, classes, (rows,), device=backend.device)
        t[2] = -100
    m = torch.rand(rows, dtype=torch.float64) + 0.1
    m[[0, 5]] = 0
    m = m.to(backend.device).requires_grad_()
    kw = _ce_kwargs(option, classes, backend.device)
    out = fl.cross_entropy(x, t, reduction=reduction, mask=m, **kw)
    xr, mr = (v.detach().cpu().requires_grad_() for v in (x, m))
    kw_ref = _on_cpu(kw)
    expected = ref.cross_entropy(xr, t.cpu(), reduction=reduction, mask=mr, read_masked=True,
                                 **kw_ref)
    _check_grads(out, expected, (x, m), (xr, mr), torch.float64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_class_weight_gets_its_gradient(backend, reduction, probs):
    """PyTorch refuses a class weight that requires grad; fusedloss differentiates it (a
    float64 composite is the reference)."""
    rows, classes = 6, 8
    x = logits((rows, classes), torch.float64, backend.device).requires_grad_()
    if probs:
        t = torch.softmax(torch.randn(rows, classes, dtype=torch.float64), 1).to(backend.device)
    else:
        t = torch.randint(0, classes, (rows,), device=backend.device)
    w = (torch.rand(classes, dtype=torch.float64) + 0.2).to(backend.device).requires_grad_()
    e = 0.1
    out = fl.cross_entropy(x, t, w, reduction=reduction, label_smoothing=e)
    xr, wr = (v.detach().cpu().requires_grad_() for v in (x, w))
    # PyTorch's formula for the weighted, smoothed loss, written out
    log_p = torch.log_softmax(xr, 1)
    if probs:
        q = t.cpu() * (1 - e) + e / classes
        per = -(wr * q * log_p).sum(1)
        denominator = rows
    else:
        tc = t.cpu()
        per = (-(1 - e) * wr[tc] * log_p.gather(1, tc[:, None])[:, 0]
               - e / classes * (wr * log_p).sum(1))
        denominator = wr[tc].sum()
    expected = {"none": per, "sum": per.sum(), "mean": per.sum() / denominator}[reduction]
    _check_grads(out, expected, (x, w), (xr, wr), torch.float64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bce_target_weight_pos_weight_mask_get_their_gradients(backend, reduction, dtype):
    x = logits((5, 7), dtype, backend.device).requires_grad_()
    y = torch.rand(5, 7, dtype=torch.float64).to(dtype).to(backend.device).requires_grad_()
    w = (torch.rand(7, dtype=torch.float64) + 0.5).to(backend.device).requires_grad_()
    pw = (torch.rand(7, dtype=torch.float64) * 3).to(backend.device).requires_grad_()
    m = torch.rand(5, 1, dtype=torch.float64).to(backend.device).requires_grad_()
    out = fl.binary_cross_entropy_with_logits(x, y, w, reduction, pw, mask=m,
                                              label_smoothing=0.1)
    theirs = [v.detach().cpu().double().requires_grad_() for v in (x, y, w, pw, m)]
    xr, yr, wr, pwr, mr = theirs
    # PyTorch refuses weight / pos_weight that require grad: its formula, written out
    ys = yr * 0.9 + 0.05
    per = wr * ((1 - ys) * xr + (1 + (pwr - 1) * ys) * F.softplus(-xr)) * mr
    expected = {"none": per, "sum": per.sum(),
                "mean": per.sum() / mr.expand(5, 7).sum()}[reduction]
    _check_grads(out, expected, (x, y, w, pw, m), theirs, dtype)


def test_bce_target_gradient_matches_pytorch(backend):
    """Mutual learning: PyTorch differentiates BCE's target."""
    x = logits((4, 6), torch.float64, backend.device).requires_grad_()
    y = torch.rand(4, 6, dtype=torch.float64, device=backend.device).requires_grad_()
    out = fl.binary_cross_entropy_with_logits(x, y)
    expected = F.binary_cross_entropy_with_logits(x, y)
    assert_close(out, expected, torch.float64)
    for a, b in zip(torch.autograd.grad(out, (x, y)), torch.autograd.grad(expected, (x, y))):
        assert_close(a, b, torch.float64)


# --- 2 and 3. gradcheck and gradgradcheck with default settings --------------------------------

GRADCHECK_CE = {
    "plain": {},
    "smoothing+weight": {"label_smoothing": 0.3, "weight": True},
    "z_loss+softcap": {"z_loss": 0.05, "softcap": 2.0},
    "mask+ignore": {"mask": True, "ignore_index": 1},
}


def _gradcheck_ce_case(option, probs, device):
    rows, classes = 4, 5
    x = logits((rows, classes), torch.float64, device).requires_grad_()
    spec = GRADCHECK_CE[option]
    kw = {k: v for k, v in spec.items() if k not in ("weight", "mask")}
    tensors = [x]
    if probs:
        kw.pop("ignore_index", None)
        t = torch.softmax(torch.randn(rows, classes, dtype=torch.float64), 1).to(device)
        t.requires_grad_()
        tensors.append(t)
    else:
        t = torch.tensor([0, 1, 4, 2], device=device)
    names = []
    if spec.get("weight"):
        tensors.append((torch.rand(classes, dtype=torch.float64) + 0.2).to(device)
                       .requires_grad_())
        names.append("weight")
    if spec.get("mask"):
        tensors.append(torch.tensor([1.0, 0.3, 0.5, 2.0], dtype=torch.float64, device=device)
                       .requires_grad_())
        names.append("mask")

    def fn(reduction):
        def call(x, *rest):
            target = rest[0] if probs else t
            extra = dict(zip(names, rest[1:] if probs else rest))
            return fl.cross_entropy(x, target, reduction=reduction, **kw, **extra)
        return call

    return fn, tuple(tensors)


@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck],
                         ids=["gradcheck", "gradgradcheck"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(GRADCHECK_CE))
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_gradcheck_and_gradgradcheck_every_input(backend, option, reduction, probs, check):
    """Default settings: every backward through one graph gives the same bits, and the second
    derivatives (of the logits, a probability target, class weights, a mask) are exact."""
    fn, inputs = _gradcheck_ce_case(option, probs, backend.device)
    assert check(fn(reduction), inputs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_and_gradgradcheck_bce(backend, reduction):
    d = backend.device
    inputs = (logits((3, 4), torch.float64, d).requires_grad_(),
              torch.rand(3, 4, dtype=torch.float64, device=d).requires_grad_(),
              (torch.rand(4, dtype=torch.float64, device=d) + 0.5).requires_grad_(),
              (torch.rand(4, dtype=torch.float64, device=d) * 3).requires_grad_(),
              torch.rand(3, 1, dtype=torch.float64, device=d).requires_grad_())

    def fn(x, y, w, pw, m):
        return fl.binary_cross_entropy_with_logits(x, y, w, reduction, pw, mask=m,
                                                   label_smoothing=0.1)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_gradcheck_tf_functions(backend):
    x = logits((2, 3, 4), torch.float64, backend.device).requires_grad_()
    labels = torch.randint(0, 4, (2, 3), device=backend.device)
    assert torch.autograd.gradcheck(
        lambda x: fl.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=x), (x,))
    y = torch.rand(2, 3, 4, dtype=torch.float64, device=backend.device)
    assert torch.autograd.gradcheck(
        lambda x: fl.sigmoid_cross_entropy_with_logits(labels=y, logits=x), (x,))


def test_hessian_vector_product_matches_pytorch(backend):
    """A gradient penalty / HVP through a model: second derivatives flow into the parameters."""
    d = backend.device
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 7).double().to(d)
    h = torch.randn(6, 5, dtype=torch.float64, device=d)
    t = torch.randint(0, 7, (6,), device=d)
    results = []
    for loss_fn in (fl.cross_entropy, F.cross_entropy):
        loss = loss_fn(lin(h), t, label_smoothing=0.1)
        (gw,) = torch.autograd.grad(loss, lin.weight, create_graph=True)
        penalty = (gw ** 2).sum()
        results.append(torch.autograd.grad(penalty, (lin.weight, lin.bias)))
    for a, b in zip(*results):
        assert_close(a, b, torch.float64)


# --- 4. autocast ---------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_returns_float32_like_pytorch(backend, reduction):
    """Under autocast PyTorch's losses are float32; fusedloss reads the 16-bit logits in place
    and returns float32 too (no coarse bfloat16 loss for the logged curve)."""
    if backend.name == "simt":
        dev = "cpu"
    else:
        dev = backend.device.type
    lin = torch.nn.Linear(16, 50).to(backend.device)
    h = torch.randn(12, 16, device=backend.device)
    t = torch.randint(0, 50, (12,), device=backend.device)
    y = torch.rand(12, 50, device=backend.device)
    with torch.autocast(dev, dtype=torch.bfloat16):
        z = lin(h)
        assert z.dtype == torch.bfloat16
        ours = fl.cross_entropy(z, t, reduction=reduction)
        theirs = F.cross_entropy(z, t, reduction=reduction)
        ours_bce = fl.binary_cross_entropy_with_logits(z, y, reduction=reduction)
        theirs_bce = F.binary_cross_entropy_with_logits(z, y, reduction=reduction)
    for a, b in ((ours, theirs), (ours_bce, theirs_bce)):
        assert a.dtype == b.dtype == torch.float32
        assert a.shape == b.shape
        assert_close(a, b, torch.float32)
    g = grad_output_like(ours)
    (gz,) = torch.autograd.grad(ours, z, g)
    (gz_ref,) = torch.autograd.grad(theirs, z, g)
    assert gz.dtype == torch.bfloat16
    assert_close(gz, gz_ref.float(), torch.bfloat16)


def test_autocast_makes_no_float32_copy_of_the_logits(backend):
    """The op receives the 16-bit logits themselves: no N x C conversion runs before it."""
    if backend.name != "cpu":
        pytest.skip("the dispatch trace is checked once, on the CPU")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append((str(func), [a.shape if isinstance(a, torch.Tensor) else None
                                           for a in args]))
            return func(*args, **(kwargs or {}))

    z = torch.randn(64, 300).bfloat16().requires_grad_()
    t = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16), Record() as rec:
        loss = fl.cross_entropy(z * 1, t)
    assert loss.dtype == torch.float32
    copies = [c for c in rec.calls if "_to_copy" in c[0] and c[1] and c[1][0] == (64, 300)]
    assert not copies, copies


# --- 5. torch.func --------------------------------------------------------------------------------


def test_torch_func_grad_vmap_jacrev_match_pytorch(backend):
    d = backend.device
    x = logits((6, 9), torch.float64, d)
    t = torch.randint(0, 9, (6,), device=d)
    m = torch.rand(6, dtype=torch.float64, device=d)

    def ours(x, t):
        return fl.cross_entropy(x, t, label_smoothing=0.1)

    def theirs(x, t):
        return F.cross_entropy(x, t, label_smoothing=0.1)

    assert_close(torch.func.grad(ours)(x, t), torch.func.grad(theirs)(x, t), torch.float64)
    # per-sample gradients (differential privacy): vmap over the batch of grad
    per_ours = torch.func.vmap(torch.func.grad(ours), in_dims=(0, 0))(x[:, None], t[:, None])
    per_theirs = torch.func.vmap(torch.func.grad(theirs), in_dims=(0, 0))(x[:, None], t[:, None])
    assert_close(per_ours, per_theirs, torch.float64)
    jac = torch.func.jacrev(lambda x: fl.cross_entropy(x, t, reduction="none", mask=m))(x)
    jac_ref = torch.func.jacrev(lambda x: F.cross_entropy(x, t, reduction="none") * m)(x)
    assert_close(jac, jac_ref, torch.float64)
    y = torch.rand(6, 9, dtype=torch.float64, device=d)
    g_bce = torch.func.grad(lambda x: fl.binary_cross_entropy_with_logits(x, y))(x)
    g_bce_ref = torch.func.grad(lambda x: F.binary_cross_entropy_with_logits(x, y))(x)
    assert_close(g_bce, g_bce_ref, torch.float64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_mode_ad_matches_pytorch(backend, reduction):
    """torch.autograd.forward_ad (dual tensors) and torch.func.jvp: the tangent of the loss,
    as PyTorch's losses give it (the kernels have no jvp; the compositions run instead)."""
    import torch.autograd.forward_ad as fwAD

    d = backend.device
    x = logits((7, 11), torch.float64, d)
    tangent = torch.randn(7, 11, dtype=torch.float64, device=d)
    t = torch.randint(0, 11, (7,), device=d)
    y = torch.rand(7, 11, dtype=torch.float64, device=d)
    cases = [
        (lambda x: fl.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1),
         lambda x: F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)),
        (lambda x: fl.binary_cross_entropy_with_logits(x, y, reduction=reduction),
         lambda x: F.binary_cross_entropy_with_logits(x, y, reduction=reduction)),
    ]
    for ours, theirs in cases:
        with fwAD.dual_level():
            got = fwAD.unpack_dual(ours(fwAD.make_dual(x, tangent)))
            want = fwAD.unpack_dual(theirs(fwAD.make_dual(x.cpu(), tangent.cpu())))
        assert got.tangent is not None
        assert_close(got.primal, want.primal, torch.float64)
        assert_close(got.tangent, want.tangent, torch.float64)
        got_jvp = torch.func.jvp(ours, (x,), (tangent,))
        want_jvp = torch.func.jvp(theirs, (x.cpu(),), (tangent.cpu(),))
        for a, b in zip(got_jvp, want_jvp):
            assert_close(a, b, torch.float64)


def test_loss_without_gradient_records_no_graph(backend):
    """With nothing to differentiate (no_grad, or no input requiring grad) the op is called
    below autograd: same values, no grad_fn, nothing kept alive."""
    d = backend.device
    x = logits((5, 8), torch.float64, d)
    t = torch.randint(0, 8, (5,), device=d)
    y = torch.rand(5, 8, dtype=torch.float64, device=d)
    for ours, theirs in [(lambda x: fl.cross_entropy(x, t, reduction="none"),
                          lambda x: F.cross_entropy(x, t, reduction="none")),
                         (lambda x: fl.binary_cross_entropy_with_logits(x, y),
                          lambda x: F.binary_cross_entropy_with_logits(x, y))]:
        want = theirs(x.cpu())
        for got in (ours(x), _no_grad_call(ours, x.clone().requires_grad_())):
            assert got.grad_fn is None and not got.requires_grad
            assert_close(got, want, torch.float64)


def _no_grad_call(fn, x):
    with torch.no_grad():
        return fn(x)


# --- 6. float32 as accurate as PyTorch -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("classes", [7, 1000])
def test_confident_rows_keep_their_digits(dtype, classes):
    """Rows whose target logit stands 12 above the rest (a trained model's usual case): each
    row's loss (1e-5 or so) and the target's gradient p_t - 1 to a few ulps of themselves.
    Summing exp(z - max) with the max's 1 in it, as PyTorch does, leaves them ~1e-7 absolute
    off in float32: 1e-2 of themselves. The CPU kernels only: the CUDA ones keep the plain sum
    (common/losses.h, softmax_row_stats_of_sum)."""
    d = "cpu"
    rows = 300
    x = logits((rows, classes), torch.float64, "cpu", scale=2.0)
    t = torch.randint(0, classes, (rows,))
    x[torch.arange(rows), t] += 12
    x = x.to(dtype)
    # reference: relative to the target's logit, without a cancellation (float64 differences
    # of values of dtype are exact)
    xd = x.double()
    e = torch.exp(xd - xd[torch.arange(rows), t][:, None])
    e[torch.arange(rows), t] = 0
    r = e.sum(1)
    ref_loss, ref_grad_t = torch.log1p(r), -r / (1 + r)

    def errors(loss_fn, x):
        x = x.clone().requires_grad_()
        loss = loss_fn(x, t.to(x.device), reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), x)
        rel = lambda v, ref: ((v.double().cpu() - ref).abs() / ref.abs()).max().item()
        return rel(loss, ref_loss), rel(g[torch.arange(rows), t.to(x.device)], ref_grad_t)

    ours = errors(fl.cross_entropy, x.to(d))
    theirs = errors(F.cross_entropy, x)
    eps = torch.finfo(dtype).eps
    for got in ours:  # (PyTorch's own errors, `theirs`, are shown on failure)
        assert got <= 16 * eps, (ours, theirs)


# --- 8. z-loss convention ---------------------------------------------------------------------------


@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_z_loss_of_a_mean_is_divided_by_the_valid_count(backend, probs):
    """The z-loss part of a mean is divided by the count of valid positions (PaLM, Liger,
    flash-attention), not by the weighted denominator."""
    x = logits((10, 12), torch.float64, backend.device)
    if probs:
        t = torch.softmax(torch.randn(10, 12, dtype=torch.float64), 1).to(backend.device)
    else:
        t = torch.randint(0, 12, (10,), device=backend.device)
    m = torch.rand(10, dtype=torch.float64, device=backend.device)
    base = fl.cross_entropy(x, t, mask=m, z_loss=0.1)
    if not probs:  # (a probability target's mean divides by the positions, as PyTorch's)
        tripled = fl.cross_entropy(x, t, torch.full((12,), 3.0, dtype=torch.float64,
                                                    device=backend.device), mask=m, z_loss=0.1)
        assert_close(tripled, base, torch.float64)
    lse = torch.logsumexp(x.cpu(), 1)
    if probs:
        ce = -(t.cpu() * torch.log_softmax(x.cpu(), 1)).sum(1)
    else:
        ce = F.cross_entropy(x.cpu(), t.cpu(), reduction="none")
    expected = (m.cpu() * (ce + 0.1 * lse**2)).sum() / m.cpu().sum()
    assert_close(base, expected, torch.float64)


# --- 9. extra outputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_extra_outputs(backend, reduction, dtype):
    rows, classes = 40, 23
    # small integers: many ties, so argmax's first-maximum rule matters
    x = torch.randint(-3, 4, (rows, classes)).to(dtype).to(backend.device)
    t = x.float().argmax(1).cpu()
    t[::3] = torch.randint(0, classes, (len(t[::3]),))
    t[5] = -100
    m = torch.rand(rows, dtype=torch.float64)
    m[7] = 0
    t, m = t.to(backend.device), m.to(backend.device)
    out = fl.cross_entropy(x, t, reduction=reduction, mask=m, z_loss=1e-2,
                           return_z_loss=True, return_token_accuracy=True, return_lse=True)
    assert isinstance(out, fl.CrossEntropyOutput)
    plain = fl.cross_entropy(x, t, reduction=reduction, mask=m, z_loss=1e-2)
    assert torch.equal(out.loss, plain)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for v in (out.z_loss, out.token_accuracy, out.lse):
        assert v.dtype == acc and not v.requires_grad
    xr, tc, mc = x.double().cpu(), t.cpu(), m.cpu()
    valid = (tc != -100) & (mc != 0)
    lse = torch.where(valid, torch.logsumexp(xr, 1), 0)
    assert_close(out.lse, lse, torch.float32)
    z_rows = torch.where(valid, mc * 1e-2 * lse**2, 0)
    correct = torch.where(valid & (xr.argmax(1) == tc), mc, 0)
    count = torch.where(tc != -100, mc, 0).sum()
    if reduction == "none":
        assert_close(out.z_loss, z_rows, torch.float32)
        assert_close(out.token_accuracy, correct, torch.float32)
    else:
        z_total = z_rows.sum() / count if reduction == "mean" else z_rows.sum()
        assert_close(out.z_loss, z_total, torch.float32)
        assert_close(out.token_accuracy, correct.sum() / count, torch.float32)


def test_extra_outputs_of_sequence_loss_and_module(backend):
    x = logits((3, 5, 7), torch.float32, backend.device)
    t = torch.randint(0, 7, (3, 5), device=backend.device)
    w = torch.ones(3, 5, device=backend.device)
    out = fl.sequence_loss(x, t, w, return_token_accuracy=True, return_lse=True)
    expected_acc = (x.argmax(-1) == t).double().mean()
    assert_close(out.token_accuracy, expected_acc, torch.float32)
    assert out.lse.shape == (3, 5) and out.z_loss is None
    per_row = fl.sequence_loss(x, t, w, True, False, return_token_accuracy=True)
    assert_close(per_row.token_accuracy, (x.argmax(-1) == t).double().mean(1), torch.float32)
    crit = fl.CrossEntropyLoss(return_z_loss=True, z_loss=1e-3)
    res = crit(x.reshape(-1, 7), t.reshape(-1))
    assert isinstance(res, fl.CrossEntropyOutput) and res.token_accuracy is None


def test_token_accuracy_needs_class_indices(backend):
    x = logits((3, 4), torch.float32, backend.device)
    y = torch.softmax(x, 1)
    with pytest.raises(ValueError, match="return_token_accuracy=True needs class-index"):
        fl.cross_entropy(x, y, return_token_accuracy=True)


# --- 10. inputs users pass ------------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_attention_mask_is_accepted(backend, mask_dtype):
    x = logits((6, 9), torch.float32, backend.device)
    t = torch.randint(0, 9, (6,), device=backend.device)
    attention = torch.tensor([1, 1, 0, 1, 0, 1]).to(mask_dtype).to(backend.device)
    out = fl.cross_entropy(x, t, mask=attention)
    expected = ref.cross_entropy(x.cpu(), t.cpu(), mask=attention.cpu().double())
    assert_close(out, expected, torch.float32)


def test_floating_class_index_target_says_indices_must_be_integers():
    x = torch.randn(4, 5)
    with pytest.raises(TypeError, match="class indices, which must be an integer tensor"):
        fl.cross_entropy(x, torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_bce_shape_error_prints_each_shape_once():
    with pytest.raises(ValueError) as err:
        fl.binary_cross_entropy_with_logits(torch.randn(4, 1), torch.rand(4))
    assert str(err.value) == "Target size (4,) must be the same as input size (4, 1)"
