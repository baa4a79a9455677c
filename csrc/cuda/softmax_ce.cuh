// Softmax cross-entropy kernels: loss, row statistics and gradient in one pass over the logits
// (the "rows" path), the split-row path for rows too long for one block or too few rows, and
// the gradient recomputed from the saved row statistics (reduction="none" backward). The
// formulas are those of csrc/common/losses.h and the rules of a row (skipped rows, its outputs,
// its gradient's constants) those of csrc/common/softmax_rows.h, as in the CPU kernel; see
// launch.h for the paths and their plans.
#pragma once

#include "../common/softmax_merge.h"
#include "../common/softmax_rows.h"
#include "device.cuh"
#include "launch.h"
#include "reduce.cuh"

namespace fusedloss {
namespace cuda {

using common::RowCase;
using common::RowKind;
using common::SoftmaxCEOptions;
using common::SoftmaxCERowGrad;
using common::SoftmaxRowStats;
using common::SoftmaxStats;

// Everything a softmax cross-entropy kernel reads besides the logits: the op's parameters, the
// device-side scalars and the launch geometry.
struct SoftmaxCEArgs {
  SoftmaxCEParams p;
  const void* weight_sum;    // acc_t[1] from the prep kernel, or null: p.weight_sum
  const void* grad_scale;    // acc_t[2] from the prep kernel: the gradient's factors of the
                             // cross-entropy and z-loss parts (params.h), or null: 1 and 1
  // 1 / classes and 1 / softcap (0 without one), divided on the host: a division in a kernel
  // calls an out-of-line slow path, whose calling convention cost the split kernels spills.
  double inv_classes, inv_cap;
  int64_t grad_loss_stride;  // GradFromLse: 1 per row, 0 one value
  int threads_per_row;       // rows path
  int rows_per_block;        // rows path
  int64_t row_begin;         // first row of this launch
  int64_t row_end;           // one past its last row
  int64_t chunk;             // split path: elements per chunk
  int splits;                // split path: chunks per row
  void* partials;            // split path: acc_t[rows of the launch][splits][kPartialWords]
};

// Per-call constants in the accumulation type.
template <typename acc_t>
struct SoftmaxCEConsts {
  SoftmaxCEOptions<acc_t> opts;
  acc_t cap, inv_cap;
  bool softcap;
  bool need_sums;  // sum w (z - m) and sum w: label smoothing or probability targets
  const acc_t* weight;

  FL_DEVICE SoftmaxCEConsts(const SoftmaxCEArgs& a, bool prob) {
    const SoftmaxCEParams& p = a.p;
    opts.label_smoothing = acc_t(p.label_smoothing);
    opts.inv_classes = static_cast<acc_t>(a.inv_classes);
    opts.weight_sum = a.weight_sum != nullptr ? *static_cast<const acc_t*>(a.weight_sum)
                                              : acc_t(p.weight_sum);
    opts.z_loss = acc_t(p.z_loss);
    softcap = p.softcap != 0.0;
    cap = acc_t(p.softcap);
    inv_cap = static_cast<acc_t>(a.inv_cap);
    need_sums = prob || p.label_smoothing != 0.0;
    // The logits' first class's weight (launch_softmax_ce_t offsets it): w_of(t) of a target
    // in another slice is still its own.
    weight = static_cast<const acc_t*>(p.class_weight);
  }

  template <typename T>
  FL_DEVICE acc_t z_of(T v) const {
    const acc_t z = to_acc(v);
    return softcap ? common::softcap_apply(z, cap, inv_cap) : z;
  }
  FL_DEVICE acc_t z_of(acc_t z) const { return softcap ? common::softcap_apply(z, cap, inv_cap) : z; }
  FL_DEVICE acc_t w_of(int64_t c) const { return common::class_weight_at(weight, c); }
};

// The sums of a row (or of a part of it), relative to a max m: sum exp(z - m),
// a = sum w (z - m) (w q for probability targets), b = sum w (w q).
template <typename acc_t>
struct RowSums {
  acc_t sum, a, b;
};

template <typename acc_t>
struct RowSumsAdd {
  FL_DEVICE RowSums<acc_t> operator()(RowSums<acc_t> x, RowSums<acc_t> y) const {
    return {x.sum + y.sum, x.a + y.a, x.b + y.b};
  }
};

// A chunk's partial: its max, and its sums relative to that max.
template <typename acc_t>
struct RowPartial {
  acc_t max;
  RowSums<acc_t> s;
};

// Merges two partials at the larger max (commutative, bit for bit, so a butterfly leaves the
// same value in every lane).
template <typename acc_t>
struct RowPartialMerge {
  FL_DEVICE RowPartial<acc_t> operator()(RowPartial<acc_t> x, RowPartial<acc_t> y) const {
    const SoftmaxStats<acc_t> st =
        common::softmax_stats_merge(SoftmaxStats<acc_t>{x.max, x.s.sum, acc_t(0)},
                                    SoftmaxStats<acc_t>{y.max, y.s.sum, acc_t(0)});
    const acc_t a = common::softmax_sum_rebase(x.s.a, x.s.b, x.max, st.max) +
                    common::softmax_sum_rebase(y.s.a, y.s.b, y.max, st.max);
    return {st.max, {st.sum, a, x.s.b + y.s.b}};
  }
};

// Whether z counts as the max m of its row for the argmax (a NaN row's max is NaN: its first
// NaN is the argmax, as torch.argmax picks it).
template <typename acc_t>
FL_DEVICE bool is_row_max(acc_t z, acc_t m) {
  return m != m ? z != z : z == m;
}

// The slice [lo, hi) of one row held in registers by a group of `threads` threads: thread
// `lane` holds slots first + k * threads + lane, k < kVecs (consecutive lanes read consecutive
// 16 bytes). The logits are read from memory once, into xs; probability targets into ys.
// Indices inside a row are 32-bit (the op entry caps the classes at 2^31 - 1 - 16); offsets of
// rows are 64-bit.
template <typename T, int kVecs, bool kProb>
struct RowSlice {
  using acc_t = acc_of<T>;
  static constexpr int N = Pack<T>::N;
  // Converted to acc_t as they arrive, so that no value is live twice (as loaded and as
  // converted) across the reductions.
  acc_t xs[kVecs][N];
  acc_t ys[kProb ? kVecs : 1][N];
  int base;    // element index of lane 0 of this thread's first slot
  int stride;  // elements between this thread's consecutive slots
  int lo, hi;

