"""Leaf helpers that every layer of the package may use: the reduction codes, the accumulation
dtype, the tracing test, and the device-side sums the mean's denominators are made of.

Nothing here imports from the package: this module is the bottom layer
(tests/test_layers.py checks the order of the layers)."""

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

# The ops' reduction argument (csrc/op_checks.h's Reduction enum).
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
REDUCTION_NAMES = {code: name for name, code in REDUCTIONS.items()}
NONE, MEAN, SUM = REDUCTIONS["none"], REDUCTIONS["mean"], REDUCTIONS["sum"]

# TensorFlow's losses and probability targets have no ignore_index: a label no int64 can reach
# disables it.
NO_IGNORE_INDEX = -(2**63)


def acc_dtype(dtype):
    """The dtype the kernels accumulate in and return losses in: float64 for float64 inputs,
    float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_traced(t):
    """True while torch.compile / AOTAutograd traces (tensors are fake or functional)."""
    return torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))


def divide_or_zero(total, denominator):
    """total / denominator, 0 (with a zero gradient) where the denominator is 0."""
    nonzero = denominator != 0
    return torch.where(nonzero, total / torch.where(nonzero, denominator, 1), 0)


def sequential_sum(v):
    """sum(v) in float64 added in index order (a running sum, like the CPU op's denominator):
    the same bits for any thread count. A 0-d tensor on v's device; no host synchronisation."""
    if v.numel() == 0:
        return v.new_zeros((), dtype=torch.float64)
    return torch.cumsum(v.to(torch.float64), 0)[-1]


def mean_denominators(target, class_weight, mask, ignore_index, rows, device):
    """For mean/sum, handed to every chunk's kernel call (the linear_ce op's, the vocab-parallel
    paths'): the whole loss's (weighted denominator, count of valid positions), float64 on the
    device (no host synchronisation): sum_i mask_i * w[t_i] * [t_i != ignore_index] and
    sum_i mask_i * [t_i != ignore_index] for class indices, the mask's sum (or the row count)
    twice for probabilities, as softmax_ce computes them for one call."""
    ones = torch.ones(rows, dtype=torch.float64, device=device)
    counted = mask.to(torch.float64) if mask is not None else ones
    if target.is_floating_point():
        count = sequential_sum(counted)
        return torch.stack([count, count])
    valid = target != ignore_index
    counted = torch.where(valid, counted, 0)
    weighted = counted
    if class_weight is not None:
        safe = torch.where(valid, target, 0).clamp(0, class_weight.shape[0] - 1)
        weighted = counted * class_weight.to(torch.float64)[safe]
    return torch.stack([sequential_sum(weighted), sequential_sum(counted)])


# ---- the fused linear cross-entropy's chunks of rows ----

# Chunk size rule (auto_chunk_rows): a chunk holds 1/16 of the rows, so that its logits buffer
# is at most 1/16 of the whole logits, but at least _MIN_CHUNK_ROWS rows, and at most what fits
# in _MAX_CHUNK_BYTES (a very long batch's 1/16 would be gigabytes). Why not smaller (PyTorch's
# chunked path makes its buffer about the input's size, 64 rows at N x H x V = 4096 x 256 x
# 32000): every chunk streams the whole (V, H) weight three times, and the GEMMs of a thin chunk
# run far below the big ones' FLOP rate (MKL repacks all of W for each call); measured on 2 CPU
# cores (bench/README.md, "Chunk rows: time against memory"), 64-row chunks took 1.44x as long
# as 256-row ones (1.92 s against 1.34 s) to save 24 MB of 67 MB. chunk_size= trades the other way.
_CHUNK_FRACTION = 16


_MIN_CHUNK_ROWS = 128


_MAX_CHUNK_BYTES = 256 << 20


_ROW_ALIGN = 16  # a multiple of 16 rows keeps the GEMMs' row blocks whole


def _round_up(n, k):
    return -(-n // k) * k


def auto_chunk_rows(rows: int, in_features: int, classes: int, dtype: torch.dtype) -> int:
    """Rows per chunk when ``chunk_size`` is None: ceil(rows / 16) rounded up to a multiple of
    16, at least 128 and at most the rows whose logits fit in 256 MB (in the dtype the chunk is
    computed in), never more than ``rows``. ``in_features`` does not enter: the GEMMs' FLOPs and
    the weight's bytes streamed per chunk both scale with it."""
    del in_features  # see the docstring
    if rows <= 0:
        return 1
    element = torch.empty((), dtype=dtype).element_size()
    sixteenth = _round_up(-(-rows // _CHUNK_FRACTION), _ROW_ALIGN)
    by_bytes = max(1, _MAX_CHUNK_BYTES // max(1, classes * element))
    return max(1, min(rows, by_bytes, max(_MIN_CHUNK_ROWS, sixteenth)))


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the chunks' GEMMs and kernel run in. On the CPU, float16/bfloat16 GEMMs are
    emulated and measured here 10-100x slower than float32 ones (a 512 x 32000 x 256 bfloat16
    G @ W: 27 s against 0.22 s), so 16-bit inputs are computed in float32 there (as PyTorch's
    own chunked path does on the CPU); elsewhere the input dtype is used."""
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype
