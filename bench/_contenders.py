"""Benchmark cases, their byte model, and the contenders that run them.

Every contender is a Runner: `prepare()` runs outside the timed region (it picks the next
input set and, for contenders that overwrite the logits, rebuilds them); `step()` is what is
timed, end to end, and returns what it produced (kept alive until the clock has stopped).
"""

import importlib
import inspect
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fusedloss as fl

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Distillation cases: loss name -> divergence; the student's gradient against a frozen teacher
# at temperature DISTILL_TEMPERATURE, mixed with the hard-label CE at DISTILL_HARD_WEIGHT.
DISTILL = {"distill_fkl": "forward_kl", "distill_jsd": "jsd"}
DISTILL_TEMPERATURE, DISTILL_HARD_WEIGHT, DISTILL_BETA = 2.0, 0.5, 0.5


@dataclass(frozen=True)
class Case:
    loss: str  # "ce" (softmax cross-entropy, class-index targets), "bce" (sigmoid CE), or a
    #            distillation loss of DISTILL (student and teacher logits, class-index targets)
    rows: int
    cols: int  # classes for "ce" and distillation, features for "bce"
    dtype: str

    @property
    def name(self):
        return f"{self.loss}-{self.rows}x{self.cols}-{self.dtype}"

    @classmethod
    def parse(cls, name):
        m = re.fullmatch(rf"(ce|bce|{'|'.join(DISTILL)})-(\d+)x(\d+)-(\w+)", name)
        if not m or m.group(4) not in DTYPES:
            raise ValueError(f"not a case name: {name!r} (expected e.g. ce-4096x32000-float32)")
        return cls(m.group(1), int(m.group(2)), int(m.group(3)), m.group(4))

    @property
    def distill(self):
        return self.loss in DISTILL

    @property
    def floor(self):
        """The floor contender every ratio is against: it moves the fused kernel's bytes."""
        return "add" if self.distill else "copy_"

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def elem(self):
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def numel(self):
        return self.rows * self.cols

    @property
    def grad_bytes(self):
        """One gradient buffer (the logits' size): the unit of the memory column."""
        return self.numel * self.elem

    @property
    def model_bytes(self):
        """The fused kernel's minimum traffic: read the logits once, write the gradient once
        (BCE also reads its target, of the input's dtype; distillation the teacher's logits).
        Per-row extras (int64 target, float32 loss/lse) are left out: < 0.1% at these sizes."""
        return (3 if self.loss == "bce" or self.distill else 2) * self.numel * self.elem

    @property
    def copy_bytes(self):
        """Bytes the floor moves: a dst.copy_(src) of a logits-sized buffer (read once + write
        once); for distillation torch.add(student, teacher, out=g) (two reads, one write)."""
        return (3 if self.distill else 2) * self.numel * self.elem


FULL_CASES = [Case("ce", 4096, 32000, d) for d in ("float32", "bfloat16")] + \
             [Case("ce", 1024, 128256, d) for d in ("float32", "bfloat16")] + \
             [Case("bce", 65536, 128, d) for d in ("float32", "bfloat16")]
# The default run: one LLM-shaped case per loss and 16-bit dtype, a few minutes on 2 cores
# (the full sweep is --full).
DEFAULT_CASES = [FULL_CASES[0], FULL_CASES[1], FULL_CASES[4]]
QUICK_CASES = [Case("ce", 256, 4000, d) for d in ("float32", "bfloat16")] + \
              [Case("bce", 4096, 128, d) for d in ("float32", "bfloat16")]
# Distillation, not in the default or --full runs: --cases distill (or a name of any shape).
DISTILL_CASES = [Case(k, 4096, 32000, d) for k in DISTILL for d in ("float32", "bfloat16")]
# The shapes the performance targets were set for (bench/_report.py judges only these).
TARGET_CASES = frozenset(FULL_CASES + [c for c in DISTILL_CASES if c.dtype == "float32"])


def make_inputs(case, device, seed=0):
    """(logits, target) for a case, generated the same way on every device; for distillation
    the target is (teacher logits, class indices)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.rows, case.cols, generator=g).to(device=device, dtype=case.torch_dtype)
    if case.distill:
        teacher = torch.randn(case.rows, case.cols, generator=g).to(device=device,
                                                                    dtype=case.torch_dtype)
        t = Pair((teacher, torch.randint(0, case.cols, (case.rows,), generator=g).to(device)))
    elif case.loss == "ce":
        t = torch.randint(0, case.cols, (case.rows,), generator=g).to(device)
    else:
        t = torch.rand(case.rows, case.cols, generator=g).to(device=device,
                                                             dtype=case.torch_dtype)
    return x, t


class Pair(tuple):
    """A distillation case's target: (teacher logits, class indices), cloned as one."""

    def clone(self):
        return Pair(v.clone() for v in self)

    @property
    def nbytes(self):
        return sum(v.nbytes for v in self)