  FL_DEVICE RowSlice(const T* x, int lo_, int hi_, int lane, int threads) : lo(lo_), hi(hi_) {
    const int lead = lead_of(x);
    base = ((lo + lead) / N + lane) * N - lead;
    stride = threads * N;
  }
  FL_DEVICE int e0(int k) const { return base + k * stride; }
  FL_DEVICE bool in(int e) const { return e >= lo && e < hi; }
  FL_DEVICE bool touches(int k) const { return e0(k) < hi; }
  FL_DEVICE bool full(int k) const { return e0(k) >= lo && e0(k) + N <= hi; }

  // y (probability targets) is read at the logits' element positions: 128-bit when its rows
  // have the logits' 16-byte phase, element by element otherwise. A target kept in acc_t
  // (float32 beside 16-bit logits, `y_in_acc`) is read as it is, 128-bit where aligned.
  FL_DEVICE void load(const T* x, const void* y, bool y_in_acc) {
    const bool y_vec = kProb && !y_in_acc && lead_of(static_cast<const T*>(y)) == lead_of(x);
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      if (!touches(k)) continue;
      load_at(x, k, true, xs[k]);
      if constexpr (kProb) {
        if (y_in_acc) load_acc_at(static_cast<const acc_t*>(y), k, ys[k]);
        else load_at(static_cast<const T*>(y), k, y_vec, ys[k]);
      }
    }
  }

  FL_DEVICE void load_at(const T* src, int k, bool vec, acc_t (&out)[N]) const {
    const int e = e0(k);
    if (vec && full(k)) {
      const Pack<T> v = load_pack(src + e);
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = to_acc(v.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (in(e + i)) out[i] = to_acc(src[e + i]);
      }
    }
  }

  FL_DEVICE void load_acc_at(const acc_t* src, int k, acc_t (&out)[N]) const {
    const int e = e0(k);
    if (full(k) && (reinterpret_cast<uintptr_t>(src + e) & 15u) == 0) {
      load_acc_vec<acc_t, N>(src + e, out);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (in(e + i)) out[i] = src[e + i];
      }
    }
  }

  // The element of the lowest bit of max_hits (from sums), the slice's end when none is set.
  FL_DEVICE int first_of_hits(unsigned max_hits) const {
    static_assert(kVecs * N <= 32, "one bit per value of the slice");
    int first = hi;
#pragma unroll
    for (int b = kVecs * N - 1; b >= 0; --b) {
      if ((max_hits >> b) & 1u) first = e0(b / N) + b % N;
    }
    return first;
  }

  // The first element of the slice whose z is the max m (the slice's end when none is).
  FL_DEVICE int first_max(const SoftmaxCEConsts<acc_t>& c, acc_t m) const {
    int first = hi;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int e = e0(k) + i;
        if (in(e) && e < first && is_row_max(c.z_of(xs[k][i]), m)) first = e;
      }
    }
    return first;
  }

  FL_DEVICE acc_t max(const SoftmaxCEConsts<acc_t>& c) const {
    acc_t m = fl_neg_infinity<acc_t>();
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (in(e0(k) + i)) m = fl_max(m, c.z_of(xs[k][i]));
      }
    }
    return m;
  }

  // Sums relative to the max m (m of the whole row, or of this slice in the split path).
  // kStatsOnly: only b (the Q = sum w q of a gradient recomputed from saved statistics).
  // `max_hits`, when given, receives bit k * N + i set where value i of pack k is the max m
  // (a bitmask rather than an index: one register, see first_of_hits).
  template <bool kStatsOnly>
  FL_DEVICE RowSums<acc_t> sums(const SoftmaxCEConsts<acc_t>& c, acc_t m,
                                unsigned* max_hits = nullptr) const {
    RowSums<acc_t> s{acc_t(0), acc_t(0), acc_t(0)};
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int e = e0(k) + i;
        if (!in(e)) continue;
        const acc_t z = c.z_of(xs[k][i]);
        if (max_hits != nullptr && is_row_max(z, m)) *max_hits |= 1u << (k * N + i);
        const acc_t zm = z - m;
        if (!kStatsOnly) s.sum += fl_exp(zm);
        if (c.need_sums) {
          acc_t w = c.w_of(e);
          if constexpr (kProb) w *= common::softmax_ce_smoothed_prob(c.opts, ys[k][i]);
          if (!kStatsOnly) s.a += w * zm;
          s.b += w;
        }
      }
    }
    return s;
  }

  // The gradient of the slice into g (same element positions; 128-bit stores when g's rows
  // have the logits' phase).
  FL_DEVICE void grad(const SoftmaxCEConsts<acc_t>& c, const SoftmaxRowStats<acc_t>& st,
                      const SoftmaxCERowGrad<acc_t>& rg, int t, const T* x, T* g) const {
    const bool g_vec = lead_of(g) == lead_of(x);
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      if (!touches(k)) continue;
      const int e = e0(k);
      Pack<T> out;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (!in(e + i)) continue;
        const acc_t z = c.z_of(xs[k][i]);
        const acc_t pr = common::softmax_prob(z, st);
        acc_t w = c.w_of(e + i);
        if constexpr (kProb) w *= common::softmax_ce_smoothed_prob(c.opts, ys[k][i]);
        acc_t v = common::softmax_ce_grad_element(rg, pr, w);
        if (!kProb && e + i == t) v -= rg.coef_target;
        if (c.softcap) v *= common::softcap_derivative(z, c.inv_cap);
        out.v[i] = from_acc<T>(v);
      }
      store_slot(g, e, lo, hi, g_vec, out);
    }
  }
};

// The row's base in the probability targets (scalar_t, or acc_t when p.target_in_acc).
template <typename T>
FL_DEVICE const void* target_row(const SoftmaxCEParams& p, int64_t r) {
  const int64_t bytes = p.target_in_acc ? int64_t(sizeof(acc_of<T>)) : int64_t(sizeof(T));
  return static_cast<const char*>(p.target_probs) + r * p.target_row_stride * bytes;
}

// The gradient's constants of an active row (common/softmax_rows.h), from the launch's scales
// and incoming gradient.
template <typename acc_t, bool kProb, bool kFromStats>
FL_DEVICE SoftmaxCERowGrad<acc_t> grad_coefs_of(const SoftmaxCEArgs& a,
                                                const SoftmaxCEConsts<acc_t>& c,
                                                const SoftmaxRowStats<acc_t>& st, acc_t sum_w_q,
                                                int64_t r, const RowCase<acc_t>& rc,
                                                acc_t token_scale) {
  return common::row_grad_coefs<acc_t, kProb>(
      c.opts, c.weight, static_cast<const acc_t*>(a.grad_scale), st, sum_w_q, rc.target,
      common::row_grad_factor(a.p, kFromStats, a.grad_loss_stride, r, rc.mask, token_scale));
}

// ---------------------------------------------------------------------------------------------
// The rows path: `threads_per_row` threads per row, `rows_per_block` rows per block. kFromStats:
// the gradient from the saved (max, log_sum) and grad_loss; otherwise the loss, the row
// statistics and (LossAndGrad) the gradient.
template <typename T> constexpr ScalarType scalar_type_of();
template <> constexpr ScalarType scalar_type_of<__half>() { return ScalarType::Float16; }
template <> constexpr ScalarType scalar_type_of<__nv_bfloat16>() { return ScalarType::BFloat16; }
template <> constexpr ScalarType scalar_type_of<float>() { return ScalarType::Float32; }
template <> constexpr ScalarType scalar_type_of<double>() { return ScalarType::Float64; }

