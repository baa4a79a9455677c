// CPU softmax cross-entropy: one call handles a range of rows. Included only by
// isa_kernels.cpp, which is compiled once per instruction set.
//
// Per row, the logits are read from memory once (pass A: the max); passes B (exp, its sum and
// the loss's sums) and C (the gradient) read the row again from cache, where it still is (a
// 128256-class float32 row is 513 KB). exp(z - max) is kept in a per-thread scratch row
// between B and C, so that exp is evaluated once per logit.
#pragma once

#include <ATen/Parallel.h>

#include <vector>

#include "../common/losses.h"
#include "../common/params.h"
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
  acc_t ce_scale, z_scale;  // the gradient's factors of the two loss parts (params.h)
  const acc_t* weight;
  std::vector<acc_t> z_row;    // softcapped logits (kSoftcap only)
  std::vector<acc_t> exp_row;  // exp(z - max) between passes B and C

  explicit SoftmaxCERowKernel(const SoftmaxCEParams& params) : p(params) {
    opts.label_smoothing = acc_t(p.label_smoothing);
    opts.inv_classes = acc_t(1) / acc_t(p.global_classes);
    opts.weight_sum = acc_t(p.weight_sum);
    opts.z_loss = acc_t(p.z_loss);
    cap = acc_t(p.softcap);
    inv_cap = kSoftcap ? acc_t(1) / cap : acc_t(0);
    const auto* scales = static_cast<const acc_t*>(p.grad_scale);
    ce_scale = scales ? scales[0] : acc_t(1);
    z_scale = scales ? scales[1] : acc_t(1);
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

  void zero_grad_row(scalar_t* g) const {
    std::fill(g, g + p.classes, scalar_t(0));
  }

  // Whether the row's first maximum (torch.argmax's pick: the first NaN, if any) is at t.
  // Only a row whose z_t equals the max scans, and only the t elements before it.
  bool first_max_at(const scalar_t* x, int64_t t, acc_t row_max) const {
    const bool nan_row = row_max != row_max;
    const auto is_max = [&](acc_t v) { return nan_row ? v != v : v == row_max; };
    if (!is_max(kSoftcap ? z_row[t] : acc_t(x[t]))) return false;
    const Vec vmax(row_max);
    int64_t j = 0;
    for (; j + kStep <= t; j += kStep) {
      Vec z[K];
      load_z(x, j, kStep, z);
      for (int k = 0; k < K; ++k) {
        const Vec hit = nan_row ? z[k].isnan() : (z[k] == vmax);
        if (hit.zero_mask() != (1 << Vec::size()) - 1) return false;
      }
    }
    for (; j < t; ++j) {
      if (is_max(kSoftcap ? z_row[j] : acc_t(x[j]))) return false;
    }
    return true;
  }

  void load_probs(const void* y, int64_t j, int64_t n, Vec* q) const {
    IO::load_either(y, p.target_in_acc, j, n, q);
    for (int k = 0; k < K; ++k) q[k] = softmax_ce_smoothed_prob(opts, q[k]);
  }

  void run(int64_t row_begin, int64_t row_end) {
    const int64_t C = p.classes;
    const auto* logits = static_cast<const scalar_t*>(p.logits);
    auto* grad = static_cast<scalar_t*>(p.grad);
    const auto* mask = static_cast<const acc_t*>(p.mask);
    auto* row_loss = static_cast<acc_t*>(p.row_loss);
    auto* row_z_loss = static_cast<acc_t*>(p.row_z_loss);
    auto* row_correct = static_cast<acc_t*>(p.row_correct);
    auto* row_stats = static_cast<acc_t*>(p.row_stats);
    auto* row_target_mass = static_cast<acc_t*>(p.row_target_mass);
    const auto* grad_loss = static_cast<const acc_t*>(p.grad_loss);
    const bool want_grad = p.mode != SoftmaxCEMode::Loss;
    const bool from_stats = p.mode == SoftmaxCEMode::GradFromLse;
    const bool need_sums = kProb || opts.label_smoothing != acc_t(0);

    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* x = logits + r * p.logits_row_stride;
      scalar_t* g = want_grad ? grad + r * p.grad_row_stride : nullptr;
      const void* y =
          kProb ? IO::row_of(p.target_probs, p.target_in_acc, r, p.target_row_stride) : nullptr;
      const acc_t m_r = mask ? mask[r] : acc_t(1);
      const int64_t t_global = kProb ? 0 : p.target[r];
      // The target's index in this row of logits (outside [0, C) when another slice holds it).
      const int64_t t = t_global - p.class_offset;
      const bool t_here = !kProb && t >= 0 && t < C;

      // Padding and ignored positions are never read: loss 0, gradient 0.
      if (m_r == acc_t(0) || (!kProb && t_global == p.ignore_index)) {
        if (!from_stats) {
          row_loss[r] = acc_t(0);
          if (row_z_loss) row_z_loss[r] = acc_t(0);
          if (row_correct) row_correct[r] = acc_t(0);
          if (row_target_mass) row_target_mass[r] = acc_t(0);
          row_stats[2 * r] = row_stats[2 * r + 1] = acc_t(0);
        }
        if (want_grad) std::fill(g, g + C, scalar_t(0));
        continue;
      }
      // Never index with a bad target (the op entry rejects them on the CPU; this is the
      // last line of defence): the row's loss and gradient become NaN.
      if (!kProb && (t_global < 0 || t_global >= p.global_classes)) {
        if (!from_stats) {
          row_loss[r] = fl_quiet_nan<acc_t>();
          if (row_z_loss) row_z_loss[r] = fl_quiet_nan<acc_t>();
          if (row_correct) row_correct[r] = acc_t(0);
          row_stats[2 * r] = row_stats[2 * r + 1] = fl_quiet_nan<acc_t>();
        }
        if (want_grad) std::fill(g, g + C, scalar_t(fl_quiet_nan<acc_t>()));
        continue;
      }

      SoftmaxRowStats<acc_t> stats;
      acc_t sum_exp = acc_t(1), sum_w_q = acc_t(0);
      const acc_t w_t = !kProb && kWeight ? weight[t] : acc_t(1);
      if (!from_stats) {
        // Pass A: the row max (and the softcapped z, kept for passes B and C).
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

        // Pass B: exp(z - max) and its sum (kept for pass C), and the sums of the loss:
        // sum w (z - max) (smoothing), or sum w q (z - max) and sum w q (probability targets).
        BlockedSum<Vec, K> vsum, vbelow, va, vb;
        const Vec vrow_max(row_max);
        // The next row's logits: fetched into L2 while this row computes exp (one cache line
        // per step, which is at least one line of data per step for every dtype).
        const scalar_t* next = r + 1 < row_end ? x + p.logits_row_stride : nullptr;
        for (int64_t j = 0; j < C; j += kStep) {
          const int64_t n = std::min<int64_t>(kStep, C - j);
          Vec z[K], e[K];
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
          if (want_grad) IO::store_acc(exp_row.data() + j, e);
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
        sum_exp = vsum.result();
        const acc_t sum_a = va.result();
        sum_w_q = vb.result();
        stats = kSumBelowMax
                    ? softmax_row_stats(SoftmaxStats<acc_t>{row_max, sum_exp, vbelow.result()})
                    : softmax_row_stats_of_sum(row_max, sum_exp);

        acc_t loss;
        if constexpr (kProb) {
          loss = softmax_ce_prob_loss(stats, sum_w_q, sum_a);
          if (row_target_mass) row_target_mass[r] = sum_w_q;
        } else if (t_here) {
          const acc_t z_t = kSoftcap ? z_row[t] : acc_t(x[t]);
          loss = softmax_ce_index_loss(opts, stats, z_t, w_t, sum_a);
          if (row_correct) row_correct[r] = first_max_at(x, t, row_max) ? m_r : acc_t(0);
        } else {  // another slice holds the target: only the smoothing term is this slice's
          loss = softmax_ce_index_loss(opts, stats, row_max, acc_t(0), sum_a);
          if (row_correct) row_correct[r] = acc_t(0);
        }
        row_loss[r] = m_r * loss;
        if (row_z_loss) row_z_loss[r] = m_r * softmax_ce_z_loss(opts, stats);
        row_stats[2 * r] = stats.max;
        row_stats[2 * r + 1] = stats.log_sum;
        if (!want_grad) continue;
      } else {
        stats = {row_stats[2 * r], row_stats[2 * r + 1]};
        if (kProb && row_target_mass) {  // the whole row's Q, of every slice
          sum_w_q = row_target_mass[r];
        } else if constexpr (kProb) {  // Q = sum w q: pass B did not run in this call
          BlockedSum<Vec, K> vb;
          for (int64_t j = 0; j < C; j += kStep) {
            const int64_t n = std::min<int64_t>(kStep, C - j);
            Vec w[K], q[K];
            load_weight(j, n, w);
            load_probs(y, j, n, q);
            for (int k = 0; k < K; ++k) w[k] = w[k] * q[k];
            vb.add(w);
          }
          sum_w_q = vb.result();
        }
      }

      // Pass C: the gradient, pre-scaled by mask and reduction (LossAndGrad) or by the
      // incoming per-row gradient (GradFromLse, recomputing p from the saved statistics).
      const acc_t lse = softmax_row_lse(stats);
      const acc_t row_factor = m_r * (from_stats ? grad_loss[r] : acc_t(1));
      const acc_t row_ce = row_factor * ce_scale, row_z = row_factor * z_scale;
      const SoftmaxCERowGrad<acc_t> rg =
          kProb ? softmax_ce_prob_row_grad(opts, lse, sum_w_q, row_ce, row_z)
                : softmax_ce_index_row_grad(opts, lse, w_t, row_ce, row_z);
      // The one element with the [j == t] term, in scalar arithmetic; computed before the
      // row loop because with inplace_backward that loop overwrites the logits.
      acc_t g_t = acc_t(0);
      if (t_here) {
        const acc_t z_t = kSoftcap && !from_stats ? z_row[t] : scalar_z(x, t);
        g_t = softmax_ce_target_grad(rg, z_t - stats.max, stats, w_t);
        if (kSoftcap) g_t *= softcap_derivative(z_t, inv_cap);
      }
      // exp_row holds exp(z - max), so p = exp_row / sum_exp: fold 1/sum_exp into coef_p.
      SoftmaxCERowGrad<acc_t> rg_exp = rg;
      rg_exp.coef_p = rg.coef_p / sum_exp;
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
