// Distillation rows on CUDA: the passes of the CPU rows kernel (csrc/cpu/distill_kernel.h) over
// the formulas of csrc/common/distill.h, one block of kDistillThreads threads per row, the
// threads strided over the classes (consecutive threads read consecutive logits).
//
// Pass A reads the student's and the teacher's row from memory (their maxima); pass B (the
// exps' sums and the KL's weighted sum), B2 (jsd: the two KLs against the mixture) and C (the
// gradients) read them again. Those re-reads come from L2 while the rows of the resident
// blocks fit it: not measured on a GPU; by arithmetic, float32 rows of 32000 classes (256 KB a
// pair) at 5 resident blocks an SM take an H100's 132 SMs past its 50 MB of L2. The exps are
// evaluated again in each pass instead of being kept (a row does not fit a block's registers
// or shared memory). Every reduction is a fixed-order block reduction (reduce.cuh): no atomics,
// the bits depend on the row only.
//
// A sparse teacher's K classes are a second, strided loop beside the classes' (its max, its
// exps and the KL's sum gather the student's logits at the K indices); the gradient's class
// loop writes every student class with p = 0, and after a barrier the K classes are written
// again whole, as the CPU's scalar fix-ups do. The hard part's target needs no fix-up here:
// the class loop is scalar, so it writes the target's element whole.
#pragma once

#include "../common/distill.h"
#include "device.cuh"
#include "launch.h"
#include "reduce.cuh"