template <typename T, int kVecs, bool kProb, bool kFromStats>
__global__ void __launch_bounds__(row_max_threads(scalar_type_of<T>(), kProb, kVecs), 1)
    softmax_ce_rows_kernel(const SoftmaxCEArgs a) {
  using acc_t = acc_of<T>;
  const SoftmaxCEParams& p = a.p;
  const int tpr = a.threads_per_row;
  const int lane = static_cast<int>(threadIdx.x) & (tpr - 1);
  const int64_t r = a.row_begin + int64_t(blockIdx.x) * a.rows_per_block + threadIdx.x / tpr;
  const bool live = r < a.row_end;
  const RowCase<acc_t> rc = live ? common::softmax_row_case<acc_t, kProb>(p, r)
                                 : RowCase<acc_t>{RowKind::Skipped, 0, acc_t(0)};
  const bool active = live && rc.kind == RowKind::Active;
  const SoftmaxCEConsts<acc_t> c(a, kProb);
  const int64_t C = p.classes;
  const T* x = static_cast<const T*>(p.logits) + (live ? r : 0) * p.logits_row_stride;
  const void* y = kProb ? target_row<T>(p, live ? r : 0) : nullptr;
  FL_SHARED_ARRAY(acc_t, red_max, kRowsMaxThreads / kWarp);
  FL_SHARED_ARRAY(RowSums<acc_t>, red_sums, kRowsMaxThreads / kWarp);
  FL_SHARED_ARRAY(int, red_first, kRowsMaxThreads / kWarp);

  // Every thread reaches every shuffle and barrier below, live or not: rows past the end and
  // skipped rows take part with neutral values.
  RowSlice<T, kVecs, kProb> slice(x, 0, static_cast<int>(C), lane, tpr);
  acc_t z_t = acc_t(0);
  if (active) {
    slice.load(x, y, p.target_in_acc);
    // z_target is read before any gradient store of this row (in place, the logits become the
    // gradient): the reductions below order it before every store of the group. From saved
    // statistics only token_scaling needs it (p_t), and nothing is written in place.
    if (!kProb && (!kFromStats || p.token_scaling) && rc.here(C)) z_t = c.z_of(x[rc.target]);
  }

  SoftmaxRowStats<acc_t> st{acc_t(0), acc_t(0)};
  RowSums<acc_t> s{acc_t(0), acc_t(0), acc_t(0)};
  if constexpr (!kFromStats) {
    const acc_t m = row_allreduce(active ? slice.max(c) : fl_neg_infinity<acc_t>(), tpr,
                                  MaxOp<acc_t>(), red_max);
    s = row_allreduce(active ? slice.template sums<false>(c, m) : s, tpr, RowSumsAdd<acc_t>(),
                      red_sums);
    st = common::softmax_row_stats_of_sum(m, s.sum);
    // The argmax is the target when z_t is the max and no element before it is (the same for
    // every thread of the block: p is the kernel's argument). The row's first argmax, when
    // asked, is the same reduction over every active row.
    bool correct = false;
    int first = static_cast<int>(C);
    if ((!kProb && p.row_correct != nullptr) || p.row_argmax != nullptr) {
      const bool t_max = !kProb && active && rc.here(C) && is_row_max(z_t, m);
      const bool scan = p.row_argmax != nullptr ? active : t_max;
      first = row_allreduce(scan ? slice.first_max(c, m) : static_cast<int>(C), tpr,
                            MinOp<int>(), red_first);
      correct = t_max && first == rc.target;
    }
    if (live && lane == 0) {
      if (active) {
        common::store_row_outputs(
            p, r,
            common::active_row_outputs<acc_t, kProb>(c.opts, c.weight, st, s.a, s.b, rc, z_t,
                                                     correct, C,
                                                     common::row_token_scale(p, st, z_t)),
            kProb, st.max, st.log_sum);
        common::store_row_argmax(p, r, first);
      } else {
        common::store_inactive_row<acc_t>(p, r, rc.kind, kProb);
      }
    }
    if (p.mode == SoftmaxCEMode::Loss) return;
  } else {
    if constexpr (kProb) {
      // Q = sum w q: of the whole row when the logits are a class slice (p is uniform: every
      // thread takes the same branch)
      if (p.row_target_mass == nullptr) {
        s = row_allreduce(active ? slice.template sums<true>(c, acc_t(0)) : s, tpr,
                          RowSumsAdd<acc_t>(), red_sums);
      } else if (active) {
        s.b = static_cast<const acc_t*>(p.row_target_mass)[r];
      }
    }
    if (active) st = common::saved_row_stats<acc_t>(p, r);
  }
  // In place, the read of z_target above and the other lanes' gradient stores below touch the
  // same logits. A group of more than 32 threads is ordered by the block reductions'
  // __syncthreads; a group of 32 or fewer only by warp shuffles, which order no memory access
  // in CUDA's memory model: __syncwarp does. (Every thread of the block is still here.)
  if (tpr <= kWarp) __syncwarp();
  // No barrier or shuffle below: threads of dead rows may leave.
  if (!live) return;
  T* g = static_cast<T*>(p.grad) + r * p.grad_row_stride;
  if (!active) {
    const T fill = from_acc<T>(common::inactive_row_value<acc_t>(rc.kind));
    fill_range(g, 0, C, fill, lane, tpr);
    return;
  }
  const SoftmaxCERowGrad<acc_t> rg = grad_coefs_of<acc_t, kProb, kFromStats>(
      a, c, st, s.b, r, rc, kProb ? acc_t(1) : common::row_token_scale(p, st, z_t));
  slice.grad(c, st, rg, rc.target_index(C), x, g);
}