class LossRunner:
    """forward + backward of one loss on the contender's own copies of the inputs.

    Timed: `loss = fn(x, target); grad = torch.autograd.grad(loss, x)`. Normally x is a leaf
    that requires grad and is reused, so the timed region includes allocating the gradient
    buffer. With rebuild=True (contenders that write the gradient into the logits), prepare()
    restores the logits outside the timed region as a fresh non-leaf `x = pristine * one`,
    standing in for the output of an LM head."""

    def __init__(self, fn, sets, rebuild=False):
        self.fn, self.rebuild, self.i = fn, rebuild, -1
        self.x = None
        if rebuild:
            self.sets = [(x.clone(), t.clone()) for x, t in sets]
            self.one = torch.ones((), dtype=sets[0][0].dtype, device=sets[0][0].device,
                                  requires_grad=True)
        else:
            self.sets = [(x.clone().requires_grad_(), t.clone()) for x, t in sets]

    def prepare(self):
        self.i = (self.i + 1) % len(self.sets)
        x, self.t = self.sets[self.i]
        self.x = None  # free the previous (overwritten) logits before allocating new ones
        self.x = x * self.one if self.rebuild else x

    def step(self):
        loss = self.fn(self.x, self.t)
        return torch.autograd.grad(loss, self.x)[0]


class CopyRunner:
    """The floor: `dst.copy_(src)` of a logits-sized buffer into a preallocated dst
    (clone=False), or `src.clone()` (clone=True: the same bytes plus allocating the output,
    as every contender that returns a fresh gradient must)."""

    def __init__(self, sets, clone=False):
        self.clone, self.i = clone, -1
        self.sets = [(x.clone(), None if clone else torch.empty_like(x)) for x, _ in sets]

    def prepare(self):
        self.i = (self.i + 1) % len(self.sets)

    def step(self):
        src, dst = self.sets[self.i]
        return src.clone() if self.clone else dst.copy_(src)


class AddRunner(CopyRunner):
    """The distillation floor: `torch.add(student, teacher, out=g)` into a preallocated g: one
    read of each input and one write of a gradient-sized buffer."""

    def __init__(self, sets):
        self.clone, self.i = False, -1
        self.sets = [(x.clone(), t[0].clone(), torch.empty_like(x)) for x, t in sets]

    def step(self):
        s, t, g = self.sets[self.i]
        return torch.add(s, t, out=g)


def _liger_ce():
    fn = importlib.import_module("liger_kernel.transformers.functional").liger_cross_entropy

    def ce(x, t):
        out = fn(x, t)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return getattr(out, "loss", out)

    return ce


def _quack_ce():
    fn = importlib.import_module("quack.cross_entropy").cross_entropy
    if "reduction" in inspect.signature(fn).parameters:
        return lambda x, t: fn(x, t, reduction="mean")
    return lambda x, t: fn(x, t).mean()


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _ce_fused(x, t):
    return fl.cross_entropy(x, t)


def _ce_fused_inplace(x, t):
    return fl.cross_entropy(x, t, inplace_backward=True)


def _ce_eager(x, t):
    return F.cross_entropy(x, t)


def _distill_fused(case, inplace=False):
    def loss(x, t):
        return fl.distillation_loss(x, t[0], t[1], divergence=DISTILL[case.loss],
                                    temperature=DISTILL_TEMPERATURE, beta=DISTILL_BETA,
                                    hard_weight=DISTILL_HARD_WEIGHT, inplace_backward=inplace)

    return loss


def distill_composite(student, teacher, target, divergence, temperature=DISTILL_TEMPERATURE,
                      beta=DISTILL_BETA, hard_weight=DISTILL_HARD_WEIGHT, ignore_index=-100):
    """The PyTorch composite, as TRL's GKD trainer writes it (in the logits' dtype): log_softmax
    of both at T, kl_div (log_target) or the generalised JSD through the mixture's log-probs,
    summed over classes, averaged over the rows whose target is not ignore_index, times T^2;
    plus the hard-label CE."""
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    if divergence == "forward_kl":
        div = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    elif divergence == "reverse_kl":
        div = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta),
                                             log_q + math.log(1 - beta)]), dim=0)
        div = (beta * F.kl_div(log_m, log_p, reduction="none", log_target=True)
               + (1 - beta) * F.kl_div(log_m, log_q, reduction="none", log_target=True))
    valid = target != ignore_index
    soft = (div.sum(-1) * valid).sum() / valid.sum() * temperature ** 2
    hard = F.cross_entropy(student, target, ignore_index=ignore_index)
    return hard_weight * hard + (1 - hard_weight) * soft


