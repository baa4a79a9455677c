"""Where one rule is computed by two paths, the paths agree, on inputs that tell them apart.

fusedloss computes the same results along several paths: the kernels (eager), the
differentiable compositions that replace them under torch.func transforms and forward-mode AD,
the compiled path (torch.compile), and the vocab-parallel path (process_group: each rank reduces
its slice of the classes, the ranks' parts are combined). A rule written twice can drift in one
place only, and random logits do not show it: random rows have no ties, a mask of ones hides a
weight that is ignored, and logits of a few units hide a log-sum-exp taken about the wrong
pivot. So every test here feeds both paths rows built to separate them:

- tied maxima (two and three classes at the row's max, the target the first of them or not; a
  row of one value; softcap saturating two different logits into one value): token accuracy
  counts a hit only where the FIRST maximum is the target (torch.argmax's rule);
- fractional masks (0, 0.25, 0.5, 0.75, 1.5, 2: dyadic, so that every sum of them is exact and
  the token accuracy of both paths must be equal, not just close) on hit rows, ignored rows;
- logits of +-1e4, rows whose classes' slices have maxima thousands apart.

Comparisons are exact where the rule is exact (token accuracy: a sum of mask weights over a
sum of mask weights) and to the accumulation dtype's tolerance for losses, log-sum-exps and
gradients; token accuracy is also checked against a float64 PyTorch reference
(torch.argmax, first maximum), so that two paths wrong the same way still fail.
"""

import functools
import types
import zlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fusedloss as fl
from distributed_harness import WorkerPool, class_slices, gather_classes
from reference import tolerances

IGNORE = -1  # not torch's default, so that the argument is really passed on
BIG = 1e4
SOFTCAP = 20.0
REDUCTIONS = ["none", "mean", "sum"]
DTYPES = [torch.float32, torch.bfloat16]
MASK_VALUES = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0], dtype=torch.float64)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- the inputs ------------------------------------------------------------------------------