namespace fusedloss {
namespace cuda {

using common::DistillOptions;
using common::DistillRow;
using common::DistillRowGrad;
using common::DistillSums;
using common::GradPair;

// What a distillation kernel reads: the op's parameters, the call's constants (computed on the
// host: their logs and divisions would otherwise run in every block) and the launch's rows.
template <typename acc_t>
struct DistillArgs {
  DistillParams p;
  DistillOptions<acc_t> o;
  int64_t row_begin;  // the row of block 0
};

// The maxima of a row's student and teacher logits.
template <typename acc_t>
struct DistillMax {
  acc_t s, t;
};

template <typename acc_t>
struct DistillMaxOp {
  FL_DEVICE DistillMax<acc_t> operator()(DistillMax<acc_t> a, DistillMax<acc_t> b) const {
    return {fl_max(a.s, b.s), fl_max(a.t, b.t)};
  }
};

template <typename acc_t>
struct DistillSumsAdd {
  FL_DEVICE DistillSums<acc_t> operator()(DistillSums<acc_t> a, DistillSums<acc_t> b) const {
    return {a.zu + b.zu, a.zv + b.zv, a.zs + b.zs, a.ratio + b.ratio, a.dp + b.dp, a.dq + b.dq};
  }
};

// Passes A, B and B2 of an active row: its statistics into st (every thread gets the same bits)
// and its masked loss. Every thread of the block calls it (it holds the block's barriers).
template <typename S, typename Tt>
FL_DEVICE acc_of<S> distill_row_stats(const DistillArgs<acc_of<S>>& a, const S* x, const Tt* y,
                                      const int64_t* idx, acc_of<S> mask, int64_t target,
                                      acc_of<S> (&st)[kDistillStats]) {
  using acc_t = acc_of<S>;
  const DistillParams& p = a.p;
  const DistillOptions<acc_t>& o = a.o;
  const bool sparse = idx != nullptr;
  const int64_t C = p.classes, K = p.teacher_classes;
  const int64_t tid = threadIdx.x;
  FL_SHARED_ARRAY(DistillMax<acc_t>, red_max, kDistillThreads / kWarp);
  FL_SHARED_ARRAY(DistillSums<acc_t>, red_sums, kDistillThreads / kWarp);
  FL_SHARED_ARRAY(DistillSums<acc_t>, red_jsd, kDistillThreads / kWarp);

  // Pass A: the maxima (a sparse teacher's over its K values).
  DistillMax<acc_t> m{fl_neg_infinity<acc_t>(), fl_neg_infinity<acc_t>()};
  for (int64_t j = tid; j < C; j += kDistillThreads) {
    m.s = fl_max(m.s, to_acc(x[j]));
    if (!sparse) m.t = fl_max(m.t, to_acc(y[j]));
  }
  if (sparse) {
    for (int64_t k = tid; k < K; k += kDistillThreads) m.t = fl_max(m.t, to_acc(y[k]));
  }
  m = block_group_allreduce(m, kDistillThreads, DistillMaxOp<acc_t>(), red_max);
  const acc_t mu = m.s * o.inv_temperature, mv = m.t * o.inv_temperature;

  // Pass B: the exps' sums and the forward/reverse KL's weighted log-ratio sum.
  const bool kl = o.divergence != Divergence::JSD;
  DistillSums<acc_t> sums{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t j = tid; j < C; j += kDistillThreads) {
    const acc_t s = to_acc(x[j]);
    const acc_t u = s * o.inv_temperature - mu;
    const acc_t eu = fl_exp(u);
    sums.zu += eu;
    if (!sparse) {
      const acc_t v = to_acc(y[j]) * o.inv_temperature - mv;
      const acc_t ev = fl_exp(v);
      sums.zv += ev;
      if (kl) sums.ratio += common::distill_ratio_term(o, eu, ev, u, v);
    }
    if (o.separate_hard) sums.zs += fl_exp(s - m.s);
  }
  if (sparse) {
    for (int64_t k = tid; k < K; k += kDistillThreads) {
      const acc_t v = to_acc(y[k]) * o.inv_temperature - mv;
      // an index out of range is never read: it makes the row's loss NaN (the Python layer
      // raises first when asked to check, fusedloss.set_target_validation)
      const int64_t j = idx[k];
      const acc_t u = static_cast<uint64_t>(j) < static_cast<uint64_t>(C)
                          ? to_acc(x[j]) * o.inv_temperature - mu
                          : fl_quiet_nan<acc_t>();
      const acc_t ev = fl_exp(v);
      sums.zv += ev;
      sums.ratio += common::distill_ratio_term(o, acc_t(0), ev, u, v);  // forward_kl: eu unused
    }
  }
  sums = block_group_allreduce(sums, kDistillThreads, DistillSumsAdd<acc_t>(), red_sums);

  // Pass B2 (jsd; dense only): the two KLs against the mixture.
  if (!kl) {
    const acc_t log_zu = fl_log(sums.zu), log_zv = fl_log(sums.zv);
    DistillSums<acc_t> js{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t j = tid; j < C; j += kDistillThreads) {
      const acc_t u = to_acc(x[j]) * o.inv_temperature - mu;
      const acc_t v = to_acc(y[j]) * o.inv_temperature - mv;
      const common::JsdTerms<acc_t> terms =
          common::distill_jsd_terms(o, fl_exp(u), fl_exp(v), u - log_zu, v - log_zv);
      js.dp += terms.dp;
      js.dq += terms.dq;
    }
    js = block_group_allreduce(js, kDistillThreads, DistillSumsAdd<acc_t>(), red_jsd);
    sums.dp = js.dp;
    sums.dq = js.dq;
  }
  const acc_t s_target = o.hard ? to_acc(x[target]) : acc_t(0);
  return common::distill_row_finish(o, sums, mu, mv, m.s, s_target, mask, st);
}

// Forward: each row's loss and statistics, and the gradients where their pointers are set.
// kFromStats (DistillMode::GradFromStats): the gradients only, from the saved statistics times
// grad_loss.
template <typename S, typename Tt, bool kFromStats>
__global__ void __launch_bounds__(kDistillThreads)
    distill_rows_kernel(const DistillArgs<acc_of<S>> a) {
  using acc_t = acc_of<S>;
  const DistillParams& p = a.p;
  const DistillOptions<acc_t>& o = a.o;
  const int64_t r = a.row_begin + static_cast<int64_t>(blockIdx.x);
  const int64_t tid = threadIdx.x;
  const int64_t C = p.classes, K = p.teacher_classes;
  const bool sparse = p.teacher_indices != nullptr;
  const acc_t mask = p.mask != nullptr ? static_cast<const acc_t*>(p.mask)[r] : acc_t(1);
  const int64_t target = p.target != nullptr ? p.target[r] : -1;
  const DistillRow kind = common::distill_row_kind(p, o, mask, target);
  S* gs = p.grad_student != nullptr
              ? static_cast<S*>(p.grad_student) + r * p.grad_student_row_stride
              : nullptr;
  Tt* gt = p.grad_teacher != nullptr
               ? static_cast<Tt*>(p.grad_teacher) + r * p.grad_teacher_row_stride
               : nullptr;
  acc_t* stats = static_cast<acc_t*>(p.row_stats) + r * kDistillStats;

  // The kind depends on the row only: the whole block returns here or none of it does.
  if (kind != DistillRow::Active) {
    const acc_t v = kind == DistillRow::Skipped ? acc_t(0) : fl_quiet_nan<acc_t>();
    if (!kFromStats && tid == 0) {
      static_cast<acc_t*>(p.row_loss)[r] = v;
      for (int i = 0; i < kDistillStats; ++i) stats[i] = v;
    }
    if (gs != nullptr) {
      for (int64_t j = tid; j < C; j += kDistillThreads) gs[j] = from_acc<S>(v);
    }
    if (gt != nullptr) {
      for (int64_t k = tid; k < K; k += kDistillThreads) gt[k] = from_acc<Tt>(v);
    }
    return;
  }

  const S* x = static_cast<const S*>(p.student) + r * p.student_row_stride;
  const Tt* y = static_cast<const Tt*>(p.teacher) + r * p.teacher_row_stride;
  const int64_t* idx = sparse ? p.teacher_indices + r * p.indices_row_stride : nullptr;
  acc_t st[kDistillStats];
  acc_t factor = mask * (p.grad_scale != nullptr ? *static_cast<const acc_t*>(p.grad_scale)
                                                 : acc_t(1));
  if constexpr (kFromStats) {
#pragma unroll
    for (int i = 0; i < kDistillStats; ++i) st[i] = stats[i];
    factor *= static_cast<const acc_t*>(p.grad_loss)[r * p.grad_loss_stride];
  } else {
    const acc_t loss = distill_row_stats(a, x, y, idx, mask, target, st);
    if (tid == 0) {
      static_cast<acc_t*>(p.row_loss)[r] = loss;
#pragma unroll
      for (int i = 0; i < kDistillStats; ++i) stats[i] = st[i];
    }
    if (gs == nullptr && gt == nullptr) return;  // the same for the whole block
  }

  // Pass C: the gradients.
  const DistillRowGrad<acc_t> g =
      common::distill_row_grad(o, factor, st[kDivergence], st[kDivergenceQ],
                               st[kStudentLogSum], st[kTeacherLogSum]);
  // The target's index in this row (a class slice's: maybe none of its classes, and then no
  // class below is the target).
  const int64_t t_index = o.hard ? target - p.class_offset : -1;
  const acc_t mu = st[kStudentMax], mv = st[kTeacherMax];
  const acc_t hard_max = st[kHardMax], log_zs = st[kHardLogSum];
  const bool dense_teacher_grad = gt != nullptr && !sparse;
  if (gs != nullptr || dense_teacher_grad) {
    for (int64_t j = tid; j < C; j += kDistillThreads) {
      const acc_t s = to_acc(x[j]);
      const acc_t v = sparse ? acc_t(0) : to_acc(y[j]) * o.inv_temperature;
      const GradPair<acc_t> e =
          common::distill_grad_at(o, g, s * o.inv_temperature, v, !sparse, mu, mv, s, hard_max,
                                  log_zs, j == t_index);
      if (gs != nullptr) gs[j] = from_acc<S>(e.student);
      if (dense_teacher_grad) gt[j] = from_acc<Tt>(e.teacher);
    }
  }
  if (sparse) {
    // The class loop's stores of the K classes (by other threads) come before their fix-ups.
    __syncthreads();
    for (int64_t k = tid; k < K; k += kDistillThreads) {
      const int64_t j = idx[k];
      if (static_cast<uint64_t>(j) >= static_cast<uint64_t>(C)) {  // never read or written
        if (gt != nullptr) gt[k] = from_acc<Tt>(fl_quiet_nan<acc_t>());
        continue;
      }
      const acc_t s = to_acc(x[j]);
      const GradPair<acc_t> e = common::distill_grad_at(
          o, g, s * o.inv_temperature, to_acc(y[k]) * o.inv_temperature, true, mu, mv, s,
          hard_max, log_zs, j == t_index);
      if (gs != nullptr) gs[j] = from_acc<S>(e.student);
      if (gt != nullptr) gt[k] = from_acc<Tt>(e.teacher);
    }
  }
}

// The launcher of one (student, teacher) storage pair.
template <typename S, typename Tt>
int launch_distill_t(const DistillParams& p, void* stream) {
  using acc_t = acc_of<S>;
  DistillArgs<acc_t> a{p, common::distill_options<acc_t>(p), 0};
  // One block per row; a grid holds at most 2^31 - 1 blocks.
  constexpr int64_t kMaxGrid = 0x7fffffff;
  for (int64_t begin = 0; begin < p.rows; begin += kMaxGrid) {
    a.row_begin = begin;
    const auto blocks = static_cast<unsigned>(p.rows - begin < kMaxGrid ? p.rows - begin : kMaxGrid);
    if (p.mode == DistillMode::GradFromStats) {
      const auto distill_grad_rows = &distill_rows_kernel<S, Tt, true>;
      FL_LAUNCH(distill_grad_rows, dim3(blocks), dim3(kDistillThreads), 0, stream, a);
    } else {
      const auto distill_rows = &distill_rows_kernel<S, Tt, false>;
      FL_LAUNCH(distill_rows, dim3(blocks), dim3(kDistillThreads), 0, stream, a);
    }
    if (int err = FL_LAUNCH_STATUS()) return err;
  }
  return 0;
}

// Every teacher dtype beside one student dtype: the three 16/32-bit ones, or float64 with
// float64 (the op entry checks the pair; -1 for one it let through by mistake).
template <ScalarType kStudent>
int launch_distill_of(const DistillParams& p, void* stream) {
  using S = storage_t<common::Dtype<kStudent>>;
  return common::visit_dtype(p.teacher_dtype, -1, [&](auto teacher) {
    constexpr bool kWide = decltype(teacher)::value == ScalarType::Float64;
    if constexpr (kWide != (kStudent == ScalarType::Float64)) {
      return -1;
    } else {
      return launch_distill_t<S, storage_t<decltype(teacher)>>(p, stream);
    }
  });
}

}  // namespace cuda
}  // namespace fusedloss
