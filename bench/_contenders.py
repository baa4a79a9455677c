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


@dataclass(frozen=True)
class Case:
    loss: str  # "ce" (softmax cross-entropy, class-index targets) or "bce" (sigmoid CE)
    rows: int
    cols: int  # classes for "ce", features for "bce"
    dtype: str

    @property
    def name(self):
        return f"{self.loss}-{self.rows}x{self.cols}-{self.dtype}"

    @classmethod
    def parse(cls, name):
        m = re.fullmatch(r"(ce|bce)-(\d+)x(\d+)-(\w+)", name)
        if not m or m.group(4) not in DTYPES:
            raise ValueError(f"not a case name: {name!r} (expected e.g. ce-4096x32000-float32)")
        return cls(m.group(1), int(m.group(2)), int(m.group(3)), m.group(4))

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
        (BCE also reads its target, of the input's dtype). Per-row extras (int64 target,
        float32 loss/lse) are left out: < 0.1% at these sizes."""
        return (3 if self.loss == "bce" else 2) * self.numel * self.elem

    @property
    def copy_bytes(self):
        """Bytes a dst.copy_(src) of a logits-sized buffer moves (read once + write once)."""
        return 2 * self.numel * self.elem


FULL_CASES = [Case("ce", 4096, 32000, d) for d in ("float32", "bfloat16")] + \
             [Case("ce", 1024, 128256, d) for d in ("float32", "bfloat16")] + \
             [Case("bce", 65536, 128, d) for d in ("float32", "bfloat16")]
# The default run: one LLM-shaped case per loss and 16-bit dtype, a few minutes on 2 cores
# (the full sweep is --full).
DEFAULT_CASES = [FULL_CASES[0], FULL_CASES[1], FULL_CASES[4]]
# The shapes the performance targets were set for (bench/_report.py judges only these).
TARGET_CASES = frozenset(FULL_CASES)
QUICK_CASES = [Case("ce", 256, 4000, d) for d in ("float32", "bfloat16")] + \
              [Case("bce", 4096, 128, d) for d in ("float32", "bfloat16")]


def make_inputs(case, device, seed=0):
    """(logits, target) for a case, generated the same way on every device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.rows, case.cols, generator=g).to(device=device, dtype=case.torch_dtype)
    if case.loss == "ce":
        t = torch.randint(0, case.cols, (case.rows,), generator=g).to(device)
    else:
        t = torch.rand(case.rows, case.cols, generator=g).to(device=device,
                                                             dtype=case.torch_dtype)
    return x, t


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


def _bce_fused(x, t):
    return fl.binary_cross_entropy_with_logits(x, t)


def _bce_eager(x, t):
    return F.binary_cross_entropy_with_logits(x, t)


# name -> (loss kinds it runs, device kinds, factory(sets) -> Runner). Order = table order.
# Factories that import an optional library raise when it is missing (the row is skipped).
CONTENDERS = {
    "fusedloss": ({"ce", "bce"}, {"cpu", "cuda"},
                  lambda case, sets: LossRunner(_ce_fused if case.loss == "ce" else _bce_fused,
                                                sets)),
    "fusedloss inplace": ({"ce"}, {"cpu", "cuda"},
                          lambda case, sets: LossRunner(_ce_fused_inplace, sets, rebuild=True)),
    "eager": ({"ce", "bce"}, {"cpu", "cuda"},
              lambda case, sets: LossRunner(_ce_eager if case.loss == "ce" else _bce_eager, sets)),
    "torch.compile": ({"ce", "bce"}, {"cpu", "cuda"},
                      lambda case, sets: LossRunner(
                          _compiled(_ce_eager if case.loss == "ce" else _bce_eager), sets)),
    # Liger writes the gradient into the logits in its forward, so its logits are rebuilt.
    "liger": ({"ce"}, {"cuda"}, lambda case, sets: LossRunner(_liger_ce(), sets, rebuild=True)),
    "quack": ({"ce"}, {"cuda"}, lambda case, sets: LossRunner(_quack_ce(), sets)),
    "copy_": ({"ce", "bce"}, {"cpu", "cuda"}, lambda case, sets: CopyRunner(sets)),
    "clone": ({"ce", "bce"}, {"cpu", "cuda"}, lambda case, sets: CopyRunner(sets, clone=True)),
}
FLOORS = ("copy_", "clone")
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
    fn = F.cross_entropy if case.loss == "ce" else F.binary_cross_entropy_with_logits
    tr = t if case.loss == "ce" else t.float()
    return torch.autograd.grad(fn(xr, tr), xr)[0]


def grad_error(grad, ref):
    """max |grad - ref| / max |ref|."""
    return float((grad.detach().float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


GRAD_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