def hard_rows(gen, rows, classes, dtype, big=BIG):
    """(logits (rows, classes) rounded to dtype, as float64; class-index target; mask) with rows
    that tell the paths apart. Rows 0-11 are built (see the comments); the others are random,
    about half of them with the target at the argmax, so that hits carry fractional weights."""
    assert rows >= 16 and classes >= 8
    x = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, classes, (rows,), generator=gen)
    at_max = torch.rand(rows, generator=gen) < 0.5
    target = torch.where(at_max, x.argmax(1), target)
    top = float(x.abs().amax()) + 1
    x[0, [2, 6]] = top  # two-way tie, target the first: a hit
    target[0] = 2
    x[1, [2, 6]] = top  # two-way tie, target the second: a miss
    target[1] = 6
    x[2, [1, 4, 7]] = top  # three-way tie, target in the middle: a miss
    target[2] = 4
    x[3, [3, 5]] = big  # a tie at +big, target the first: a hit
    target[3] = 3
    x[4] = torch.where(torch.rand(classes, generator=gen) < 0.5, big, -big)  # only +-big
    x[4, [0, classes - 1]] = big
    target[4] = classes - 1  # the last of the maxima: a miss
    x[5] = 1.5  # one value: every class ties; target the first: a hit
    target[5] = 0
    x[6] = 1.5  # ... target the last: a miss
    target[6] = classes - 1
    x[7] = -big + x[7] / 3  # all near -big
    x[8] = x[8] / 3  # argmax big, a second class at 0.9 big: softcap ties them (a miss then)
    x[8, 1], x[8, 5] = 0.9 * big, big
    target[8] = 5
    x[9, 0] = big  # ignored
    target[9] = IGNORE
    target[10] = int(x[10].argmax())  # a hit with mask 0
    x[11, :classes // 2] += big  # half the row near +big, half near 0; target at the max
    x = x.to(dtype).double()  # the rounded values: ties that rounding makes are real ties
    target[7] = int(x[7].argmax())
    target[11] = int(x[11].argmax())
    mask = MASK_VALUES[torch.randint(0, len(MASK_VALUES), (rows,), generator=gen)]
    mask[[0, 3, 4, 5, 7, 8, 11]] = torch.tensor([0.25, 0.5, 1.5, 0.75, 2.0, 0.5, 0.25],
                                                dtype=torch.float64)
    mask[10] = 0.0
    return x, target, mask


def reference_accuracy(x, target, mask, softcap, ignore_index, reduction):
    """Token accuracy in float64 from PyTorch's ops: the mask-weighted share of valid positions
    whose first maximum (torch.argmax) of the (softcapped) logits is the target."""
    z = x.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    valid = target != ignore_index
    m = mask.double() if mask is not None else torch.ones(len(target), dtype=torch.float64)
    hit = z.argmax(1) == torch.where(valid, target, 0)
    correct = torch.where(valid & (m != 0) & hit, m, 0.0)
    if reduction == "none":
        return correct
    count = torch.where(valid, m, 0.0).sum()
    return correct.sum() / count if count != 0 else torch.zeros((), dtype=torch.float64)


def reference_lse(x, target, mask, softcap, ignore_index):
    z = x.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    kept = (target != ignore_index) & (mask != 0 if mask is not None else True)
    return torch.where(kept, torch.logsumexp(z, 1), 0.0)


def assert_equal(got, want, what):
    """Bitwise equal (values, dtype, shape), with a message naming what differs and where."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got, want)
    if not torch.equal(got, want):
        bad = (got != want).nonzero().flatten().tolist() if got.dim() else []
        raise AssertionError(f"{what}: the paths differ (at {bad}):\n{got}\nvs\n{want}")


def assert_accuracy(got, want, ulps, what):
    """Token accuracies of two paths: bitwise equal when ulps is 0, else within ulps units in
    the last place (float32), dtype and shape equal."""
    if ulps == 0:
        return assert_equal(got, want, what)
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got, want)
    torch.testing.assert_close(got, want, rtol=ulps * 2 ** -23, atol=0,
                               msg=lambda m: f"{what}: {m}")


def kernel_accuracy_ulps(backend, reduction):
    """How far a kernel's token accuracy may be from the correctly rounded ratio of the mask
    sums. Per position (none) it is the mask itself: exact. Reduced, the CPU kernel divides
    (correctly rounded, as the compositions do); the CUDA kernels multiply the sum by
    1 / count rounded to float32 (csrc/cuda/softmax_ce.cuh, SoftmaxLossFinish): an ulp or two
    off, never more."""
    return 0 if reduction == "none" or backend.name == "cpu" else 2


def assert_near(got, want, dtype, what):
    """Equal to dtype's tolerance, elementwise (no scaling with the largest value: the losses
    here span 1e-3 to 1e8 and each must be right)."""
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(got.detach().cpu().double(), want.detach().cpu().double(),
                               rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_accuracy_is_reference(got, x, target, mask, softcap, reduction, what, ulps=1):
    want = reference_accuracy(x, target, mask, softcap, IGNORE, reduction)
    torch.testing.assert_close(got.cpu().double(), want, rtol=ulps * 2 ** -23, atol=0,
                               msg=lambda m: f"{what} against the float64 reference: {m}")


# --- 1. kernels and compositions -------------------------------------------------------------

EXTRAS = dict(return_z_loss=True, return_token_accuracy=True, return_lse=True)


def _outputs(out):
    return out.loss, out.z_loss, out.token_accuracy, out.lse


def _primal(t):
    return fwAD.unpack_dual(t).primal if t is not None else None


def composed_cross_entropy(path, x, target, mask, kw):
    """cross_entropy's (loss, z_loss, token_accuracy, lse, gradient or None) through the
    differentiable compositions, reached as a user reaches them: forward-mode AD (a dual
    input), torch.func.grad (extras as aux), torch.func.vmap (a batch of one problem)."""
    call = functools.partial(fl.cross_entropy, **kw, **EXTRAS)
    if path == "forward_ad":
        with fwAD.dual_level():
            out = call(fwAD.make_dual(x, torch.randn_like(x)), target, mask=mask)
            assert fwAD.unpack_dual(out.loss).tangent is not None, "not a composition"
            return tuple(_primal(t) for t in _outputs(out)) + (None,)
    if path == "grad":
        def f(x):
            out = call(x, target, mask=mask)
            return out.loss.sum(), tuple(t.detach() for t in _outputs(out))

        grad, aux = torch.func.grad(f, has_aux=True)(x)
        return aux + (grad,)
    if path == "vmap":
        out = torch.func.vmap(lambda x, t, m: tuple(_outputs(call(x, t, mask=m))))(
            x[None], target[None], mask[None])
        return tuple(t[0] for t in out) + (None,)
    raise ValueError(path)


@pytest.mark.parametrize("softcap", [None, SOFTCAP], ids=["no_softcap", "softcap"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["forward_ad", "grad", "vmap"])
def test_cross_entropy_compositions_match_kernels(backend, path, dtype, reduction, softcap):
    """fl.cross_entropy's extra outputs (token accuracy, z-loss part, lse) and loss under a
    torch.func transform / forward-mode AD (the compositions) equal the eager call's (the
    kernels), on tied rows, fractional masks, ignored rows and logits of +-1e4."""
    d = backend.device
    gen = torch.Generator().manual_seed(zlib.crc32(f"{path}{dtype}{reduction}{softcap}".encode()))
    rows, classes = 24, 13
    x64, target, mask = hard_rows(gen, rows, classes, dtype)
    acc = acc_dtype(dtype)
    weight = (torch.rand(classes, generator=gen, dtype=torch.float64) + 0.25).to(acc).to(d)
    x, target, mask = x64.to(dtype).to(d), target.to(d), mask.to(acc).to(d)
    kw = dict(weight=weight, ignore_index=IGNORE, reduction=reduction, label_smoothing=0.1,
              z_loss=1e-3, softcap=softcap)

    xk = x.clone().requires_grad_()
    kernel = fl.cross_entropy(xk, target, mask=mask, **kw, **EXTRAS)
    assert kernel.loss.grad_fn is not None
    kernel.loss.sum().backward()
    loss, z_part, accuracy, lse, grad = composed_cross_entropy(path, x, target, mask, kw)

    ulps = kernel_accuracy_ulps(backend, reduction)
    assert_accuracy(accuracy, kernel.token_accuracy, ulps, f"token_accuracy ({path} vs kernel)")
    assert_accuracy_is_reference(accuracy, x64, target.cpu(), mask.cpu(), softcap, reduction,
                                 f"token_accuracy ({path})")
    assert_accuracy_is_reference(kernel.token_accuracy, x64, target.cpu(), mask.cpu(), softcap,
                                 reduction, "token_accuracy (kernel)", ulps=max(ulps, 1))
    assert_near(z_part, kernel.z_loss, acc, f"z_loss ({path} vs kernel)")
    assert_near(lse, kernel.lse, acc, f"lse ({path} vs kernel)")
    assert_near(lse, reference_lse(x64, target.cpu(), mask.cpu(), softcap, IGNORE).to(acc), acc,
                "lse (composition vs float64 reference)")
    assert_near(loss, kernel.loss, dtype, f"loss ({path} vs kernel)")
    if grad is not None:
        assert_near(grad, xk.grad, dtype, f"gradient ({path} vs kernel)")


def test_hard_rows_separate_the_rules():
    """The rows above do tell the rules apart: the first-maximum accuracy is not the
    last-maximum one, nor the unweighted one (else the tests above could not fail)."""
    gen = torch.Generator().manual_seed(0)
    x, target, mask = hard_rows(gen, 24, 13, torch.float32)
    first = reference_accuracy(x, target, mask, None, IGNORE, "none")
    assert first[0] == 0.25 and first[1] == 0 and first[2] == 0 and first[3] == 0.5
    assert first[4] == 0 and first[5] == 0.75 and first[6] == 0 and first[10] == 0
    capped = reference_accuracy(x, target, mask, SOFTCAP, IGNORE, "none")
    assert first[8] == 0.5 and capped[8] == 0
    last = (x.flip(1).argmax(1) == x.shape[1] - 1 - target) & (target != IGNORE) & (mask != 0)
    assert not torch.equal(torch.where(last, mask, 0.0), first)
    unweighted = (first != 0).double()
    assert not torch.equal(unweighted.sum() / mask[target != IGNORE].sum(),
                           first.sum() / mask[target != IGNORE].sum())


@pytest.mark.parametrize("average", [(True, True), (True, False), (False, True),
                                     (False, False)], ids=["both", "time", "batch", "neither"])
def test_sequence_loss_compositions_match_kernels(backend, average):
    """fl.sequence_loss's token accuracy (averaged like the loss, weighted by the fractional
    weights) and z-loss part: forward-mode AD (the compositions) against the eager call."""
    d = backend.device
    gen = torch.Generator().manual_seed(17 + sum(average) * 2 + average[0])
    batch, time, classes = 4, 6, 11
    x64, target, mask = hard_rows(gen, batch * time, classes, torch.float32)
    target = torch.where(target == IGNORE, 0, target)  # sequence_loss has no ignore_index
    logits = x64.float().reshape(batch, time, classes).to(d)
    targets, weights = target.reshape(batch, time).to(d), mask.float().reshape(batch, time).to(d)
    kw = dict(average_across_timesteps=average[0], average_across_batch=average[1], z_loss=1e-3,
              **EXTRAS)

    kernel = fl.sequence_loss(logits, targets, weights, **kw)
    with fwAD.dual_level():
        out = fl.sequence_loss(fwAD.make_dual(logits, torch.randn_like(logits)), targets,
                               weights, **kw)
        assert fwAD.unpack_dual(out.loss).tangent is not None, "not a composition"
        composed = [_primal(t) for t in _outputs(out)]
    ulps = kernel_accuracy_ulps(backend, "mean" if all(average) else "none")
    assert_accuracy(composed[2], kernel.token_accuracy, ulps,
                    "token_accuracy (forward AD vs kernel)")
    assert_near(composed[1], kernel.z_loss, torch.float32, "z_loss (forward AD vs kernel)")
    assert_near(composed[3], kernel.lse, torch.float32, "lse (forward AD vs kernel)")
    assert_near(composed[0], kernel.loss, torch.float32, "loss (forward AD vs kernel)")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_composition_matches_kernel(backend, reduction):
    """fl.linear_cross_entropy under forward-mode AD (the composition on the whole logits)
    against the chunked kernel, on logits with exact ties (integer inputs and weights,
    duplicated vocabulary rows: every product is exact in float32) and a fractional mask.
    Token accuracy is per position exact; for mean and sum the kernel adds its chunks' shares
    (each divided by the whole count), so it may differ from one division by an ulp per
    chunk."""
    d = backend.device
    gen = torch.Generator().manual_seed(5 + REDUCTIONS.index(reduction))
    rows, hidden, classes = 20, 8, 12
    x = torch.randint(-2, 3, (rows, hidden), generator=gen).float()
    w = torch.randint(-2, 3, (classes, hidden), generator=gen).float()
    w[7], w[10] = w[3], w[3]  # classes 3, 7 and 10 always tie
    logits = x @ w.T
    target = logits.argmax(1)  # the first maximum: a hit
    tied = logits[:, 3] == logits.amax(1)
    target[tied & (torch.arange(rows) % 2 == 0)] = 7  # the second of the tie: a miss
    target[1] = IGNORE
    mask = MASK_VALUES[torch.randint(0, len(MASK_VALUES), (rows,), generator=gen)].float()
    mask[0] = 0.25
    x[0] = 0
    x[0, 0] = 1
    w[3, 0] = w[7, 0] = w[10, 0] = 100  # row 0: classes 3, 7, 10 tie at the max
    target[0] = 3
    x, w, target, mask = x.to(d), w.to(d), target.to(d), mask.to(d)
    kw = dict(reduction=reduction, ignore_index=IGNORE, mask=mask, z_loss=1e-3,
              label_smoothing=0.1, chunk_size=7, return_z_loss=True,
              return_token_accuracy=True)

    kernel = fl.linear_cross_entropy(x, w, target, **kw)
    with fwAD.dual_level():
        out = fl.linear_cross_entropy(fwAD.make_dual(x, torch.randn_like(x)), w, target, **kw)
        assert fwAD.unpack_dual(out.loss).tangent is not None, "not a composition"
        composed = [_primal(t) for t in out[:3]]
    chunks = -(-rows // kw["chunk_size"])
    ulps = 0 if reduction == "none" else chunks + kernel_accuracy_ulps(backend, reduction)
    assert_accuracy(composed[2], kernel.token_accuracy, ulps,
                    "token_accuracy (forward AD vs kernel)")
    assert_accuracy_is_reference(composed[2], (x @ w.T).cpu().double(), target.cpu(),
                                 mask.cpu(), None, reduction, "token_accuracy (composition)")
    assert_accuracy_is_reference(kernel.token_accuracy, (x @ w.T).cpu().double(), target.cpu(),
                                 mask.cpu(), None, reduction, "token_accuracy (kernel)",
                                 ulps=max(ulps, 1))
    assert_near(composed[1], kernel.z_loss, torch.float32, "z_loss (forward AD vs kernel)")
    assert_near(composed[0], kernel.loss, torch.float32, "loss (forward AD vs kernel)")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_composition_matches_kernel(backend, reduction):
    """fl.binary_cross_entropy_with_logits under forward-mode AD (the composition) against
    the kernel, on logits of +-1e4 (softplus must not overflow on either path), a fractional
    mask, pos_weight, weight and label smoothing; also under torch.func.grad."""
    d = backend.device
    gen = torch.Generator().manual_seed(11 + REDUCTIONS.index(reduction))
    shape = (6, 10)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    x[0], x[1, ::2], x[2, 1::2] = BIG, -BIG, BIG
    x[3] = -BIG
    x = x.float().to(d)
    y = (torch.rand(shape, generator=gen) < 0.5).float().to(d)
    mask = MASK_VALUES[torch.randint(0, len(MASK_VALUES), (6, 1), generator=gen)].float().to(d)
    pos_weight = (torch.rand(10, generator=gen) * 2 + 0.25).to(d)
    weight = (torch.rand(10, generator=gen) + 0.5).to(d)
    kw = dict(weight=weight, pos_weight=pos_weight, mask=mask, label_smoothing=0.1,
              reduction=reduction)

    xk = x.clone().requires_grad_()
    kernel = fl.binary_cross_entropy_with_logits(xk, y, **kw)
    kernel.sum().backward()
    with fwAD.dual_level():
        out = fl.binary_cross_entropy_with_logits(fwAD.make_dual(x, torch.randn_like(x)), y,
                                                  **kw)
        assert fwAD.unpack_dual(out).tangent is not None, "not a composition"
        composed = _primal(out)
    grad = torch.func.grad(lambda x: fl.binary_cross_entropy_with_logits(x, y, **kw).sum())(x)
    assert torch.isfinite(kernel).all()
    assert_near(composed, kernel, torch.float32, "loss (forward AD vs kernel)")
    assert_near(grad, xk.grad, torch.float32, "gradient (torch.func.grad vs kernel)")


# --- 2. eager and compiled ------------------------------------------------------------------

SOFTCAPS = [None, SOFTCAP]


def _every_reduction_and_softcap(x, scale, target, mask, weight):
    """cross_entropy with every extra output, for each reduction, softcap off and on. The
    logits are computed here (x * scale, exact: scale is 1), so that under torch.compile they
    are the graph's own intermediate, which the compiled path may overwrite with the
    gradient, as well as read."""
    logits = x * scale
    outs = [fl.cross_entropy(logits, target, weight, IGNORE, reduction, 0.1, mask=mask,
                             z_loss=1e-3, softcap=softcap, **EXTRAS)
            for softcap in SOFTCAPS for reduction in REDUCTIONS]
    total = sum(o.loss.sum() for o in outs)
    return total, [t for o in outs for t in _outputs(o)]


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor",
                                                                marks=pytest.mark.slow)])
def test_compiled_matches_eager(compiler):
    """torch.compile(fullgraph=True) of cross_entropy with every extra output, each reduction,
    softcap off and on, and a gradient: the same token accuracy (bitwise), loss, z-loss part,
    lse and gradient as the eager call, on the rows that tell the rules apart. aot_eager runs
    the compiled path's own parts (its autograd Function, the fake kernels, the functionalized
    in-place op) without inductor's code generation, in a few seconds; inductor adds its
    re-inplacing of the gradient over the logits (~30 s to compile on 2 cores: slow)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(23)
    x64, target, mask = hard_rows(gen, 24, 13, torch.float32)
    weight = torch.rand(13, generator=gen) + 0.25
    mask, scale = mask.float(), torch.ones(())
    xe = x64.float().requires_grad_()
    xc = x64.float().requires_grad_()
    eager_total, eager = _every_reduction_and_softcap(xe, scale, target, mask, weight)
    eager_total.backward()
    compiled = torch.compile(_every_reduction_and_softcap, fullgraph=True, backend=compiler)
    comp_total, comp = compiled(xc, scale, target, mask, weight)
    comp_total.backward()
    names = ["loss", "z_loss", "token_accuracy", "lse"]
    cases = [(softcap, reduction) for softcap in SOFTCAPS for reduction in REDUCTIONS]
    assert len(comp) == len(eager) == 4 * len(cases)
    for i, (got, want) in enumerate(zip(comp, eager)):
        softcap, reduction = cases[i // 4]
        what = f"{names[i % 4]} ({reduction}, softcap={softcap}, compiled vs eager)"
        if names[i % 4] == "token_accuracy":
            assert_equal(got, want, what)
            assert_accuracy_is_reference(got, x64, target, mask, softcap, reduction, what)
        else:
            assert_near(got, want, torch.float32, what)
    assert_near(xc.grad, xe.grad, torch.float32, "gradient (compiled vs eager)")


# --- 3. one process and many (vocab parallel) ------------------------------------------------

WORLD_SIZES = [2, 4]


def spread_rows(gen, rows, classes, slices, dtype):
    """hard_rows, plus rows that tell a vocab-parallel combine apart: each slice of the classes
    offset by thousands from the others (+-1e4 and in between), so that any pivot but the
    maximum of the slices' maxima overflows or underflows; ties across slice boundaries, the
    target in the first or the second slice."""
    x, target, mask = hard_rows(gen, rows, classes, dtype)
    offsets = [BIG, -BIG, 0.5 * BIG, -0.3 * BIG, 0.8 * BIG]
    for i, r in enumerate(range(12, 16)):
        for k, (start, stop) in enumerate(slices):
            x[r, start:stop] = (x[r, start:stop] / 3 + offsets[(k + i) % len(offsets)]).to(
                dtype).double()
        target[r] = int(x[r].argmax())  # a hit
    r = 16
    x[r, 12:] = (torch.randn(classes - 12, generator=gen, dtype=torch.float64) + BIG).to(
        dtype).double()  # all near +big
    target[r] = int(x[r].argmax())
    first, second = slices[0][1] - 1, slices[-1][0]  # the first slice's last class, the last's
    for r, t in ((17, first), (18, second)):  # a tie across slices: a hit, then a miss
        x[r, [first, second]] = float(x[r].abs().amax()) + 1
        target[r] = t
    mask[[12, 13, 16, 17, 18]] = torch.tensor([0.25, 1.5, 0.75, 0.5, 2.0], dtype=torch.float64)
    return x.to(dtype).double(), target, mask


DISTRIBUTED_OPTIONS = {
    "plain": {},
    "weight_smoothing_z": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3},
    "softcap": {"softcap": SOFTCAP, "weight": True, "label_smoothing": 0.1, "z_loss": 1e-3},
}


