// Softmax cross-entropy kernels: loss, row statistics and gradient in one pass over the logits
// (the "rows" path), the split-row path for rows too long for one block or too few rows, and
// the gradient recomputed from the saved row statistics (reduction="none" backward). The
// formulas are those of csrc/common/losses.h; see launch.h for the paths and their plans.
#pragma once

#include "../common/softmax_merge.h"
#include "device.cuh"
#include "launch.h"
#include "reduce.cuh"

namespace fusedloss {
namespace cuda {

using common::SoftmaxCEOptions;
using common::SoftmaxCERowGrad;
using common::SoftmaxRowStats;
using common::SoftmaxStats;

// Everything a softmax cross-entropy kernel reads besides the logits: the op's parameters, the
// device-side scalars and the launch geometry.
struct SoftmaxCEArgs {
  SoftmaxCEParams p;
  const void* weight_sum;    // acc_t[1] from the prep kernel, or null: p.weight_sum
  const void* grad_scale;    // acc_t[1] from the prep kernel, or null: 1
  int64_t grad_loss_stride;  // GradFromLse: 1 per row, 0 one value
  int threads_per_row;       // rows path
  int rows_per_block;        // rows path
  int64_t row_begin;         // first row of this launch
  int64_t row_end;           // one past its last row
  int64_t chunk;             // split path: elements per chunk
  int splits;                // split path: chunks per row
  void* partials;            // split path: acc_t[rows of the launch][splits][kPartialWords]
};

constexpr int kPartialWords = 5;  // max, sum exp(z - max), sum w (z - max), sum w, z_target

enum RowKind : int { kActive = 0, kSkipped = 1, kBadTarget = 2 };

template <typename acc_t>
struct RowCase {
  int kind;
  int64_t target;
  acc_t mask;
};

// Padding (mask 0) and ignored rows are never read: loss 0, gradient 0. A target outside
// [0, C) is never used as an index: the row's loss and gradient are NaN.
template <typename acc_t, bool kProb>
FL_DEVICE RowCase<acc_t> row_case(const SoftmaxCEParams& p, int64_t r) {
  const acc_t m = p.mask != nullptr ? static_cast<const acc_t*>(p.mask)[r] : acc_t(1);
  const int64_t t = kProb ? 0 : p.target[r];
  if (m == acc_t(0) || (!kProb && t == p.ignore_index)) return {kSkipped, t, m};
  if (!kProb && (t < 0 || t >= p.classes)) return {kBadTarget, t, m};
  return {kActive, t, m};
}

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
    opts.inv_classes = acc_t(1) / acc_t(p.classes);
    opts.weight_sum = a.weight_sum != nullptr ? *static_cast<const acc_t*>(a.weight_sum)
                                              : acc_t(p.weight_sum);
    opts.z_loss = acc_t(p.z_loss);
    softcap = p.softcap != 0.0;
    cap = acc_t(p.softcap);
    inv_cap = softcap ? acc_t(1) / cap : acc_t(0);
    need_sums = prob || p.label_smoothing != 0.0;
    weight = static_cast<const acc_t*>(p.class_weight);
  }