// ---------------------------------------------------------------------------------------------
// Split path, stage 1: block (row, chunk) holds its chunk in registers and writes the chunk's
// partial (max, sums relative to it, z_target when the target falls in the chunk, and, when the
// accuracy is asked, the offset in the chunk of its first max).
template <typename T, bool kProb, bool kFromStats>
__global__ void __launch_bounds__(kSplitThreads) softmax_ce_split_stats_kernel(const SoftmaxCEArgs a) {
  using acc_t = acc_of<T>;
  const SoftmaxCEParams& p = a.p;
  const int64_t local = blockIdx.x / a.splits;
  const int64_t chunk = blockIdx.x - local * a.splits;
  const int64_t r = a.row_begin + local;
  const RowCase<acc_t> rc = common::softmax_row_case<acc_t, kProb>(p, r);
  acc_t* part = static_cast<acc_t*>(a.partials) + (local * a.splits + chunk) * kPartialWords;
  if (rc.kind != RowKind::Active) {  // the whole block agrees: no barrier is skipped by some only
    if (threadIdx.x == 0) {
      part[0] = fl_neg_infinity<acc_t>();
      part[1] = part[2] = part[3] = part[4] = part[5] = acc_t(0);
    }
    return;
  }
  const SoftmaxCEConsts<acc_t> c(a, kProb);
  const int64_t lo = chunk * a.chunk;
  const int64_t hi = lo + a.chunk < p.classes ? lo + a.chunk : p.classes;
  const T* x = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
  const void* y = kProb ? target_row<T>(p, r) : nullptr;
  FL_SHARED_ARRAY(acc_t, red_max, kSplitThreads / kWarp);
  FL_SHARED_ARRAY(RowSums<acc_t>, red_sums, kSplitThreads / kWarp);
  FL_SHARED_ARRAY(int, red_first, kSplitThreads / kWarp);

  RowSlice<T, split_vecs(scalar_type_of<T>()), kProb> slice(x, static_cast<int>(lo), static_cast<int>(hi),
                                       static_cast<int>(threadIdx.x), kSplitThreads);
  slice.load(x, y, p.target_in_acc);
  acc_t m = acc_t(0);
  RowSums<acc_t> s;
  int first = 0;  // offset of the chunk's first max (chunks hold < 2^24 values: exact in acc_t)
  if constexpr (!kFromStats) {
    m = block_group_allreduce(slice.max(c), kSplitThreads, MaxOp<acc_t>(), red_max);
    unsigned max_hits = 0;  // collected always: a compare per value, no branch
    s = slice.template sums<false>(c, m, &max_hits);
    first = slice.first_of_hits(max_hits);
    s = block_group_allreduce(s, kSplitThreads, RowSumsAdd<acc_t>(), red_sums);
    if ((!kProb && p.row_correct != nullptr) || p.row_argmax != nullptr) {
      first = block_group_allreduce(first, kSplitThreads, MinOp<int>(), red_first) -
              static_cast<int>(lo);
    }
  } else {
    s = block_group_allreduce(slice.template sums<true>(c, acc_t(0)), kSplitThreads,
                              RowSumsAdd<acc_t>(), red_sums);
  }
  if (threadIdx.x == 0) {
    part[0] = kFromStats ? fl_neg_infinity<acc_t>() : m;
    part[1] = s.sum;
    part[2] = s.a;
    part[3] = s.b;
    part[4] = (!kProb && rc.target >= lo && rc.target < hi) ? c.z_of(x[rc.target]) : acc_t(0);
    part[5] = acc_t(first);
  }
}

