// The loss formulas: the one place where fusedloss says what it computes. Every kernel (CPU
// vector loops and their scalar tails, CUDA, the SIMT harness) calls these; none restates them.
//
// Softmax cross-entropy of one position with logits x, after the optional softcap
// z = s * tanh(x / s), row max m, log_sum = log(sum_c exp(z_c - m)), lse = m + log_sum,
// p = softmax(z), class weights w, smoothing e, C classes, W = sum_c w_c:
//
//   class-index target t, the cross-entropy part:
//     ce      = (1-e) w_t (log_sum - (z_t - m)) + (e/C) (W log_sum - sum_c w_c (z_c - m))
//     dce/dz_j = p_j ((1-e) w_t + (e/C) W) - (e/C) w_j - (1-e) w_t [j == t]
//   probability target y, smoothed q_c = (1-e) y_c + e/C, Q = sum_c w_c q_c:
//     ce      = Q log_sum - sum_c w_c q_c (z_c - m)
//     dce/dz_j = p_j Q - w_j q_j
//   the z-loss part, kept apart because `mean` divides it by the count of valid positions
//   while it divides the cross-entropy part by the weighted one:
//     zl      = z_loss lse^2,    dzl/dz_j = 2 z_loss lse p_j
//   and dz/dx = 1 - (z/s)^2 under the softcap. A row's gradient is ce_scale dce/dz +
//   z_scale dzl/dz, the scales folding in the mask, the reduction and the incoming gradient.
//
// The loss is written with (z - m) and log_sum rather than lse - z: in float32, lse of logits
// around 1e4 has an ulp of 1e-3, which lse - z_t would carry into the loss whole; z - m is
// exact and log_sum small. The same reason makes the saved row statistics (m, log_sum), not lse.
//
// Sigmoid cross-entropy of one element with logit x, target y, weight w, pos_weight pw:
//     loss    = w ((1-y) x + (1 + (pw-1) y) softplus(-x))
//     dloss/dx = w ((1 + (pw-1) y) sigmoid(x) - pw y)
// with softplus(-x) = max(-x, 0) + log1p(exp(-|x|)), which never overflows. The derivative is
// written as sigmoid(x) - y (pw = 1) rather than (1 - y) - sigmoid(-x): where the two terms
// nearly cancel (y close to sigmoid(x), both small) the latter carries 1 - y's rounding, an
// ulp of 1, into a result far smaller than 1.
#pragma once

#include "math.h"

namespace fusedloss {
namespace common {
FL_ISA_NAMESPACE_BEGIN

// ---------------------------------------------------------------------------------------------
// Softmax statistics. `max` is the running maximum, `sum` the sum of exp(z - max), and `below`
// the part of that sum over z < max: sum = ties + below, where each of the `ties` values equal
// to the max adds exp(0) = 1. A confident row's sum is 1 + a few 1e-4 and, rounded, keeps only
// a few digits of them; `below` keeps them all (softmax_row_stats). Two partial results (lanes,
// threads, blocks) merge exactly, which is what lets a row be split.
template <typename T>
struct SoftmaxStats {
  T max;
  T sum;
  T below;
};

template <typename T>
FL_HD SoftmaxStats<T> softmax_stats_identity() {
  return {fl_neg_infinity<T>(), T(0), T(0)};
}

template <typename T>
FL_HD SoftmaxStats<T> softmax_stats_merge(SoftmaxStats<T> a, SoftmaxStats<T> b) {
  const T m = fl_max(a.max, b.max);
  // An empty side (max = -inf) must contribute 0, not exp(-inf - -inf) = NaN.
  const T sa = a.max == fl_neg_infinity<T>() ? T(0) : a.sum * fl_exp(a.max - m);
  const T sb = b.max == fl_neg_infinity<T>() ? T(0) : b.sum * fl_exp(b.max - m);
  // The side whose max is the merged one keeps its split; all of the other side is below it.
  const T ba = a.max == m ? a.below : sa;
  const T bb = b.max == m ? b.below : sb;
  return {m, sa + sb, ba + bb};
}

// What a row keeps of its softmax: the max and log(sum exp(z - max)).
template <typename T>
struct SoftmaxRowStats {
  T max;
  T log_sum;
};

template <typename T>
FL_HD SoftmaxRowStats<T> softmax_row_stats(SoftmaxStats<T> s) {
  // log(sum) = log1p(sum - 1), and sum - 1 is `below` when the max is not tied (sum - below,
  // the count of ties, is 1): summed apart, it has all its digits, where sum - 1 has those the
  // rounding of sum left. With ties (rare), sum >= 2 and sum - 1 loses nothing that matters. A
  // NaN sum fails the test and stays NaN.
  const T rest = s.sum - s.below < T(1.5) ? s.below : s.sum - T(1);
  return {s.max, fl_log1p(rest)};
}

// The same from the sum alone, log(sum), for kernels that do not sum `below` apart: the CPU's
// 16-bit rows, and the CUDA kernels, whose rows kernels spill registers with one more
// accumulator (measured with ptxas: 28 bytes of spill stores in the bfloat16 8-vector kernel
// on sm_80).
template <typename T>
FL_HD SoftmaxRowStats<T> softmax_row_stats_of_sum(T max, T sum) {
  return {max, fl_log(sum)};
}

template <typename T>
FL_HD T softmax_row_lse(SoftmaxRowStats<T> r) {
  return r.max + r.log_sum;
}

// p_j = softmax(z)_j from the row statistics.
template <typename V, typename T, typename ExpFn = AccurateExp>
FL_HD V softmax_prob(V z, SoftmaxRowStats<T> r, ExpFn exp = {}) {
  return exp((z - V(r.max)) - V(r.log_sum));
}

// ---------------------------------------------------------------------------------------------
// Softcap (Gemma-style logit capping).
template <typename V, typename T>
FL_HD V softcap_apply(V x, T cap, T inv_cap) {
  return V(cap) * fl_tanh(x * V(inv_cap));
}

// dz/dx at z = cap * tanh(x / cap), written in terms of z so that tanh is evaluated once.
template <typename V, typename T>
FL_HD V softcap_derivative(V z, T inv_cap) {
  const V u = z * V(inv_cap);
  return V(T(1)) - u * u;
}

// ---------------------------------------------------------------------------------------------
// Options of a softmax cross-entropy call, in the accumulation type T.
template <typename T>
struct SoftmaxCEOptions {
  T label_smoothing;  // e
  T inv_classes;      // 1 / C
  T weight_sum;       // W = sum_c w_c (C without class weights)
  T z_loss;
};

// Per-row constants of the gradient: ce_scale dce/dz_j + z_scale dzl/dz_j = coef_p * p_j
// - coef_w * w_j - coef_target [j == t] (class-index targets) or coef_p * p_j - coef_w * w_j q_j
// (probability targets).
template <typename T>
struct SoftmaxCERowGrad {
  T coef_p;
  T coef_w;
  T coef_target;
};

// The z-loss part of one row's loss (before the mask).
template <typename T>
FL_HD T softmax_ce_z_loss(const SoftmaxCEOptions<T>& o, SoftmaxRowStats<T> r) {
  const T lse = softmax_row_lse(r);
  return o.z_loss * lse * lse;
}

// Class-index target: the cross-entropy part of one row's loss (before the mask).
// sum_w_zm = sum_c w_c (z_c - m).
template <typename T>
FL_HD T softmax_ce_index_loss(const SoftmaxCEOptions<T>& o, SoftmaxRowStats<T> r, T z_target,
                              T w_target, T sum_w_zm) {
  const T e = o.label_smoothing;
  return (T(1) - e) * w_target * (r.log_sum - (z_target - r.max)) +
         e * o.inv_classes * (o.weight_sum * r.log_sum - sum_w_zm);
}

template <typename T>
FL_HD SoftmaxCERowGrad<T> softmax_ce_index_row_grad(const SoftmaxCEOptions<T>& o, T lse,
                                                    T w_target, T ce_scale, T z_scale) {
  const T e = o.label_smoothing;
  const T smooth = e * o.inv_classes;
  return {ce_scale * ((T(1) - e) * w_target + smooth * o.weight_sum) +
              z_scale * (T(2) * o.z_loss * lse),
          ce_scale * smooth, ce_scale * (T(1) - e) * w_target};
}

// Probability target: the smoothed target q_c.
template <typename V, typename T>
FL_HD V softmax_ce_smoothed_prob(const SoftmaxCEOptions<T>& o, V y) {
  return y * V(T(1) - o.label_smoothing) + V(o.label_smoothing * o.inv_classes);
}

// Probability target: the cross-entropy part of one row's loss (before the mask), from
// Q = sum_c w_c q_c and sum_w_q_zm = sum_c w_c q_c (z_c - m).
template <typename T>
FL_HD T softmax_ce_prob_loss(SoftmaxRowStats<T> r, T sum_w_q, T sum_w_q_zm) {
  return sum_w_q * r.log_sum - sum_w_q_zm;
}

template <typename T>
FL_HD SoftmaxCERowGrad<T> softmax_ce_prob_row_grad(const SoftmaxCEOptions<T>& o, T lse,
                                                   T sum_w_q, T ce_scale, T z_scale) {
  return {ce_scale * sum_w_q + z_scale * (T(2) * o.z_loss * lse), ce_scale, T(0)};
}

// The target's gradient element (class-index targets): softmax_ce_grad_element(g, p_t, w_t) -
// coef_target, with p_t's coefficient applied to p_t - 1 = expm1(z_t - lse) rather than to p_t:
// a confident row's p_t is 1 - 1e-4, and p_t - 1 formed from it keeps a few digits only.
// z_minus_max = z_t - max (exact where it matters: z_t near the max).
template <typename T>
FL_HD T softmax_ce_target_grad(const SoftmaxCERowGrad<T>& g, T z_minus_max,
                               SoftmaxRowStats<T> r, T w_target) {
  const T p_minus_1 = fl_expm1(z_minus_max - r.log_sum);
  return g.coef_p * p_minus_1 + (g.coef_p - g.coef_target) - g.coef_w * w_target;
}

// One gradient element from p_j (class-index targets; the [j == t] term is applied by the
// caller to the single target element). `w` is w_j, or 1 without class weights.
template <typename V, typename T>
FL_HD V softmax_ce_grad_element(const SoftmaxCERowGrad<T>& g, V p, V w) {
  return V(g.coef_p) * p - V(g.coef_w) * w;
}

// ---------------------------------------------------------------------------------------------
// Sigmoid cross-entropy.
template <typename V, typename T>
FL_HD V sigmoid_ce_smoothed_target(V y, T label_smoothing) {
  return y * V(T(1) - label_smoothing) + V(T(0.5) * label_smoothing);
}

// Loss and derivative of one element (before weight and mask, which the caller multiplies in
// together with the reduction scale); pw is 1 without pos_weight.
template <typename V>
struct SigmoidCEValue {
  V loss;
  V dloss;
};

// kPosWeight false: pos_weight is 1, and the compiler drops the multiplications by it.
template <typename V, typename ExpFn = AccurateExp, bool kPosWeight = true>
FL_HD SigmoidCEValue<V> sigmoid_ce_element(V x, V y, V pos_weight, ExpFn exp = {}) {
  const V zero(0);
  const V one(1);
  if constexpr (!kPosWeight) pos_weight = one;
  const V log_weight = kPosWeight ? one + (pos_weight - one) * y : one;  // 1 when pw is 1
  const SoftplusAndSigmoid<V> ss = exp.softplus_and_sigmoid(x);
  const V softplus_neg = fl_max(zero - x, zero) + ss.log1p_exp_neg_abs;
  return {(one - y) * x + log_weight * softplus_neg, log_weight * ss.sigmoid - pos_weight * y};
}

FL_ISA_NAMESPACE_END
}  // namespace common
}  // namespace fusedloss
