"""The distillation kernels of csrc/cuda (distill.cuh), run on the SIMT harness, against the CPU
kernels (torch.ops.fusedloss) and a float64 PyTorch reference written here: every divergence,
temperature 1 and 2, hard_weight 0 and 0.4, a dense and a top-K sparse teacher (forward_kl
only), fractional masks with zeros, ignored rows, each reduction, gradients wanted or not, every
dtype pair the kernels take; odd sizes, the block's loop tails, a bad target (NaN on CUDA) and
-inf teacher logits (a masked vocabulary).

On a GPU the same cases run on the native kernels too (the `cuda` kind; skipped without one).
The ops are called directly (the public API's tests route it through the emulated kernels
elsewhere): distill(student, teacher, teacher_indices, target, mask, divergence, temperature,
beta, hard_weight, ignore_index, reduction, denominator, student_grad, teacher_grad) ->
(loss, row_stats, grad_student, grad_teacher), and distill_backward, which recomputes the
gradients from row_stats times grad_loss."""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import assert_close  # noqa: E402

import fusedloss  # noqa: E402, F401  (registers torch.ops.fusedloss)

simt = pytest.importorskip("simt")

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
NONE, MEAN, SUM = 0, 1, 2
IGNORE = -100
BETA = 0.3
# The kernels' block (csrc/cuda/launch.h kDistillThreads): rows shorter than it leave threads
# idle, longer ones take several strides with a partial last one.
BLOCK = 256

# (student, teacher) dtypes: the same 16/32-bit dtype, a 16-bit teacher beside a float32
# student, float64 with float64.
PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
         (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
         (torch.float64, torch.float64)]
PAIR_IDS = ["f32", "bf16", "f16", "f32-bf16teacher", "f64"]

# (divergence, sparse teacher)
TEACHERS = [(FORWARD_KL, False), (REVERSE_KL, False), (JSD, False), (FORWARD_KL, True)]
TEACHER_IDS = ["forward_kl", "reverse_kl", "jsd", "forward_kl-topk"]


class Kernels:
    """The CUDA kernels' ops on one kind of machine: emulated (simt: torch.ops.fusedloss_simt on
    CPU tensors) or native (cuda: torch.ops.fusedloss on the GPU). Inputs go to its device,
    results come back to the CPU."""

    def __init__(self, name):
        self.name = name
        if name == "cuda":
            self.device, self.ops = torch.device("cuda"), torch.ops.fusedloss
        else:
            simt.load_simt_opset()
            self.device, self.ops = torch.device("cpu"), torch.ops.fusedloss_simt

    def _run(self, op, args):
        args = [a.to(self.device) if torch.is_tensor(a) else a for a in args]
        return tuple(o.cpu() for o in op(*args))

    def distill(self, *args):
        return self._run(self.ops.distill, args)

    def distill_backward(self, *args):
        return self._run(self.ops.distill_backward, args)


