// The SIMT harness: what a CUDA kernel of fusedloss may use, emulated on the CPU, so that the
// very same kernel templates and launchers (csrc/cuda/*.cuh, *.cu) compile as host C++ and run
// under pytest on machines without a GPU.
//
// Model (simt_runtime.cpp):
//  - a launch runs its blocks one at a time, in a shuffled order; every thread of a block is a
//    fiber with its own stack, and the fibers are interleaved at random at every
//    synchronisation point (__syncthreads, each warp intrinsic), so a kernel that depends on an
//    order the hardware does not promise shows it;
//  - warp intrinsics are collective: every lane named in the mask must call the same intrinsic
//    with the same mask (checked), and the exchange is a two-phase barrier of those lanes, so
//    nothing relies on implicit warp synchrony;
//  - __syncthreads is a barrier of the whole block; a thread that exits while others wait at a
//    barrier, or a barrier after some threads exited, is an error (divergent barrier);
//  - shared memory (FL_SHARED_ARRAY, dynamic shared memory) is bounds-checked per access and
//    race-checked: reading a value another thread wrote, or overwriting a value another thread
//    read, without a __syncthreads in between is an error, and so is reading shared memory
//    nobody wrote;
//  - global memory: the op entries hand the kernels guard-paged copies of every tensor (see
//    guarded_alloc), each inside 16 GiB of inaccessible address space a side. Every global
//    access outside the registered buffers that faults fails the launch (not the process):
//    within a buffer's reserve (an index past the end, before the start, or wrong in 32 bits:
//    a 64-bit offset truncated) with that buffer's name and the byte offset; anywhere else (a
//    wild or null pointer) with the address and the nearest buffer. Bytes between a buffer and
//    its reserve are poisoned (NaN) and checked after each launch; 128-bit accesses must be
//    16-byte aligned, as on the GPU.
// Any failure raises from the launch, naming the kernel, block and thread.
#pragma once

#define FUSEDLOSS_SIMT 1

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>

// ---------------------------------------------------------------------------------------------
// CUDA's vocabulary.
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
// Plain `__shared__` declarations work (blocks run one at a time, so a static is per block),
// but they are not checked: kernels use FL_SHARED_ARRAY.
#define __shared__ static

namespace fl_simt {

struct ThreadCtx {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};
// The context of the fiber that runs now (set by the scheduler before each switch).
extern ThreadCtx* g_ctx;

[[noreturn]] void fail(const std::string& message);

void syncthreads();
// One collective of a warp: kind 0 xor, 1 down, 2 up, 3 idx, 4 ballot, 5 any, 6 all, 7 syncwarp.
uint64_t warp_op(unsigned mask, int kind, uint64_t value, int arg, int width);

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 32- or 64-bit values");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

inline void check_aligned(const void* p, int bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) != 0)
    fail(std::string("misaligned ") + std::to_string(bytes * 8) + "-bit access (" + what + ")");
}

// ---------------------------------------------------------------------------------------------
// Shared memory: one region per declaration site and block, poisoned when created.
struct SharedRegion;
SharedRegion* block_shared(int key, size_t elem_size, size_t count, const char* name);
SharedRegion* block_dynamic_shared(size_t elem_size);
int new_shared_key();
size_t shared_count(const SharedRegion* r);
void* shared_read(SharedRegion* r, long long i);   // checks bounds, races; returns the element
void* shared_write(SharedRegion* r, long long i);  // the same for a write

template <typename T>
struct SharedRef {
  SharedRegion* r;
  long long i;
  operator T() const {
    T v;
    std::memcpy(&v, shared_read(r, i), sizeof(T));
    return v;
  }
  SharedRef& operator=(const T& v) {
    std::memcpy(shared_write(r, i), &v, sizeof(T));
    return *this;
  }
  SharedRef& operator=(const SharedRef& o) { return *this = static_cast<T>(o); }
};

template <typename T>
struct SharedArray {
  SharedRegion* r;
  SharedArray(int key, size_t count, const char* name) : r(block_shared(key, sizeof(T), count, name)) {}
  explicit SharedArray(SharedRegion* region) : r(region) {}
  SharedRef<T> operator[](long long i) const { return SharedRef<T>{r, i}; }
  size_t size() const { return shared_count(r); }
};

