"""fusedloss.linear_cross_entropy: equal to fusedloss.cross_entropy(F.linear(...)) and to the
float64 reference for every option and reduction, on every backend (the CE part of the simt
backend is the emulated CUDA kernel); chunking, skipped gradients, determinism, compile, errors."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss as fl
import reference as ref
from helpers import assert_close, grad_output_like
from test_cross_entropy import OPTIONS, gradient_term_floor

DTYPES = [torch.float64, torch.float32, torch.bfloat16]

# (rows, in_features, classes) -> chunk_size, each with what it covers. (The conftest leaves
# shapes above the SIMT emulator's size out of the simt backend.)
CHUNKS = {
    (1, 4, 7): None,  # one row: one chunk of one row
    (37, 16, 50): 8,  # rows not a multiple of the chunk: a short last chunk
    (38, 16, 50): 1,  # one row per chunk
    (0, 8, 10): None,  # empty batch
    (300, 32, 1000): None,  # automatic chunk size (3 chunks of 128, the last short)
}
SHAPES = list(CHUNKS)
SHAPE_IDS = [f"{n}x{h}x{v}-chunk{CHUNKS[(n, h, v)]}" for n, h, v in SHAPES]


def make_case(rows, hidden, classes, dtype, device, option, probs=False, bias=True):
    """x (rows, hidden), W (classes, hidden), bias, target and keyword arguments; values rounded
    to dtype, logits of a few units."""
    x = torch.randn(rows, hidden, dtype=torch.float64).to(dtype).to(device)
    w = (torch.randn(classes, hidden, dtype=torch.float64) * 3 / hidden ** 0.5).to(dtype).to(device)
    b = torch.randn(classes, dtype=torch.float64).to(dtype).to(device) if bias else None
    kw = {}
    if probs:
        target = torch.softmax(torch.randn(rows, classes, dtype=torch.float64), 1).to(dtype)
    else:
        target = torch.randint(0, classes, (rows,))
        if "ignore" in option:
            kw["ignore_index"] = option["ignore"]
            target[torch.rand(rows) < 0.3] = option["ignore"]
    if option.get("weight"):
        kw["weight"] = torch.rand(classes, dtype=torch.float64) + 0.1
    if option.get("mask") == "float":
        m = torch.rand(rows, dtype=torch.float64)
        m[torch.rand(rows) < 0.3] = 0
        kw["mask"] = m
    elif option.get("mask") == "bool":
        kw["mask"] = torch.rand(rows) < 0.7
    for k in ("label_smoothing", "z_loss", "softcap"):
        if k in option:
            kw[k] = option[k]
    return x, w, b, target.to(device), kw


def on(kw, device, dtype):
    """kw for fusedloss on device (a class weight in the accumulation dtype, as the reference
    sees it)."""
    out = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    if "weight" in out and dtype != torch.float64:
        out["weight"] = out["weight"].float()
    return out


def leaves(*ts, dtype=None):
    return [None if t is None else t.detach().clone().to(dtype or t.dtype).requires_grad_()
            for t in ts]


def gradients(out, params, g):
    return torch.autograd.grad(out, [p for p in params if p is not None], g)


def check_parity(x, w, b, target, kw, reduction, dtype, device, chunk_size=None):
    """linear_cross_entropy against the float64 reference and against fusedloss.cross_entropy
    on the materialised logits: loss, and gradients of x, W and bias under one random
    grad_output."""
    fkw = on(kw, device, dtype)
    xa, wa, ba = leaves(x, w, b)
    out = fl.linear_cross_entropy(xa, wa, target, linear_bias=ba, reduction=reduction,
                                  chunk_size=chunk_size, **fkw)
    xr, wr, br = leaves(x, w, b, dtype=torch.float64)
    rkw = dict(kw)
    if "weight" in rkw and dtype != torch.float64:
        rkw["weight"] = rkw["weight"].float().double()
    rkw = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in rkw.items()}
    expected = ref.cross_entropy(F.linear(xr.cpu(), wr.cpu(), None if br is None else br.cpu()),
                                 target.cpu(), reduction=reduction, **rkw)
    xf, wf, bf = leaves(x, w, b)
    unfused = fl.cross_entropy(F.linear(xf, wf, bf), target, reduction=reduction, **fkw)

    # 16-bit: the materialised path rounds the logits and their gradient to 16 bits, while the
    # chunks run in float32 on the CPU (see compute_dtype); the float64 reference judges both,
    # and the two are compared with each other in float32 and float64 only (the loss too: the
    # loss of logits rounded to bfloat16 can be 4% off the float64 reference where the loss is
    # small, 0.0153 against 0.0159, while the float32 chunks' loss is within the tolerance).
    same_math = dtype in (torch.float32, torch.float64) or x.device.type != "cpu"
    assert out.dtype == dtype and out.shape == expected.shape and out.device == x.device
    assert_close(out, expected, dtype)
    if same_math:
        assert_close(out, unfused.detach().double(), dtype)
    g = grad_output_like(out)
    got = gradients(out, (xa, wa, ba), g)
    want = gradients(expected, (xr, wr, br), g.cpu().double())
    want_unfused = gradients(unfused, (xf, wf, bf), g)
    floors = _head_gradient_floors(xr, wr, br, target, rkw, reduction, g, dtype)
    for a, e, u, p, floor in zip(got, want, want_unfused, (xa, wa, ba), floors):
        assert a.shape == p.shape and a.dtype == dtype
        assert_close(a, e, dtype, atol_floor=floor)
        if same_math:
            assert_close(a, u.double(), dtype, atol_floor=floor)


def _head_gradient_floors(xr, wr, br, target, rkw, reduction, g, dtype):
    """Absolute error floors of the input's, weight's and bias's gradients. A logit-gradient
    element of a row whose target is nearly certain (p_t near 1) is the difference of terms of
    size ~1, whose rounding bounds its error, not the result's size (test_cross_entropy's
    gradient_term_floor, which judges fusedloss.cross_entropy's logit gradient so). The head's
    gradients are that logit gradient mapped through the head: the floor times the largest
    column sum of |W| (input), of |x| over the rows (weight), and the row count (bias)."""
    classes, hidden = wr.shape
    logits = F.linear(xr, wr, br).detach().cpu().reshape(-1, classes)
    t = target.cpu()
    t = t.reshape(-1, classes) if t.is_floating_point() else t.reshape(-1)
    kw = dict(rkw)
    if kw.get("mask") is not None:
        kw["mask"] = kw["mask"].reshape(-1)
    go = g.detach().cpu().double()
    go = go.reshape(-1) if reduction == "none" else go
    floor = gradient_term_floor(logits, t, kw, reduction, go, dtype)
    x_sums = xr.detach().cpu().abs().reshape(-1, hidden).sum(0).max()
    return (floor * float(wr.detach().cpu().abs().sum(0).max()), floor * float(x_sums),
            floor * logits.shape[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_class_index_targets(backend, dtype, shape, option, reduction):
    x, w, b, t, kw = make_case(*shape, dtype, backend.device, OPTIONS[option])
    check_parity(x, w, b, t, kw, reduction, dtype, backend.device, CHUNKS[shape])


PROB_OPTIONS = {k: v for k, v in OPTIONS.items() if "ignore" not in v}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(PROB_OPTIONS), ids=list(PROB_OPTIONS))
@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_probability_targets(backend, dtype, shape, option, reduction):
    x, w, b, t, kw = make_case(*shape, dtype, backend.device, PROB_OPTIONS[option], probs=True)
    check_parity(x, w, b, t, kw, reduction, dtype, backend.device, CHUNKS[shape])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float16_and_no_bias(backend, reduction):
    x, w, _, t, kw = make_case(37, 16, 50, torch.float16, backend.device, OPTIONS["everything"],
                               bias=False)
    check_parity(x, w, None, t, kw, reduction, torch.float16, backend.device, 8)


@pytest.mark.parametrize("shape", [(2, 3, 16), (5, 8)], ids=["batch-time", "1-d-input"])
def test_leading_dims(backend, shape):
    """input (..., H): the same as the flattened rows; target of the leading shape."""
    *lead, hidden = shape
    classes = 11
    x = torch.randn(shape, dtype=torch.float64, device=backend.device)
    w = torch.randn(classes, hidden, dtype=torch.float64, device=backend.device)
    t = torch.randint(0, classes, tuple(lead), device=backend.device)
    for reduction in ("mean", "none"):
        out = fl.linear_cross_entropy(x, w, t, reduction=reduction)
        flat = fl.cross_entropy(F.linear(x.reshape(-1, hidden), w), t.reshape(-1),
                                reduction=reduction)
        assert out.shape == (tuple(lead) if reduction == "none" else ())
        torch.testing.assert_close(out, flat.reshape(out.shape), rtol=1e-12, atol=1e-12)


def test_chunk_sizes_agree(backend):
    """Every chunk size gives the same loss and gradients (to rounding: only the order in which
    the chunks' weight gradients are added changes)."""
    x, w, b, t, kw = make_case(50, 8, 30, torch.float64, backend.device, OPTIONS["everything"])
    results = []
    for chunk in (1, 7, 50, 64, None):
        xa, wa, ba = leaves(x, w, b)
        out = fl.linear_cross_entropy(xa, wa, t, linear_bias=ba, chunk_size=chunk,
                                      **on(kw, backend.device, torch.float64))
        results.append([out.detach()] + list(gradients(out, (xa, wa, ba), None)))
    for r in results[1:]:
        for a, e in zip(r, results[0]):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


def _profiled_ops(fn):
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return [(e.name, e.input_shapes) for e in prof.events()]


def test_frozen_weight_and_input_without_grad():
    """A weight that does not require grad costs no weight-gradient GEMM (addmm_), an input
    that does not costs no input-gradient GEMM; the other gradients are unchanged."""
    x, w, b, t, kw = make_case(40, 8, 30, torch.float32, "cpu", OPTIONS["plain"])
    xa, wa, ba = leaves(x, w, b)
    full = gradients(fl.linear_cross_entropy(xa, wa, t, linear_bias=ba, chunk_size=16),
                     (xa, wa, ba), None)
    full_no_bias = gradients(fl.linear_cross_entropy(xa, wa, t, chunk_size=16), (xa, wa), None)

    xa, ba = leaves(x, b)
    frozen = w.detach()
    ops = _profiled_ops(lambda: fl.linear_cross_entropy(xa, frozen, t, linear_bias=ba,
                                                        chunk_size=16).backward())
    assert not any(name == "aten::addmm_" for name, _ in ops)
    torch.testing.assert_close(xa.grad, full[0], rtol=0, atol=0)
    torch.testing.assert_close(ba.grad, full[2], rtol=0, atol=0)

    wa, = leaves(w)
    ops = _profiled_ops(lambda: fl.linear_cross_entropy(x, wa, t, chunk_size=16).backward())
    # the only mm calls are the logits GEMMs: (16, 8) x (8, 30), never G (16, 30) x W (30, 8)
    mm_shapes = [s for name, s in ops if name == "aten::mm"]
    assert mm_shapes and all(s[0][1] == 8 for s in mm_shapes), mm_shapes
    torch.testing.assert_close(wa.grad, full_no_bias[1], rtol=0, atol=0)


def test_ignored_rows_cost_no_gemm_work():
    """CPU: ignored and masked-out rows are left out of the chunks: the logits GEMMs see only
    the live rows."""
    rows, hidden, classes = 64, 8, 30
    x, w, _, t, _ = make_case(rows, hidden, classes, torch.float32, "cpu", {}, bias=False)
    t[::2] = -100
    mask = torch.ones(rows)
    mask[1::4] = 0
    live = int(((t != -100) & (mask != 0)).sum())
    xa, wa = leaves(x, w)
    ops = _profiled_ops(lambda: fl.linear_cross_entropy(xa, wa, t, mask=mask,
                                                        chunk_size=10).backward())
    logits_rows = sum(s[0][0] for name, s in ops if name == "aten::mm" and s[1] == [hidden, classes])
    assert logits_rows == live
    xr, wr = leaves(x, w)
    expected = fl.cross_entropy(F.linear(xr, wr), t, mask=mask)
    expected.backward()
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wa.grad, wr.grad, rtol=1e-5, atol=1e-6)
    assert torch.all(xa.grad[::2] == 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_16bit_cpu_converts_chunk_by_chunk(reduction):
    """CPU, bfloat16 (computed in float32): the input and probability targets are converted one
    chunk at a time, never as a whole (N, H) or (N, V) float32 copy; only the weight is
    converted whole (every chunk's GEMMs read all of it). The result is unchanged."""
    rows, hidden, classes, chunk = 40, 8, 30, 16
    x, w, _, target, _ = make_case(rows, hidden, classes, torch.bfloat16, "cpu", {}, probs=True,
                                   bias=False)
    xa, wa = leaves(x, w)
    ops = _profiled_ops(lambda: fl.linear_cross_entropy(
        xa, wa, target, reduction=reduction, chunk_size=chunk).sum().backward())
    copied = [s[0] for name, s in ops if name == "aten::_to_copy"]
    assert [classes, hidden] in copied  # the weight, once per pass over the chunks
    assert [rows, hidden] not in copied and [rows, classes] not in copied, copied
    xr, wr = leaves(x, w, dtype=torch.float64)
    expected = fl.cross_entropy(F.linear(xr, wr), target.double(), reduction=reduction)
    expected.sum().backward()
    torch.testing.assert_close(xa.grad.double(), xr.grad, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(wa.grad.double(), wr.grad, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_everything_ignored(backend, reduction):
    """A mean over no valid position is 0 with zero gradients (as fusedloss.cross_entropy)."""
    x, w, b, t, _ = make_case(9, 4, 6, torch.float32, backend.device, {})
    t[:] = -100
    xa, wa, ba = leaves(x, w, b)
    out = fl.linear_cross_entropy(xa, wa, t, linear_bias=ba, reduction=reduction)
    assert torch.all(out == 0)
    for g in gradients(out, (xa, wa, ba), torch.ones_like(out)):
        assert torch.all(g == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", ["plain", "everything"])
def test_gradcheck(backend, option, reduction):
    x, w, b, t, kw = make_case(6, 3, 5, torch.float64, backend.device, OPTIONS[option])
    kw = on(kw, backend.device, torch.float64)

    def f(x, w, b):
        return fl.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                       chunk_size=4, **kw)

    assert torch.autograd.gradcheck(f, leaves(x, w, b))


def test_second_backward_is_identical():
    x, w, b, t, kw = make_case(20, 4, 9, torch.float64, "cpu", OPTIONS["everything"])
    xa, wa, ba = leaves(x, w, b)
    out = fl.linear_cross_entropy(xa, wa, t, linear_bias=ba, chunk_size=6, **kw)
    g = torch.tensor(0.7, dtype=torch.float64)
    first = [v.clone() for v in torch.autograd.grad(out, (xa, wa, ba), g, retain_graph=True)]
    second = torch.autograd.grad(out, (xa, wa, ba), g)
    for a, e in zip(second, first):
        assert torch.equal(a, e)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", ["plain", "everything"])
def test_double_backward(backend, option, reduction):
    """create_graph=True: gradgradcheck with default settings, and a Hessian-vector product of
    (input, weight, bias) equal to the float64 reference's on the whole logits."""
    d = backend.device
    x, w, b, t, kw = make_case(7, 3, 5, torch.float64, d, OPTIONS[option])
    fkw = on(kw, d, torch.float64)

    def f(x, w, b):
        return fl.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                       chunk_size=3, **fkw)

    assert torch.autograd.gradgradcheck(f, leaves(x, w, b))
    rkw = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}

    def hvp(loss_of, params, cpu):
        params = [p.cpu() if cpu else p for p in params]
        out = loss_of(*params)
        g = torch.ones_like(out)
        grads = torch.autograd.grad(out, params, g, create_graph=True)
        vs = [torch.linspace(-1, 1, p.numel(), dtype=p.dtype, device=p.device).reshape(p.shape)
              for p in params]
        dot = sum((gi * v).sum() for gi, v in zip(grads, vs))
        return torch.autograd.grad(dot, params)

    got = hvp(f, leaves(x, w, b), cpu=False)
    want = hvp(lambda x, w, b: ref.cross_entropy(F.linear(x, w, b), t.cpu(), reduction=reduction,
                                                 **rkw), leaves(x, w, b), cpu=True)
    for a, e in zip(got, want):
        assert_close(a, e, torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_mode_ad_and_torch_func(backend, reduction):
    """Forward-mode AD (dual tensors, torch.func.jvp) and torch.func.grad / vmap(grad): the
    tangent and the gradients of the definition (the float64 reference on the whole logits);
    the tangent was silently dropped, the transforms refused, before."""
    import torch.autograd.forward_ad as fwAD

    d = backend.device
    x, w, b, t, kw = make_case(12, 5, 9, torch.float64, d, OPTIONS["everything"])
    t = t.reshape(3, 4)
    x = x.reshape(3, 4, 5)
    kw["mask"] = kw["mask"].reshape(3, 4)
    rkw = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
    fkw = on(kw, d, torch.float64)
    tx, tw = torch.randn_like(x), torch.randn_like(w)

    def ours(x, w):
        return fl.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, **fkw)

    def theirs(x, w):
        out = ref.cross_entropy(F.linear(x, w, b.cpu()).reshape(12, 9), t.cpu().reshape(12),
                                reduction=reduction, **dict(rkw, mask=rkw["mask"].reshape(12)))
        return out.reshape(3, 4) if reduction == "none" else out

    with fwAD.dual_level():
        got = fwAD.unpack_dual(ours(fwAD.make_dual(x, tx), fwAD.make_dual(w, tw)))
        want = fwAD.unpack_dual(theirs(fwAD.make_dual(x.cpu(), tx.cpu()),
                                       fwAD.make_dual(w.cpu(), tw.cpu())))
    assert got.tangent is not None and got.primal.shape == want.primal.shape
    assert_close(got.primal, want.primal, torch.float64)
    assert_close(got.tangent, want.tangent, torch.float64)
    got_jvp = torch.func.jvp(ours, (x, w), (tx, tw))
    want_jvp = torch.func.jvp(theirs, (x.cpu(), w.cpu()), (tx.cpu(), tw.cpu()))
    for a, e in zip(got_jvp, want_jvp):
        assert_close(a, e, torch.float64)
    if reduction == "none":
        return
    for a, e in zip(torch.func.grad(ours, argnums=(0, 1))(x, w),
                    torch.func.grad(theirs, argnums=(0, 1))(x.cpu(), w.cpu())):
        assert_close(a, e, torch.float64)
    # per-sample gradients of the weight (one position each)
    per = torch.func.vmap(torch.func.grad(
        lambda w, xi, ti: fl.linear_cross_entropy(xi, w, ti)), in_dims=(None, 0, 0))(
        w, x.reshape(12, 1, 5), t.reshape(12, 1))
    per_ref = torch.func.vmap(torch.func.grad(
        lambda w, xi, ti: F.cross_entropy(F.linear(xi, w), ti)), in_dims=(None, 0, 0))(
        w.cpu(), x.cpu().reshape(12, 1, 5), t.cpu().reshape(12, 1))
    assert_close(per, per_ref, torch.float64)


def _run_for_determinism(x, w, b, t, kw):
    xa, wa, ba = leaves(x, w, b)
    out = fl.linear_cross_entropy(xa, wa, t, linear_bias=ba, chunk_size=100, **kw)
    return [out.detach()] + list(gradients(out, (xa, wa, ba), None))


def test_deterministic_run_to_run():
    """Bitwise identical run to run, with 2 threads and with 1: the CE kernel sums in fixed
    blocks and the mean's denominator is a running sum by construction. Not asserted across
    thread counts: the GEMMs are the BLAS's, and MKL splits a GEMM's reduction dimension among
    its threads on some hosts (measured on an AVX-512 host: the input gradient G @ W of this
    case, and a bare 256 x 32000 x 256 torch.mm, differ between 1 and 2 threads). The kernels'
    own invariance to the thread count is tests/test_ops.py's."""
    x, w, b, t, kw = make_case(333, 64, 3000, torch.float32, "cpu", OPTIONS["everything"])
    threads = torch.get_num_threads()
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            first = _run_for_determinism(x, w, b, t, kw)
            again = _run_for_determinism(x, w, b, t, kw)
            for u, v in zip(first, again):
                assert torch.equal(u, v), f"{n} thread(s)"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="no CUDA device on this machine"))])
def test_torch_compile_fullgraph(device):
    """One opaque op in the compiled graph (no graph break), equal to eager."""
    x, w, b, t, kw = make_case(37, 16, 50, torch.float32, device, OPTIONS["everything"])
    kw = on(kw, device, torch.float32)

    def f(x, w, b):
        return fl.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=8, **kw)

    compiled = torch.compile(f, fullgraph=True)
    xa, wa, ba = leaves(x, w, b)
    g = torch.tensor(1.5, device=device)
    eager = f(xa, wa, ba)
    ge = gradients(eager, (xa, wa, ba), g)
    xc, wc, bc = leaves(x, w, b)
    comp = compiled(xc, wc, bc)
    gc = gradients(comp, (xc, wc, bc), g)
    torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_opcheck():
    """The custom op's fake kernel, schema and autograd registration (torch.library.opcheck)."""
    from fusedloss import _ops
    from fusedloss._common import mean_denominators

    op = _ops.current().linear_ce
    x, w, b, t, kw = make_case(10, 4, 7, torch.float64, "cpu", OPTIONS["plain"])
    for reduction in (0, 1, 2):
        dens = mean_denominators(t, None, None, -100, 10, "cpu") if reduction else None
        args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), t, None, None,
                -100, 0.1, 1e-3, 5.0, reduction, dens, 4, True, True, True, True)
        # and with token_scaling and each row's argmax (a seventh output, int64)
        for extra in ((), (True, True)):
            torch.library.opcheck(op, args + extra, test_utils=("test_schema", "test_faketensor",
                                                                "test_aot_dispatch_static"))


