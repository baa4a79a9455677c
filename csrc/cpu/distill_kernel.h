// CPU distillation rows (common/distill.h has the formulas): one call handles a range of rows.
// Included only by isa_kernels.cpp, which is compiled once per instruction set.
//
// Per row, the student's and the teacher's logits are read from memory once (pass A: the two
// maxima); pass B (the exps, their sums and the divergence's sums; jsd: B2, the mixture's log
// and the two KLs) and pass C (the gradients) read them again from cache, where they still are
// (two 32000-class float32 rows are 256 KB). The exps are kept in per-thread scratch rows
// between the passes, so that each is evaluated once per logit. The student and the teacher may
// have different dtypes: a step is two vectors of the accumulation type, whatever each side's
// storage.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../common/distill.h"
#include "vec_math.h"

namespace fusedloss {
namespace cpu {
inline namespace CPU_CAPABILITY {

using namespace ::fusedloss::common;

// One step of a row in any storage: two vectors of the accumulation type.
template <typename scalar_t, typename acc_t>
struct PairIO {
  using IO = VecIO<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static_assert(std::is_same_v<typename IO::acc_t, acc_t>, "one accumulation type per call");
  static constexpr int64_t kLanes = Vec::size();
  static constexpr int64_t kStep = 2 * kLanes;

  // n <= kStep elements; lanes at and past n read as 0.
  static void load(const scalar_t* p, int64_t n, Vec* v) {
    if constexpr (IO::K == 2) {
      if (n == kStep) IO::load(p, v);
      else IO::load_partial(p, n, v);
    } else {
      for (int k = 0; k < 2; ++k) {
        const int64_t count = std::min<int64_t>(std::max<int64_t>(n - k * kLanes, 0), kLanes);
        if (count == kLanes) IO::load(p + k * kLanes, v + k);
        else if (count > 0) IO::load_partial(p + k * kLanes, count, v + k);
        else v[k] = Vec(acc_t(0));
      }
    }
  }
  static void store(scalar_t* p, int64_t n, const Vec* v) {
    if constexpr (IO::K == 2) {
      if (n == kStep) IO::store(p, v);
      else IO::store_partial(p, n, v);
    } else {
      for (int k = 0; k < 2; ++k) {
        const int64_t count = std::min<int64_t>(std::max<int64_t>(n - k * kLanes, 0), kLanes);
        if (count == kLanes) IO::store(p + k * kLanes, v + k);
        else if (count > 0) IO::store_partial(p + k * kLanes, count, v + k);
      }
    }
  }
  static Vec lanes_below(int64_t n, int k) {
    return Vec::arange(acc_t(k * kLanes), acc_t(1)) < Vec(acc_t(n));
  }
  // A gradient row written once and not read soon goes past the cache (non-temporal stores,
  // no read-for-ownership: half the memory traffic), when its start is aligned to a step.
  static bool stream_aligned(const scalar_t* p) {
    return reinterpret_cast<uintptr_t>(p) % (kStep * sizeof(scalar_t)) == 0;
  }
  static void stream(scalar_t* p, const Vec* v) {
    if constexpr (IO::K == 2) {
      IO::stream(p, v);
    } else {
      IO::stream(p, v);
      IO::stream(p + kLanes, v + 1);
    }
  }
  // n elements of a step at p (streamed when `streamed`: a full step of an aligned row)
  static void write(scalar_t* p, int64_t n, const Vec* v, bool streamed) {
    if (streamed && n == kStep) stream(p, v);
    else store(p, n, v);
  }
};

// A step into a scratch row (padded to whole steps).
template <typename acc_t>
void store_scratch(acc_t* p, const at::vec::Vectorized<acc_t>* v) {
  for (int k = 0; k < 2; ++k) v[k].store(p + k * at::vec::Vectorized<acc_t>::size());
}

template <typename student_t, typename teacher_t>
struct DistillRowKernel {
  using acc_t = typename AccTypeOf<student_t>::type;
  using S = PairIO<student_t, acc_t>;
  using Tch = PairIO<teacher_t, acc_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kStep = S::kStep;

  const DistillParams& p;
  DistillOptions<acc_t> o;
  bool sparse, want_student, want_teacher, jsd;
  // T = 2 (the usual distillation temperature) with a hard part: exp(s - ms) = exp(u - mu)^2,
  // a product instead of a third exp per logit, and no scratch row for it
  bool square_hard;
  std::vector<acc_t> eu_row, ev_row, es_row, lm_row;  // exp(u - mu), exp(v - mv), exp(s - ms),
                                                       // log m (jsd), between the passes
  std::vector<acc_t> x_at_indices;  // a sparse teacher's classes' student logits (pass C)

  explicit DistillRowKernel(const DistillParams& params) : p(params) {
    o = distill_options<acc_t>(p);
    sparse = p.teacher_indices != nullptr;
    want_student = p.grad_student != nullptr;
    want_teacher = p.grad_teacher != nullptr;
    jsd = o.divergence == Divergence::JSD;
    square_hard = o.separate_hard && p.temperature == 2.0;
    if (p.mode == DistillMode::Forward) {
      // Rounded up to whole steps: full-step stores past the row's end stay inside the buffer.
      const int64_t padded = (p.classes + kStep - 1) / kStep * kStep;
      const bool grads = want_student || want_teacher;
      eu_row.resize(padded);
      if (!sparse) ev_row.resize(padded);
      if (o.separate_hard && !square_hard && grads) es_row.resize(padded);
      if (jsd && grads) lm_row.resize(padded);
    }
  }

  // One step of the row: the scaled, max-shifted logits u - mu and v - mv, and s itself.
  struct Step {
    Vec s[2], u[2], v[2];
  };
  void load_step(const student_t* x, const teacher_t* y, int64_t j, int64_t n, acc_t mu,
                 acc_t mv, Step& st) const {
    S::load(x + j, n, st.s);
    if (!sparse) Tch::load(y + j, n, st.v);
    const Vec inv(o.inv_temperature);
    for (int k = 0; k < 2; ++k) {
      st.u[k] = st.s[k] * inv - Vec(mu);
      if (!sparse) st.v[k] = st.v[k] * inv - Vec(mv);
    }
  }

  // Pass A: the maxima of s and t (the dense teacher's; a sparse teacher's K values are
  // scanned by the caller).
  std::pair<acc_t, acc_t> max_pass(const student_t* x, const teacher_t* y) const {
    Vec ms[2], mt[2];
    const Vec ninf(fl_neg_infinity<acc_t>());
    for (int k = 0; k < 2; ++k) ms[k] = mt[k] = ninf;
    for (int64_t j = 0; j < p.classes; j += kStep) {
      const int64_t n = std::min<int64_t>(kStep, p.classes - j);
      Vec a[2], b[2] = {ninf, ninf};
      S::load(x + j, n, a);
      if (!sparse) Tch::load(y + j, n, b);
      for (int k = 0; k < 2; ++k) {
        if (n != kStep) {
          const Vec in = S::lanes_below(n, k);
          a[k] = Vec::blendv(ninf, a[k], in);
          b[k] = Vec::blendv(ninf, b[k], in);
        }
        ms[k] = fl_max(ms[k], a[k]);
        if (!sparse) mt[k] = fl_max(mt[k], b[k]);
      }
    }
    const auto vmax = [](Vec a, Vec b) { return fl_max(a, b); };
    acc_t s_max = fl_max(at::vec::vec_reduce_all<acc_t>(vmax, ms[0]),
                         at::vec::vec_reduce_all<acc_t>(vmax, ms[1]));
    acc_t t_max = fl_max(at::vec::vec_reduce_all<acc_t>(vmax, mt[0]),
                         at::vec::vec_reduce_all<acc_t>(vmax, mt[1]));
    return {s_max, t_max};
  }

  // Pass B: the exps, their sums and the forward/reverse KL's weighted log-ratio sum.
  DistillSums<acc_t> exp_pass(const student_t* x, const teacher_t* y, acc_t mu, acc_t mv,
                              acc_t ms) {
    BlockedSum<Vec, 2> zu, zv, zs, ratio;
    const bool forward = o.divergence == Divergence::ForwardKL;
    const bool reverse = o.divergence == Divergence::ReverseKL;
    for (int64_t j = 0; j < p.classes; j += kStep) {
      const int64_t n = std::min<int64_t>(kStep, p.classes - j);
      Step st;
      load_step(x, y, j, n, mu, mv, st);
      Vec eu[2], ev[2], es[2], r[2];
      for (int k = 0; k < 2; ++k) {
        eu[k] = fl_exp(st.u[k]);
        if (n != kStep) eu[k] = eu[k] & S::lanes_below(n, k);
      }
      zu.add(eu);
      if (!eu_row.empty()) store_scratch(eu_row.data() + j, eu);
      if (!sparse) {
        for (int k = 0; k < 2; ++k) {
          ev[k] = fl_exp(st.v[k]);
          if (n != kStep) ev[k] = ev[k] & S::lanes_below(n, k);
        }
        zv.add(ev);
        if (!ev_row.empty()) store_scratch(ev_row.data() + j, ev);
        if (forward || reverse) {
          for (int k = 0; k < 2; ++k) r[k] = distill_ratio_term(o, eu[k], ev[k], st.u[k], st.v[k]);
          ratio.add(r);
        }
      }
      if (o.separate_hard) {
        for (int k = 0; k < 2; ++k) {
          if (square_hard) {
            es[k] = eu[k] * eu[k];  // lanes past the end are 0 already
          } else {
            es[k] = fl_exp(st.s[k] - Vec(ms));
            if (n != kStep) es[k] = es[k] & S::lanes_below(n, k);
          }
        }
        zs.add(es);
        if (!es_row.empty()) store_scratch(es_row.data() + j, es);
      }
    }
    return {zu.result(), sparse ? acc_t(0) : zv.result(), o.separate_hard ? zs.result() : acc_t(0),
            ratio.result(), acc_t(0), acc_t(0)};
  }

  // Pass B2 (jsd): the two KLs against the mixture, and log m kept for pass C.
  std::pair<acc_t, acc_t> jsd_pass(const student_t* x, const teacher_t* y, acc_t mu, acc_t mv,
                                   acc_t log_zu, acc_t log_zv) {
    BlockedSum<Vec, 2> dp, dq;
    for (int64_t j = 0; j < p.classes; j += kStep) {
      const int64_t n = std::min<int64_t>(kStep, p.classes - j);
      Step st;
      load_step(x, y, j, n, mu, mv, st);
      Vec eu[2], ev[2], a[2], b[2], lm[2];
      for (int k = 0; k < 2; ++k) {
        eu[k] = Vec::loadu(eu_row.data() + j + k * S::kLanes);
        ev[k] = Vec::loadu(ev_row.data() + j + k * S::kLanes);
        const Vec log_q = st.u[k] - Vec(log_zu), log_p = st.v[k] - Vec(log_zv);
        const JsdTerms<Vec> terms = distill_jsd_terms(o, eu[k], ev[k], log_q, log_p);
        lm[k] = terms.log_m;
        a[k] = terms.dp;
        b[k] = terms.dq;
        if (n != kStep) {
          a[k] = a[k] & S::lanes_below(n, k);
          b[k] = b[k] & S::lanes_below(n, k);
        }
      }
      dp.add(a);
      dq.add(b);
      if (!lm_row.empty()) store_scratch(lm_row.data() + j, lm);
    }
    // the exps are unnormalised: p = ev / Zv, q = eu / Zu
    return {dp.result(), dq.result()};
  }

  acc_t stat(int64_t r, int i) const {
    return static_cast<const acc_t*>(p.row_stats)[r * kDistillStats + i];
  }

  // Row r of the inputs.
  const student_t* student_row(int64_t r) const {
    return static_cast<const student_t*>(p.student) + r * p.student_row_stride;
  }
  const teacher_t* teacher_row(int64_t r) const {
    return static_cast<const teacher_t*>(p.teacher) + r * p.teacher_row_stride;
  }
  const int64_t* indices_row(int64_t r) const {
    return sparse ? p.teacher_indices + r * p.indices_row_stride : nullptr;
  }

  // Passes A, B (and B2) of an active row: its statistics (stored) and its masked loss.
  void loss_row(int64_t r, acc_t mask, int64_t t_index) {
    const student_t* x = student_row(r);
    const teacher_t* y = teacher_row(r);
    const int64_t* idx = indices_row(r);
    const int64_t K = p.teacher_classes;
    auto [s_max, t_max] = max_pass(x, y);
    if (sparse) {
      t_max = fl_neg_infinity<acc_t>();
      for (int64_t k = 0; k < K; ++k) t_max = fl_max(t_max, acc_t(y[k]));
    }
    const acc_t mu = s_max * o.inv_temperature, mv = t_max * o.inv_temperature;
    const acc_t ms = s_max;
    DistillSums<acc_t> sums = exp_pass(x, y, mu, mv, ms);
    if (sparse) {
      // the teacher's K classes: its exps and the weighted log-ratio, student logits gathered
      sums.zv = acc_t(0);
      sums.ratio = acc_t(0);
      for (int64_t k = 0; k < K; ++k) {
        const acc_t v = acc_t(y[k]) * o.inv_temperature - mv;
        const acc_t u = acc_t(x[idx[k]]) * o.inv_temperature - mu;
        const acc_t ev = fl_exp(v);
        sums.zv += ev;
        sums.ratio += distill_ratio_term(o, acc_t(0), ev, u, v);  // forward_kl: eu unused
      }
    }
    if (jsd) {
      const acc_t log_zu = fl_log(sums.zu), log_zv = fl_log(sums.zv);
      std::tie(sums.dp, sums.dq) = jsd_pass(x, y, mu, mv, log_zu, log_zv);
    }
    const acc_t s_target = o.hard ? acc_t(x[t_index]) : acc_t(0);
    static_cast<acc_t*>(p.row_loss)[r] =
        distill_row_finish(o, sums, mu, mv, ms, s_target, mask,
                           static_cast<acc_t*>(p.row_stats) + r * kDistillStats);
  }

  // Pass C: the gradients of row r times `factor`.
  void grad_row(int64_t r, acc_t factor, int64_t t_index, bool from_stats) {
    const student_t* x = student_row(r);
    const teacher_t* y = teacher_row(r);
    const int64_t* idx = indices_row(r);
    const acc_t mu = stat(r, kStudentMax), log_zu = stat(r, kStudentLogSum);
    const acc_t mv = stat(r, kTeacherMax), log_zv = stat(r, kTeacherLogSum);
    const acc_t hard_max = stat(r, kHardMax), log_zs = stat(r, kHardLogSum);
    const DistillRowGrad<acc_t> g = distill_row_grad(o, factor, stat(r, kDivergence),
                                                     stat(r, kDivergenceQ), log_zu, log_zv);
    auto* gs = want_student
                   ? static_cast<student_t*>(p.grad_student) + r * p.grad_student_row_stride
                   : nullptr;
    auto* gt = want_teacher
                   ? static_cast<teacher_t*>(p.grad_teacher) + r * p.grad_teacher_row_stride
                   : nullptr;
    const bool dense_teacher_grad = gt != nullptr && !sparse;
    // The student logits the scalar fix-ups below need, read before the vector loop: written
    // in place (distill_inplace), the gradient overwrites the logits as the loop goes.
    const bool t_here = t_index >= 0 && t_index < p.classes;  // a slice may not hold it
    const acc_t x_t = t_here ? acc_t(x[t_index]) : acc_t(0);
    if (sparse) {
      x_at_indices.resize(p.teacher_classes);
      for (int64_t k = 0; k < p.teacher_classes; ++k) x_at_indices[k] = acc_t(x[idx[k]]);
    }
    // forward KL's student gradient from the kept exps alone: the logits are not read again
    const bool exps_suffice = !from_stats && o.divergence == Divergence::ForwardKL &&
                              !dense_teacher_grad;
    // (in place, the row is in cache already: stored, not streamed)
    const bool stream_s = gs != nullptr && static_cast<const void*>(gs) != x && S::stream_aligned(gs);
    const bool stream_t = dense_teacher_grad && Tch::stream_aligned(gt);
    if (gs != nullptr || dense_teacher_grad) {
      const Vec inv_zu(fl_exp(-log_zu)), inv_zv(fl_exp(-log_zv)), inv_zs(fl_exp(-log_zs));
      for (int64_t j = 0; j < p.classes; j += kStep) {
        const int64_t n = std::min<int64_t>(kStep, p.classes - j);
        Step st;
        if (!exps_suffice) load_step(x, y, j, n, mu, mv, st);
        Vec out_s[2], out_t[2];
        for (int k = 0; k < 2; ++k) {
          const int64_t at = j + k * S::kLanes;
          if (exps_suffice) {
            const Vec eu = Vec::loadu(eu_row.data() + at);
            const Vec q = eu * inv_zu;
            const Vec pp = sparse ? Vec(acc_t(0)) : Vec::loadu(ev_row.data() + at) * inv_zv;
            out_s[k] = Vec(g.soft) * (q - pp);
            if (o.hard) {
              Vec soft_s = q;
              if (square_hard) soft_s = (eu * eu) * inv_zs;
              else if (o.separate_hard) soft_s = Vec::loadu(es_row.data() + at) * inv_zs;
              out_s[k] = out_s[k] + Vec(g.hard) * soft_s;
            }
            continue;
          }
          const Vec log_q = st.u[k] - Vec(log_zu);
          const Vec log_p = sparse ? Vec(fl_neg_infinity<acc_t>()) : st.v[k] - Vec(log_zv);
          Vec q, pp, lm(acc_t(0));
          if (from_stats) {
            q = fl_exp(log_q);
            pp = sparse ? Vec(acc_t(0)) : fl_exp(log_p);
            if (jsd) lm = jsd_log_mixture(o, log_p, log_q);
          } else {
            q = Vec::loadu(eu_row.data() + at) * inv_zu;
            pp = sparse ? Vec(acc_t(0)) : Vec::loadu(ev_row.data() + at) * inv_zv;
            if (jsd) lm = Vec::loadu(lm_row.data() + at);
          }
          const GradPair<Vec> e = distill_grad_element(o, g, q, pp, log_q, log_p, lm);
          out_s[k] = e.student;
          out_t[k] = e.teacher;
          if (o.hard && gs != nullptr) {
            Vec soft_s;
            if (!o.separate_hard) soft_s = q;
            else if (from_stats) soft_s = fl_exp((st.s[k] - Vec(hard_max)) - Vec(log_zs));
            else if (square_hard) soft_s = (q * q) * Vec(fl_exp(acc_t(2) * log_zu - log_zs));
            else soft_s = Vec::loadu(es_row.data() + at) * inv_zs;
            out_s[k] = out_s[k] + Vec(g.hard) * soft_s;
          }
        }
        if (gs != nullptr) S::write(gs + j, n, out_s, stream_s);
        if (dense_teacher_grad) Tch::write(gt + j, n, out_t, stream_t);
      }
      if (stream_s || stream_t) stream_fence();  // the rows are complete before the fix-ups
    }
    // The elements the vector loop left unfinished, written whole in scalar arithmetic.
    if (sparse) {
      for (int64_t k = 0; k < p.teacher_classes; ++k) {
        const int64_t j = idx[k];
        const acc_t x_j = x_at_indices[k];
        const GradPair<acc_t> e = distill_grad_at(o, g, x_j * o.inv_temperature,
                                                  acc_t(y[k]) * o.inv_temperature, true, mu, mv,
                                                  x_j, hard_max, log_zs, o.hard && j == t_index);
        if (gs != nullptr) gs[j] = student_t(e.student);
        if (gt != nullptr) gt[k] = teacher_t(e.teacher);
      }
    }
    if (o.hard && gs != nullptr && t_here) {
      bool in_sparse = false;
      if (sparse)
        for (int64_t k = 0; k < p.teacher_classes; ++k) in_sparse |= idx[k] == t_index;
      if (!in_sparse) {
        const acc_t v = sparse ? acc_t(0) : acc_t(y[t_index]) * o.inv_temperature;
        gs[t_index] = student_t(distill_grad_at(o, g, x_t * o.inv_temperature, v, !sparse, mu,
                                                mv, x_t, hard_max, log_zs, true)
                                    .student);
      }
    }
  }

  void zero_row(int64_t r) {
    if (want_student) {
      auto* gs = static_cast<student_t*>(p.grad_student) + r * p.grad_student_row_stride;
      std::fill(gs, gs + p.classes, student_t(0));
    }
    if (want_teacher) {
      auto* gt = static_cast<teacher_t*>(p.grad_teacher) + r * p.grad_teacher_row_stride;
      std::fill(gt, gt + p.teacher_classes, teacher_t(0));
    }
  }

  void run(int64_t row_begin, int64_t row_end) {
    const auto* mask = static_cast<const acc_t*>(p.mask);
    const auto* scale = static_cast<const acc_t*>(p.grad_scale);
    const auto* grad_loss = static_cast<const acc_t*>(p.grad_loss);
    const bool from_stats = p.mode == DistillMode::GradFromStats;
    for (int64_t r = row_begin; r < row_end; ++r) {
      const acc_t m = mask != nullptr ? mask[r] : acc_t(1);
      const int64_t t = p.target != nullptr ? p.target[r] : -1;
      // (a bad target never gets here: the CPU entry rejects it)
      const bool skipped = distill_row_kind(p, o, m, t) == DistillRow::Skipped;
      if (skipped) {
        if (!from_stats) {
          static_cast<acc_t*>(p.row_loss)[r] = acc_t(0);
          acc_t* st = static_cast<acc_t*>(p.row_stats) + r * kDistillStats;
          std::fill(st, st + kDistillStats, acc_t(0));
        }
        zero_row(r);
        continue;
      }
      if (!from_stats) loss_row(r, m, t);
      if (!want_student && !want_teacher) continue;
      acc_t factor = m * (scale != nullptr ? scale[0] : acc_t(1));
      if (from_stats) factor *= grad_loss[r * p.grad_loss_stride];
      grad_row(r, factor, t - p.class_offset, from_stats);
    }
  }
};

template <typename student_t, typename teacher_t>
void distill_launch(const DistillParams& p) {
  // Enough rows per task that a task moves at least ~256 KB.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(p.classes, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    DistillRowKernel<student_t, teacher_t> kernel(p);
    kernel.run(begin, end);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedloss
