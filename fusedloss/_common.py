"""Leaf helpers that every layer of the package may use: the reduction codes, the accumulation
dtype, the tracing test, the device-side sums the mean's denominators are made of (in a fixed
order), and small host values put on a device without a host synchronisation.

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


def pairwise_sum(v):
    """v (..., n) -> (...): the sum over the last dim in an order fixed by construction: v
    zero-padded to a power-of-two length, then halved log2(n) times by adding its upper half to
    its lower half, element by element. Elementwise adds only, so the same bits on every device
    and every run (no parallel reduction or scan whose order depends on the GPU or a launch
    configuration), under torch.use_deterministic_algorithms(True) too; ceil(log2 n) + 1
    launches. No host synchronisation."""
    n = v.shape[-1]
    size = 1 << max(0, n - 1).bit_length()
    if size != n:
        v = torch.nn.functional.pad(v, (0, size - n))
    while size > 1:
        size //= 2
        v = v[..., :size] + v[..., size:]
    return v[..., 0]


def fixed_order_sum(v):
    """v (..., n) -> (...): the sum over the last dim in float64, in an order that does not
    depend on the thread count, the run or the rank. No host synchronisation.

    On the CPU it is the running sum in index order (cumsum's loop there, serial over the summed
    dim), which is how the CPU op adds its own mean denominators (csrc/cpu/ops_cpu.cpp,
    prepare_softmax): the chunked linear CE and the vocab-parallel paths, which hand their
    denominators to the kernel, then give the single call's bits, and tests compare them
    bitwise. Elsewhere it is pairwise_sum: CUDA's cumsum is a parallel scan whose floating-point
    order is not promised (torch.use_deterministic_algorithms lists it as nondeterministic)."""
    v = v.to(torch.float64)
    if v.device.type != "cpu":
        return pairwise_sum(v)
    if v.shape[-1] == 0:
        return v.new_zeros(v.shape[:-1])
    return torch.cumsum(v, -1)[..., -1]


def device_values(values, dtype, device):
    """A small tensor of host values (a list of Python numbers) on device without a host
    synchronisation. torch.tensor(values, device=cuda) copies from pageable memory, which
    blocks the host until the stream has run; here the values go to a fresh pinned host tensor
    and are copied with non_blocking=True. The pinned block is not reused before the copy is
    done: the caching host allocator records the copy's stream event when the block is freed.
    On other devices, torch.tensor."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def mean_denominators(target, class_weight, mask, ignore_index, rows, device):
    """For mean/sum, handed to every chunk's kernel call (the linear_ce op's, the vocab-parallel
    paths'): the whole loss's (weighted denominator, count of valid positions), float64 on the
    device (no host synchronisation): sum_i mask_i * w[t_i] * [t_i != ignore_index] and
    sum_i mask_i * [t_i != ignore_index] for class indices, the mask's sum (or the row count)
    twice for probabilities, as softmax_ce computes them for one call."""
    ones = torch.ones(rows, dtype=torch.float64, device=device)
    counted = mask.to(torch.float64) if mask is not None else ones
    if target.is_floating_point():
        count = fixed_order_sum(counted)
        return torch.stack([count, count])
    valid = target != ignore_index
    counted = torch.where(valid, counted, 0)
    weighted = counted
    if class_weight is not None:
        safe = torch.where(valid, target, 0).clamp(0, class_weight.shape[0] - 1)
        weighted = counted * class_weight.to(torch.float64)[safe]
    return fixed_order_sum(torch.stack([weighted, counted]))


def valid_mask_sum(target, mask, ignore_index, rows, device):
    """The mean's denominator of a loss without class weights (the distillation losses):
    sum_i mask_i [t_i != ignore_index] (the row count without mask and target), float64 on
    the device, as mean_denominators' count of valid positions."""
    if target is not None:
        return mean_denominators(target, None, mask, ignore_index, rows, device)[1]
    if mask is not None:
        return fixed_order_sum(mask.to(torch.float64))
    return torch.full((), float(rows), dtype=torch.float64, device=device)


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
