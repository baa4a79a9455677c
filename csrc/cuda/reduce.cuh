// Block-level reductions and the deterministic sum kernels (valid counts, weight sums, the
// reduced loss). No atomics: a sum over n terms is cut into fixed chunks of kSumChunk terms
// (one block each, threads strided, a fixed tree), and the chunk sums are added by one block in
// the same way, so the bits depend on n only, never on the device or the schedule.
#pragma once

#include "device.cuh"
#include "launch.h"

namespace fusedloss {
namespace cuda {

// Combines `v` over aligned groups of `group` threads (a power of two >= 32 dividing blockDim.x)
// through `red` (shared, at least blockDim.x / 32 entries); every thread of the block calls it
// and gets its group's result. Warps merge in a fixed order, so every thread of a group computes
// the same bits. `red` is read after the call's barrier by every thread: a caller that reuses
// it needs a __syncthreads first (each kernel here reduces once per array, so none does; the
// SIMT harness's race check would catch one that forgot).
template <typename U, typename Op, typename Red>
FL_DEVICE U block_group_allreduce(U v, int group, Op op, Red red) {
  v = warp_allreduce(v, op);
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  if (static_cast<int>(threadIdx.x) % kWarp == 0) red[warp] = v;
  __syncthreads();
  const int warps = group / kWarp;
  const int first = warp / warps * warps;
  U r = red[first];
  for (int w = 1; w < warps; ++w) r = op(r, red[first + w]);
  return r;
}

// The same over groups of `group` threads, any power of two up to blockDim.x.
template <typename U, typename Op, typename Red>
FL_DEVICE U row_allreduce(U v, int group, Op op, Red red) {
  if (group <= kWarp) return group_allreduce(v, group, op);
  return block_group_allreduce(v, group, op, red);
}

// ---------------------------------------------------------------------------------------------
// Deterministic sums. A Term maps an index to a Sum3; a Finish receives (block, total).
struct StorePartial {
  Sum3* out;
  FL_DEVICE void operator()(int64_t block, Sum3 s) const { out[block] = s; }
};

struct PartialTerm {
  const Sum3* in;
  FL_DEVICE Sum3 operator()(int64_t i) const { return in[i]; }
};

template <typename Term, typename Finish>
__global__ void __launch_bounds__(kSumThreads)
    deterministic_sum_kernel(const Term term, const int64_t n, const int64_t chunk,
                             const Finish finish) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int count = static_cast<int>((begin + chunk < n ? begin + chunk : n) - begin);
  Sum3 s{0.0, 0.0, 0.0};
  for (int j = static_cast<int>(threadIdx.x); j < count; j += kSumThreads) {
    const Sum3 v = term(begin + j);
    s.a += v.a;
    s.b += v.b;
    s.c += v.c;
  }
  FL_SHARED_ARRAY(Sum3, red, kSumThreads / kWarp);
  s = block_group_allreduce(s, kSumThreads, Sum3Add(), red);
  if (threadIdx.x == 0) finish(static_cast<int64_t>(blockIdx.x), s);
}

// Sums term(0..n) and hands the total to finish(0, total); `scratch` holds
// sum_scratch_bytes(n) bytes.
template <typename Term, typename Finish>
int launch_sum(const Term& term, int64_t n, const Finish& finish, void* scratch, void* stream) {
  const int64_t blocks = ceil_div(n > 0 ? n : 1, kSumChunk);
  if (blocks <= 1) {
    const auto sum_single = &deterministic_sum_kernel<Term, Finish>;
    FL_LAUNCH(sum_single, dim3(1), dim3(kSumThreads), 0, stream, term, n, kSumChunk, finish);
    return FL_LAUNCH_STATUS();
  }
  Sum3* partials = static_cast<Sum3*>(scratch);
  const auto sum_stage1 = &deterministic_sum_kernel<Term, StorePartial>;
  FL_LAUNCH(sum_stage1, dim3(static_cast<unsigned>(blocks)), dim3(kSumThreads), 0, stream, term, n,
            kSumChunk, StorePartial{partials});
  if (int err = FL_LAUNCH_STATUS()) return err;
  const auto sum_stage2 = &deterministic_sum_kernel<PartialTerm, Finish>;
  FL_LAUNCH(sum_stage2, dim3(1), dim3(kSumThreads), 0, stream, PartialTerm{partials}, blocks,
            blocks, finish);
  return FL_LAUNCH_STATUS();
}

// The reduced loss, in the accumulation dtype: total * scale (a device scalar, else
// scale_value).
template <typename acc_t>
struct LossFinish {
  acc_t* out;
  const acc_t* scale;
  double scale_value;
  FL_DEVICE void operator()(int64_t, Sum3 s) const {
    const double k = scale != nullptr ? static_cast<double>(*scale) : scale_value;
    out[0] = static_cast<acc_t>(s.a * k);
  }
};

// Sums of a per-row (or per-chunk) acc_t array.
template <typename acc_t>
struct ArrayTerm {
  const acc_t* v;
  FL_DEVICE Sum3 operator()(int64_t i) const { return {static_cast<double>(v[i]), 0.0, 0.0}; }
};

}  // namespace cuda
}  // namespace fusedloss
