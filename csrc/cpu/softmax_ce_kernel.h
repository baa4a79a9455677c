// CPU softmax cross-entropy: one call handles a range of rows. Included only by
// isa_kernels.cpp, which is compiled once per instruction set.
//
// Per row, the logits are read from memory once (pass A: the max); passes B (exp, its sum and
// the loss's sums) and C (the gradient) read the row again from cache, where it still is (a
// 128256-class float32 row is 513 KB). exp(z - max) is kept in a per-thread scratch row
// between B and C, so that exp is evaluated once per logit. What a row writes besides its
// gradient, and its gradient's constants, are common/softmax_rows.h's, as in the CUDA kernels.
#pragma once

#include <ATen/Parallel.h>

#include <vector>

#include "../common/losses.h"
#include "../common/params.h"
#include "../common/softmax_rows.h"
#include "vec_math.h"

namespace fusedloss {
namespace cpu {
inline namespace CPU_CAPABILITY {

using namespace ::fusedloss::common;

template <typename scalar_t, bool kWeight, bool kSoftcap, bool kProb>
struct SoftmaxCERowKernel {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  static constexpr int K = IO::K;
  static constexpr int64_t kStep = IO::kStep;
  // 16-bit data: the fast exp, whose error the output rounding hides (common/math.h).
  using Exp = std::conditional_t<IO::kReduced, FastExp, AccurateExp>;
  // float32/float64: the sum's part below the row max is summed apart too (SoftmaxStats), for
  // a confident row's loss to keep its digits; a 16-bit row's loss is not worth the extra
  // operations in its exp-bound pass (its sum near 1 costs ~1e-7 absolute).
  static constexpr bool kSumBelowMax = !IO::kReduced;

  const SoftmaxCEParams& p;
  SoftmaxCEOptions<acc_t> opts;
  acc_t cap, inv_cap;
  const acc_t* grad_scale;  // the gradient's factors of the two loss parts (params.h)
  const acc_t* weight;
  bool need_sums;  // sum w (z - max) and sum w q: label smoothing or probability targets
  std::vector<acc_t> z_row;    // softcapped logits (kSoftcap only)
  std::vector<acc_t> exp_row;  // exp(z - max) between passes B and C

  explicit SoftmaxCERowKernel(const SoftmaxCEParams& params) : p(params) {
    opts.label_smoothing = acc_t(p.label_smoothing);
    opts.inv_classes = acc_t(1) / acc_t(p.global_classes);
    opts.weight_sum = acc_t(p.weight_sum);
    opts.z_loss = acc_t(p.z_loss);
    cap = acc_t(p.softcap);
    inv_cap = kSoftcap ? acc_t(1) / cap : acc_t(0);
    grad_scale = static_cast<const acc_t*>(p.grad_scale);
    need_sums = kProb || opts.label_smoothing != acc_t(0);
    // The slice's first class weight: weight[j] is class j of the logits, and weight[t - offset]
    // a target's weight wherever in the whole vector it is.
    weight = p.class_weight ? static_cast<const acc_t*>(p.class_weight) + p.class_offset : nullptr;
    // Rounded up to whole steps: full-step stores past the row's end stay inside the buffer.
    const int64_t padded = (p.classes + kStep - 1) / kStep * kStep;
    if (kSoftcap) z_row.resize(padded);
    if (p.mode == SoftmaxCEMode::LossAndGrad) exp_row.resize(padded);
  }

  // Class weights of one step (1 without weights; 0 in the lanes past the row's end).
  void load_weight(int64_t j, int64_t n, Vec* w) const {
    if constexpr (kWeight) {
      if (n == kStep) IO::load_acc(weight + j, w);
      else IO::load_acc_partial(weight + j, n, w);
    } else {
      for (int k = 0; k < K; ++k)
        w[k] = n == kStep ? Vec(acc_t(1)) : (IO::lanes_below(n, k) & Vec(acc_t(1)));
    }
  }

  // z of one step, from the scratch row (softcap) or the logits (lanes past the end are 0).
  void load_z(const scalar_t* x, int64_t j, int64_t n, Vec* z) const {
    if constexpr (kSoftcap) {
      IO::load_acc(z_row.data() + j, z);
    } else {
      if (n == kStep) IO::load(x + j, z);
      else IO::load_partial(x + j, n, z);
    }
  }

  acc_t scalar_z(const scalar_t* x, int64_t j) const {
    const acc_t v = acc_t(x[j]);
    return kSoftcap ? softcap_apply(v, cap, inv_cap) : v;
  }

  // The row's first maximum among its first `limit` elements (torch.argmax's pick: the first
  // NaN of a NaN row), or `limit` when none of them is the max. Reads the row from cache (pass
  // A has just read it) and stops at the first hit.
  int64_t first_max_index(const scalar_t* x, acc_t row_max, int64_t limit) const {
    const bool nan_row = row_max != row_max;
    const auto is_max = [&](acc_t v) { return nan_row ? v != v : v == row_max; };
    const Vec vmax(row_max);
    constexpr int kAllLanes = (1 << Vec::size()) - 1;
    int64_t j = 0;
    for (; j + kStep <= limit; j += kStep) {
      Vec z[K];
      load_z(x, j, kStep, z);
      for (int k = 0; k < K; ++k) {
        const Vec hit = nan_row ? z[k].isnan() : (z[k] == vmax);
        const int hits = ~hit.zero_mask() & kAllLanes;  // zero_mask: bit i set where lane i is 0
        if (hits != 0) return j + k * Vec::size() + __builtin_ctz(static_cast<unsigned>(hits));
      }
    }
    for (; j < limit; ++j) {
      if (is_max(kSoftcap ? z_row[j] : acc_t(x[j]))) return j;
    }
    return limit;
  }

  // Whether the row's first maximum is at t. Only a row whose z_t equals the max scans, and
  // only the t elements before it.
  bool first_max_at(const scalar_t* x, int64_t t, acc_t row_max) const {
    const bool nan_row = row_max != row_max;
    const acc_t z_t = kSoftcap ? z_row[t] : acc_t(x[t]);
    if (!(nan_row ? z_t != z_t : z_t == row_max)) return false;
    return first_max_index(x, row_max, t) == t;
  }

  void load_probs(const void* y, int64_t j, int64_t n, Vec* q) const {
    IO::load_either(y, p.target_in_acc, j, n, q);
    for (int k = 0; k < K; ++k) q[k] = softmax_ce_smoothed_prob(opts, q[k]);
  }

  // Pass A: the row max (and the softcapped z, kept in z_row for passes B and C).
  acc_t max_pass(const scalar_t* x) {
    const int64_t C = p.classes;
    Vec vmax[K];
    for (int k = 0; k < K; ++k) vmax[k] = Vec(fl_neg_infinity<acc_t>());
    for (int64_t j = 0; j < C; j += kStep) {
      const int64_t n = std::min<int64_t>(kStep, C - j);
      Vec z[K];
      if (n == kStep) IO::load(x + j, z);
      else IO::load_partial(x + j, n, z);
      if constexpr (kSoftcap) {
        for (int k = 0; k < K; ++k) z[k] = softcap_apply(z[k], cap, inv_cap);
        IO::store_acc(z_row.data() + j, z);
      }
      for (int k = 0; k < K; ++k) {
        const Vec zk = n == kStep ? z[k]
                                  : Vec::blendv(Vec(fl_neg_infinity<acc_t>()), z[k],
                                                IO::lanes_below(n, k));
        vmax[k] = fl_max(vmax[k], zk);
      }
    }
    acc_t row_max = fl_neg_infinity<acc_t>();
    for (int k = 0; k < K; ++k)
      row_max = fl_max(row_max, at::vec::vec_reduce_all<acc_t>(
                                    [](Vec a, Vec b) { return fl_max(a, b); }, vmax[k]));
    return row_max;
  }

  // What pass B sums over a row.
  struct ExpSums {
    acc_t sum_exp;   // sum exp(z - max)
    acc_t below;     // its part over z < max (kSumBelowMax only)
    acc_t sum_w_zm;  // sum w (z - max), w q for probability targets (need_sums only)
    acc_t sum_w_q;   // Q = sum w q (probability targets only)
  };

  // Pass B: exp(z - max) and its sum (kept in exp_row for pass C when keep_exp), and the sums
  // of the loss: sum w (z - max) (smoothing), or sum w q (z - max) and sum w q (probability
  // targets). `next`: the next row's logits, or null.
  ExpSums exp_pass(const scalar_t* x, const void* y, acc_t row_max, const scalar_t* next,
                   bool keep_exp, bool need_sums) {
    const int64_t C = p.classes;
    BlockedSum<Vec, K> vsum, vbelow, va, vb;
    const Vec vrow_max(row_max);
    for (int64_t j = 0; j < C; j += kStep) {
      const int64_t n = std::min<int64_t>(kStep, C - j);
      Vec z[K], e[K];
      // The next row's logits: fetched into L2 while this row computes exp (one cache line
      // per step, which is at least one line of data per step for every dtype).
      if (next) prefetch_l2(next + j);
      load_z(x, j, n, z);
      for (int k = 0; k < K; ++k) {
        z[k] = z[k] - vrow_max;  // lanes past the end are masked out below, via w or e
        e[k] = Exp{}(z[k]);
        if (n != kStep) e[k] = e[k] & IO::lanes_below(n, k);
      }
      vsum.add(e);
      if constexpr (kSumBelowMax) {
        Vec below[K];
        for (int k = 0; k < K; ++k) below[k] = e[k] & (z[k] < Vec(acc_t(0)));
        vbelow.add(below);
      }
      if (keep_exp) IO::store_acc(exp_row.data() + j, e);
      if (need_sums) {
        Vec w[K];
        load_weight(j, n, w);
        if constexpr (kProb) {
          Vec q[K];
          load_probs(y, j, n, q);
          for (int k = 0; k < K; ++k) w[k] = w[k] * q[k];
          vb.add(w);
        }
        for (int k = 0; k < K; ++k) z[k] = w[k] * z[k];
        va.add(z);
      }
    }
    ExpSums s;
    s.sum_exp = vsum.result();
    s.below = kSumBelowMax ? vbelow.result() : acc_t(0);
    s.sum_w_zm = va.result();
    s.sum_w_q = vb.result();
    return s;
  }

  // Q = sum w q of a row whose pass B did not run (the gradient from saved statistics).
  acc_t target_mass_pass(const void* y) {
    const int64_t C = p.classes;
    BlockedSum<Vec, K> vb;
    for (int64_t j = 0; j < C; j += kStep) {
      const int64_t n = std::min<int64_t>(kStep, C - j);
      Vec w[K], q[K];
      load_weight(j, n, w);
      load_probs(y, j, n, q);
      for (int k = 0; k < K; ++k) w[k] = w[k] * q[k];
      vb.add(w);
    }
    return vb.result();
  }

  // What pass C needs of a row besides its logits: the statistics, the sum exp(z - max) that
  // divides exp_row (1 when the gradient is recomputed from saved statistics) and Q.
  struct RowTotals {
    SoftmaxRowStats<acc_t> stats;
    acc_t sum_exp = acc_t(1);
    acc_t sum_w_q = acc_t(0);
    acc_t token_scale = acc_t(1);  // row_token_scale's p_t (token_scaling), else 1
  };

  // Passes A and B of an active row, and its outputs: the loss parts, the accuracy, Q and the
  // statistics (common/softmax_rows.h).
  RowTotals loss_row(int64_t r, const RowCase<acc_t>& rc, const scalar_t* x, const void* y,
                     const scalar_t* next, bool want_grad) {
    const acc_t row_max = max_pass(x);
    const ExpSums s = exp_pass(x, y, row_max, next, want_grad, need_sums);
    RowTotals tot;
    tot.sum_exp = s.sum_exp;
    tot.sum_w_q = s.sum_w_q;
    tot.stats = kSumBelowMax ? softmax_row_stats(SoftmaxStats<acc_t>{row_max, s.sum_exp, s.below})
                             : softmax_row_stats_of_sum(row_max, s.sum_exp);
    const bool here = rc.here(p.classes);
    const acc_t z_t = here ? (kSoftcap ? z_row[rc.target] : acc_t(x[rc.target])) : acc_t(0);
    const bool correct = here && p.row_correct && first_max_at(x, rc.target, row_max);
    if (p.row_argmax != nullptr) store_row_argmax(p, r, first_max_index(x, row_max, p.classes));
    if (!kProb && here) tot.token_scale = row_token_scale(p, tot.stats, z_t);
    store_row_outputs(p, r,
                      active_row_outputs<acc_t, kProb>(opts, weight, tot.stats, s.sum_w_zm,
                                                       s.sum_w_q, rc, z_t, correct, p.classes,
                                                       tot.token_scale),
                      kProb, tot.stats.max, tot.stats.log_sum);
    return tot;
  }

  // Pass C: the gradient, pre-scaled by mask and reduction (LossAndGrad) or by the incoming
  // per-row gradient (GradFromLse, recomputing p from the saved statistics).
  void grad_pass(int64_t r, const RowCase<acc_t>& rc, const scalar_t* x, const void* y,
                 scalar_t* g, const RowTotals& tot, bool from_stats) {
    const int64_t C = p.classes;
    const SoftmaxRowStats<acc_t> stats = tot.stats;
    // The one element with the [j == t] term, in scalar arithmetic; read before the row loop
    // because with inplace_backward that loop overwrites the logits.
    const bool t_here = rc.here(C);
    const int64_t t = rc.target;
    const acc_t z_t = t_here ? (kSoftcap && !from_stats ? z_row[t] : scalar_z(x, t)) : acc_t(0);
    // (from saved statistics, p_t is recomputed as the forward computed it)
    const acc_t token_scale =
        from_stats && !kProb && t_here ? row_token_scale(p, stats, z_t) : tot.token_scale;
    const SoftmaxCERowGrad<acc_t> rg = row_grad_coefs<acc_t, kProb>(
        opts, weight, grad_scale, stats, tot.sum_w_q, rc.target,
        row_grad_factor(p, from_stats, 1, r, rc.mask, token_scale));
    acc_t g_t = acc_t(0);
    if (t_here) {
      g_t = softmax_ce_target_grad(rg, z_t - stats.max, stats, class_weight_at(weight, t));
      if (kSoftcap) g_t *= softcap_derivative(z_t, inv_cap);
    }
    // exp_row holds exp(z - max), so p = exp_row / sum_exp: fold 1/sum_exp into coef_p.
    SoftmaxCERowGrad<acc_t> rg_exp = rg;
    rg_exp.coef_p = rg.coef_p / tot.sum_exp;
    // Stream the gradient past the cache, except in place (the row is in cache already).
    // A row that does not start on a step boundary (C = 50257, say) first stores a short
    // head step, so that all its full steps are aligned.
    const bool stream = static_cast<const void*>(g) != x;
    const bool plain_index = !kProb && rg.coef_w == acc_t(0);
    const int64_t head = stream ? IO::elements_to_alignment(g) : 0;
    for (int64_t j = 0, n; j < C; j += n) {
      n = std::min<int64_t>(j == 0 && head ? head : kStep, C - j);
      Vec pv[K], w[K], out[K], zc[K];
      if (from_stats) {
        if (n == kStep) IO::load(x + j, zc);
        else IO::load_partial(x + j, n, zc);
        for (int k = 0; k < K; ++k) {
          if constexpr (kSoftcap) zc[k] = softcap_apply(zc[k], cap, inv_cap);
          pv[k] = softmax_prob(zc[k], stats, Exp{});
        }
      } else {
        IO::load_acc(exp_row.data() + j, pv);
        if constexpr (kSoftcap) IO::load_acc(z_row.data() + j, zc);
      }
      if (plain_index) {  // no smoothing: the w_j term is 0, skip loading it
        for (int k = 0; k < K; ++k) w[k] = Vec(acc_t(0));
      } else {
        load_weight(j, n, w);
      }
      if constexpr (kProb) {
        Vec q[K];
        load_probs(y, j, n, q);
        for (int k = 0; k < K; ++k) w[k] = w[k] * q[k];
      }
      for (int k = 0; k < K; ++k) {
        out[k] = plain_index ? Vec((from_stats ? rg : rg_exp).coef_p) * pv[k]
                             : softmax_ce_grad_element(from_stats ? rg : rg_exp, pv[k], w[k]);
        if constexpr (kSoftcap) out[k] = out[k] * softcap_derivative(zc[k], inv_cap);
      }
      if (n != kStep) IO::store_partial(g + j, n, out);
      else if (stream && IO::stream_aligned(g + j)) IO::stream(g + j, out);
      else IO::store(g + j, out);
    }
    if (stream) stream_fence();  // the streamed row is complete before g[t] is written
    if (t_here) g[t] = scalar_t(g_t);
  }

  // Rows [row_begin, row_end): passes A and B (loss and statistics) unless the statistics are
  // given, then pass C (the gradient) when asked.
  void run(int64_t row_begin, int64_t row_end) {
    const auto* logits = static_cast<const scalar_t*>(p.logits);
    auto* grad = static_cast<scalar_t*>(p.grad);
    const bool want_grad = p.mode != SoftmaxCEMode::Loss;
    const bool from_stats = p.mode == SoftmaxCEMode::GradFromLse;

    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* x = logits + r * p.logits_row_stride;
      scalar_t* g = want_grad ? grad + r * p.grad_row_stride : nullptr;
      const RowCase<acc_t> rc = softmax_row_case<acc_t, kProb>(p, r);
      if (rc.kind != RowKind::Active) {
        if (!from_stats) store_inactive_row<acc_t>(p, r, rc.kind, kProb);
        if (want_grad) std::fill(g, g + p.classes, scalar_t(inactive_row_value<acc_t>(rc.kind)));
        continue;
      }
      const void* y =
          kProb ? IO::row_of(p.target_probs, p.target_in_acc, r, p.target_row_stride) : nullptr;
      RowTotals tot;
      if (!from_stats) {
        const scalar_t* next = r + 1 < row_end ? x + p.logits_row_stride : nullptr;
        tot = loss_row(r, rc, x, y, next, want_grad);
        if (!want_grad) continue;
      } else {
        tot.stats = saved_row_stats<acc_t>(p, r);
        // Q: given for the whole row when the logits are a class slice of it, else summed here
        // (pass B did not run in this call)
        if constexpr (kProb) {
          tot.sum_w_q = p.row_target_mass ? static_cast<const acc_t*>(p.row_target_mass)[r]
                                          : target_mass_pass(y);
        }
      }
      grad_pass(r, rc, x, y, g, tot, from_stats);
    }
  }
};

template <typename scalar_t, bool kWeight, bool kSoftcap, bool kProb>
void softmax_ce_launch(const SoftmaxCEParams& p) {
  // Enough rows per task that a task moves at least ~256 KB.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(p.classes, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    SoftmaxCERowKernel<scalar_t, kWeight, kSoftcap, kProb> kernel(p);
    kernel.run(begin, end);
  });
}

template <typename scalar_t>
void softmax_ce_dispatch_flags(const SoftmaxCEParams& p) {
  const bool w = p.class_weight != nullptr;
  const bool s = p.softcap != 0.0;
  const bool prob = p.target == nullptr;
#define FL_SOFTMAX_CASE(W, S, P) \
  if (w == W && s == S && prob == P) return softmax_ce_launch<scalar_t, W, S, P>(p);
  FL_SOFTMAX_CASE(false, false, false)
  FL_SOFTMAX_CASE(true, false, false)
  FL_SOFTMAX_CASE(false, true, false)
  FL_SOFTMAX_CASE(true, true, false)
  FL_SOFTMAX_CASE(false, false, true)
  FL_SOFTMAX_CASE(true, false, true)
  FL_SOFTMAX_CASE(false, true, true)
  FL_SOFTMAX_CASE(true, true, true)
#undef FL_SOFTMAX_CASE
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedloss
