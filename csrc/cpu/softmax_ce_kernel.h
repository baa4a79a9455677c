// CPU softmax cross-entropy: one call handles a range of rows. Included only by
// isa_kernels.cpp, which is compiled once per instruction set.
//
// Per row, the logits are read from memory once (pass A: max and the sums the loss needs);
// passes B (exp and its sum) and C (the gradient) read the row again from cache, where it
// still is (a 128256-class float32 row is 513 KB). exp(z - max) is kept in a per-thread
// scratch row between B and C, so that exp is evaluated once per logit.
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

  const SoftmaxCEParams& p;
  SoftmaxCEOptions<acc_t> opts;
  acc_t cap, inv_cap;
  acc_t grad_scale;
  const acc_t* weight;
  std::vector<acc_t> z_row;    // softcapped logits (kSoftcap only)
  std::vector<acc_t> exp_row;  // exp(z - max) between passes B and C

  explicit SoftmaxCERowKernel(const SoftmaxCEParams& params) : p(params) {
    opts.label_smoothing = acc_t(p.label_smoothing);
    opts.inv_classes = acc_t(1) / acc_t(p.classes);
    opts.weight_sum = acc_t(p.weight_sum);
    opts.z_loss = acc_t(p.z_loss);
    cap = acc_t(p.softcap);
    inv_cap = kSoftcap ? acc_t(1) / cap : acc_t(0);
    grad_scale = p.grad_scale ? *static_cast<const acc_t*>(p.grad_scale) : acc_t(1);
    weight = static_cast<const acc_t*>(p.class_weight);
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

  void run(int64_t row_begin, int64_t row_end) {
    const int64_t C = p.classes;
    const auto* logits = static_cast<const scalar_t*>(p.logits);
    auto* grad = static_cast<scalar_t*>(p.grad);
    const auto* mask = static_cast<const acc_t*>(p.mask);
    const auto* probs = static_cast<const scalar_t*>(p.target_probs);
    auto* row_loss = static_cast<acc_t*>(p.row_loss);
    auto* lse_out = static_cast<acc_t*>(p.lse);
    const auto* grad_loss = static_cast<const acc_t*>(p.grad_loss);
    const bool want_grad = p.mode != SoftmaxCEMode::Loss;
    const bool want_loss = p.mode != SoftmaxCEMode::GradFromLse;
    const bool need_sums = kProb || opts.label_smoothing != acc_t(0);

    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* x = logits + r * p.logits_row_stride;
      scalar_t* g = want_grad ? grad + r * p.grad_row_stride : nullptr;
      const scalar_t* y = kProb ? probs + r * p.target_row_stride : nullptr;
      const acc_t m_r = mask ? mask[r] : acc_t(1);
      const int64_t t = kProb ? 0 : p.target[r];

      // Padding and ignored positions are never read: loss 0, gradient 0.
      if (m_r == acc_t(0) || (!kProb && t == p.ignore_index)) {
        if (want_loss) row_loss[r] = acc_t(0);
        if (want_loss) lse_out[r] = acc_t(0);
        if (want_grad) zero_grad_row(g);
        continue;
      }
      // Never index with a bad target (the op entry rejects them on the CPU; this is the
      // last line of defence): the row's loss and gradient become NaN.
      if (!kProb && (t < 0 || t >= C)) {
        if (want_loss) row_loss[r] = fl_quiet_nan<acc_t>();
        if (want_loss) lse_out[r] = fl_quiet_nan<acc_t>();
        if (want_grad) std::fill(g, g + C, scalar_t(fl_quiet_nan<acc_t>()));
        continue;
      }

      acc_t lse, sum_exp = acc_t(1), sum_a = acc_t(0), sum_b = acc_t(0);
      if (want_loss) {
        // Pass A: max of z, and the sums of the loss: sum w z (index targets with smoothing),
        // or sum w q z and sum w q (probability targets).
        Vec vmax[K], va[K], vb[K];
        for (int k = 0; k < K; ++k) {
          vmax[k] = Vec(fl_neg_infinity<acc_t>());
          va[k] = Vec(acc_t(0));
          vb[k] = Vec(acc_t(0));
        }
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
          if (need_sums) {
            Vec w[K];
            load_weight(j, n, w);
            if constexpr (kProb) {
              Vec yv[K];
              if (n == kStep) IO::load(y + j, yv);
              else IO::load_partial(y + j, n, yv);
              for (int k = 0; k < K; ++k) {
                const Vec wq = w[k] * softmax_ce_smoothed_prob(opts, yv[k]);
                va[k] = va[k] + wq * z[k];
                vb[k] = vb[k] + wq;
              }
            } else {
              for (int k = 0; k < K; ++k) va[k] = va[k] + w[k] * z[k];
            }
          }
        }
        acc_t row_max = fl_neg_infinity<acc_t>();
        for (int k = 0; k < K; ++k) {
          row_max = fl_max(row_max, at::vec::vec_reduce_all<acc_t>(
                                        [](Vec a, Vec b) { return fl_max(a, b); }, vmax[k]));
          sum_a += at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), va[k]);
          sum_b += at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), vb[k]);
        }

        // Pass B: sum of exp(z - max), kept for pass C.
        Vec vsum[K];
        for (int k = 0; k < K; ++k) vsum[k] = Vec(acc_t(0));
        const Vec vrow_max(row_max);
        for (int64_t j = 0; j < C; j += kStep) {
          const int64_t n = std::min<int64_t>(kStep, C - j);
          Vec z[K];
          load_z(x, j, n, z);
          for (int k = 0; k < K; ++k) {
            Vec e = fl_exp(z[k] - vrow_max);
            if (n != kStep) e = e & IO::lanes_below(n, k);
            z[k] = e;
            vsum[k] = vsum[k] + e;
          }
          if (want_grad) IO::store_acc(exp_row.data() + j, z);
        }
        sum_exp = acc_t(0);
        for (int k = 0; k < K; ++k)
          sum_exp += at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), vsum[k]);
        lse = row_max + fl_log(sum_exp);

        acc_t loss;
        if constexpr (kProb) {
          loss = softmax_ce_prob_loss(opts, lse, sum_b, sum_a);
        } else {
          const acc_t w_t = kWeight ? weight[t] : acc_t(1);
          const acc_t z_t = kSoftcap ? z_row[t] : acc_t(x[t]);
          loss = softmax_ce_index_loss(opts, lse, z_t, w_t, sum_a);
        }
        row_loss[r] = m_r * loss;
        lse_out[r] = lse;
        if (!want_grad) continue;
      } else {
        lse = lse_out[r];
      }

      // Pass C: the gradient, pre-scaled by mask and reduction (LossAndGrad) or by the
      // incoming per-row gradient (GradFromLse, recomputing exp from the saved lse).
      const bool from_lse = p.mode == SoftmaxCEMode::GradFromLse;
      const acc_t row_scale = m_r * (from_lse ? grad_loss[r] : grad_scale);
      SoftmaxCERowGrad<acc_t> rg;
      if constexpr (kProb) {
        acc_t sum_w_q = sum_b;
        if (from_lse) {  // Q was not computed by a pass A in this call
          sum_w_q = acc_t(0);
          for (int64_t j = 0; j < C; ++j)
            sum_w_q += (kWeight ? weight[j] : acc_t(1)) *
                       softmax_ce_smoothed_prob(opts, acc_t(y[j]));
        }
        rg = softmax_ce_prob_row_grad(opts, lse, sum_w_q, row_scale);
      } else {
        rg = softmax_ce_index_row_grad(opts, lse, kWeight ? weight[t] : acc_t(1), row_scale);
      }
      // The one element with the [j == t] term, in scalar arithmetic; computed before the
      // row loop because with inplace_backward that loop overwrites the logits.
      acc_t g_t = acc_t(0);
      if constexpr (!kProb) {
        const acc_t z_t = kSoftcap && !from_lse ? z_row[t] : scalar_z(x, t);
        const acc_t p_t = fl_exp(z_t - lse);
        const acc_t w_t = kWeight ? weight[t] : acc_t(1);
        g_t = softmax_ce_grad_element(rg, p_t, w_t) - rg.coef_target;
        if (kSoftcap) g_t *= softcap_derivative(z_t, inv_cap);
      }
      // exp_row holds exp(z - max); p = exp_row / sum_exp. From lse, p = exp(z - lse).
      const acc_t coef_p_scratch = rg.coef_p / sum_exp;
      const Vec vlse(lse);
      for (int64_t j = 0; j < C; j += kStep) {
        const int64_t n = std::min<int64_t>(kStep, C - j);
        Vec pv[K], w[K], out[K], zc[K];
        SoftmaxCERowGrad<acc_t> rgj = rg;
        if (from_lse) {
          if (n == kStep) IO::load(x + j, zc);
          else IO::load_partial(x + j, n, zc);
          for (int k = 0; k < K; ++k) {
            if constexpr (kSoftcap) zc[k] = softcap_apply(zc[k], cap, inv_cap);
            pv[k] = fl_exp(zc[k] - vlse);
          }
        } else {
          IO::load_acc(exp_row.data() + j, pv);
          if constexpr (kSoftcap) IO::load_acc(z_row.data() + j, zc);
          rgj.coef_p = coef_p_scratch;
        }
        load_weight(j, n, w);
        if constexpr (kProb) {
          Vec yv[K];
          if (n == kStep) IO::load(y + j, yv);
          else IO::load_partial(y + j, n, yv);
          for (int k = 0; k < K; ++k) w[k] = w[k] * softmax_ce_smoothed_prob(opts, yv[k]);
        }
        for (int k = 0; k < K; ++k) {
          out[k] = softmax_ce_grad_element(rgj, pv[k], w[k]);
          if constexpr (kSoftcap) out[k] = out[k] * softcap_derivative(zc[k], inv_cap);
        }
        if (n == kStep) IO::store(g + j, out);
        else IO::store_partial(g + j, n, out);
      }
      if constexpr (!kProb) g[t] = scalar_t(g_t);
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
