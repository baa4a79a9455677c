// The device layer every CUDA kernel of fusedloss is written against: storage and accumulation
// types, 128-bit packs, warp and block reductions, shared-memory declarations and the launch
// macro. Only CUDA headers and csrc/common are included here, never torch.
//
// The SIMT harness (tests/simt/simt.h) compiles these same files as host C++: it defines
// FUSEDLOSS_SIMT and provides threadIdx/blockIdx/blockDim/gridDim, __syncthreads, the warp
// shuffles, __half/__nv_bfloat16 and their conversions, and a checked shared-memory array. A
// kernel may use only what is listed here and in simt.h; anything else would not compile
// there, which is the point.
#pragma once

#include <cstdint>

#if !defined(FUSEDLOSS_SIMT)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "../common/dtype.h"
#include "../common/losses.h"
#include "../common/params.h"

#if !defined(FUSEDLOSS_SIMT)
#define FL_DEVICE __device__ __forceinline__
// `kernel` is a pointer to a __global__ function (a named local in the launchers, so that the
// SIMT harness can log what ran).
#define FL_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
// The launch status (launch-configuration errors surface here, without a device sync).
#define FL_LAUNCH_STATUS() static_cast<int>(cudaGetLastError())
// A shared-memory array of the block; the harness's version is bounds- and race-checked.
#define FL_SHARED_ARRAY(T, name, N) __shared__ T name[N]
#define FL_CHECK_ALIGNED(ptr, bytes) ((void)0)
#else
#define FL_DEVICE inline
#define FL_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::fl_simt::launch(#kernel, (grid), (block), (smem), [&]() { kernel(__VA_ARGS__); })
#define FL_LAUNCH_STATUS() 0
#define FL_SHARED_ARRAY(T, name, N) FL_SIMT_SHARED_ARRAY(T, name, N)
#define FL_CHECK_ALIGNED(ptr, bytes) ::fl_simt::check_aligned((ptr), (bytes), #ptr)
#endif

namespace fusedloss {
namespace cuda {

using common::fl_exp;
using common::fl_log;
using common::fl_max;
using common::fl_neg_infinity;
using common::fl_quiet_nan;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Storage (scalar_t) and accumulation (acc_t) types: float for 16/32-bit, double for float64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_of = typename AccType<T>::type;

// The storage type of a dtype (common/dtype.h) in the kernels.
template <class D>
using storage_t = common::storage_of<D::value, __half, __nv_bfloat16>;

FL_DEVICE float to_acc(__half v) { return __half2float(v); }
FL_DEVICE float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
FL_DEVICE float to_acc(float v) { return v; }
FL_DEVICE double to_acc(double v) { return v; }

template <typename T>
FL_DEVICE T from_acc(acc_of<T> v);
template <>
FL_DEVICE __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
FL_DEVICE __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
FL_DEVICE float from_acc<float>(float v) {
  return v;
}
template <>
FL_DEVICE double from_acc<double>(double v) {
  return v;
}

// 1 / x, correctly rounded (as the division is), without the division's out-of-line slow path
// (which would put a stack frame into the kernel).
FL_DEVICE double reciprocal(double x) { return __drcp_rn(x); }

// ---------------------------------------------------------------------------------------------
// 128-bit packs. A row is cut into "slots" of 16 bytes aligned in memory (not to the row's
// start): slot s of a row whose first element sits `lead` elements past a 16-byte boundary
// covers elements [s*N - lead, s*N - lead + N). A slot inside [lo, hi) is one 128-bit access;
// the (at most two) slots that straddle an end are accessed element by element. This is both
// the tail handling and the fallback for misaligned rows: any row gets 128-bit accesses in its
// interior, whatever its length and offset.
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T>
FL_DEVICE Pack<T> load_pack(const T* p) {
  FL_CHECK_ALIGNED(p, 16);
  return *reinterpret_cast<const Pack<T>*>(p);
}

template <typename T>
FL_DEVICE void store_pack(T* p, const Pack<T>& v) {
  FL_CHECK_ALIGNED(p, 16);
  *reinterpret_cast<Pack<T>*>(p) = v;
}

// Elements between `ptr` and the 16-byte boundary below it.
template <typename T>
FL_DEVICE int lead_of(const T* ptr) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(ptr) & 15u) / sizeof(T));
}

// The slot geometry of the element range [lo, hi) of one row.
struct SlotRange {
  int64_t first;  // first slot touching [lo, hi)
  int64_t end;    // one past the last
};

template <typename T>
FL_DEVICE SlotRange slot_range(int lead, int64_t lo, int64_t hi) {
  constexpr int N = Pack<T>::N;
  return {(lo + lead) / N, (hi + lead + N - 1) / N};
}

// Loads slot `s` of row `x` restricted to [lo, hi); elements outside are left as they are.
// Returns the element index of the slot's first lane.
template <typename T>
FL_DEVICE int64_t load_slot(const T* x, int lead, int64_t s, int64_t lo, int64_t hi, Pack<T>& out) {
  constexpr int N = Pack<T>::N;
  const int64_t e0 = s * N - lead;
  if (e0 >= lo && e0 + N <= hi) {
    out = load_pack(x + e0);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (e0 + i >= lo && e0 + i < hi) out.v[i] = x[e0 + i];
    }
  }
  return e0;
}

// Stores slot `s` restricted to [lo, hi); `vector_ok` says the destination has the same
// 16-byte phase as the source the slot geometry came from.
template <typename T>
FL_DEVICE void store_slot(T* g, int64_t e0, int64_t lo, int64_t hi, bool vector_ok,
                          const Pack<T>& v) {
  constexpr int N = Pack<T>::N;
  if (vector_ok && e0 >= lo && e0 + N <= hi) {
    store_pack(g + e0, v);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (e0 + i >= lo && e0 + i < hi) g[e0 + i] = v.v[i];
    }
  }
}

// Fills row elements [lo, hi) of `g` with `value`, 128-bit stores in the interior. Every
// thread of a `threads`-wide group calls it with its `lane`.
template <typename T>
FL_DEVICE void fill_range(T* g, int64_t lo, int64_t hi, T value, int lane, int threads) {
  constexpr int N = Pack<T>::N;
  const int lead = lead_of(g);
  const SlotRange r = slot_range<T>(lead, lo, hi);
  Pack<T> v;
#pragma unroll
  for (int i = 0; i < N; ++i) v.v[i] = value;
  for (int64_t s = r.first + lane; s < r.end; s += threads) store_slot(g, s * N - lead, lo, hi, true, v);
}

// kVec consecutive acc_t values (an operand kept in the accumulation dtype beside 16-bit data,
// or an accumulation-dtype output), 128-bit accesses when they make whole packs: the caller
// guarantees 16-byte alignment then (kVec elements of the data's dtype are 16 bytes).
template <typename acc_t, int kVec>
FL_DEVICE void load_acc_vec(const acc_t* src, acc_t (&out)[kVec]) {
  constexpr int kPer = Pack<acc_t>::N;
  if constexpr (kVec % kPer == 0) {
#pragma unroll
    for (int j = 0; j < kVec / kPer; ++j) {
      const Pack<acc_t> v = load_pack(src + j * kPer);
#pragma unroll
      for (int i = 0; i < kPer; ++i) out[j * kPer + i] = v.v[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = src[i];
  }
}

// The first n of kVec acc_t values to dst: whole packs when n is kVec (aligned as above).
template <typename acc_t, int kVec>
FL_DEVICE void store_acc_first(acc_t* dst, int n, const acc_t (&v)[kVec]) {
  constexpr int kPer = Pack<acc_t>::N;
  if constexpr (kVec % kPer == 0) {
    if (n == kVec) {
#pragma unroll
      for (int j = 0; j < kVec / kPer; ++j) {
        Pack<acc_t> w;
#pragma unroll
        for (int i = 0; i < kPer; ++i) w.v[i] = v[j * kPer + i];
        store_pack(dst + j * kPer, w);
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) {  // unrolled: the values stay in registers
    if (i < n) dst[i] = v[i];
  }
}

// ---------------------------------------------------------------------------------------------
// Warp and block reductions. Every value crosses lanes with __shfl_xor_sync, 32 bits at a
// time; a butterfly leaves the same result in every lane (IEEE addition and max commute, so
// partner lanes compute bit-identical merges), and the order of the tree is fixed, so every
// reduction here is deterministic.
template <typename U>
FL_DEVICE U shfl_xor(U v, int offset) {
  static_assert(sizeof(U) % 4 == 0, "shuffled types are whole 32-bit words");
  constexpr int W = sizeof(U) / 4;
  union {
    U value;
    unsigned words[W];
  } in, out;
  in.value = v;
#pragma unroll
  for (int i = 0; i < W; ++i) out.words[i] = __shfl_xor_sync(kFullMask, in.words[i], offset);
  return out.value;
}

// Combines `v` over aligned groups of `width` lanes (a power of two, at most 32).
template <typename U, typename Op>
FL_DEVICE U group_allreduce(U v, int width, Op op) {
  for (int offset = width / 2; offset > 0; offset /= 2) v = op(v, shfl_xor(v, offset));
  return v;
}

template <typename U, typename Op>
FL_DEVICE U warp_allreduce(U v, Op op) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = op(v, shfl_xor(v, offset));
  return v;
}

// Sums of the deterministic reductions (denominators, valid counts, weight sums, the final
// loss and its parts).
struct Sum3 {
  double a;
  double b;
  double c;
};

struct Sum3Add {
  FL_DEVICE Sum3 operator()(Sum3 x, Sum3 y) const { return {x.a + y.a, x.b + y.b, x.c + y.c}; }
};

template <typename T>
struct AddOp {
  FL_DEVICE T operator()(T a, T b) const { return a + b; }
};

template <typename T>
struct MaxOp {
  FL_DEVICE T operator()(T a, T b) const { return fl_max(a, b); }
};

template <typename T>
struct MinOp {
  FL_DEVICE T operator()(T a, T b) const { return a < b ? a : b; }
};

}  // namespace cuda
}  // namespace fusedloss