def case_vocab_parallel(ctx, seed, rows, classes, dtype):
    """On every rank: fl.cross_entropy(process_group=) of this rank's (uneven) slice against
    the single-process call on the whole logits (the kernels) and the float64 references, for
    each option set and reduction. Returns the loss bits of every call (the same on every
    rank)."""
    slices = class_slices(classes, ctx.world_size, uneven=True)
    start, stop = slices[ctx.rank]
    results = []
    for name, option in DISTRIBUTED_OPTIONS.items():
        gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        x64, target, mask = spread_rows(gen, rows, classes, slices, dtype)
        acc = acc_dtype(dtype)
        weight = ((torch.rand(classes, generator=gen, dtype=torch.float64) + 0.25).to(acc)
                  if option.get("weight") else None)
        kw = dict(weight=weight, ignore_index=IGNORE, mask=mask.to(acc),
                  label_smoothing=option.get("label_smoothing", 0.0),
                  z_loss=option.get("z_loss", 0.0), softcap=option.get("softcap"), **EXTRAS)
        for reduction in REDUCTIONS:
            what = f"[{name}, {reduction}, rank {ctx.rank} of {ctx.world_size}]"
            xl = x64[:, start:stop].to(dtype).contiguous().requires_grad_()
            out = fl.cross_entropy(xl, target, reduction=reduction, process_group=ctx.group,
                                   **kw)
            out.loss.sum().backward()
            xs = x64.to(dtype).requires_grad_()
            single = fl.cross_entropy(xs, target, reduction=reduction, **kw)
            single.loss.sum().backward()
            assert torch.isfinite(out.loss).all(), f"{what} loss not finite: {out.loss}"
            assert torch.isfinite(out.lse).all(), f"{what} lse not finite: {out.lse}"
            assert_equal(out.token_accuracy, single.token_accuracy,
                         f"{what} token_accuracy (vocab parallel vs one process)")
            assert_accuracy_is_reference(out.token_accuracy, x64, target, mask, kw["softcap"],
                                         reduction, f"{what} token_accuracy")
            assert_near(out.lse, single.lse, acc, f"{what} lse (vocab parallel vs one process)")
            assert_near(out.lse, reference_lse(x64, target, mask, kw["softcap"], IGNORE).to(acc),
                        acc, f"{what} lse (vocab parallel vs float64 reference)")
            assert_near(out.z_loss, single.z_loss, acc, f"{what} z_loss")
            assert_near(out.loss, single.loss, dtype, f"{what} loss (vocab parallel vs one "
                                                      f"process)")
            grad = gather_classes(xl.grad, ctx.group, 1, slices)
            assert_near(grad, xs.grad, dtype, f"{what} gradient (vocab parallel vs one process)")
            results.append(out.loss.detach().reshape(-1).view(torch.uint8).clone())
    return results


@pytest.fixture(scope="module")
def pool():
    """One gloo pool of 4 processes; the 2-rank cases run on the subgroup of global ranks 1
    and 3 (group ranks 0 and 1, not the global ones)."""
    made = WorkerPool(4, "gloo", subgroups=[(1, 3)])
    yield types.SimpleNamespace(run=made.run)
    made.close()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_vocab_parallel_matches_one_process(pool, world_size, dtype):
    """Vocab-parallel (2 and 4 gloo ranks, uneven class slices) against one process, on rows
    whose slices' maxima are thousands apart (a log-sum-exp pivoted on anything but the
    maximum of the slices' maxima overflows), ties within and across slices, fractional
    masks, ignored rows, softcap on and off, every reduction; the loss is the same bits on
    every rank."""
    results = pool.run(case_vocab_parallel, group_size=world_size, timeout=120,
                       seed=31 * world_size + DTYPES.index(dtype), rows=24, classes=21,
                       dtype=dtype)
    for rank, other in enumerate(results[1:], 1):
        for call, (a, b) in enumerate(zip(results[0], other)):
            assert torch.equal(a, b), f"call {call}: rank {rank}'s loss differs from rank 0's"
