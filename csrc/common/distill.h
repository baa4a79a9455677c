// Distillation losses: what a student's logits s learn from a teacher's logits t, per position,
// at temperature T. The one place where fusedloss says what it computes for them; the CPU
// rows (csrc/cpu/distill_kernel.h), the CUDA rows (csrc/cuda/distill.cuh) and so the SIMT
// harness call these and restate none of them.
//
// With u = s / T, v = t / T, Q = softmax(u) (the student), P = softmax(v) (the teacher),
// log q = (u - mu) - log Zu and log p = (v - mv) - log Zv (mu, mv the row maxima, Zu, Zv the
// sums of exp(u - mu), exp(v - mv)):
//
//   forward_kl  D = KL(P || Q) = sum p (log p - log q)
//     dD/du_j = q_j - p_j                       dD/dv_j = p_j (log p_j - log q_j - D)
//   reverse_kl  D = KL(Q || P) = sum q (log q - log p)
//     dD/du_j = q_j (log q_j - log p_j - D)     dD/dv_j = p_j - q_j
//   jsd         D = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q,
//               with Dp = KL(P || M), Dq = KL(Q || M):
//     dD/du_j = (1 - beta) q_j (log q_j - log m_j - Dq)
//     dD/dv_j = beta p_j (log p_j - log m_j - Dp)
//   (the log m terms of L = beta sum p log p + (1-beta) sum q log q - sum m log m cancel in
//   dL/dq, which is why m's own derivative does not appear.)
//
// A position's loss is (1 - a) T^2 D + a CE(s, target), a the hard weight, CE at temperature 1
// (its own statistics ms, log Zs of s itself: the same as mu, log Zu only when T = 1). Since
// d/ds = (1/T) d/du, the divergence's gradient carries the factor (1 - a) T; the hard part's is
// a (softmax(s)_j - [j == target]).
//
// The sums are written over (v - mv) - (u - mu), never lse_v - lse_u apart: both are exact
// differences of nearby logits, while an lse of logits around 1e4 carries an ulp of 1e-3
// (losses.h says the same of cross-entropy). A class whose weight p (or q) is exactly 0 (a
// logit of -inf: a vocabulary the model may not emit) adds 0, as x log x does at 0, not NaN.
//
// Sparse teacher: teacher_logits (rows, K) at classes teacher_indices (rows, K); P is the
// softmax of those K values at T, 0 elsewhere. Only forward_kl: D = sum_k p_k (log p_k -
// log q_{i_k}); dD/du_j = q_j - p_j as above, with p_j = 0 off the K classes.
#pragma once

#include <cstdint>

#include "math.h"
#include "params.h"

namespace fusedloss {

enum class Divergence : int32_t { ForwardKL = 0, ReverseKL = 1, JSD = 2 };

enum class DistillMode : int32_t {
  Forward = 0,         // row losses and statistics; the gradients too where their pointers are set
  GradFromStats = 1,   // the gradients only, recomputed from the saved statistics and grad_loss
};

// What a row keeps (acc_t[rows][kDistillStats]): enough to write its gradient again without
// the sums, from one read of each input.
enum DistillStat : int {
  kStudentMax = 0,     // mu: max of u = s / T
  kStudentLogSum = 1,  // log Zu
  kTeacherMax = 2,     // mv: max of v = t / T
  kTeacherLogSum = 3,  // log Zv
  kHardMax = 4,        // ms: max of s (the hard cross-entropy's; hard_weight > 0 only)
  kHardLogSum = 5,     // log Zs
  kDivergence = 6,     // forward/reverse: D; jsd: Dp = KL(P || M)
  kDivergenceQ = 7,    // jsd: Dq = KL(Q || M); else 0
  kDistillStats = 8,
};

// The student's logits (rows, classes), the teacher's (rows, classes) or, sparse, (rows, K)
// at teacher_indices. acc_t is double when the student is float64 (the teacher is then too),
// float otherwise; every acc_t pointer below points at that type.
struct DistillParams {
  const void* student;          // student dtype, row r at student + r * student_row_stride
  const void* teacher;          // teacher dtype, row r at teacher + r * teacher_row_stride
  const int64_t* teacher_indices;  // (rows, teacher_classes), row stride indices_row_stride;
                                   // null: a dense teacher (teacher_classes == classes)
  const int64_t* target;        // class indices (rows) or null (no hard part, no ignored rows)
  const void* mask;             // acc_t[rows] or null
  const void* grad_loss;        // GradFromStats: acc_t, row r's at grad_loss[r * grad_loss_stride]
  int64_t grad_loss_stride;     // 1 (per row: reduction none) or 0 (one for every row)
  const void* grad_scale;       // acc_t[1]: mean 1/denominator (0 when it is 0); null: 1
  void* grad_student;           // student dtype (rows, classes), row stride grad_student_row_stride;
                                // null: not wanted
  void* grad_teacher;           // teacher dtype, the teacher's shape, row stride
                                // grad_teacher_row_stride; null: not wanted
  void* row_loss;               // acc_t[rows]: each row's loss times its mask (Forward)
  void* row_stats;              // acc_t[rows][kDistillStats]: written by Forward, read by
                                // GradFromStats (0 for skipped rows)
  int64_t rows;
  int64_t classes;              // the student's
  int64_t teacher_classes;      // classes (dense) or K (sparse)
  // Vocab-parallel rows (GradFromStats, dense teacher): both logits hold classes
  // [class_offset, class_offset + classes) of the rows, the statistics are the whole rows' and
  // targets global ids; a row whose target another slice holds has no target term here. 0
  // otherwise.
  int64_t class_offset;
  int64_t student_row_stride;
  int64_t teacher_row_stride;
  int64_t indices_row_stride;
  int64_t grad_student_row_stride;
  int64_t grad_teacher_row_stride;
  int64_t ignore_index;
  double temperature;
  double beta;                  // jsd only, in (0, 1): 0 and 1 are forward and reverse KL
  double hard_weight;           // a in [0, 1]; > 0 needs target
  ScalarType student_dtype;
  ScalarType teacher_dtype;
  Divergence divergence;
  DistillMode mode;
};

namespace common {
FL_ISA_NAMESPACE_BEGIN

// The constants of a call, in the accumulation type.
template <typename T>
struct DistillOptions {
  T inv_temperature;   // 1 / T
  T t_squared;         // T^2
  T beta, one_minus_beta;
  T hard_weight;
  bool hard;           // a > 0 (a target is given)
  bool separate_hard;  // the hard part needs statistics of its own (T != 1)
  Divergence divergence;
};

template <typename T>
DistillOptions<T> distill_options(const DistillParams& p) {
  DistillOptions<T> o;
  o.inv_temperature = T(1.0 / p.temperature);
  o.t_squared = T(p.temperature * p.temperature);
  o.beta = T(p.beta);
  o.one_minus_beta = T(1.0 - p.beta);
  o.hard_weight = T(p.hard_weight);
  o.hard = p.hard_weight > 0 && p.target != nullptr;
  o.separate_hard = o.hard && p.temperature != 1.0;
  o.divergence = p.divergence;
  return o;
}

// w * d, and 0 where the weight w is 0 (whatever d: a -inf logit makes d infinite there).
template <typename V>
FL_HD V weighted_or_zero(V w, V d) {
  return fl_select(w == V(0), V(0), w * d);
}

// log m = log(beta p + (1 - beta) q) from log p and log q, without forming p or q (either may
// underflow where its log is finite): the larger side factored out, log m = log p +
// log(1 + (1 - beta)(exp(log q - log p) - 1)) where p >= q (the other way round otherwise).
// Where p == q it is log p exactly (exp(0) - 1 = 0, log(1) = 0), so that a student that
// matches its teacher has a jsd of exactly 0 rather than the rounding of terms of size 1. exp
// and log rather than expm1 and log1p: the argument of the log is in (1 - w, 1], away from 0,
// where log1p's extra digits buy no accuracy the loss keeps (its terms are absolute), and
// log1p and expm1 cost several times exp's on the CPU's vectors.
template <typename V, typename T>
FL_HD V jsd_log_mixture(const DistillOptions<T>& o, V log_p, V log_q) {
  const V diff = log_p - log_q;
  const auto p_larger = fl_ge(diff, V(T(0)));
  const V larger = fl_select(p_larger, log_p, log_q);
  const V other_weight = fl_select(p_larger, V(o.one_minus_beta), V(o.beta));
  return larger + fl_log(V(T(1)) + other_weight * (fl_exp(-fl_abs(diff)) - V(T(1))));
}

// A row's divergence from its sums (forward/reverse: sum e (log-ratio) over the exp sum Z of
// the distribution that weighs, plus the two log sums' difference; jsd: the two KLs).
template <typename T>
FL_HD T distill_forward_kl(T sum_ev_ratio, T sum_ev, T log_zu, T log_zv) {
  // sum p (log p - log q) = sum ev ((v - mv) - (u - mu)) / Zv - log Zv + log Zu
  return sum_ev_ratio / sum_ev + (log_zu - log_zv);
}
template <typename T>
FL_HD T distill_reverse_kl(T sum_eu_ratio, T sum_eu, T log_zu, T log_zv) {
  return sum_eu_ratio / sum_eu + (log_zv - log_zu);
}
template <typename T>
FL_HD T distill_divergence(const DistillOptions<T>& o, T d, T dq) {
  return o.divergence == Divergence::JSD ? o.beta * d + o.one_minus_beta * dq : d;
}

// The hard part: CE = log Zs - (s_t - ms).
template <typename T>
FL_HD T distill_hard_ce(T log_zs, T s_t_minus_max) {
  return log_zs - s_t_minus_max;
}

// A row's loss before its mask.
template <typename T>
FL_HD T distill_row_loss(const DistillOptions<T>& o, T divergence, T hard_ce) {
  const T soft = o.t_squared * divergence;
  return o.hard ? (T(1) - o.hard_weight) * soft + o.hard_weight * hard_ce : soft;
}

// The factors of a row's gradient: of the divergence's part (with respect to the logits s, t:
// (1 - a) T times the row factor) and of the hard part (a times it).
template <typename T>
struct DistillRowGrad {
  T soft, hard;
  T d, dq;  // the row's divergence terms (kDivergence, kDivergenceQ)
  T log_zu, log_zv;
};

template <typename T>
FL_HD DistillRowGrad<T> distill_row_grad(const DistillOptions<T>& o, T factor, T d, T dq,
                                         T log_zu, T log_zv) {
  const T temperature = T(1) / o.inv_temperature;
  const T soft_weight = o.hard ? T(1) - o.hard_weight : T(1);
  return {factor * soft_weight * temperature, o.hard ? factor * o.hard_weight : T(0), d, dq,
          log_zu, log_zv};
}

// The divergence's gradient of one class, given q, p and their logs (log_q = u - mu - log Zu,
// log_p = v - mv - log Zv), and log m for jsd. Returns (student, teacher).
template <typename V>
struct GradPair {
  V student, teacher;
};

template <typename V, typename T>
FL_HD GradPair<V> distill_grad_element(const DistillOptions<T>& o, const DistillRowGrad<T>& g,
                                       V q, V p, V log_q, V log_p, V log_m) {
  const V c(g.soft);
  switch (o.divergence) {
    case Divergence::ForwardKL:
      return {c * (q - p), c * weighted_or_zero(p, (log_p - log_q) - V(g.d))};
    case Divergence::ReverseKL:
      return {c * weighted_or_zero(q, (log_q - log_p) - V(g.d)), c * (p - q)};
    default:
      return {V(g.soft * o.one_minus_beta) * weighted_or_zero(q, (log_q - log_m) - V(g.dq)),
              V(g.soft * o.beta) * weighted_or_zero(p, (log_p - log_m) - V(g.d))};
  }
}

// Whether a row is computed: skipped (mask 0, or its target is ignore_index: loss, statistics and
// gradients 0), or, in the forward with a hard part, a target outside [0, classes) that is never
// used as an index (the CPU entry rejects such targets first; the CUDA kernels make the row NaN,
// as softmax_rows.h's RowKind::BadTarget). From the statistics, a target outside the row's
// classes is one that another class slice holds (class_offset): the row has no target term
// here; a bad target's row has the NaN statistics of its forward, which make it NaN again.
enum class DistillRow : int { Active = 0, Skipped = 1, BadTarget = 2 };

template <typename T>
FL_HD DistillRow distill_row_kind(const DistillParams& p, const DistillOptions<T>& o, T mask,
                                  int64_t target) {
  if (mask == T(0) || (p.target != nullptr && target == p.ignore_index)) return DistillRow::Skipped;
  if (o.hard && p.mode == DistillMode::Forward && (target < 0 || target >= p.classes))
    return DistillRow::BadTarget;
  return DistillRow::Active;
}

// A row's sums over its classes, in the accumulation type.
template <typename T>
struct DistillSums {
  T zu, zv, zs;  // sum exp(u - mu), exp(v - mv), exp(s - ms) (the last: separate_hard only)
  T ratio;       // forward/reverse KL: the weighted log-ratio sum (distill_ratio_term)
  T dp, dq;      // jsd: sum ev (log p - log m), sum eu (log q - log m)
};

// One class's term of the forward/reverse KL's weighted log-ratio sum, from the exps eu, ev and
// the max-shifted u - mu, v - mv.
template <typename V, typename T>
FL_HD V distill_ratio_term(const DistillOptions<T>& o, V eu, V ev, V u_rel, V v_rel) {
  return o.divergence == Divergence::ForwardKL ? weighted_or_zero(ev, v_rel - u_rel)
                                               : weighted_or_zero(eu, u_rel - v_rel);
}

// One class's terms of jsd's two sums (dp, dq of DistillSums), and log m, which the gradient
// needs again.
template <typename V>
struct JsdTerms {
  V log_m, dp, dq;
};

template <typename V, typename T>
FL_HD JsdTerms<V> distill_jsd_terms(const DistillOptions<T>& o, V eu, V ev, V log_q, V log_p) {
  const V lm = jsd_log_mixture(o, log_p, log_q);
  return {lm, weighted_or_zero(ev, log_p - lm), weighted_or_zero(eu, log_q - lm)};
}

// A row's statistics (st[kDistillStats]) and its loss times its mask, from its sums, the maxima
// mu, mv of u and v, the student's max s_max and (with a hard part) its logit at the target.
template <typename T>
FL_HD T distill_row_finish(const DistillOptions<T>& o, const DistillSums<T>& s, T mu, T mv,
                           T s_max, T s_target, T mask, T* st) {
  const T log_zu = fl_log(s.zu), log_zv = fl_log(s.zv);
  T d = T(0), dq = T(0);
  switch (o.divergence) {
    case Divergence::ForwardKL: d = distill_forward_kl(s.ratio, s.zv, log_zu, log_zv); break;
    case Divergence::ReverseKL: d = distill_reverse_kl(s.ratio, s.zu, log_zu, log_zv); break;
    default:
      // the exps are unnormalised: p = ev / Zv, q = eu / Zu
      d = s.dp / s.zv;
      dq = s.dq / s.zu;
  }
  T hard_ce = T(0), hard_max = T(0), log_zs = T(0);
  if (o.hard) {
    hard_max = o.separate_hard ? s_max : mu;
    log_zs = o.separate_hard ? fl_log(s.zs) : log_zu;
    const T s_t = o.separate_hard ? s_target : s_target * o.inv_temperature;
    hard_ce = distill_hard_ce(log_zs, s_t - hard_max);
  }
  st[kStudentMax] = mu;
  st[kStudentLogSum] = log_zu;
  st[kTeacherMax] = mv;
  st[kTeacherLogSum] = log_zv;
  st[kHardMax] = hard_max;
  st[kHardLogSum] = log_zs;
  st[kDivergence] = d;
  st[kDivergenceQ] = dq;
  return mask * distill_row_loss(o, distill_divergence(o, d, dq), hard_ce);
}

// The whole gradient of one class j from the row's statistics, in scalar arithmetic: u = s_j / T,
// v = t_j / T (or a sparse teacher's value at class j; has_p false: j is not one of its K
// classes, p_j = 0), s = s_j; is_target: j is the hard part's target.
template <typename T>
FL_HD GradPair<T> distill_grad_at(const DistillOptions<T>& o, const DistillRowGrad<T>& g, T u,
                                  T v, bool has_p, T mu, T mv, T s, T hard_max, T log_zs,
                                  bool is_target) {
  const T log_q = (u - mu) - g.log_zu;
  const T q = fl_exp(log_q);
  const T log_p = has_p ? (v - mv) - g.log_zv : fl_neg_infinity<T>();
  const T pp = has_p ? fl_exp(log_p) : T(0);
  const T lm = o.divergence == Divergence::JSD ? jsd_log_mixture(o, log_p, log_q) : T(0);
  GradPair<T> e = distill_grad_element(o, g, q, pp, log_q, log_p, lm);
  if (o.hard) {
    const T soft_s = fl_exp((s - hard_max) - log_zs);
    e.student += g.hard * (soft_s - (is_target ? T(1) : T(0)));
  }
  return e;
}

FL_ISA_NAMESPACE_END
}  // namespace common
}  // namespace fusedloss