  template <typename T>
  FL_DEVICE acc_t z_of(T v) const {
    const acc_t z = to_acc(v);
    return softcap ? common::softcap_apply(z, cap, inv_cap) : z;
  }
  FL_DEVICE acc_t z_of(acc_t z) const { return softcap ? common::softcap_apply(z, cap, inv_cap) : z; }
  FL_DEVICE acc_t w_of(int64_t c) const { return weight != nullptr ? weight[c] : acc_t(1); }
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
        common::softmax_stats_merge(SoftmaxStats<acc_t>{x.max, x.s.sum}, SoftmaxStats<acc_t>{y.max, y.s.sum});
    const acc_t a = common::softmax_sum_rebase(x.s.a, x.s.b, x.max, st.max) +
                    common::softmax_sum_rebase(y.s.a, y.s.b, y.max, st.max);
    return {st.max, {st.sum, a, x.s.b + y.s.b}};
  }
};

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
  // have the logits' 16-byte phase, element by element otherwise.
  FL_DEVICE void load(const T* x, const T* y) {
    const bool y_vec = kProb && lead_of(y) == lead_of(x);
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      if (!touches(k)) continue;
      load_at(x, k, true, xs[k]);
      if constexpr (kProb) load_at(y, k, y_vec, ys[k]);
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
  template <bool kStatsOnly>
  FL_DEVICE RowSums<acc_t> sums(const SoftmaxCEConsts<acc_t>& c, acc_t m) const {
    RowSums<acc_t> s{acc_t(0), acc_t(0), acc_t(0)};
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int e = e0(k) + i;
        if (!in(e)) continue;
        const acc_t zm = c.z_of(xs[k][i]) - m;
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
                      const SoftmaxCERowGrad<acc_t>& rg, int64_t t, const T* x, T* g) const {
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

template <typename acc_t, bool kProb>
FL_DEVICE SoftmaxCERowGrad<acc_t> row_grad_coefs(const SoftmaxCEConsts<acc_t>& c,
                                                 const SoftmaxRowStats<acc_t>& st, acc_t sum_w_q,
                                                 int64_t t, acc_t row_scale) {
  const acc_t lse = common::softmax_row_lse(st);
  if constexpr (kProb) return common::softmax_ce_prob_row_grad(c.opts, lse, sum_w_q, row_scale);
  return common::softmax_ce_index_row_grad(c.opts, lse, c.w_of(t), row_scale);
}

template <typename acc_t, bool kProb>
FL_DEVICE acc_t row_loss_of(const SoftmaxCEConsts<acc_t>& c, const SoftmaxRowStats<acc_t>& st,
                            const RowSums<acc_t>& s, int64_t t, acc_t z_t) {
  if constexpr (kProb) return common::softmax_ce_prob_loss(c.opts, st, s.b, s.a);
  return common::softmax_ce_index_loss(c.opts, st, z_t, c.w_of(t), s.a);
}

// d(total)/d(row loss) times the mask: the forward's reduction scale, or the backward's
// incoming gradient (per row, or one value times the mean's scale).
template <typename acc_t, bool kFromStats>
FL_DEVICE acc_t row_scale_of(const SoftmaxCEArgs& a, int64_t r, acc_t m) {
  const acc_t scale = a.grad_scale != nullptr ? *static_cast<const acc_t*>(a.grad_scale) : acc_t(1);
  if constexpr (kFromStats)
    return m * (static_cast<const acc_t*>(a.p.grad_loss)[r * a.grad_loss_stride] * scale);
  return m * scale;
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
  const RowCase<acc_t> rc = live ? row_case<acc_t, kProb>(p, r) : RowCase<acc_t>{kSkipped, 0, acc_t(0)};
  const bool active = live && rc.kind == kActive;
  const SoftmaxCEConsts<acc_t> c(a, kProb);
  const int64_t C = p.classes;
  const T* x = static_cast<const T*>(p.logits) + (live ? r : 0) * p.logits_row_stride;
  const T* y = kProb ? static_cast<const T*>(p.target_probs) + (live ? r : 0) * p.target_row_stride
                     : nullptr;
  FL_SHARED_ARRAY(acc_t, red_max, kRowsMaxThreads / kWarp);
  FL_SHARED_ARRAY(RowSums<acc_t>, red_sums, kRowsMaxThreads / kWarp);

  // Every thread reaches every shuffle and barrier below, live or not: rows past the end and
  // skipped rows take part with neutral values.
  RowSlice<T, kVecs, kProb> slice(x, 0, static_cast<int>(C), lane, tpr);
  acc_t z_t = acc_t(0);
  if (active) {
    slice.load(x, y);
    // z_target is read before any gradient store of this row (in place, the logits become the
    // gradient): the reductions below order it before every store of the group.
    if (!kProb && !kFromStats) z_t = c.z_of(x[rc.target]);
  }

  SoftmaxRowStats<acc_t> st{acc_t(0), acc_t(0)};
  RowSums<acc_t> s{acc_t(0), acc_t(0), acc_t(0)};
  if constexpr (!kFromStats) {
    const acc_t m = row_allreduce(active ? slice.max(c) : fl_neg_infinity<acc_t>(), tpr,
                                  MaxOp<acc_t>(), red_max);
    s = row_allreduce(active ? slice.template sums<false>(c, m) : s, tpr, RowSumsAdd<acc_t>(),
                      red_sums);
    st = common::softmax_row_stats(SoftmaxStats<acc_t>{m, s.sum});
    if (live && lane == 0) {
      acc_t loss = acc_t(0), smax = acc_t(0), slog = acc_t(0);
      if (active) {
        loss = rc.mask * row_loss_of<acc_t, kProb>(c, st, s, rc.target, z_t);
        smax = st.max;
        slog = st.log_sum;
      } else if (rc.kind == kBadTarget) {
        loss = smax = slog = fl_quiet_nan<acc_t>();
      }
      static_cast<acc_t*>(p.row_loss)[r] = loss;
      static_cast<acc_t*>(p.row_stats)[2 * r] = smax;
      static_cast<acc_t*>(p.row_stats)[2 * r + 1] = slog;
    }
    if (p.mode == SoftmaxCEMode::Loss) return;
  } else {
    if constexpr (kProb) {
      s = row_allreduce(active ? slice.template sums<true>(c, acc_t(0)) : s, tpr,
                        RowSumsAdd<acc_t>(), red_sums);
    }
    if (active) {
      st.max = static_cast<const acc_t*>(p.row_stats)[2 * r];
      st.log_sum = static_cast<const acc_t*>(p.row_stats)[2 * r + 1];
    }
  }
  // No barrier or shuffle below: threads of dead rows may leave.
  if (!live) return;
  T* g = static_cast<T*>(p.grad) + r * p.grad_row_stride;
  if (!active) {
    const T fill = from_acc<T>(rc.kind == kSkipped ? acc_t(0) : fl_quiet_nan<acc_t>());
    fill_range(g, 0, C, fill, lane, tpr);
    return;
  }
  const acc_t row_scale = row_scale_of<acc_t, kFromStats>(a, r, rc.mask);
  const SoftmaxCERowGrad<acc_t> rg = row_grad_coefs<acc_t, kProb>(c, st, s.b, rc.target, row_scale);
  slice.grad(c, st, rg, rc.target, x, g);
}

// ---------------------------------------------------------------------------------------------
// Split path, stage 1: block (row, chunk) holds its chunk in registers and writes the chunk's
// partial (max, sums relative to it, and z_target when the target falls in the chunk).
template <typename T, bool kProb, bool kFromStats>
__global__ void __launch_bounds__(kSplitThreads) softmax_ce_split_stats_kernel(const SoftmaxCEArgs a) {
  using acc_t = acc_of<T>;
  const SoftmaxCEParams& p = a.p;
  const int64_t local = blockIdx.x / a.splits;
  const int64_t chunk = blockIdx.x - local * a.splits;
  const int64_t r = a.row_begin + local;
  const RowCase<acc_t> rc = row_case<acc_t, kProb>(p, r);
  acc_t* part = static_cast<acc_t*>(a.partials) + (local * a.splits + chunk) * kPartialWords;
  if (rc.kind != kActive) {  // the whole block agrees: no barrier is skipped by some only
    if (threadIdx.x == 0) {
      part[0] = fl_neg_infinity<acc_t>();
      part[1] = part[2] = part[3] = part[4] = acc_t(0);
    }
    return;
  }
  const SoftmaxCEConsts<acc_t> c(a, kProb);
  const int64_t lo = chunk * a.chunk;
  const int64_t hi = lo + a.chunk < p.classes ? lo + a.chunk : p.classes;
  const T* x = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
  const T* y = kProb ? static_cast<const T*>(p.target_probs) + r * p.target_row_stride : nullptr;
  FL_SHARED_ARRAY(acc_t, red_max, kSplitThreads / kWarp);
  FL_SHARED_ARRAY(RowSums<acc_t>, red_sums, kSplitThreads / kWarp);

  RowSlice<T, split_vecs(scalar_type_of<T>()), kProb> slice(x, static_cast<int>(lo), static_cast<int>(hi),
                                       static_cast<int>(threadIdx.x), kSplitThreads);
  slice.load(x, y);
  acc_t m = acc_t(0);
  RowSums<acc_t> s;
  if constexpr (!kFromStats) {
    m = block_group_allreduce(slice.max(c), kSplitThreads, MaxOp<acc_t>(), red_max);
    s = block_group_allreduce(slice.template sums<false>(c, m), kSplitThreads, RowSumsAdd<acc_t>(),
                              red_sums);
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
  }
}

// Split path, stage 2: block (row, chunk) merges the row's partials in a fixed order (each warp
// the same butterfly: every thread gets the same bits), writes the row's loss and statistics
// (chunk 0), and the chunk's gradient, reading the chunk again.
template <typename T, bool kProb, bool kFromStats>
__global__ void __launch_bounds__(kSplitThreads) softmax_ce_split_finish_kernel(const SoftmaxCEArgs a) {
  using acc_t = acc_of<T>;
  const SoftmaxCEParams& p = a.p;
  const int64_t local = blockIdx.x / a.splits;
  const int64_t chunk = blockIdx.x - local * a.splits;
  const int64_t r = a.row_begin + local;
  const bool want_grad = p.mode != SoftmaxCEMode::Loss;
  if (!want_grad && chunk != 0) return;  // the loss alone: chunk 0 of each row writes it
  const RowCase<acc_t> rc = row_case<acc_t, kProb>(p, r);
  const int64_t lo = chunk * a.chunk;
  const int64_t hi = lo + a.chunk < p.classes ? lo + a.chunk : p.classes;
  const int tid = static_cast<int>(threadIdx.x);
  T* g = want_grad ? static_cast<T*>(p.grad) + r * p.grad_row_stride : nullptr;
  if (rc.kind != kActive) {
    const acc_t v = rc.kind == kSkipped ? acc_t(0) : fl_quiet_nan<acc_t>();
    if (!kFromStats && chunk == 0 && tid == 0) {
      static_cast<acc_t*>(p.row_loss)[r] = v;
      static_cast<acc_t*>(p.row_stats)[2 * r] = v;
      static_cast<acc_t*>(p.row_stats)[2 * r + 1] = v;
    }
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
    if (!kProb && !kFromStats) z_t = parts[(rc.target / a.chunk) * kPartialWords + 4];
  }
  SoftmaxRowStats<acc_t> st;
  if constexpr (!kFromStats) {
    st = common::softmax_row_stats(SoftmaxStats<acc_t>{rp.max, rp.s.sum});
    if (chunk == 0 && tid == 0) {
      static_cast<acc_t*>(p.row_loss)[r] = rc.mask * row_loss_of<acc_t, kProb>(c, st, rp.s, rc.target, z_t);
      static_cast<acc_t*>(p.row_stats)[2 * r] = st.max;
      static_cast<acc_t*>(p.row_stats)[2 * r + 1] = st.log_sum;
    }
    if (!want_grad) return;
  } else {
    st.max = static_cast<const acc_t*>(p.row_stats)[2 * r];
    st.log_sum = static_cast<const acc_t*>(p.row_stats)[2 * r + 1];
  }
  const T* x = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
  const T* y = kProb ? static_cast<const T*>(p.target_probs) + r * p.target_row_stride : nullptr;
  RowSlice<T, split_vecs(scalar_type_of<T>()), kProb> slice(x, static_cast<int>(lo), static_cast<int>(hi), tid,
                                       kSplitThreads);
  slice.load(x, y);
  const acc_t row_scale = row_scale_of<acc_t, kFromStats>(a, r, rc.mask);
  const SoftmaxCERowGrad<acc_t> rg = row_grad_coefs<acc_t, kProb>(c, st, rp.s.b, rc.target, row_scale);
  slice.grad(c, st, rg, rc.target, x, g);
}

// ---------------------------------------------------------------------------------------------
// Device-side scalars: the sum of the class weights, and the mean's 1 / (sum of valid weights
// + mean_eps) (0 when that is 0).
template <typename acc_t>
struct SoftmaxPrepTerm {
  const int64_t* target;  // null for probability targets
  const acc_t* mask;
  const acc_t* weight;
  int64_t rows, classes, ignore_index;
  FL_DEVICE Sum2 operator()(int64_t i) const {
    double den = 0.0;
    if (i < rows) {
      den = mask != nullptr ? static_cast<double>(mask[i]) : 1.0;
      if (target != nullptr) {
        const int64_t t = target[i];
        if (t == ignore_index) den = 0.0;
        // a bad target is never an index (its row's loss is NaN anyway)
        else if (weight != nullptr && t >= 0 && t < classes) den *= static_cast<double>(weight[t]);
      }
    }
    const double w = (weight != nullptr && i < classes) ? static_cast<double>(weight[i]) : 0.0;
    return {den, w};
  }
};

template <typename acc_t>
struct SoftmaxPrepFinish {
  acc_t* out;  // [0] weight sum, [1] gradient scale
  bool weighted;
  double classes;
  bool mean;
  double mean_eps;
  FL_DEVICE void operator()(int64_t, Sum2 s) const {
    out[0] = static_cast<acc_t>(weighted ? s.b : classes);
    const double den = mean ? s.a + mean_eps : 1.0;
    out[1] = static_cast<acc_t>(den != 0.0 ? reciprocal(den) : 0.0);
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
  acc_t* scalars = reinterpret_cast<acc_t*>(ws);
  void* scratch = ws + plan.off_scratch;
  const bool prob = p.target == nullptr;
  const bool from_stats = p.mode == SoftmaxCEMode::GradFromLse;

  SoftmaxCEArgs a{};
  a.p = p;
  a.grad_loss_stride = x.grad_loss_stride;
  a.threads_per_row = plan.tpr;
  a.rows_per_block = plan.rows_per_block;
  a.row_begin = 0;
  a.row_end = p.rows;
  a.chunk = plan.chunk;
  a.splits = plan.splits;
  a.partials = ws + plan.off_partials;
  if (plan.prep) {
    const SoftmaxPrepTerm<acc_t> term{p.target, static_cast<const acc_t*>(p.mask),
                                      static_cast<const acc_t*>(p.class_weight), p.rows,
                                      p.classes, p.ignore_index};
    const SoftmaxPrepFinish<acc_t> finish{scalars, p.class_weight != nullptr,
                                          static_cast<double>(p.classes),
                                          x.reduction == Reduction::Mean, x.mean_eps};
    if (int err = launch_sum(term, plan.prep_terms, finish, scratch, stream)) return err;
    a.weight_sum = scalars;
    a.grad_scale = x.reduction == Reduction::Mean ? scalars + 1 : nullptr;
  }
  int err;
  if (from_stats) {
    err = prob ? launch_main<T, true, true>(a, plan, stream) : launch_main<T, false, true>(a, plan, stream);
  } else {
    err = prob ? launch_main<T, true, false>(a, plan, stream) : launch_main<T, false, false>(a, plan, stream);
  }
  if (err) return err;
  if (plan.reduce_loss) {
    const LossFinish<T> finish{static_cast<T*>(x.loss_out), static_cast<const acc_t*>(a.grad_scale), 1.0};
    return launch_sum(ArrayTerm<acc_t>{static_cast<const acc_t*>(p.row_loss)}, p.rows, finish,
                      scratch, stream);
  }
  return 0;
}

}  // namespace cuda
}  // namespace fusedloss