// The block's dynamic shared memory (the launch's `smem` bytes), viewed as T.
template <typename T>
inline SharedArray<T> dynamic_shared() {
  return SharedArray<T>(block_dynamic_shared(sizeof(T)));
}

// ---------------------------------------------------------------------------------------------
// Launches and guarded buffers.
void launch(const char* name, dim3 grid, dim3 block, size_t dynamic_smem,
            const std::function<void()>& body);

// A buffer flanked by inaccessible address space (16 GiB a side; one page where the process
// cannot reserve that much): `bytes` bytes starting at an address that is `residue` modulo 16
// (so that a copy keeps its original's 16-byte phase), ending less than 16 bytes before the
// trailing reserve. Everything in its pages outside the buffer is 0xFF (NaN in
// every float format), and checked after each launch.
void* guarded_alloc(size_t bytes, unsigned residue, const char* name);
// The same, for a sparse view (a few rows far apart): the pages are reserved, not touched, so
// only the pages a copy writes cost memory; the buffer's interior reads as zero, not NaN.
void* guarded_alloc_sparse(size_t bytes, unsigned residue, const char* name);
void guarded_free(void* data);

struct Config {
  int num_sms = 16;
  int64_t l2_bytes = 1 << 20;
  int64_t min_split_classes = 2048;
  uint64_t seed = 0;
};
Config& config();
std::string launch_log();  // "name count" lines of the launches since the last reset
void reset_launch_log();

}  // namespace fl_simt

#define FL_SIMT_SHARED_ARRAY(T, name, N)                                \
  static const int name##_fl_simt_key = ::fl_simt::new_shared_key(); \
  const ::fl_simt::SharedArray<T> name(name##_fl_simt_key, static_cast<size_t>(N), #name)

#define threadIdx (::fl_simt::g_ctx->thread_idx)
#define blockIdx (::fl_simt::g_ctx->block_idx)
#define blockDim (::fl_simt::g_ctx->block_dim)
#define gridDim (::fl_simt::g_ctx->grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads() { ::fl_simt::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::fl_simt::warp_op(mask, 7, 0, 0, 32); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::fl_simt::from_bits<T>(::fl_simt::warp_op(mask, 0, ::fl_simt::to_bits(v), lane_mask, width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::fl_simt::from_bits<T>(
      ::fl_simt::warp_op(mask, 1, ::fl_simt::to_bits(v), static_cast<int>(delta), width));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::fl_simt::from_bits<T>(
      ::fl_simt::warp_op(mask, 2, ::fl_simt::to_bits(v), static_cast<int>(delta), width));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::fl_simt::from_bits<T>(::fl_simt::warp_op(mask, 3, ::fl_simt::to_bits(v), src_lane, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(::fl_simt::warp_op(mask, 4, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(::fl_simt::warp_op(mask, 5, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(::fl_simt::warp_op(mask, 6, pred != 0, 0, 32));
}

inline double __drcp_rn(double x) { return 1.0 / x; }

// ---------------------------------------------------------------------------------------------
// __half and __nv_bfloat16 with CUDA's conversions: round to nearest even, NaN to the canonical
// 0x7fff. (tests/test_simt_harness.py checks them against torch bit for bit.)
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t exp = (h.__x >> 10) & 0x1fu;
  const uint32_t mant = h.__x & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(mant), -24);  // zero or subnormal: exact
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  uint32_t h;
  if (x > 0x7f800000u) {
    return __half{0x7fff};
  } else if (x >= 0x477ff000u) {  // >= 65520 (and inf): inf
    h = 0x7c00u;
  } else if (x >= 0x38800000u) {  // normal
    h = (((x >> 23) - 112u) << 10) | ((x >> 13) & 0x3ffu);
    const uint32_t rem = x & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry moves the exponent up
  } else if (x < 0x33000000u) {  // below 2^-25: zero
    h = 0;
  } else {  // subnormal
    const uint32_t e = x >> 23;
    const uint32_t m = (x & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24
    h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) ++h;
  }
  return __half{static_cast<unsigned short>(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t bits = static_cast<uint32_t>(b.__x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
  x += 0x7fffu + ((x >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(x >> 16)};
}
