// Scalar math used by the loss formulas. The formulas in losses.h are templates over a value
// type V, so that the same text runs on scalars (CUDA, SIMT harness, CPU tails) and on
// at::vec::Vectorized (the CPU kernels, whose overloads live in csrc/cpu/vec_math.h and are
// found by argument-dependent lookup).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "macros.h"

namespace fusedloss {
namespace common {
FL_ISA_NAMESPACE_BEGIN

FL_HD float fl_exp(float x) { return ::expf(x); }
FL_HD double fl_exp(double x) { return ::exp(x); }
// The shorter exp the CPU vector code may use for 16-bit data (csrc/cpu/vec_math.h); on
// scalars it is the exact one.
FL_HD float fl_exp_fast(float x) { return ::expf(x); }
FL_HD double fl_exp_fast(double x) { return ::exp(x); }
// The exp PyTorch's sigmoid is computed with (Sleef's 1-ulp one in the CPU vector code).
FL_HD float fl_exp_u10(float x) { return ::expf(x); }
FL_HD double fl_exp_u10(double x) { return ::exp(x); }
FL_HD float fl_log(float x) { return ::logf(x); }
FL_HD double fl_log(double x) { return ::log(x); }
FL_HD float fl_log1p(float x) { return ::log1pf(x); }
FL_HD double fl_log1p(double x) { return ::log1p(x); }
FL_HD float fl_expm1(float x) { return ::expm1f(x); }
FL_HD double fl_expm1(double x) { return ::expm1(x); }
// log1p of a value in [0, 1] only: the one range the losses need it on (softplus of
// exp(-|x|)), which lets the vector code use a short series in u = x / (2 + x) instead of a
// general log1p. Given as a ratio, log1p(num / den) for 0 <= num <= den (the vector code then
// divides once, u = num / (2 den + num)).
FL_HD float fl_log1p_ratio(float num, float den) { return ::log1pf(num / den); }
FL_HD double fl_log1p_ratio(double num, double den) { return ::log1p(num / den); }
FL_HD float fl_tanh(float x) { return ::tanhf(x); }
FL_HD double fl_tanh(double x) { return ::tanh(x); }
FL_HD float fl_abs(float x) { return ::fabsf(x); }
FL_HD double fl_abs(double x) { return ::fabs(x); }

// max that propagates NaN from either side, like torch.maximum: a NaN logit must reach the loss.
template <typename T>
FL_HD T fl_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}
template <typename T>
FL_HD T fl_min(T a, T b) {
  return (a < b || a != a) ? a : b;
}
template <typename T>
FL_HD bool fl_ge(T a, T b) {
  return a >= b;
}
template <typename T>
FL_HD T fl_select(bool cond, T if_true, T if_false) {
  return cond ? if_true : if_false;
}

template <typename T>
FL_HD T fl_neg_infinity() {
  return -std::numeric_limits<T>::infinity();
}
template <typename T>
FL_HD T fl_quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// Which exp a kernel evaluates; the formulas in losses.h take one as a parameter.
//  - AccurateExp (libm; in the CPU vector code ATen's 2-ulp exp_u20 for float32, Sleef's 1-ulp
//    exp for float64): float32 and float64 data, whose loss and gradient must be as close to a
//    float64 reference as PyTorch's own.
//  - FastExp: float16/bfloat16 data. Its 2.4e-6 relative error is 1/1600 of a bfloat16 ulp
//    (2^-8) and 1/200 of a float16 ulp (2^-11) of the gradient it feeds, so the rounding to
//    the output dtype hides it (the error budget is in bench/README.md).
// Each also gives BCE's two functions of a logit x that need an exp: log1p(exp(-|x|)) (the
// softplus) and sigmoid(x):
//  - AccurateExp: sigmoid(x) = 1 / (1 + t), t = exp(-x), exactly as PyTorch forms it with its
//    own 1-ulp exp. Where BCE's gradient sigmoid(x) - y nearly cancels, the rounding of
//    sigmoid(x) is the whole error: this keeps it PyTorch's to the bit (the one-exp form below
//    measured up to 1.6x PyTorch's max error). The softplus comes from the same t: exp(-|x|) is
//    t for x >= 0 and 1 / t for x < 0, so one exp an element, not two;
//  - FastExp: e = exp(-|x|) by the fast exp, sigmoid 1 / (1 + e), times e for x < 0.
template <typename V>
struct SoftplusAndSigmoid {
  V log1p_exp_neg_abs;
  V sigmoid;
};
struct AccurateExp {
  template <typename V>
  FL_HD V operator()(V x) const { return fl_exp(x); }
  template <typename V>
  FL_HD SoftplusAndSigmoid<V> softplus_and_sigmoid(V x) const {
    const V t = fl_exp_u10(V(0) - x);
    const auto pos = fl_ge(x, V(0));  // bool on scalars, a lane mask on vectors
    return {fl_log1p_ratio(fl_select(pos, t, V(1)), fl_select(pos, V(1), t)), V(1) / (V(1) + t)};
  }
};
struct FastExp {
  template <typename V>
  FL_HD V operator()(V x) const { return fl_exp_fast(x); }
  template <typename V>
  FL_HD SoftplusAndSigmoid<V> softplus_and_sigmoid(V x) const {
    const V e = fl_exp_fast(V(0) - fl_abs(x));
    // (one division for both 1 / (1 + e) and e / (2 + e), via 1 / ((1 + e)(2 + e)), measured
    // 5% slower: the two independent divisions overlap, the longer chain does not)
    const V inv = V(1) / (V(1) + e);
    return {fl_log1p_ratio(e, V(1)), fl_select(fl_ge(x, V(0)), inv, e * inv)};
  }
};

FL_ISA_NAMESPACE_END
}  // namespace common
}  // namespace fusedloss