// Split path, stage 2: block (row, chunk) merges the row's partials in a fixed order (each warp
// the same butterfly: every thread gets the same bits), writes the row's outputs (chunk 0),
// and the chunk's gradient, reading the chunk again.
template <typename T, bool kProb, bool kFromStats>
__global__ void __launch_bounds__(kSplitThreads) softmax_ce_split_finish_kernel(const SoftmaxCEArgs a) {
  using acc_t = acc_of<T>;
  const SoftmaxCEParams& p = a.p;
  const int64_t local = blockIdx.x / a.splits;
  const int64_t chunk = blockIdx.x - local * a.splits;
  const int64_t r = a.row_begin + local;
  const bool want_grad = p.mode != SoftmaxCEMode::Loss;
  if (!want_grad && chunk != 0) return;  // the loss alone: chunk 0 of each row writes it
  const RowCase<acc_t> rc = common::softmax_row_case<acc_t, kProb>(p, r);
  const int64_t lo = chunk * a.chunk;
  const int64_t hi = lo + a.chunk < p.classes ? lo + a.chunk : p.classes;
  const int tid = static_cast<int>(threadIdx.x);
  T* g = want_grad ? static_cast<T*>(p.grad) + r * p.grad_row_stride : nullptr;
  if (rc.kind != RowKind::Active) {
    if (!kFromStats && chunk == 0 && tid == 0) common::store_inactive_row<acc_t>(p, r, rc.kind, kProb);
    const acc_t v = common::inactive_row_value<acc_t>(rc.kind);
    if (want_grad) fill_range(g, lo, hi, from_acc<T>(v), tid, kSplitThreads);
    return;
  }
  const SoftmaxCEConsts<acc_t> c(a, kProb);

  // The row's partials, merged by every warp: lane l takes chunks l, l + 32, ... in order, then
  // a butterfly (no shared memory, no barrier).
  const bool have_partials = !kFromStats || kProb;
  RowPartial<acc_t> rp{fl_neg_infinity<acc_t>(), {acc_t(0), acc_t(0), acc_t(0)}};
  acc_t z_t = acc_t(0);
  if (have_partials) {
    const acc_t* parts = static_cast<const acc_t*>(a.partials) + local * a.splits * kPartialWords;
    const int lane = tid % kWarp;
    for (int64_t j = lane; j < a.splits; j += kWarp) {
      const acc_t* q = parts + j * kPartialWords;
      rp = RowPartialMerge<acc_t>()(rp, RowPartial<acc_t>{q[0], {q[1], q[2], q[3]}});
    }
    rp = warp_allreduce(rp, RowPartialMerge<acc_t>());
    if (!kProb && !kFromStats && rc.here(p.classes)) {
      // 32-bit division (indices inside a row are, launch.h): a 64-bit one is a called
      // subroutine, whose calling convention cost this kernel a spill.
      const int chunk_of_target = static_cast<int>(rc.target) / static_cast<int>(a.chunk);
      z_t = parts[chunk_of_target * kPartialWords + 4];
    }
  }
  if (kProb && kFromStats && p.row_target_mass != nullptr)
    rp.s.b = static_cast<const acc_t*>(p.row_target_mass)[r];  // the whole row's Q
  SoftmaxRowStats<acc_t> st;
  if constexpr (!kFromStats) {
    st = common::softmax_row_stats_of_sum(rp.max, rp.s.sum);
    if (chunk == 0) {
      // The row's first max lies in the first chunk whose max is the row's (the row max is
      // one of the chunk maxima, bit for bit), at that chunk's offset of its own first max.
      bool correct = false;
      int64_t first = p.classes;
      if ((!kProb && p.row_correct != nullptr) || p.row_argmax != nullptr) {
        const acc_t* parts = static_cast<const acc_t*>(a.partials) + local * a.splits * kPartialWords;
        int64_t j0 = a.splits;
        for (int64_t j = tid % kWarp; j < a.splits; j += kWarp) {
          if (is_row_max(parts[j * kPartialWords], rp.max)) {
            j0 = j;
            break;
          }
        }
        j0 = warp_allreduce(j0, MinOp<int64_t>());
        if (j0 < a.splits) first = j0 * a.chunk + static_cast<int64_t>(parts[j0 * kPartialWords + 5]);
        // (a target in another slice matches no position of this one)
        correct = !kProb && is_row_max(z_t, rp.max) && first == rc.target;
      }
      if (tid == 0) {
        common::store_row_outputs(
            p, r,
            common::active_row_outputs<acc_t, kProb>(c.opts, c.weight, st, rp.s.a, rp.s.b, rc,
                                                     z_t, correct, p.classes,
                                                     common::row_token_scale(p, st, z_t)),
            kProb, st.max, st.log_sum);
        common::store_row_argmax(p, r, first);
      }
    }
    if (!want_grad) return;
  } else {
    st = common::saved_row_stats<acc_t>(p, r);
  }
  const T* x = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
  // token_scaling's p_t from saved statistics needs z_t, which no partial holds here
  if (!kProb && kFromStats && p.token_scaling && rc.here(p.classes)) z_t = c.z_of(x[rc.target]);
  const void* y = kProb ? target_row<T>(p, r) : nullptr;
  RowSlice<T, split_vecs(scalar_type_of<T>()), kProb> slice(x, static_cast<int>(lo), static_cast<int>(hi), tid,
                                       kSplitThreads);
  slice.load(x, y, p.target_in_acc);
  const SoftmaxCERowGrad<acc_t> rg = grad_coefs_of<acc_t, kProb, kFromStats>(
      a, c, st, rp.s.b, r, rc, kProb ? acc_t(1) : common::row_token_scale(p, st, z_t));
  slice.grad(c, st, rg, rc.target_index(p.classes), x, g);
}

// ---------------------------------------------------------------------------------------------
// Device-side scalars (the workspace's first kScalarBytes): the sum of the class weights, the
// gradient's factors of the two loss parts (mean: 1 / (sum of valid mask * class weight +
// mean_eps) and 1 / (sum of valid mask + mean_eps); sum: 1 and 1) and 1 / the valid count,
// which divides the token accuracy under every reduction. Each inverse is 0 when its
// denominator is 0; the caller's denominators replace the sums (and mean_eps) when given.
template <typename acc_t>
struct SoftmaxScalars {
  acc_t weight_sum;
  acc_t grad_scale[2];
  acc_t inv_valid;
};
static_assert(sizeof(SoftmaxScalars<double>) <= kScalarBytes, "scalars fit their workspace");

template <typename acc_t>
struct SoftmaxPrepTerm {
  const int64_t* target;  // null for probability targets
  const acc_t* mask;
  const acc_t* weight;    // every class's (a class slice's call too)
  int64_t rows, classes, ignore_index;  // classes: of the whole row
  const acc_t* weight_summed;  // the weights whose sum is the loss's W (plan's weight_sum_range)
  int64_t weight_summed_count;
  // (mask * class weight, mask) of row i, and class weight i of the summed range.
  FL_DEVICE Sum3 operator()(int64_t i) const {
    double den = 0.0, valid = 0.0;
    if (i < rows) {
      valid = mask != nullptr ? static_cast<double>(mask[i]) : 1.0;
      den = valid;
      if (target != nullptr) {
        const int64_t t = target[i];
        if (t == ignore_index) den = valid = 0.0;
        // a bad target is never an index (its row's loss is NaN anyway)
        else if (weight != nullptr && t >= 0 && t < classes) den *= static_cast<double>(weight[t]);
      }
    }
    const double w = (weight_summed != nullptr && i < weight_summed_count)
                         ? static_cast<double>(weight_summed[i])
                         : 0.0;
    return {den, valid, w};
  }
};

FL_DEVICE double inverse_or_zero(double d) { return d != 0.0 ? reciprocal(d) : 0.0; }

template <typename acc_t>
struct SoftmaxPrepFinish {
  SoftmaxScalars<acc_t>* out;
  bool weighted;
  double classes;
  bool mean;
  double mean_eps;
  const acc_t* denominators;  // the caller's (weighted denominator, valid count), or null
  FL_DEVICE void operator()(int64_t, Sum3 s) const {
    double den = s.a + mean_eps, valid = s.b + mean_eps;
    if (denominators != nullptr) {
      den = static_cast<double>(denominators[0]);
      valid = static_cast<double>(denominators[1]);
    }
    out->weight_sum = static_cast<acc_t>(weighted ? s.c : classes);
    out->grad_scale[0] = static_cast<acc_t>(mean ? inverse_or_zero(den) : 1.0);
    out->grad_scale[1] = static_cast<acc_t>(mean ? inverse_or_zero(valid) : 1.0);
    out->inv_valid = static_cast<acc_t>(inverse_or_zero(valid));
  }
};

// The reduced loss and the extra outputs from the sums of the rows' (cross-entropy part,
// z-loss part, correct): loss = ce * scale_ce + z * scale_z, extras = (z * scale_z, accuracy).
template <typename acc_t>
struct SoftmaxRowsTerm {
  const acc_t* loss;
  const acc_t* z_loss;   // or null
  const acc_t* correct;  // or null
  FL_DEVICE Sum3 operator()(int64_t i) const {
    return {static_cast<double>(loss[i]), z_loss != nullptr ? static_cast<double>(z_loss[i]) : 0.0,
            correct != nullptr ? static_cast<double>(correct[i]) : 0.0};
  }
};

template <typename acc_t>
struct SoftmaxLossFinish {
  acc_t* loss;
  acc_t* extras;
  const SoftmaxScalars<acc_t>* scalars;  // null: no prep ran (sum, no accuracy): scales of 1
  bool mean;
  FL_DEVICE void operator()(int64_t, Sum3 s) const {
    const bool scaled = mean && scalars != nullptr;
    const double z = s.b * (scaled ? static_cast<double>(scalars->grad_scale[1]) : 1.0);
    const double ce = s.a * (scaled ? static_cast<double>(scalars->grad_scale[0]) : 1.0);
    loss[0] = static_cast<acc_t>(ce + z);
    extras[0] = static_cast<acc_t>(z);
    extras[1] = scalars != nullptr ? static_cast<acc_t>(s.c * static_cast<double>(scalars->inv_valid))
                                   : acc_t(0);
  }
};

// ---------------------------------------------------------------------------------------------
// The launcher of one storage type.
template <typename T, int kVecs, bool kProb, bool kFromStats>
int launch_rows(const SoftmaxCEArgs& a, const SoftmaxCEPlan& plan, void* stream) {
  const auto softmax_ce_rows = &softmax_ce_rows_kernel<T, kVecs, kProb, kFromStats>;
  const int64_t blocks = ceil_div(a.row_end - a.row_begin, plan.rows_per_block);
  FL_LAUNCH(softmax_ce_rows, dim3(static_cast<unsigned>(blocks)), dim3(plan.block), 0, stream, a);
  return FL_LAUNCH_STATUS();
}

// Only the pack counts the plan can choose are instantiated (row_max_threads > 0).
template <typename T, bool kProb, bool kFromStats, int kVecs>
int launch_rows_if(const SoftmaxCEArgs& a, const SoftmaxCEPlan& plan, void* stream) {
  if constexpr (row_max_threads(scalar_type_of<T>(), kProb, kVecs) > 0)
    return launch_rows<T, kVecs, kProb, kFromStats>(a, plan, stream);
  return -1;
}

template <typename T, bool kProb, bool kFromStats>
int launch_rows_vecs(const SoftmaxCEArgs& a, const SoftmaxCEPlan& plan, void* stream) {
  switch (plan.vecs) {
    case 1: return launch_rows_if<T, kProb, kFromStats, 1>(a, plan, stream);
    case 2: return launch_rows_if<T, kProb, kFromStats, 2>(a, plan, stream);
    case 4: return launch_rows_if<T, kProb, kFromStats, 4>(a, plan, stream);
    case 8: return launch_rows_if<T, kProb, kFromStats, 8>(a, plan, stream);
    default: return -1;
  }
}

template <typename T, bool kProb, bool kFromStats>
int launch_split(SoftmaxCEArgs a, const SoftmaxCEPlan& plan, void* stream) {
  // Stage 1 is needed unless the statistics are given and the target is an index.
  constexpr bool kStage1 = !kFromStats || kProb;
  const auto softmax_ce_split_finish = &softmax_ce_split_finish_kernel<T, kProb, kFromStats>;
  for (int64_t begin = 0; begin < a.p.rows; begin += plan.rows_per_group) {
    a.row_begin = begin;
    a.row_end = begin + plan.rows_per_group < a.p.rows ? begin + plan.rows_per_group : a.p.rows;
    const unsigned blocks = static_cast<unsigned>((a.row_end - begin) * plan.splits);
    if constexpr (kStage1) {
      const auto softmax_ce_split_stats = &softmax_ce_split_stats_kernel<T, kProb, kFromStats>;
      FL_LAUNCH(softmax_ce_split_stats, dim3(blocks), dim3(kSplitThreads), 0, stream, a);
      if (int err = FL_LAUNCH_STATUS()) return err;
    }
    FL_LAUNCH(softmax_ce_split_finish, dim3(blocks), dim3(kSplitThreads), 0, stream, a);
    if (int err = FL_LAUNCH_STATUS()) return err;
  }
  return 0;
}

template <typename T, bool kProb, bool kFromStats>
int launch_main(const SoftmaxCEArgs& a, const SoftmaxCEPlan& plan, void* stream) {
  return plan.split ? launch_split<T, kProb, kFromStats>(a, plan, stream)
                    : launch_rows_vecs<T, kProb, kFromStats>(a, plan, stream);
}

template <typename T>
int launch_softmax_ce_t(const SoftmaxCEParams& p, const SoftmaxCEExtras& x, const DeviceInfo& d,
                        void* stream) {
  using acc_t = acc_of<T>;
  const SoftmaxCEPlan plan = plan_softmax_ce(p, x, d);
  char* ws = static_cast<char*>(x.workspace);
  auto* scalars = reinterpret_cast<SoftmaxScalars<acc_t>*>(ws);
  void* scratch = ws + plan.off_scratch;
  const bool prob = p.target == nullptr;
  const bool from_stats = p.mode == SoftmaxCEMode::GradFromLse;
  const bool mean = x.reduction == Reduction::Mean;

  SoftmaxCEArgs a{};
  a.p = p;
  // The kernels index the class weights from the logits' first class; offset here, on the host
  // (offset in the kernels, the 64-bit arithmetic cost a split kernel a spill). The prep
  // kernel below reads the whole vector from p.
  if (p.class_weight != nullptr)
    a.p.class_weight = static_cast<const acc_t*>(p.class_weight) + p.class_offset;
  a.inv_classes = 1.0 / static_cast<double>(p.global_classes);
  a.inv_cap = p.softcap != 0.0 ? 1.0 / p.softcap : 0.0;
  a.grad_loss_stride = x.grad_loss_stride;
  a.threads_per_row = plan.tpr;
  a.rows_per_block = plan.rows_per_block;
  a.row_begin = 0;
  a.row_end = p.rows;
  a.chunk = plan.chunk;
  a.splits = plan.splits;
  a.partials = ws + plan.off_partials;
  if (plan.prep) {
    const WeightSumRange ws_range = weight_sum_range(p);
    const auto* weight = static_cast<const acc_t*>(p.class_weight);
    const SoftmaxPrepTerm<acc_t> term{p.target, static_cast<const acc_t*>(p.mask), weight, p.rows,
                                      p.global_classes, p.ignore_index,
                                      weight != nullptr ? weight + ws_range.offset : nullptr,
                                      ws_range.count};
    const SoftmaxPrepFinish<acc_t> finish{scalars, p.class_weight != nullptr,
                                          static_cast<double>(ws_range.count), mean, x.mean_eps,
                                          static_cast<const acc_t*>(x.denominators)};
    if (int err = launch_sum(term, plan.prep_terms, finish, scratch, stream)) return err;
    a.weight_sum = &scalars->weight_sum;
    a.grad_scale = mean ? scalars->grad_scale : nullptr;
  }
  int err;
  if (from_stats) {
    err = prob ? launch_main<T, true, true>(a, plan, stream) : launch_main<T, false, true>(a, plan, stream);
  } else {
    err = prob ? launch_main<T, true, false>(a, plan, stream) : launch_main<T, false, false>(a, plan, stream);
  }
  if (err) return err;
  if (plan.reduce_loss) {
    const SoftmaxRowsTerm<acc_t> term{static_cast<const acc_t*>(p.row_loss),
                                      static_cast<const acc_t*>(p.row_z_loss),
                                      static_cast<const acc_t*>(p.row_correct)};
    const SoftmaxLossFinish<acc_t> finish{static_cast<acc_t*>(x.loss_out),
                                          static_cast<acc_t*>(x.extras_out),
                                          plan.prep ? scalars : nullptr, mean};
    return launch_sum(term, p.rows, finish, scratch, stream);
  }
  return 0;
}

template <ScalarType kDtype>
int launch_softmax_ce_of(const SoftmaxCEParams& p, const SoftmaxCEExtras& x, const DeviceInfo& d,
                         void* stream) {
  return launch_softmax_ce_t<storage_t<common::Dtype<kDtype>>>(p, x, d, stream);
}

}  // namespace cuda
}  // namespace fusedloss