@pytest.fixture(scope="module", params=["simt", "cuda"])
def kernels(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    return Kernels(request.param)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_rows(s, t, idx, target, mask, divergence, temperature, hard_weight):
    """Each row's loss times its mask, in float64, differentiable in s and t (skipped rows 0).
    A teacher probability of exactly 0 (a -inf logit) adds 0, as x log x does at 0."""
    C = s.shape[1]
    lq = F.log_softmax(s / temperature, -1)
    if idx is not None:  # top-K: P over the K classes, 0 elsewhere
        lp = torch.full_like(lq, -math.inf).scatter(1, idx, F.log_softmax(t / temperature, -1))
    else:
        lp = F.log_softmax(t / temperature, -1)
    p, q = lp.exp(), lq.exp()

    def kl(w, lw, lo):  # sum w (log w - lo), 0 where w is 0 (and NaN where w is)
        zero = w == 0
        safe = torch.where(zero, torch.zeros_like(lw), lw)
        return torch.where(zero, torch.zeros_like(w), w * (safe - lo)).sum(-1)

    if divergence == FORWARD_KL:
        d = kl(p, lp, lq)
    elif divergence == REVERSE_KL:
        d = kl(q, lq, lp)
    else:
        lm = torch.logaddexp(lp + math.log(BETA), lq + math.log(1 - BETA))
        d = BETA * kl(p, lp, lm) + (1 - BETA) * kl(q, lq, lm)
    row = temperature ** 2 * d
    valid = torch.ones(s.shape[0], dtype=torch.bool)
    if target is not None:
        valid = target != IGNORE
        if hard_weight > 0:
            ce = F.cross_entropy(s, torch.where(valid, target, 0).clamp(0, C - 1), reduction="none")
            row = (1 - hard_weight) * row + hard_weight * ce
    m = mask.double() if mask is not None else torch.ones(s.shape[0], dtype=torch.float64)
    keep = valid & (m != 0)
    return torch.where(keep, row * m, torch.zeros_like(row)), (m * keep).sum()


def make_case(rows, classes, pair, divergence, sparse, hard_weight, k=None, mask=True,
              ignore=True, teacher_scale=3.0):
    sd, td = pair
    s = (torch.randn(rows, classes, dtype=torch.float64) * 3).to(sd)
    if sparse:
        k = k or max(1, min(classes, 7))
        idx = torch.stack([torch.randperm(classes)[:k] for _ in range(rows)]) if rows else \
            torch.empty(0, k, dtype=torch.long)
        t = (torch.randn(rows, k, dtype=torch.float64) * teacher_scale).to(td)
    else:
        idx = None
        t = (torch.randn(rows, classes, dtype=torch.float64) * teacher_scale).to(td)
    target = torch.randint(0, classes, (rows,))
    if rows:
        target[0] = classes - 1  # the last class, and the first below
        if rows > 1:
            target[1] = 0
    if ignore and rows > 2:
        target[2] = IGNORE
    m = None
    if mask:
        m = torch.rand(rows, dtype=torch.float64) + 0.25
        if rows > 3:
            m[3] = 0.0  # padding
        m = m.to(acc_dtype(sd))
    return s, t, idx, target, m


def call(ops, s, t, idx, target, m, divergence, temperature, hard_weight, reduction, den,
         sg, tg):
    return ops.distill(s, t, idx, target, m, divergence, temperature, BETA, hard_weight, IGNORE,
                       reduction, den if reduction == MEAN else None, sg, tg)


def call_backward(ops, go, s, t, idx, target, m, stats, divergence, temperature, hard_weight,
                  reduction, den, sg, tg):
    return ops.distill_backward(go, s, t, idx, target, m, stats, divergence, temperature, BETA,
                                hard_weight, IGNORE, reduction,
                                den if reduction == MEAN else None, sg, tg)


def check_case(kernels, rows, classes, pair, divergence, sparse, temperature, hard_weight,
               plans, **case_kw):
    """Forward (loss, statistics, gradients) and backward from the statistics on the emulated
    CUDA kernels, against the CPU kernels and the float64 reference, for each (reduction,
    student grad, teacher grad) of `plans`."""
    sd, td = pair
    s, t, idx, target, m = make_case(rows, classes, pair, divergence, sparse, hard_weight,
                                     **case_kw)
    s64 = s.double().requires_grad_()
    t64 = t.double().requires_grad_()
    ref_rows, ref_den = reference_rows(s64, t64, idx, target, m, divergence, temperature,
                                       hard_weight)
    den = ref_den.to(acc_dtype(sd)).reshape(1)
    cpu = torch.ops.fusedloss
    for reduction, sg, tg in plans:
        if reduction == NONE:
            ref_loss = ref_rows
        elif reduction == SUM:
            ref_loss = ref_rows.sum()
        else:
            ref_loss = ref_rows.sum() / ref_den if ref_den != 0 else ref_rows.sum() * 0
        go = (torch.rand(ref_loss.shape, dtype=torch.float64) + 0.5) if reduction == NONE else \
            torch.ones((), dtype=torch.float64)
        ref_gs, ref_gt = torch.autograd.grad(ref_loss, (s64, t64), go, retain_graph=True,
                                             allow_unused=True)
        ref_gs = torch.zeros_like(s64) if ref_gs is None else ref_gs
        ref_gt = torch.zeros_like(t64) if ref_gt is None else ref_gt
        out = call(kernels, s, t, idx, target, m, divergence, temperature, hard_weight,
                   reduction, den, sg, tg)
        out_cpu = call(cpu, s, t, idx, target, m, divergence, temperature, hard_weight,
                       reduction, den, sg, tg)
        loss_dtype = sd  # the loss is float32 (float64) computed from exactly rounded inputs
        assert out[0].dtype == acc_dtype(sd) and out[0].shape == ref_loss.shape
        assert_close(out[0], ref_loss, loss_dtype)
        assert_close(out[0], out_cpu[0], loss_dtype)
        assert_close(out[1], out_cpu[1], loss_dtype)
        if reduction == NONE:  # the forward's gradients: of the rows' sum, as the CPU's
            for a, b, wanted in ((out[2], out_cpu[2], sg), (out[3], out_cpu[3], tg)):
                assert a.numel() == (b.numel() if wanted else 0)
                if wanted:
                    assert_close(a, b, a.dtype)
        else:  # the forward's gradients are those of grad_output 1
            if sg:
                assert out[2].dtype == sd
                assert_close(out[2], ref_gs, sd)
                assert_close(out[2], out_cpu[2], sd)
            else:
                assert out[2].numel() == 0
            if tg:
                assert out[3].dtype == td and out[3].shape == t.shape
                assert_close(out[3], ref_gt, td)
                assert_close(out[3], out_cpu[3], td)
            else:
                assert out[3].numel() == 0
        back = call_backward(kernels, go.to(out[0].dtype), s, t, idx, target, m, out[1],
                             divergence, temperature, hard_weight, reduction, den, sg, tg)
        back_cpu = call_backward(cpu, go.to(out[0].dtype), s, t, idx, target, m, out_cpu[1],
                                 divergence, temperature, hard_weight, reduction, den, sg, tg)
        if sg:
            assert_close(back[0], ref_gs, sd)
            assert_close(back[0], back_cpu[0], sd)
        if tg:
            assert_close(back[1], ref_gt, td)
            assert_close(back[1], back_cpu[1], td)


# Each reduction once, with the gradients wanted or not in turn (none: the gradients come from
# the backward only; mean without gradients: the loss alone).
PLANS = [(NONE, True, False), (MEAN, True, True), (SUM, False, True), (MEAN, False, False)]


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("teacher", TEACHERS, ids=TEACHER_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("hard_weight", [0.0, 0.4])
def test_parity(kernels, pair, teacher, temperature, hard_weight):
    # 1000 classes: three whole strides of the block and a partial fourth; 6 rows: an ignored
    # row, a padding row (mask 0), targets at 0 and C-1, fractional masks
    divergence, sparse = teacher
    check_case(kernels, 6, 1000, pair, divergence, sparse, temperature, hard_weight, PLANS,
               k=40)


# Sizes: one row of one class; fewer classes than the block's threads (17); exactly two
# strides (512); a partial stride after one (BLOCK + 1); a top-K teacher with more classes
# than threads (K = 300 of 700), so that its own loop has a tail; an empty batch.
# Each dense size with forward_kl and jsd (its extra pass), the top-K one with forward_kl.
SIZES = [(r, c, None, d) for r, c in [(1, 1), (2, 17), (3, 2 * BLOCK), (4, BLOCK + 1), (0, 17)]
         for d in (FORWARD_KL, JSD)] + [(3, 700, 300, FORWARD_KL)]


@pytest.mark.parametrize("pair", [PAIRS[0], PAIRS[1], PAIRS[4]], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("rows,classes,k,divergence", SIZES,
                         ids=[f"{r}x{c}" + (f"-k{k}" if k else "") + ("-jsd" if d == JSD else "")
                              for r, c, k, d in SIZES])
def test_sizes(kernels, pair, rows, classes, k, divergence):
    check_case(kernels, rows, classes, pair, divergence, k is not None, 2.0, 0.4,
               [(NONE, True, True), (MEAN, True, True)], k=k)


@pytest.mark.parametrize("divergence", [FORWARD_KL, REVERSE_KL, JSD],
                         ids=["forward_kl", "reverse_kl", "jsd"])
def test_without_target_or_mask(kernels, divergence):
    """No target (no hard part, no ignored rows) and no mask."""
    pair = (torch.float32, torch.float32)
    s, t, _, _, _ = make_case(5, 300, pair, divergence, False, 0.0, mask=False, ignore=False)
    out = kernels.distill(s, t, None, None, None, divergence, 2.0, BETA, 0.0, IGNORE, SUM,
                           None, True, True)
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    rows, _ = reference_rows(s64, t64, None, None, None, divergence, 2.0, 0.0)
    gs, gt = torch.autograd.grad(rows.sum(), (s64, t64))
    assert_close(out[0], rows.sum(), torch.float32)
    assert_close(out[2], gs, torch.float32)
    assert_close(out[3], gt, torch.float32)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "topk"])
def test_bad_target_row_is_nan(kernels, sparse):
    """A target outside [0, C) with a hard part: that row's loss, statistics and gradients are
    NaN (the kernel never reads with it), in the forward and in the backward; the other rows
    are unchanged; the CPU entry raises instead."""
    pair = (torch.float32, torch.float32)
    rows, C = 4, 300
    s, t, idx, target, m = make_case(rows, C, pair, FORWARD_KL, sparse, 0.4, k=9, ignore=False)
    m = torch.ones(rows)
    good = kernels.distill(s, t, idx, target, m, FORWARD_KL, 2.0, BETA, 0.4, IGNORE, NONE, None,
                            True, True)
    bad_target = target.clone()
    bad_target[1] = C
    bad_target[2] = -5
    out = kernels.distill(s, t, idx, bad_target, m, FORWARD_KL, 2.0, BETA, 0.4, IGNORE, NONE,
                           None, True, True)
    for r in (1, 2):
        assert out[0][r].isnan() and out[1][r].isnan().all()
        assert out[2][r].isnan().all() and out[3][r].isnan().all()
    for r in (0, 3):
        assert torch.equal(out[0][r], good[0][r]) and torch.equal(out[2][r], good[2][r])
        assert torch.equal(out[3][r], good[3][r])
    # the backward from the forward's statistics: NaN again
    back = kernels.distill_backward(torch.ones(rows), s, t, idx, bad_target, m, out[1],
                                    FORWARD_KL, 2.0, BETA, 0.4, IGNORE, NONE, None, True, True)
    assert back[0][1:3].isnan().all() and back[1][1:3].isnan().all()
    assert back[0][0].isfinite().all() and back[0][3].isfinite().all()
    # from finite statistics, a target outside the row's classes is another slice's (class
    # offsets): no target term, as on the CPU
    back = kernels.distill_backward(torch.ones(rows), s, t, idx, bad_target, m, good[1],
                                    FORWARD_KL, 2.0, BETA, 0.4, IGNORE, NONE, None, True, True)
    back_cpu = torch.ops.fusedloss.distill_backward(
        torch.ones(rows), s, t, idx, bad_target, m, good[1], FORWARD_KL, 2.0, BETA, 0.4, IGNORE,
        NONE, None, True, True)
    assert_close(back[0], back_cpu[0], torch.float32)
    assert_close(back[1], back_cpu[1], torch.float32)
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.fusedloss.distill(s, t, idx, bad_target, m, FORWARD_KL, 2.0, BETA, 0.4, IGNORE,
                                    NONE, None, True, True)


@pytest.mark.parametrize("pair", [PAIRS[0], PAIRS[1], PAIRS[4]], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("divergence", [FORWARD_KL, JSD], ids=["forward_kl", "jsd"])
@pytest.mark.parametrize("hard_weight", [0.0, 0.4])
def test_masked_vocabulary(kernels, pair, divergence, hard_weight):
    """-inf teacher logits (classes the teacher may not emit): their p is exactly 0 and adds 0
    to the sums (not NaN); loss and gradients are finite and equal the reference's."""
    sd, td = pair
    rows, C = 4, 600
    s, t, _, target, m = make_case(rows, C, pair, divergence, False, hard_weight)
    t = t.clone()
    t[:, C // 2:] = -math.inf  # half the vocabulary
    t[1, :7] = -math.inf
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    ref_rows, ref_den = reference_rows(s64, t64, None, target, m, divergence, 2.0, hard_weight)
    ref_loss = ref_rows.sum() / ref_den
    gs, gt = torch.autograd.grad(ref_loss, (s64, t64))
    assert ref_loss.isfinite() and gs.isfinite().all() and gt.isfinite().all()
    den = ref_den.to(acc_dtype(sd)).reshape(1)
    out = call(kernels, s, t, None, target, m, divergence, 2.0, hard_weight, MEAN, den, True,
               True)
    assert out[0].isfinite() and out[2].isfinite().all() and out[3].isfinite().all()
    assert_close(out[0], ref_loss, sd)
    assert_close(out[2], gs, sd)
    assert_close(out[3], gt, td)
    back = call_backward(kernels, torch.ones((), dtype=out[0].dtype), s, t, None, target, m,
                         out[1], divergence, 2.0, hard_weight, MEAN, den, True, True)
    assert_close(back[0], gs, sd)
    assert_close(back[1], gt, td)


def test_reverse_kl_of_a_masked_vocabulary_is_infinite(kernels):
    """KL(Q || P) where P is 0 and Q is not: +inf, as the reference says (nothing hides it)."""
    s, t, _, _, _ = make_case(2, 100, (torch.float32, torch.float32), REVERSE_KL, False, 0.0)
    t[:, :10] = -math.inf
    out = kernels.distill(s, t, None, None, None, REVERSE_KL, 1.0, BETA, 0.0, IGNORE, NONE,
                           None, False, False)
    cpu = torch.ops.fusedloss.distill(s, t, None, None, None, REVERSE_KL, 1.0, BETA, 0.0, IGNORE,
                                      NONE, None, False, False)
    assert torch.equal(out[0], torch.full((2,), math.inf)) and torch.equal(out[0], cpu[0])


def test_everything_skipped_mean_is_zero(kernels):
    """Every row ignored or padded: loss 0, statistics 0, gradients 0 (mean's denominator 0)."""
    s, t, _, target, _ = make_case(3, 50, (torch.float32, torch.float32), JSD, False, 0.4)
    target[:] = IGNORE
    m = torch.tensor([1.0, 0.0, 0.5])
    out = kernels.distill(s, t, None, target, m, JSD, 2.0, BETA, 0.4, IGNORE, MEAN,
                           torch.zeros(1), True, True)
    assert out[0].item() == 0 and not out[1].any() and not out[2].any() and not out[3].any()


def test_deterministic(kernels):
    """The same bits on every run, whatever order the emulator runs blocks and threads in: the
    block reductions have a fixed order (no atomics)."""
    s, t, _, target, m = make_case(5, 1000, (torch.float32, torch.float32), JSD, False, 0.4)
    den = m.sum().reshape(1)
    runs = [call(kernels, s, t, None, target, m, JSD, 2.0, 0.4, MEAN, den, True, True)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_kernels_ran(kernels):
    """Both kernels of the distillation launchers ran (the forward and the one from the
    statistics), one launch each."""
    if kernels.name != "simt":
        pytest.skip("the launch log is the SIMT harness's")
    s, t, _, target, m = make_case(3, 40, (torch.float32, torch.float32), FORWARD_KL, False, 0.4)
    simt.ctl.reset_launches()
    out = kernels.distill(s, t, None, target, m, FORWARD_KL, 1.0, BETA, 0.4, IGNORE, NONE, None,
                           True, False)
    kernels.distill_backward(torch.ones(3), s, t, None, target, m, out[1], FORWARD_KL, 1.0,
                              BETA, 0.4, IGNORE, NONE, None, True, False)
    log = simt.ctl.launches()
    assert log.get("distill_rows") == 1 and log.get("distill_grad_rows") == 1, log


@pytest.mark.parametrize("divergence", [FORWARD_KL, REVERSE_KL, JSD],
                         ids=["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("case", ["strided", "logits_1e4", "nan"])
def test_edge_inputs(kernels, case, divergence):
    """Rows further apart than their length (slices of wider tensors: the kernels index rows
    by their strides), logits of size 1e4 (every difference is taken after the max is
    subtracted), and a NaN logit on each side (its row is NaN, as PyTorch's; nothing hides it)."""
    pair = (torch.float32, torch.float32)
    rows, C = 5, 300
    s, t, _, target, m = make_case(rows, C, pair, divergence, False, 0.4)
    if case == "strided":
        s = torch.cat([torch.randn(rows, 3), s, torch.randn(rows, 5)], 1)[:, 3:3 + C]
        t = torch.cat([t, torch.randn(rows, 11)], 1)[:, :C]
        assert s.stride(0) == C + 8 and t.stride(0) == C + 11
    elif case == "logits_1e4":
        s, t = s * 3e3, t * 3e3
    else:
        s, t = s.clone(), t.clone()
        s[0, 5] = math.nan
        t[4, 17] = math.nan
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    ref_rows, ref_den = reference_rows(s64, t64, None, target, m, divergence, 2.0, 0.4)
    gs, gt = torch.autograd.grad(ref_rows.sum(), (s64, t64))
    out = kernels.distill(s, t, None, target, m, divergence, 2.0, BETA, 0.4, IGNORE, NONE, None,
                          True, True)
    cpu = torch.ops.fusedloss.distill(s, t, None, target, m, divergence, 2.0, BETA, 0.4, IGNORE,
                                      NONE, None, True, True)
    for ours, theirs, ref in zip((out[0], out[2], out[3]), (cpu[0], cpu[2], cpu[3]),
                                 (ref_rows, gs, gt)):
        assert torch.equal(ours.isnan(), ref.isnan())
        assert_close(ours, ref, torch.float32)
        assert_close(ours, theirs, torch.float32)
    if case == "nan":
        assert out[0][0].isnan() and out[0][4].isnan() and out[0][1].isfinite()


@pytest.mark.parametrize("divergence", [FORWARD_KL, REVERSE_KL, JSD],
                         ids=["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("pair", [PAIRS[0], PAIRS[1]], ids=["f32", "bf16"])
def test_class_slices(kernels, divergence, pair):
    """The backward of vocab-parallel rows: each class slice's gradients from the whole rows'
    statistics with its class_offset (targets global: a slice holds some rows' targets, and
    the others have no target term there) are the whole rows' gradients, cut."""
    sd, td = pair
    rows, C, cut = 6, 700, 300  # slices of 300 and 400 classes; targets at 0 and C-1 included
    s, t, _, target, m = make_case(rows, C, pair, divergence, False, 0.4)
    den = (m * (target != IGNORE)).sum().reshape(1)
    whole = torch.ops.fusedloss.distill(s, t, None, target, m, divergence, 2.0, BETA, 0.4, IGNORE,
                                        MEAN, den, True, True)
    go = torch.tensor(1.5)
    for lo, hi in ((0, cut), (cut, C)):
        args = (go, s[:, lo:hi], t[:, lo:hi], None, target, m, whole[1], divergence, 2.0, BETA,
                0.4, IGNORE, MEAN, den, True, True, lo)
        ours = kernels.distill_backward(*args)
        cpu = torch.ops.fusedloss.distill_backward(*args)
        assert_close(ours[0], whole[2][:, lo:hi].double() * 1.5, sd)
        assert_close(ours[1], whole[3][:, lo:hi].double() * 1.5, td)
        assert_close(ours[0], cpu[0], sd)
        assert_close(ours[1], cpu[1], td)
