// at::vec::Vectorized overloads of the math in csrc/common/math.h, so that the formulas in
// csrc/common/losses.h run unchanged on whole vectors. They sit in at::vec's namespace to be
// found by argument-dependent lookup from inside the formula templates.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace at {
namespace vec {
inline namespace CPU_CAPABILITY {

// The fast exp of a float vector for x <= 0 (every caller's case: z - max, -|x|), used for
// 16-bit data only (common::FastExp); the hot spot of the 16-bit softmax: exp(x) = 2^n 2^f, n = round(x log2 e), f in [-1/2, 1/2], 2^f by its Taylor
// series to degree 5 (truncation 2.4e-6 relative, exp_u20's accuracy; the rounding of
// x log2 e adds at most 3e-7 for |x| < 10 and 5e-6 at |x| = 87, where the terms are
// negligible in a softmax sum). About 11 vector operations against ~17 for exp_u20, which
// matters because a 512-bit operation costs two cycles on Zen 4 and this loop is bound by
// them. Below -87.3 it returns 2^-126 (~1e-38) rather than 0; NaN stays NaN.
inline Vectorized<float> fl_exp_fast(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  using VI = Vectorized<int32_t>;
  const V t = at::vec::maximum(x, V(-87.33654f)) * V(1.44269504088896341f);
  const V n = t.round();
  const V f = t - n;
  V p = V(1.3333558146428443e-3f);
  p = at::vec::fmadd(p, f, V(9.618129107628477e-3f));
  p = at::vec::fmadd(p, f, V(5.550410866482158e-2f));
  p = at::vec::fmadd(p, f, V(0.2402265069591007f));
  p = at::vec::fmadd(p, f, V(0.6931471805599453f));
  p = at::vec::fmadd(p, f, V(1.0f));
  const VI bits = (at::vec::convert_to_int_of_same_size(n) + VI(127)) << VI(23);
  return p * at::vec::cast<float>(bits);
}
inline Vectorized<double> fl_exp_fast(const Vectorized<double>& x) { return x.exp(); }
// The accurate exp of float32 data (common::AccurateExp): ATen's exp_u20, within 2 ulp, the
// one PyTorch's own softmax uses; Sleef's 1-ulp exp measured 1.7x slower in the softmax CE.
// float64 keeps Sleef's.
inline Vectorized<float> fl_exp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> fl_exp(const Vectorized<double>& x) { return x.exp(); }
template <typename T>
inline Vectorized<T> fl_exp_u10(const Vectorized<T>& x) { return x.exp(); }
template <typename T>
inline Vectorized<T> fl_log(const Vectorized<T>& x) { return x.log(); }
template <typename T>
inline Vectorized<T> fl_log1p(const Vectorized<T>& x) { return x.log1p(); }
template <typename T>
inline Vectorized<T> fl_expm1(const Vectorized<T>& x) { return x.expm1(); }
// log1p(x) for 0 <= x <= 1, in float: log1p(x) = 2 atanh(u), u = x / (2 + x) in [0, 1/3], and
// atanh(u) = u (1 + u^2/3 + u^4/5 + ... + u^12/13) to within 2e-8 relative there. Several
// times faster than the general log1p (which here costs ~9 ns a value); double keeps it.
inline Vectorized<float> fl_log1p_from_u(const Vectorized<float>& u) {  // 2 atanh(u)
  using V = Vectorized<float>;
  const V v = u * u;
  V p = V(1.0f / 13.0f);
  p = fmadd(p, v, V(1.0f / 11.0f));
  p = fmadd(p, v, V(1.0f / 9.0f));
  p = fmadd(p, v, V(1.0f / 7.0f));
  p = fmadd(p, v, V(1.0f / 5.0f));
  p = fmadd(p, v, V(1.0f / 3.0f));
  p = fmadd(p, v, V(1.0f));
  return V(2.0f) * u * p;
}
// log1p(num / den) for 0 <= num <= den: u = e / (2 + e) with e = num / den is num / (2 den + num),
// one division (num / den and then u would round and divide twice).
inline Vectorized<float> fl_log1p_ratio(const Vectorized<float>& num, const Vectorized<float>& den) {
  using V = Vectorized<float>;
  return fl_log1p_from_u(num / fmadd(V(2.0f), den, num));
}
inline Vectorized<double> fl_log1p_ratio(const Vectorized<double>& num,
                                         const Vectorized<double>& den) {
  return (num / den).log1p();
}
template <typename T>
inline Vectorized<T> fl_tanh(const Vectorized<T>& x) { return x.tanh(); }
template <typename T>
inline Vectorized<T> fl_abs(const Vectorized<T>& x) { return x.abs(); }
// maximum/minimum propagate NaN, as the scalar fl_max does.
template <typename T>
inline Vectorized<T> fl_max(const Vectorized<T>& a, const Vectorized<T>& b) { return maximum(a, b); }
template <typename T>
inline Vectorized<T> fl_ge(const Vectorized<T>& a, const Vectorized<T>& b) { return a >= b; }
template <typename T>
inline Vectorized<T> fl_select(const Vectorized<T>& cond, const Vectorized<T>& if_true,
                               const Vectorized<T>& if_false) {
  return Vectorized<T>::blendv(if_false, if_true, cond);
}

}  // namespace CPU_CAPABILITY
}  // namespace vec
}  // namespace at

namespace fusedloss {
namespace cpu {
inline namespace CPU_CAPABILITY {

template <typename scalar_t>
struct AccTypeOf { using type = float; };
template <>
struct AccTypeOf<double> { using type = double; };

// Loads and stores of one "step" of a row: K vectors of the accumulation type. A step is one
// Vectorized<float|double> for 32/64-bit data and two Vectorized<float> for 16-bit data (one
// 16-bit vector widens into two float vectors).
template <typename scalar_t>
struct VecIO {
  using acc_t = typename AccTypeOf<scalar_t>::type;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  static constexpr int K = kReduced ? 2 : 1;
  static constexpr int64_t kLanes = Vec::size();
  static constexpr int64_t kStep = K * kLanes;

  static void load(const scalar_t* p, Vec* v) {
    if constexpr (kReduced) {
      auto pair = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
      v[0] = std::get<0>(pair);
      v[1] = std::get<1>(pair);
    } else {
      v[0] = Vec::loadu(p);
    }
  }
  // Lanes at and beyond n read as 0; nothing past p + n is touched.
  static void load_partial(const scalar_t* p, int64_t n, Vec* v) {
    if constexpr (kReduced) {
      auto pair =
          at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p, n));
      v[0] = std::get<0>(pair);
      v[1] = std::get<1>(pair);
    } else {
      v[0] = Vec::loadu(p, n);
    }
  }
  // The two float vectors of a 16-bit step, rounded to nearest even into one 16-bit vector:
  // one instruction where the CPU has AVX512-BF16 (the AVX512_BF16 table), ~10 otherwise.
  static at::vec::Vectorized<scalar_t> narrow(const Vec* v) {
#if defined(FUSEDLOSS_AVX512_BF16)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return at::vec::Vectorized<scalar_t>((__m512i)_mm512_cvtne2ps_pbh(__m512(v[1]), __m512(v[0])));
    }
#endif
    return at::vec::convert_from_float<scalar_t>(v[0], v[1]);
  }
  static void store(scalar_t* p, const Vec* v) {
    if constexpr (kReduced) {
      narrow(v).store(p);
    } else {
      v[0].store(p);
    }
  }
  // A full step written with non-temporal stores when p is aligned to the step: an output
  // written once and not read soon (a gradient row) then goes to memory without first being
  // read into cache (no read-for-ownership), halving its memory traffic. Callers issue
  // stream_fence() before the written data is handed to another thread.
  static constexpr uintptr_t kStepBytes = kStep * sizeof(scalar_t);
  static bool stream_aligned(const scalar_t* p) {
    return reinterpret_cast<uintptr_t>(p) % kStepBytes == 0;
  }
  // Elements from p to the next step boundary (0 if p is on one, or cannot reach one).
  static int64_t elements_to_alignment(const scalar_t* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a % sizeof(scalar_t) != 0) return 0;
    return static_cast<int64_t>(((kStepBytes - a % kStepBytes) % kStepBytes) / sizeof(scalar_t));
  }
  static void stream(scalar_t* p, const Vec* v) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kReduced) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), __m512i(narrow(v)));
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      _mm512_stream_ps(p, __m512(v[0]));
    } else {
      _mm512_stream_pd(p, __m512d(v[0]));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (kReduced) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), __m256i(narrow(v)));
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(p, __m256(v[0]));
    } else {
      _mm256_stream_pd(p, __m256d(v[0]));
    }
#else
    store(p, v);
#endif
  }

  static void store_partial(scalar_t* p, int64_t n, const Vec* v) {
    if constexpr (kReduced) {
      narrow(v).store(p, n);
    } else {
      v[0].store(p, n);
    }
  }

  // The same for arrays already in the accumulation type (weights, scratch rows).
  static void load_acc(const acc_t* p, Vec* v) {
    for (int k = 0; k < K; ++k) v[k] = Vec::loadu(p + k * kLanes);
  }
  static void load_acc_partial(const acc_t* p, int64_t n, Vec* v) {
    for (int k = 0; k < K; ++k) {
      const int64_t count = std::min<int64_t>(std::max<int64_t>(n - k * kLanes, 0), kLanes);
      v[k] = count > 0 ? Vec::loadu(p + k * kLanes, count) : Vec(acc_t(0));
    }
  }
  static void store_acc(acc_t* p, const Vec* v) {
    for (int k = 0; k < K; ++k) v[k].store(p + k * kLanes);
  }
  static void store_acc_partial(acc_t* p, int64_t n, const Vec* v) {
    for (int k = 0; k < K; ++k) {
      const int64_t count = std::min<int64_t>(std::max<int64_t>(n - k * kLanes, 0), kLanes);
      if (count > 0) v[k].store(p + k * kLanes, count);
    }
  }
  // An operand stored in the data's dtype, or in the accumulation dtype (`in_acc`): a float32
  // target beside 16-bit logits is read as it is, not rounded to 16 bits first.
  static const void* row_of(const void* base, bool in_acc, int64_t r, int64_t row_stride) {
    if (in_acc) return static_cast<const acc_t*>(base) + r * row_stride;
    return static_cast<const scalar_t*>(base) + r * row_stride;
  }
  static void load_either(const void* row, bool in_acc, int64_t j, int64_t n, Vec* v) {
    if (in_acc) {
      const acc_t* a = static_cast<const acc_t*>(row) + j;
      if (n == kStep) load_acc(a, v);
      else load_acc_partial(a, n, v);
    } else {
      const scalar_t* s = static_cast<const scalar_t*>(row) + j;
      if (n == kStep) load(s, v);
      else load_partial(s, n, v);
    }
  }

  // All-ones lanes below n, zero lanes from n on, for vector k of a step.
  static Vec lanes_below(int64_t n, int k) {
    return Vec::arange(acc_t(k * kLanes), acc_t(1)) < Vec(acc_t(n));
  }
};

// A sum of K-vector terms, added in blocks: one float accumulator per lane that takes the
// ~10^4 terms of a 128K-class row loses ~1e-5 relative; partial sums of 64 steps, added
// together, keep that near 1e-7 for one extra add per 64 steps.
template <typename Vec, int K>
struct BlockedSum {
  using T = typename Vec::value_type;
  static constexpr int kBlockSteps = 64;
  Vec block[K], total[K];
  int steps = 0;

  BlockedSum() {
    for (int k = 0; k < K; ++k) block[k] = total[k] = Vec(T(0));
  }
  void add(const Vec* v) {
    for (int k = 0; k < K; ++k) block[k] = block[k] + v[k];
    if (++steps == kBlockSteps) flush();
  }
  void flush() {
    for (int k = 0; k < K; ++k) {
      total[k] = total[k] + block[k];
      block[k] = Vec(T(0));
    }
    steps = 0;
  }
  T result() {
    flush();
    T s = T(0);
    for (int k = 0; k < K; ++k) s += at::vec::vec_reduce_all<T>(std::plus<Vec>(), total[k]);
    return s;
  }
};

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Asks for the cache line at p to be brought into L2 (used one row ahead, so that the next
// row's read from memory overlaps this row's arithmetic).
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedloss
