"""The distillation losses (fusedloss.distillation_loss, linear_distillation_loss, their
modules) against the float64 PyTorch reference (tests/reference.py), on fresh random data and
odd sizes, on every backend; the autograd contract of cross-entropy (gradcheck, gradgradcheck,
torch.func, forward AD, autocast, torch.compile); the argument errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import fusedloss as fl
import reference
from helpers import assert_close, grad_output_like, logits

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
SHAPES = [(1, 1), (1, 7), (7, 17), (3, 5, 33), (0, 10), (4, 1000)]


def random_case(shape, dtype, device, mask_kind, teacher_dtype=None, ignore=True):
    s = logits(shape, dtype, device)
    t = logits(shape, teacher_dtype or dtype, device)
    classes, positions = shape[-1], shape[:-1]
    target = torch.randint(0, classes, positions, device=device)
    if ignore and target.numel() > 1:
        target.view(-1)[1] = -100
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(positions, device=device) > 0.3
    elif mask_kind == "float":
        mask = torch.rand(positions, dtype=torch.float64, device=device)
        if mask.numel() > 2:
            mask.view(-1)[2] = 0
    return s, t, target, mask


def gradient_term_floor(s, t, g, opts, dtype, teacher_indices=None):
    """The size of the terms whose difference is a gradient element: q_j - p_j and p_j (log p_j
    - log q_j - D) are differences of terms of size (p_j + q_j)(1 + |log p_j| + |log q_j|)
    times the row's factor g m T / denominator; where they nearly cancel (a student close to
    its teacher) the rounding of the terms, not of the result, bounds the error (a few units
    of the accumulation dtype's rounding)."""
    temperature = opts.get("temperature", 1.0)
    classes = s.shape[-1]
    s = s.detach().cpu().double().reshape(-1, classes)
    rows = s.shape[0]
    if rows == 0:
        return 0.0
    log_q = torch.log_softmax(s / temperature, -1)
    if teacher_indices is not None:
        idx = teacher_indices.cpu().reshape(rows, -1)
        p = torch.zeros_like(s).scatter(1, idx, torch.softmax(
            t.detach().cpu().double().reshape(rows, -1) / temperature, -1))
    else:
        p = torch.softmax(t.detach().cpu().double().reshape(rows, -1) / temperature, -1)
    log_p = p.clamp_min(1e-300).log()
    terms = ((p + log_q.exp()) * (1 + log_p.abs() + log_q.abs())).amax(-1)
    mask = opts.get("mask")
    m = mask.detach().cpu().double().reshape(-1).abs() if mask is not None else torch.ones(rows)
    factor = g.detach().cpu().double().abs().reshape(-1) * m * temperature * (1 + terms)
    if opts.get("reduction", "mean") == "mean":
        denominator = float(m.sum())
        factor = factor / denominator if denominator else factor * 0
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return 8 * eps * float(factor.max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature,hard_weight", [(1.0, 0.0), (2.0, 0.4), (0.7, 0.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(backend, shape, divergence, temperature, hard_weight, reduction):
    for dtype, mask_kind in ((torch.float64, "float"), (torch.float32, "bool"),
                             (torch.bfloat16, None), (torch.float16, "float")):
        s, t, target, mask = random_case(shape, dtype, backend.device, mask_kind)
        s.requires_grad_(True)
        t.requires_grad_(True)
        opts = dict(divergence=divergence, temperature=temperature, beta=0.3,
                    hard_weight=hard_weight, mask=mask, reduction=reduction)
        out = fl.distillation_loss(s, t, target, **opts)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        s_ref = s.detach().cpu().double().requires_grad_(True)
        t_ref = t.detach().cpu().double().requires_grad_(True)
        expected = reference.distillation(s_ref, t_ref, target.cpu(), **{
            **opts, "mask": None if mask is None else mask.cpu()})
        assert out.shape == expected.shape
        assert_close(out, expected, dtype)
        g = grad_output_like(out)
        out.backward(g)
        expected.backward(g.cpu().double())
        floor = gradient_term_floor(s, t, g, opts, dtype)
        assert_close(s.grad, s_ref.grad, dtype, atol_floor=floor)
        assert_close(t.grad, t_ref.grad, dtype, atol_floor=floor)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature,hard_weight", [(1.0, 0.0), (2.0, 0.5)])
@pytest.mark.parametrize("shape,k", [((6, 40), 5), ((2, 3, 17), 17), ((1, 9), 1)])
def test_sparse_teacher(backend, reduction, temperature, hard_weight, shape, k):
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        s, _, target, mask = random_case(shape, dtype, backend.device, "float")
        positions = shape[:-1]
        indices = torch.rand(positions + (shape[-1],)).argsort(-1)[..., :k].to(backend.device)
        t = logits(positions + (k,), dtype, backend.device).requires_grad_(True)
        s.requires_grad_(True)
        opts = dict(temperature=temperature, hard_weight=hard_weight, mask=mask,
                    reduction=reduction)
        out = fl.distillation_loss(s, t, target, teacher_indices=indices, **opts)
        s_ref = s.detach().cpu().double().requires_grad_(True)
        t_ref = t.detach().cpu().double().requires_grad_(True)
        expected = reference.distillation(s_ref, t_ref, target.cpu(), teacher_indices=indices.cpu(),
                                          **{**opts, "mask": mask.cpu()})
        assert_close(out, expected, dtype)
        g = grad_output_like(out)
        out.backward(g)
        expected.backward(g.cpu().double())
        floor = gradient_term_floor(s, t, g, opts, dtype, indices)
        assert_close(s.grad, s_ref.grad, dtype, atol_floor=floor)
        assert_close(t.grad, t_ref.grad, dtype, atol_floor=floor)


def test_sparse_teacher_of_all_classes_is_the_dense_teacher():
    s, t, target, _ = random_case((5, 23), torch.float64, "cpu", None)
    perm = torch.rand(5, 23).argsort(-1)
    dense = fl.distillation_loss(s, t, target, temperature=1.5, reduction="none")
    sparse = fl.distillation_loss(s, t.gather(1, perm), target, temperature=1.5,
                                  teacher_indices=perm, reduction="none")
    torch.testing.assert_close(sparse, dense)
    # cached log-probabilities give the same P as the logits
    logp = torch.log_softmax(t.gather(1, perm) / 1.5, -1) * 1.5
    torch.testing.assert_close(
        fl.distillation_loss(s, logp, target, temperature=1.5, teacher_indices=perm,
                             reduction="none"), dense)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_mixed_dtypes(backend, divergence):
    """A bfloat16 (or float16) teacher beside a float32 student: each read in its own dtype."""
    for teacher_dtype in (torch.bfloat16, torch.float16):
        s, t, target, mask = random_case((9, 130), torch.float32, backend.device, "float",
                                         teacher_dtype=teacher_dtype)
        s.requires_grad_(True)
        out = fl.distillation_loss(s, t, target, divergence=divergence, temperature=2.0,
                                   hard_weight=0.3, mask=mask)
        s_ref = s.detach().cpu().double().requires_grad_(True)
        expected = reference.distillation(s_ref, t.cpu(), target.cpu(), divergence=divergence,
                                          temperature=2.0, hard_weight=0.3, mask=mask.cpu())
        assert_close(out, expected, torch.float32)
        out.backward()
        expected.backward()
        assert_close(s.grad, s_ref.grad, torch.float32)
        assert t.grad is None


def test_beta_ends_are_the_two_kls():
    s, t, target, _ = random_case((6, 31), torch.float64, "cpu", None)
    for beta, name in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        torch.testing.assert_close(
            fl.distillation_loss(s, t, divergence="jsd", beta=beta, temperature=2.0),
            fl.distillation_loss(s, t, divergence=name, temperature=2.0))


def test_equal_distributions_give_zero():
    s = logits((4, 50), torch.float32, "cpu")
    for d in DIVERGENCES:
        assert float(fl.distillation_loss(s, s.clone(), divergence=d).abs()) < 1e-6


def test_masked_and_ignored_rows_are_not_read():
    s, t, target, _ = random_case((5, 12), torch.float32, "cpu", None)
    s[1] = float("nan")  # target -100
    t[3] = float("nan")
    mask = torch.ones(5)
    mask[3] = 0
    s.requires_grad_(True)
    out = fl.distillation_loss(s, t, target, mask=mask, hard_weight=0.5)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()
    assert (s.grad[1] == 0).all() and (s.grad[3] == 0).all()


def test_no_valid_position_mean_is_zero():
    s, t, _, _ = random_case((3, 8), torch.float32, "cpu", None)
    s.requires_grad_(True)
    out = fl.distillation_loss(s, t, torch.full((3,), -100), hard_weight=0.5)
    out.backward()
    assert out.item() == 0 and (s.grad == 0).all()


def test_teacher_without_grad_gets_none_and_mask_grad():
    s, t, target, _ = random_case((6, 20), torch.float64, "cpu", None)
    s.requires_grad_(True)
    mask = torch.rand(6, dtype=torch.float64, requires_grad=True)
    out = fl.distillation_loss(s, t, target, mask=mask, divergence="jsd", temperature=2.0,
                               hard_weight=0.25)
    ref_mask = mask.detach().clone().requires_grad_(True)
    expected = reference.distillation(s.detach(), t, target, divergence="jsd", temperature=2.0,
                                      hard_weight=0.25, mask=ref_mask, read_masked=True)
    out.backward()
    expected.backward()
    torch.testing.assert_close(mask.grad, ref_mask.grad)
    assert t.grad is None


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_and_gradgradcheck(divergence, reduction):
    s, t, target, _ = random_case((4, 7), torch.float64, "cpu", None)
    mask = torch.rand(4, dtype=torch.float64)

    def fn(s, t, m):
        return fl.distillation_loss(s, t, target, divergence=divergence, temperature=1.7,
                                    beta=0.4, hard_weight=0.3, mask=m, reduction=reduction)

    inputs = (s.requires_grad_(True), t.requires_grad_(True), mask.requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_sparse_gradcheck():
    s, t, target, _ = random_case((3, 9), torch.float64, "cpu", None)
    idx = torch.rand(3, 9).argsort(-1)[:, :4]
    tk = logits((3, 4), torch.float64, "cpu")

    def fn(s, t):
        return fl.distillation_loss(s, t, target, teacher_indices=idx, temperature=2.0,
                                    hard_weight=0.2)

    inputs = (s.requires_grad_(True), tk.requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_torch_func_and_forward_ad(divergence):
    s, t, target, _ = random_case((5, 11), torch.float64, "cpu", None)

    def loss(s, t):
        return fl.distillation_loss(s, t, target, divergence=divergence, temperature=2.0,
                                    hard_weight=0.5)

    def ref(s, t):
        return reference.distillation(s, t, target, divergence=divergence, temperature=2.0,
                                      hard_weight=0.5)

    torch.testing.assert_close(torch.func.grad(loss)(s, t), torch.func.grad(ref)(s, t))
    batch_s, batch_t = logits((3, 5, 11), torch.float64, "cpu"), logits((3, 5, 11),
                                                                          torch.float64, "cpu")
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(batch_s, batch_t),
                               torch.stack([torch.func.grad(ref)(a, b)
                                            for a, b in zip(batch_s, batch_t)]))
    tangent = torch.randn_like(s)
    _, jvp = torch.func.jvp(lambda x: loss(x, t), (s,), (tangent,))
    _, jvp_ref = torch.func.jvp(lambda x: ref(x, t), (s,), (tangent,))
    torch.testing.assert_close(jvp, jvp_ref)


def test_autocast_loss_is_float32():
    s, t, target, _ = random_case((4, 64), torch.bfloat16, "cpu", None)
    s.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fl.distillation_loss(s, t, target, hard_weight=0.5, temperature=2.0)
    assert out.dtype == torch.float32
    out.backward()
    assert s.grad.dtype == torch.bfloat16


def test_second_backward_gives_the_same_bits():
    s, t, target, _ = random_case((5, 40), torch.float32, "cpu", None)
    s.requires_grad_(True)
    out = fl.distillation_loss(s, t, target, divergence="jsd", hard_weight=0.2)
    (g1,) = torch.autograd.grad(out, s, retain_graph=True)
    (g2,) = torch.autograd.grad(out, s)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_compile_fullgraph_matches_eager(divergence):
    torch._dynamo.reset()
    s, t, target, mask = random_case((6, 5, 37), torch.float32, "cpu", "float")

    def step(s, t):
        return fl.distillation_loss(s, t, target, divergence=divergence, temperature=2.0,
                                    hard_weight=0.5, mask=mask)

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        x = s.clone().requires_grad_(True)
        y = t.clone().requires_grad_(True)
        out = fn(x, y)
        out.backward()
        results.append((out, x.grad, y.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_modules():
    s, t, target, mask = random_case((3, 4, 10), torch.float32, "cpu", "float")
    m = fl.DistillationLoss(divergence="reverse_kl", temperature=3.0, hard_weight=0.1)
    torch.testing.assert_close(m(s, t, target, mask), fl.distillation_loss(
        s, t, target, divergence="reverse_kl", temperature=3.0, hard_weight=0.1, mask=mask))
    assert "reverse_kl" in repr(m)
    xs, xt = torch.randn(3, 4, 8), torch.randn(3, 4, 6)
    ws, wt = torch.randn(10, 8), torch.randn(10, 6)
    lm = fl.LinearDistillationLoss(divergence="jsd", chunk_size=5)
    torch.testing.assert_close(lm(xs, ws, xt, wt, target, mask), fl.distillation_loss(
        xs @ ws.T, xt @ wt.T, target, divergence="jsd", mask=mask))


# ---- the fused linear variant ----

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("teacher_trained", [False, True])
def test_linear_matches_the_materialised_loss(backend, reduction, divergence, teacher_trained):
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        rows, hs, ht, classes = 29, 12, 7, 45
        xs = logits((rows, hs), dtype, backend.device, scale=1.0).requires_grad_(True)
        ws = logits((classes, hs), dtype, backend.device, scale=0.5).requires_grad_(True)
        bs = logits((classes,), dtype, backend.device, scale=0.5).requires_grad_(True)
        xt = logits((rows, ht), dtype, backend.device, scale=1.0).requires_grad_(teacher_trained)
        wt = logits((classes, ht), dtype, backend.device, scale=0.5).requires_grad_(
            teacher_trained)
        target = torch.randint(0, classes, (rows,), device=backend.device)
        target[3] = -100
        mask = torch.rand(rows, device=backend.device)
        opts = dict(divergence=divergence, temperature=2.0, hard_weight=0.5, mask=mask,
                    reduction=reduction)
        out = fl.linear_distillation_loss(xs, ws, xt, wt, target, student_bias=bs,
                                          chunk_size=8, **opts)
        leaves = [xs, ws, bs] + ([xt, wt] if teacher_trained else [])
        refs = [v.detach().cpu().double().requires_grad_(v.requires_grad) for v in leaves]
        r_xs, r_ws, r_bs = refs[:3]
        r_xt = refs[3] if teacher_trained else xt.detach().cpu().double()
        r_wt = refs[4] if teacher_trained else wt.detach().cpu().double()
        expected = reference.distillation(F.linear(r_xs, r_ws, r_bs), F.linear(r_xt, r_wt),
                                          target.cpu(), **{**opts, "mask": mask.cpu()})
        assert_close(out, expected, dtype)
        g = grad_output_like(out)
        out.backward(g)
        expected.backward(g.cpu().double())
        for v, r in zip(leaves, refs):
            assert v.grad.dtype == v.dtype
            assert_close(v.grad, r.grad, dtype)
        if not teacher_trained:
            assert xt.grad is None and wt.grad is None


def test_linear_double_backward_and_func():
    rows, hs, ht, classes = 6, 5, 4, 9
    xs = torch.randn(rows, hs, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(classes, hs, dtype=torch.float64, requires_grad=True)
    xt, wt = torch.randn(rows, ht, dtype=torch.float64), torch.randn(classes, ht,
                                                                      dtype=torch.float64)
    target = torch.randint(0, classes, (rows,))

    def fn(xs, ws):
        return fl.linear_distillation_loss(xs, ws, xt, wt, target, divergence="jsd",
                                           hard_weight=0.3, temperature=1.5, chunk_size=4)

    assert torch.autograd.gradcheck(fn, (xs, ws))
    assert torch.autograd.gradgradcheck(fn, (xs, ws))
    torch.testing.assert_close(torch.func.grad(fn)(xs.detach(), ws.detach()),
                               torch.autograd.grad(fn(xs, ws), xs)[0])


def test_linear_frozen_teacher_and_chunks_agree():
    rows, hs, ht, classes = 50, 16, 24, 70
    xs = torch.randn(rows, hs, requires_grad=True)
    ws = torch.randn(classes, hs, requires_grad=True)
    xt, wt = torch.randn(rows, ht), torch.randn(classes, ht)
    target = torch.randint(0, classes, (rows,))
    losses, grads = [], []
    for chunk in (None, 1, 7, 50):
        xs.grad = ws.grad = None
        out = fl.linear_distillation_loss(xs, ws, xt, wt, target, chunk_size=chunk,
                                          temperature=2.0, hard_weight=0.5)
        out.backward()
        losses.append(out.detach())
        grads.append((xs.grad.clone(), ws.grad.clone()))
    for loss, (gx, gw) in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(loss, losses[0])
        torch.testing.assert_close(gx, grads[0][0])
        torch.testing.assert_close(gw, grads[0][1])


# ---- errors ----

@pytest.mark.parametrize("kwargs,error,message", [
    (dict(divergence="kl"), ValueError, "divergence must be 'forward_kl', 'reverse_kl' or 'jsd', got 'kl'"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=-1), ValueError, "temperature must be a finite number > 0, got -1.0"),
    (dict(beta=1.5), ValueError, "beta must be between 0.0 and 1.0, got 1.5"),
    (dict(hard_weight=0.5, target=None), ValueError, "hard_weight=0.5 needs a target"),
    (dict(hard_weight=-0.1), ValueError, "hard_weight must be between 0.0 and 1.0, got -0.1"),
    (dict(reduction="avg"), ValueError, "reduction must be 'none', 'mean' or 'sum', got 'avg'"),
    (dict(teacher=(4, 11)), ValueError, "teacher_logits must have the student_logits' shape"),
    (dict(divergence="jsd", sparse=True), ValueError, "sparse teacher .*forward_kl' only"),
    (dict(sparse=True, bad_index=True), IndexError, r"teacher_indices\[1, 0\] = 10 is out of bounds for 10 classes"),
    (dict(sparse=True, repeat=True), IndexError, "teacher_indices row 2 repeats class"),
    (dict(target_shape=(5,)), ValueError, "target must have shape"),
])
def test_errors_name_the_argument(kwargs, error, message):
    kwargs = dict(kwargs)
    s = torch.randn(4, 10)
    t = torch.randn(*kwargs.pop("teacher", (4, 10)))
    target = kwargs.pop("target", torch.randint(0, 10, kwargs.pop("target_shape", (4,))))
    indices = None
    if kwargs.pop("sparse", False):
        indices = torch.stack([torch.randperm(10)[:3] for _ in range(4)])
        if kwargs.pop("bad_index", False):
            indices[1, 0] = 10
        if kwargs.pop("repeat", False):
            indices[2, 1] = indices[2, 0]
        t = torch.randn(4, 3)
    with pytest.raises(error, match=message):
        fl.distillation_loss(s, t, target, teacher_indices=indices, **kwargs)


def test_linear_errors_name_the_argument():
    xs, ws = torch.randn(4, 8), torch.randn(10, 8)
    xt, wt = torch.randn(4, 6), torch.randn(11, 6)
    with pytest.raises(ValueError, match="teacher_weight has 11 classes, student_weight 10"):
        fl.linear_distillation_loss(xs, ws, xt, wt)
    with pytest.raises(ValueError, match=r"student_weight must have shape \(10, 8\)"):
        fl.linear_distillation_loss(xs, torch.randn(10, 7), xt, torch.randn(10, 6))
    with pytest.raises(ValueError, match="teacher_input must have the student_input's positions"):
        fl.linear_distillation_loss(xs, ws, torch.randn(5, 6), torch.randn(10, 6))
    with pytest.raises(RuntimeError, match="does not differentiate with respect to mask"):
        fl.linear_distillation_loss(xs, ws, xt, torch.randn(10, 6),
                                    mask=torch.rand(4, requires_grad=True))


def test_linear_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    xs, ws = torch.randn(37, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    xt, wt = torch.randn(37, 5), torch.randn(11, 5)
    target = torch.randint(0, 11, (37,))

    def step(xs, ws):
        return fl.linear_distillation_loss(xs, ws, xt, wt, target, chunk_size=8,
                                           divergence="jsd", hard_weight=0.3, temperature=2.0)

    eager = step(xs, ws)
    compiled = torch.compile(step, fullgraph=True)(xs, ws)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled, (xs, ws)), torch.autograd.grad(eager, (xs, ws))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("divergence,sparse", [("forward_kl", False), ("reverse_kl", False),
                                               ("jsd", False), ("forward_kl", True)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inplace_backward_matches(backend, divergence, sparse, reduction):
    """inplace_backward=True writes the student's gradient over its logits (a non-leaf that
    no op saved: x @ w) and gives the out-of-place gradient."""
    for dtype in (torch.float32, torch.bfloat16):
        rows, hidden, classes, k = 9, 6, 70, 8
        x = logits((rows, hidden), dtype, backend.device, scale=1.0)
        w = logits((hidden, classes), dtype, backend.device, scale=1.0).requires_grad_(True)
        target = torch.randint(0, classes, (rows,), device=backend.device)
        target[0] = -100
        indices = (torch.rand(rows, classes).argsort(-1)[:, :k].to(backend.device) if sparse
                   else None)
        t = logits((rows, k if sparse else classes), dtype, backend.device)
        opts = dict(divergence=divergence, temperature=2.0, hard_weight=0.4, reduction=reduction,
                    teacher_indices=indices)
        grads, losses = [], []
        for inplace in (False, True):
            w.grad = None
            s = x @ w
            version = s._version
            out = fl.distillation_loss(s, t, target, inplace_backward=inplace, **opts)
            assert (s._version != version) == (inplace and not sparse)  # dense teacher only
            out.backward(torch.tensor(1.7, dtype=out.dtype, device=backend.device))
            losses.append(out.detach())
            grads.append(w.grad.clone())
        assert torch.equal(losses[0], losses[1])
        torch.testing.assert_close(grads[1], grads[0])


def test_inplace_backward_where_unsafe_or_consumed():
    s = torch.randn(5, 12, requires_grad=True)  # a leaf: never overwritten
    t = torch.randn(5, 12)
    before = s.detach().clone()
    fl.distillation_loss(s, t, inplace_backward=True).backward()
    assert torch.equal(s.detach(), before)
    h = torch.randn(5, 12, requires_grad=True) * 2
    out = fl.distillation_loss(h, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="can be differentiated once only"):
        torch.autograd.grad(out, h, create_graph=True)
