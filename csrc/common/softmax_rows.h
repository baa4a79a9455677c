// The rules of one row of a softmax cross-entropy call, apart from its passes over the classes:
// whether the row is computed at all, what it writes besides its gradient, and the constants of
// its gradient. The CPU kernel, the CUDA kernels (and so the SIMT harness) call these; the loss
// formulas themselves are losses.h's.
#pragma once

#include <cstdint>

#include "losses.h"
#include "params.h"

namespace fusedloss {
namespace common {
FL_ISA_NAMESPACE_BEGIN

// Padding (mask 0) and ignored rows are skipped: never read, loss 0, gradient 0. A class-index
// target outside [0, global classes) is never used as an index: the row's loss and gradient
// are NaN (the CPU entry rejects such targets first; this is the kernels' last line of defence).
enum class RowKind : int { Active = 0, Skipped = 1, BadTarget = 2 };

template <typename T>
struct RowCase {
  RowKind kind;
  int64_t target;  // the target's index in this row of logits (a class slice: maybe outside it)
  T mask;
  // Whether this row of logits holds the (class-index) target. Derived where used rather than
  // kept: one register more across the CUDA split kernels cost them a spill.
  FL_HD bool here(int64_t classes) const {
    return static_cast<uint64_t>(target) < static_cast<uint64_t>(classes);
  }
  // The target's index as the gradient loops compare it (32-bit, as indices inside a row are
  // on CUDA), -1 when this row of logits does not hold it.
  FL_HD int target_index(int64_t classes) const {
    return here(classes) ? static_cast<int>(target) : -1;
  }
};

template <typename T, bool kProb>
FL_HD RowCase<T> softmax_row_case(const SoftmaxCEParams& p, int64_t r) {
  const T m = p.mask != nullptr ? static_cast<const T*>(p.mask)[r] : T(1);
  const int64_t t = kProb ? 0 : p.target[r];
  if (m == T(0) || (!kProb && t == p.ignore_index)) return {RowKind::Skipped, 0, m};
  if (!kProb && (t < 0 || t >= p.global_classes)) return {RowKind::BadTarget, 0, m};
  return {RowKind::Active, kProb ? -1 : t - p.class_offset, m};
}

// Every output of a row that is not active, its gradient included: 0 skipped, NaN bad target.
template <typename T>
FL_HD T inactive_row_value(RowKind kind) {
  return kind == RowKind::Skipped ? T(0) : fl_quiet_nan<T>();
}

// The class weight of index j of the logits, 1 without class weights. `weight` points at the
// weight of the logits' first class (a class slice's offset applied), so that a target that
// another slice holds still finds its own.
template <typename T>
FL_HD T class_weight_at(const T* weight, int64_t j) {
  return weight != nullptr ? weight[j] : T(1);
}

// A row's per-row outputs besides the statistics: the cross-entropy part, the z-loss part
// (when asked), whether its argmax is the target (when asked) and, for probability targets,
// Q = sum w q (row_target_mass, when asked).
template <typename T>
struct RowOutputs {
  T loss, z_loss, correct;
  T target_mass;
};

template <typename T>
FL_HD void store_row_outputs(const SoftmaxCEParams& p, int64_t r, const RowOutputs<T>& o,
                             bool prob, T smax, T slog) {
  static_cast<T*>(p.row_loss)[r] = o.loss;
  if (p.row_z_loss != nullptr) static_cast<T*>(p.row_z_loss)[r] = o.z_loss;
  if (p.row_correct != nullptr) static_cast<T*>(p.row_correct)[r] = o.correct;
  if (prob && p.row_target_mass != nullptr) static_cast<T*>(p.row_target_mass)[r] = o.target_mass;
  static_cast<T*>(p.row_stats)[2 * r] = smax;
  static_cast<T*>(p.row_stats)[2 * r + 1] = slog;
}

// The first argmax of row r (when asked: p.row_argmax), -1 for a row that is not read.
FL_HD void store_row_argmax(const SoftmaxCEParams& p, int64_t r, int64_t index) {
  if (p.row_argmax != nullptr) p.row_argmax[r] = index;
}

// The outputs of a row that is not active (its statistics too); not correct, no argmax.
template <typename T>
FL_HD void store_inactive_row(const SoftmaxCEParams& p, int64_t r, RowKind kind, bool prob) {
  const T v = inactive_row_value<T>(kind);
  store_row_outputs(p, r, RowOutputs<T>{v, v, T(0), v}, prob, v, v);
  store_row_argmax(p, r, -1);
}

// token_scaling's factor of an active row of class-index targets: p_t = exp(z_t - lse), from
// z_t - max (exact near the max) and the row's statistics; 1 when the option is off. The loss
// and the gradient use the same value, a constant of the gradient (it is not differentiated).
template <typename T>
FL_HD T row_token_scale(const SoftmaxCEParams& p, SoftmaxRowStats<T> st, T z_t) {
  return p.token_scaling ? fl_exp((z_t - st.max) - st.log_sum) : T(1);
}

// The cross-entropy part of an active row's loss (before the mask); of a class slice that does
// not hold the target, only the smoothing term. sum_w_zm = sum w (z - m) (w q for probability
// targets), sum_w_q = Q, z_t the target's (softcapped) logit when the row holds it.
template <typename T, bool kProb>
FL_HD T softmax_row_ce(const SoftmaxCEOptions<T>& o, const T* weight, SoftmaxRowStats<T> st,
                       T sum_w_zm, T sum_w_q, const RowCase<T>& rc, T z_t, int64_t classes) {
  if constexpr (kProb) {
    return softmax_ce_prob_loss(st, sum_w_q, sum_w_zm);
  } else {
    const bool here = rc.here(classes);
    return softmax_ce_index_loss(o, st, here ? z_t : st.max,
                                 here ? class_weight_at(weight, rc.target) : T(0), sum_w_zm);
  }
}

template <typename T, bool kProb>
FL_HD RowOutputs<T> active_row_outputs(const SoftmaxCEOptions<T>& o, const T* weight,
                                       SoftmaxRowStats<T> st, T sum_w_zm, T sum_w_q,
                                       const RowCase<T>& rc, T z_t, bool correct,
                                       int64_t classes, T token_scale) {
  const T f = rc.mask * token_scale;  // the row's loss factor (row_grad_factor's, forward)
  return {f * softmax_row_ce<T, kProb>(o, weight, st, sum_w_zm, sum_w_q, rc, z_t, classes),
          f * softmax_ce_z_loss(o, st), correct ? rc.mask : T(0), kProb ? sum_w_q : T(0)};
}

// The statistics (max, log_sum) a forward saved for row r.
template <typename T>
FL_HD SoftmaxRowStats<T> saved_row_stats(const SoftmaxCEParams& p, int64_t r) {
  const T* s = static_cast<const T*>(p.row_stats);
  return {s[2 * r], s[2 * r + 1]};
}

// d(total)/d(row loss), the factor of row r's whole gradient: its mask times its token scale
// (row_token_scale), times, when the gradient is recomputed from saved statistics, the
// incoming gradient of its loss (one per row, grad_loss_stride 1, or one for every row,
// stride 0).
template <typename T>
FL_HD T row_grad_factor(const SoftmaxCEParams& p, bool from_stats, int64_t grad_loss_stride,
                        int64_t r, T mask, T token_scale) {
  const T f = mask * token_scale;
  return from_stats ? f * static_cast<const T*>(p.grad_loss)[r * grad_loss_stride] : f;
}

// The gradient's constants of an active row (losses.h), from its factor split into those of
// the cross-entropy and the z-loss parts by `grad_scale` (params.h; null: 1 and 1).
template <typename T, bool kProb>
FL_HD SoftmaxCERowGrad<T> row_grad_coefs(const SoftmaxCEOptions<T>& o, const T* weight,
                                         const T* grad_scale, SoftmaxRowStats<T> st, T sum_w_q,
                                         int64_t t, T factor) {
  const T ce_scale = grad_scale != nullptr ? factor * grad_scale[0] : factor;
  const T z_scale = grad_scale != nullptr ? factor * grad_scale[1] : factor;
  const T lse = softmax_row_lse(st);
  if constexpr (kProb) {
    return softmax_ce_prob_row_grad(o, lse, sum_w_q, ce_scale, z_scale);
  } else {
    return softmax_ce_index_row_grad(o, lse, class_weight_at(weight, t), ce_scale, z_scale);
  }
}

FL_ISA_NAMESPACE_END
}  // namespace common
}  // namespace fusedloss
