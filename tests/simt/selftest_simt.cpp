// Kernels that test the SIMT harness itself: one correct use of each feature, and one bug of
// each kind the harness must catch (tests/test_simt_harness.py). Exposed as the control op
// fusedloss_simt_ctl::selftest(name): returns the kernel's result as text, or raises with
// the harness's message.
#include <torch/library.h>

#include <string>

#include "simt.h"

namespace fusedloss_simt_selftest {
namespace {

// A load the compiler must issue even where the value is unused.
inline float load(const float* p) { return *static_cast<const volatile float*>(p); }

// A buffer of n floats in guarded memory, filled with 0..n-1.
struct Buffer {
  float* p;
  explicit Buffer(size_t n, unsigned residue = 0) {
    p = static_cast<float*>(fl_simt::guarded_alloc(n * sizeof(float), residue, "selftest buffer"));
    for (size_t i = 0; i < n; ++i) p[i] = static_cast<float>(i);
  }
  ~Buffer() { fl_simt::guarded_free(p); }
};

template <int kThreads>
float block_sum(float v) {
  FL_SIMT_SHARED_ARRAY(float, red, kThreads / 32);
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float s = 0;
  for (int w = 0; w < kThreads / 32; ++w) s += red[w];
  return s;
}

std::string run(const std::string& name) {
  float result = 0;
  auto out = [&](float v) {
    if (threadIdx.x == 0 && blockIdx.x == 0) result = v;
  };
  const dim3 one(1), block(256);
  if (name == "block_sum") {  // correct: sum of 0..255 per block
    fl_simt::launch("block_sum", dim3(3), block, 0, [&] { out(block_sum<256>(float(threadIdx.x))); });
  } else if (name == "missing_syncthreads") {  // reads other warps' partials without a barrier
    fl_simt::launch("missing_syncthreads", one, block, 0, [&] {
      FL_SIMT_SHARED_ARRAY(float, red, 8);
      float v = float(threadIdx.x);
      for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
      float s = 0;
      for (int w = 0; w < 8; ++w) s += red[w];
      out(s);
    });
  } else if (name == "reuse_without_syncthreads") {  // overwrites a slot others still read
    fl_simt::launch("reuse_without_syncthreads", one, block, 0, [&] {
      FL_SIMT_SHARED_ARRAY(float, slot, 1);
      if (threadIdx.x == 0) slot[0] = 1.0f;
      __syncthreads();
      const float a = slot[0];
      if (threadIdx.x == 0) slot[0] = 2.0f;  // missing __syncthreads before this write
      out(a);
    });
  } else if (name == "shared_out_of_bounds") {
    fl_simt::launch("shared_out_of_bounds", one, block, 0, [&] {
      FL_SIMT_SHARED_ARRAY(float, red, 8);
      if (threadIdx.x % 32 == 0) red[threadIdx.x / 32 + 1] = 1.0f;  // warp 7 writes red[8]
    });
  } else if (name == "shared_uninitialised") {
    fl_simt::launch("shared_uninitialised", one, block, 0, [&] {
      FL_SIMT_SHARED_ARRAY(float, red, 8);
      __syncthreads();
      out(red[threadIdx.x % 8]);
    });
  } else if (name == "dynamic_shared") {  // correct: per-thread slots of dynamic shared memory
    fl_simt::launch("dynamic_shared", one, block, 256 * sizeof(float), [&] {
      auto d = fl_simt::dynamic_shared<float>();
      d[threadIdx.x] = float(threadIdx.x);
      __syncthreads();
      out(d[255 - threadIdx.x]);
    });
  } else if (name == "dynamic_shared_out_of_bounds") {
    fl_simt::launch("dynamic_shared_out_of_bounds", one, block, 255 * sizeof(float), [&] {
      auto d = fl_simt::dynamic_shared<float>();
      d[threadIdx.x] = 1.0f;
    });
  } else if (name == "global_read_past_end") {  // 64 floats (256 bytes): the end is the reserve
    Buffer b(64);
    fl_simt::launch("global_read_past_end", one, dim3(32), 0,
                    [&] { out(load(b.p + 2 * threadIdx.x + 2)); });  // thread 31 reads b.p[64]
  } else if (name == "global_read_before_start") {
    Buffer b(64);
    // 4100 bytes before the buffer, past its (3840-byte) page head: the leading reserve
    fl_simt::launch("global_read_before_start", one, dim3(32), 0, [&] {
      if (threadIdx.x == 1) out(load(b.p - 1025));
    });
  } else if (name == "global_offset_truncated_to_32_bits") {
    // Rows 2^30 + 8 floats apart: row 2 starts at element 2^31 + 16, which an int offset
    // turns into -2^31 + 16, 8 GiB before the buffer (in its reserve, wherever it was mapped).
    constexpr int64_t kStride = (int64_t(1) << 30) + 8;
    constexpr size_t kBytes = (2 * kStride + 64) * sizeof(float);
    auto* rows = static_cast<float*>(fl_simt::guarded_alloc_sparse(kBytes, 0, "selftest far rows"));
    struct Free {
      float* p;
      ~Free() { fl_simt::guarded_free(p); }
    } free_rows{rows};
    fl_simt::launch("global_offset_truncated_to_32_bits", one, dim3(32), 0, [&] {
      const int64_t r = 2;
      const int offset = static_cast<int>(r * kStride);  // the bug: 64 bits kept in 32
      if (threadIdx.x == 0) out(load(rows + offset));
    });
  } else if (name == "global_read_wild_pointer") {  // null plus an offset: no buffer near
    Buffer b(64);
    float* volatile null = nullptr;  // opaque: the compiler may not fold the access away
    fl_simt::launch("global_read_wild_pointer", one, dim3(32), 0, [&] {
      if (threadIdx.x == 3) out(load(null + 16));
    });
  } else if (name == "global_write_into_gap") {  // 3 floats: 4 bytes of poison before the guard
    Buffer b(3);
    fl_simt::launch("global_write_into_gap", one, dim3(32), 0, [&] {
      if (threadIdx.x < 4) b.p[threadIdx.x] = 7.0f;
    });
  } else if (name == "global_read_gap_is_nan") {  // reading the gap yields NaN, not data
    Buffer b(3);
    fl_simt::launch("global_read_gap_is_nan", one, dim3(32), 0, [&] { out(load(b.p + 3)); });
  } else if (name == "misaligned_vector_load") {
    Buffer b(64);
    fl_simt::launch("misaligned_vector_load", one, dim3(32), 0, [&] {
      fl_simt::check_aligned(b.p + 1, 16, "b.p + 1");
    });
  } else if (name == "divergent_barrier") {  // half the block returns before a barrier
    fl_simt::launch("divergent_barrier", one, block, 0, [&] {
      if (threadIdx.x >= 128) return;
      __syncthreads();
    });
  } else if (name == "shuffle_lane_not_in_mask") {
    fl_simt::launch("shuffle_lane_not_in_mask", one, dim3(32), 0, [&] {
      out(__shfl_xor_sync(0x0000ffffu, 1.0f, 1));  // lanes 16..31 are not in the mask
    });
  } else if (name == "shuffle_reads_outside_mask") {
    fl_simt::launch("shuffle_reads_outside_mask", one, dim3(32), 0, [&] {
      const unsigned half = threadIdx.x < 16 ? 0x0000ffffu : 0xffff0000u;
      out(__shfl_xor_sync(half, 1.0f, 16));  // each half reads the other
    });
  } else if (name == "shuffle_groups") {  // correct: two half-warps reduce separately
    fl_simt::launch("shuffle_groups", one, dim3(32), 0, [&] {
      const unsigned half = threadIdx.x < 16 ? 0x0000ffffu : 0xffff0000u;
      float v = float(threadIdx.x);
      for (int o = 8; o > 0; o /= 2) v += __shfl_xor_sync(half, v, o);
      out(v);  // lane 0: 0 + ... + 15 = 120
    });
  } else if (name == "warp_lanes_disagree") {
    fl_simt::launch("warp_lanes_disagree", one, dim3(32), 0, [&] {
      if (threadIdx.x % 2) out(__shfl_xor_sync(0xffffffffu, 1.0f, 1));
      else out(static_cast<float>(__ballot_sync(0xffffffffu, 1)));
    });
  } else if (name == "deadlock") {  // half a warp shuffles (full mask), the other half waits
    fl_simt::launch("deadlock", one, dim3(32), 0, [&] {  // at a barrier: neither can go on
      if (threadIdx.x < 16) out(__shfl_xor_sync(0xffffffffu, 1.0f, 1));
      __syncthreads();
    });
  } else if (name == "votes") {  // correct: ballot / any / all
    fl_simt::launch("votes", one, dim3(32), 0, [&] {
      const unsigned b = __ballot_sync(0xffffffffu, threadIdx.x % 3 == 0);
      const int any = __any_sync(0xffffffffu, threadIdx.x == 31);
      const int all = __all_sync(0xffffffffu, threadIdx.x < 31);
      out(float(__builtin_popcount(b)) + 100.0f * any + 1000.0f * all);  // 11 + 100 + 0
    });
  } else if (name == "bad_launch") {
    fl_simt::launch("bad_launch", dim3(0), block, 0, [&] {});
  } else {
    throw std::invalid_argument("no selftest named " + name);
  }
  return std::to_string(result);
}

}  // namespace
}  // namespace fusedloss_simt_selftest

TORCH_LIBRARY_FRAGMENT(fusedloss_simt_ctl, m) {
  m.def("selftest(str name) -> str", &fusedloss_simt_selftest::run);
}