def _distill_eager(case):
    return lambda x, t: distill_composite(x, t[0], t[1], DISTILL[case.loss])


def _bce_fused(x, t):
    return fl.binary_cross_entropy_with_logits(x, t)


def _bce_eager(x, t):
    return F.binary_cross_entropy_with_logits(x, t)


# name -> (loss kinds it runs, device kinds, factory(sets) -> Runner). Order = table order.
# Factories that import an optional library raise when it is missing (the row is skipped).
def fused_fn(case):
    """fusedloss's loss function for a case."""
    if case.distill:
        return _distill_fused(case)
    return _ce_fused if case.loss == "ce" else _bce_fused


def fused_inplace_fn(case):
    """fusedloss's loss with inplace_backward=True (its gradient over the logits)."""
    return _distill_fused(case, inplace=True) if case.distill else _ce_fused_inplace


def eager_fn(case):
    """PyTorch's eager loss function (or composite) for a case."""
    if case.distill:
        return _distill_eager(case)
    return _ce_eager if case.loss == "ce" else _bce_eager


ALL = {"ce", "bce", *DISTILL}
# name -> (loss kinds it runs, device kinds, factory(sets) -> Runner). Order = table order.
# Factories that import an optional library raise when it is missing (the row is skipped).
CONTENDERS = {
    "fusedloss": (ALL, {"cpu", "cuda"}, lambda case, sets: LossRunner(fused_fn(case), sets)),
    "fusedloss inplace": ({"ce", *DISTILL}, {"cpu", "cuda"},
                          lambda case, sets: LossRunner(fused_inplace_fn(case), sets,
                                                        rebuild=True)),
    "eager": (ALL, {"cpu", "cuda"}, lambda case, sets: LossRunner(eager_fn(case), sets)),
    "torch.compile": (ALL, {"cpu", "cuda"},
                      lambda case, sets: LossRunner(_compiled(eager_fn(case)), sets)),
    # Liger writes the gradient into the logits in its forward, so its logits are rebuilt.
    "liger": ({"ce"}, {"cuda"}, lambda case, sets: LossRunner(_liger_ce(), sets, rebuild=True)),
    "quack": ({"ce"}, {"cuda"}, lambda case, sets: LossRunner(_quack_ce(), sets)),
    "copy_": ({"ce", "bce"}, {"cpu", "cuda"}, lambda case, sets: CopyRunner(sets)),
    "clone": ({"ce", "bce"}, {"cpu", "cuda"}, lambda case, sets: CopyRunner(sets, clone=True)),
    "add": (set(DISTILL), {"cpu", "cuda"}, lambda case, sets: AddRunner(sets)),
}
FLOORS = ("copy_", "clone", "add")
INPLACE = ("fusedloss inplace",)  # the gradient must land in the logits' storage


def build_runners(case, device, names, sets):
    """{name: Runner} for the contenders in `names` that apply; {name: reason} for the rest."""
    runners, skipped = {}, {}
    for name in names:
        losses, devices, factory = CONTENDERS[name]
        if case.loss not in losses:
            continue
        if device.type not in devices:
            skipped[name] = f"{device.type}: not run (CUDA only)"
            continue
        try:
            runners[name] = factory(case, sets)
        except Exception as e:  # noqa: BLE001 -- an optional library missing or broken
            skipped[name] = f"not usable ({type(e).__name__}: {e})"
    return runners, skipped


def input_sets(case, device, cache_bytes):
    """Enough distinct input sets that cycling through them does not leave the next one in
    the last-level cache (1 when one set is already twice the cache), at most 8."""
    x, t = make_inputs(case, device)
    per_set = x.nbytes + t.nbytes
    count = min(8, max(1, math.ceil(2 * cache_bytes / per_set)))
    return [(x, t)] + [(x.clone(), t.clone()) for _ in range(count - 1)]


def reference_grad(case, x, t):
    """float32 eager gradient of the mean loss, to check every contender against."""
    xr = x.detach().float().requires_grad_()
    if case.distill:
        loss = distill_composite(xr, t[0].float(), t[1], DISTILL[case.loss])
        return torch.autograd.grad(loss, xr)[0]
    fn = F.cross_entropy if case.loss == "ce" else F.binary_cross_entropy_with_logits
    tr = t if case.loss == "ce" else t.float()
    return torch.autograd.grad(fn(xr, tr), xr)[0]


def grad_error(grad, ref):
    """max |grad - ref| / max |ref|."""
    return float((grad.detach().float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


GRAD_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
