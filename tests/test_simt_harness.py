"""The SIMT harness itself (tests/simt): each bug class it must catch is caught, its correct
uses work, its fp16/bf16 conversions are CUDA's (bit for bit against torch), and the emulated
kernels' results do not depend on the schedule it draws."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simt import ctl, load_simt_opset  # noqa: E402

import fusedloss as fl  # noqa: E402
from fusedloss import _ops  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def simt():
    return load_simt_opset()


# name -> the value thread 0 returns, for the correct kernels
CORRECT = {
    "block_sum": 32640.0,  # 0 + ... + 255, in each of 3 blocks
    "dynamic_shared": 255.0,  # thread 0 reads what thread 255 wrote after the barrier
    "shuffle_groups": 120.0,  # half-warp butterflies with their own masks: 0 + ... + 15
    "votes": 111.0,  # popcount(ballot(lane % 3 == 0)) = 11, any = 1, all = 0
}

# name -> what the harness must say (each is a real bug: the kernel text is in selftest_simt.cpp)
BUGS = {
    "missing_syncthreads": r"uninitialised shared memory|shared-memory race",
    # Either side of the race, by the fibers' random order: thread 0's second write after
    # some thread read slot[0] (overwrites), or, when thread 0 reads and writes before any
    # other thread reads, a later read of that unsynchronised write (reads ... written by).
    "reuse_without_syncthreads":
        r"shared-memory race: (.* overwrites 'slot\[0\]'|thread \d+ reads 'slot\[0\]' "
        r"written by thread 0 with no __syncthreads)",
    "shared_out_of_bounds": r"shared memory index 8 out of bounds of 'red\[8\]'",
    "shared_uninitialised": r"uninitialised shared memory",
    "dynamic_shared_out_of_bounds": r"index 255 out of bounds of 'dynamic shared memory",
    "global_read_past_end": r"out-of-bounds global memory access at byte offset 256 ",
    "global_read_before_start": r"out-of-bounds global memory access at byte offset -",
    # a 64-bit row offset kept in 32 bits: 8 GiB before the buffer, named with the kernel
    "global_offset_truncated_to_32_bits":
        r"out-of-bounds global memory access at byte offset -8589934528 of buffer "
        r"'selftest far rows' .*\[kernel global_offset_truncated_to_32_bits, block \(0,0,0\), "
        r"thread \(0,0,0\)\]",
    "global_read_wild_pointer":
        r"global memory access at address 0x40, outside every registered buffer \(nearest: "
        r"byte offset -?\d+ of buffer '.*'.*"
        r"\[kernel global_read_wild_pointer, .* thread \(3,0,0\)\]",
    "global_write_into_gap": r"write outside buffer .* at byte offset 12",
    "misaligned_vector_load": r"misaligned 128-bit access",
    "divergent_barrier": r"divergent barrier",
    "shuffle_lane_not_in_mask": r"not in its mask",
    "shuffle_reads_outside_mask": r"shuffle reads lane \d+, which is not in the mask",
    "warp_lanes_disagree": r"different warp intrinsics or masks",
    "deadlock": r"deadlock in kernel deadlock: 16 threads wait at __syncthreads, 16 in a warp",
    "bad_launch": r"invalid launch configuration .* grid \(0,1,1\)",
}


@pytest.mark.parametrize("name", list(CORRECT))
def test_correct_kernels_run(name):
    assert float(ctl.selftest(name)) == CORRECT[name]


@pytest.mark.parametrize("name", list(BUGS))
def test_bugs_are_caught(name):
    with pytest.raises(RuntimeError, match=BUGS[name]):
        ctl.selftest(name)
    # and the harness is usable again after a failed launch (a fault included)
    assert float(ctl.selftest("block_sum")) == CORRECT["block_sum"]


def test_reading_the_poisoned_gap_gives_nan():
    """Bytes between a buffer's end and its guard page read as NaN, never as data."""
    assert ctl.selftest("global_read_gap_is_nan") in ("nan", "-nan")


def test_half_to_float_every_bit_pattern():
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for dtype, code in ((torch.float16, 0), (torch.bfloat16, 1)):
        ours = ctl.bits_to_float(bits, code)
        theirs = bits.view(dtype).float()
        same = (ours.view(torch.int32) == theirs.view(torch.int32)) | (ours.isnan() & theirs.isnan())
        assert same.all(), f"{dtype}: {bits[~same][:5]}"


def test_float_to_half_rounds_like_cuda():
    """Round to nearest even, overflow to inf, subnormals, ties, NaN: against torch's CPU
    conversion (which is IEEE round-to-nearest-even, as __float2half_rn / __float2bfloat16_rn)."""
    g = torch.Generator().manual_seed(0)
    rand_bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64)
    x = rand_bits.to(torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e30, float("inf"),
                            -float("inf"), float("nan"), 2**-24, 2**-25, 2**-25 * 1.0000001,
                            2**-26, 6.1e-5, 5.96e-8, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8,
                            1 + 3 * 2**-8, 3.3895e38, 3.4e38])
    x = torch.cat([x, special, -special])
    near = torch.cat([torch.randn(1 << 16, generator=g) * s for s in (1e-6, 1e-3, 1, 1e3, 6e4)])
    x = torch.cat([x, near])
    for dtype, code in ((torch.float16, 0), (torch.bfloat16, 1)):
        ours = ctl.float_to_bits(x, code)
        theirs = x.to(dtype).view(torch.int16)
        nan = x.isnan()
        assert (ours[nan].view(dtype).isnan()).all()
        mismatch = (ours != theirs) & ~nan
        assert not mismatch.any(), f"{dtype}: {x[mismatch][:5].tolist()}"


def _run_ops(seed):
    ctl.set_seed(seed)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3001, generator=g).requires_grad_()
    t = torch.randint(0, 3001, (40,), generator=g)
    y = torch.randn(33, 17, generator=g).requires_grad_()
    z = torch.rand(33, 17, generator=g)
    with _ops.use(load_simt_opset()), ctl.device(num_sms=64, min_split_classes=1024):
        a = fl.cross_entropy(x, t, label_smoothing=0.1)
        a.backward()
        b = fl.binary_cross_entropy_with_logits(y, z)
        b.backward()
    return [a.detach(), x.grad, b.detach(), y.grad]


def test_results_do_not_depend_on_the_schedule():
    """Blocks in another order, threads interleaved otherwise: the same bits (the kernels'
    reductions have a fixed order; nothing depends on timing)."""
    first = _run_ops(1)
    second = _run_ops(2)
    for u, v in zip(first, second):
        assert torch.equal(u, v)
    assert "softmax_ce_split_stats" in ctl.launches()