def test_return_z_loss_and_token_accuracy(backend):
    """The z-loss part and the accuracy against the materialised logits (float64)."""
    x, w, b, t, kw = make_case(45, 8, 20, torch.float64, backend.device, OPTIONS["everything"])
    kw = on(kw, backend.device, torch.float64)
    # a few rows whose target is the argmax, so the accuracy is neither 0 nor 1
    logits = F.linear(x, w, b)
    t[:10] = logits[:10].argmax(1)
    for reduction in ("mean", "sum", "none"):
        out = fl.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=16,
                                      return_z_loss=True, return_token_accuracy=True, **kw)
        assert isinstance(out, fl.CrossEntropyOutput) and out.lse is None
        plain = fl.cross_entropy(logits, t, reduction=reduction, **kw)
        torch.testing.assert_close(out.loss, plain, rtol=1e-12, atol=1e-12)
        no_z = fl.cross_entropy(logits, t, reduction=reduction, **{**kw, "z_loss": 0.0})
        torch.testing.assert_close(out.z_loss, plain - no_z, rtol=1e-9, atol=1e-12)
        # the mask-weighted share of valid positions whose argmax is the target (per position
        # for none), as cross_entropy's
        m = torch.where(t != kw["ignore_index"], kw["mask"], 0)
        hits = torch.where(logits.argmax(1) == t, m, 0)
        expected = hits if reduction == "none" else hits.sum() / m.sum()
        torch.testing.assert_close(out.token_accuracy, expected, rtol=1e-12, atol=1e-15)
    only_z = fl.linear_cross_entropy(x, w, t, return_z_loss=True)
    assert only_z.token_accuracy is None and only_z.z_loss is not None


def test_module_matches_torch_module():
    """torch's constructor and state_dict keys; a state_dict loads both ways."""
    for bias in (False, True):
        ours = fl.LinearCrossEntropyLoss(16, 10, bias=bias, dtype=torch.float64,
                                         label_smoothing=0.1)
        theirs = torch.nn.LinearCrossEntropyLoss(16, 10, bias=bias, dtype=torch.float64,
                                                 label_smoothing=0.1)
        assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(13, 16, dtype=torch.float64)
        t = torch.randint(0, 10, (13,))
        t[3] = -100  # ignore_index=None means -100, as in torch
        torch.testing.assert_close(ours(x, t), theirs(x, t), rtol=1e-12, atol=1e-12)
    weighted = fl.LinearCrossEntropyLoss(4, 3, weight=torch.rand(3), reduction="sum")
    assert list(weighted.state_dict()) == list(
        torch.nn.LinearCrossEntropyLoss(4, 3, weight=torch.rand(3)).state_dict())
    with pytest.raises(ValueError, match="out_features"):
        fl.LinearCrossEntropyLoss(4, 3, out_features=(2,))


def test_module_options():
    m = fl.LinearCrossEntropyLoss(8, 5, z_loss=1e-3, softcap=3.0, chunk_size=4)
    x, t = torch.randn(9, 8), torch.randint(0, 5, (9,))
    mask = torch.rand(9) > 0.3
    expected = fl.cross_entropy(F.linear(x, m.linear.weight), t, mask=mask, z_loss=1e-3,
                                softcap=3.0)
    torch.testing.assert_close(m(x, t, mask), expected, rtol=1e-5, atol=1e-6)
    assert "z_loss=0.001" in repr(m)


def _args():
    return torch.randn(4, 3), torch.randn(5, 3), torch.randint(0, 5, (4,))


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(linear_weight=torch.randn(5, 3, 1)), ValueError, "linear_weight must be 2-D"),
    (lambda a: a.update(linear_weight=torch.randn(5, 4)), ValueError, r"linear_weight must have shape \(5, 3\)"),
    (lambda a: a.update(linear_weight=torch.randn(5, 3, dtype=torch.float64)), TypeError, "linear_weight must have the input's dtype"),
    (lambda a: a.update(linear_weight=torch.randn(0, 3)), ValueError, "at least one class"),
    (lambda a: a.update(linear_bias=torch.randn(4)), ValueError, r"linear_bias must have shape \(5,\)"),
    (lambda a: a.update(linear_bias=[0.0] * 5), TypeError, "linear_bias must be a Tensor"),
    (lambda a: a.update(target=torch.randint(0, 5, (3,))), ValueError, "target must have shape"),
    (lambda a: a.update(target=torch.rand(4, 4)), ValueError, "probability target must have shape"),
    (lambda a: a.update(target=torch.ones(4, dtype=torch.bool)), TypeError, "target must be class indices"),
    (lambda a: a.update(input=torch.randn(4, 3).int()), TypeError, "input must be float16"),
    (lambda a: a.update(input=torch.tensor(1.0)), ValueError, "input must have at least 1 dimension"),
    (lambda a: a.update(chunk_size=0), ValueError, "chunk_size must be None or an int >= 1"),
    (lambda a: a.update(chunk_size=2.5), ValueError, "chunk_size .* got 2.5"),
    (lambda a: a.update(chunk_size=True), ValueError, "chunk_size .* got True"),
    (lambda a: a.update(reduction="avg"), ValueError, "reduction must be"),
    (lambda a: a.update(label_smoothing=1.5), ValueError, "label_smoothing must be between"),
    (lambda a: a.update(z_loss=-1.0), ValueError, "z_loss must be"),
    (lambda a: a.update(softcap=0.0), ValueError, "softcap must be"),
    (lambda a: a.update(mask=torch.ones(5)), ValueError, r"mask must have the target's shape"),
    (lambda a: a.update(weight=torch.ones(4)), ValueError, r"weight must have shape \(5,\)"),
    (lambda a: a.update(target=torch.tensor([0, 1, 7, 2])), IndexError, "target 7"),
    (lambda a: a.update(target=torch.softmax(torch.randn(4, 5), 1), return_token_accuracy=True),
     ValueError, "return_token_accuracy needs class-index targets"),
    (lambda a: a.update(mask=torch.ones(4, requires_grad=True)), RuntimeError,
     "does not differentiate with respect to mask"),
])
def test_bad_input_names_the_argument(change, error, match):
    x, w, t = _args()
    args = {"input": x, "linear_weight": w, "target": t}
    change(args)
    x, w, t = args.pop("input"), args.pop("linear_weight"), args.pop("target")
    with pytest.raises(error, match=match):
        fl.linear_cross_entropy(x, w, t, **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_native_no_host_sync(dtype):
    """On a GPU: equal to the materialised path, and no host synchronisation in the op path
    (forward and backward) once the inputs are on the device."""
    x, w, b, t, kw = make_case(700, 64, 5000, dtype, "cuda", OPTIONS["everything"])
    kw = on(kw, "cuda", dtype)
    xa, wa, ba = leaves(x, w, b)
    g = torch.tensor(1.0, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fl.linear_cross_entropy(xa, wa, t, linear_bias=ba, chunk_size=128, **kw)
        got = gradients(out, (xa, wa, ba), g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    xf, wf, bf = leaves(x, w, b)
    unfused = fl.cross_entropy(F.linear(xf, wf, bf), t, **kw)
    want = gradients(unfused, (xf, wf, bf), None)
    assert_close(out, unfused.detach().double(), dtype)
    for a, e in zip(got, want):
        assert_close(a, e.double(), dtype)


def test_op_checks_name_the_argument():
    """The op called directly (not through linear_cross_entropy's checks): a bad operand gets an
    error naming it, never an out-of-range slice."""
    from fusedloss import _ops
    from fusedloss._common import mean_denominators

    op, op_backward = _ops.current().linear_ce, _ops.current().linear_ce_backward
    x, w, b, t, _ = make_case(10, 4, 7, torch.float32, "cpu", OPTIONS["plain"])
    dens = mean_denominators(t, None, None, -100, 10, "cpu")

    def call(x=x, w=w, b=b, t=t, mask=None, reduction=1, dens=dens, chunk_rows=4):
        return op(x, w, b, t, None, mask, -100, 0.0, 0.0, 0.0, reduction, dens, chunk_rows,
                  True, True, True, False)

    call()  # the good call works
    bad = [
        (dict(x=x[0]), ValueError, "input must be 2-D"),
        (dict(x=x.long()), TypeError, "input must be float16"),
        (dict(w=w[:, :3]), ValueError, "weight must have shape"),
        (dict(w=w.double()), TypeError, "weight must have the input's dtype"),
        (dict(b=b[:5]), ValueError, "bias must have shape"),
        (dict(t=t[:9]), ValueError, "target must have shape"),
        (dict(t=torch.rand(10, 6)), ValueError, "target must have shape"),
        (dict(mask=torch.ones(11)), ValueError, "mask must have shape"),
        (dict(chunk_rows=0), ValueError, "chunk_rows must be >= 1, got 0"),
        (dict(reduction=5), ValueError, "reduction must be 0"),
        (dict(dens=None), ValueError, "two denominators"),
    ]
    for change, error, match in bad:
        with pytest.raises(error, match=match):
            call(**change)
    stats = torch.zeros(10, 2)
    with pytest.raises(ValueError, match="grad_loss must have shape"):
        op_backward(torch.ones(9), x, w, b, t, None, None, stats, -100, 0.0, 0.0, 0.0, 4,
                    True, True, True)
    with pytest.raises(ValueError, match="row_stats must have shape"):
        op_backward(torch.ones(10), x, w, b, t, None, None, stats[:, :1], -100, 0.0, 0.0, 0.0,
                    4, True, True, True)
