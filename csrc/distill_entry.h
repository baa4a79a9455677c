// The op entries of the distillation kernels (distill, distill_backward), written once over a
// backend B: the CPU (csrc/cpu/ops_cpu.cpp), CUDA (csrc/cuda/ops_cuda.cpp) and the SIMT
// harness (tests/simt/ops_simt.cpp). B provides
//   Guard(tensor)                 RAII: make the tensor's device current
//   stage(tensor) -> tensor       the tensor as a kernel may read it
//   empty(sizes, options)         a buffer a kernel writes
//   launch(params, like)          run the rows kernel on like's device
//   writeback(dst, staged)        after a kernel wrote `staged` (from stage(dst)): make dst
//                                 hold it (distill_inplace)
//   kChecksValues                 whether targets and teacher indices are checked here (the
//                                 CPU: their values are on the host); on a GPU the Python
//                                 layer checks them when asked, and the kernels make a row
//                                 with a bad target NaN
// The mean's denominator is the caller's (fusedloss/_common.py: the mask's sum over the valid
// positions), on the logits' device: no host synchronisation anywhere.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "common/distill.h"
#include "op_checks.h"

namespace fusedloss {

template <class B>
struct DistillOps {
  static constexpr const char* kOp = "fusedloss.distill";

  struct Call {
    at::Tensor student, teacher, indices, target, mask, denominator;
    at::ScalarType acc;
    Reduction reduction;
    int64_t rows, classes, teacher_classes;
  };

  static at::Tensor staged(const at::Tensor& t) { return t.defined() ? B::stage(t) : t; }

  static Call prepare(const at::Tensor& student, const at::Tensor& teacher,
                      const c10::optional<at::Tensor>& indices,
                      const c10::optional<at::Tensor>& target,
                      const c10::optional<at::Tensor>& mask, int64_t divergence,
                      double temperature, double beta, double hard_weight, int64_t reduction,
                      const c10::optional<at::Tensor>& denominator) {
    Call c;
    TORCH_CHECK_VALUE(student.dim() == 2, kOp, ": student logits must be 2-D (rows, classes), got ",
                      student.sizes());
    TORCH_CHECK_VALUE(teacher.dim() == 2 && teacher.size(0) == student.size(0), kOp,
                      ": teacher logits must be 2-D with the student's ", student.size(0),
                      " rows, got ", teacher.sizes());
    TORCH_CHECK(teacher.device() == student.device(), kOp, ": teacher logits are on ",
                teacher.device(), " but the student's are on ", student.device());
    const ScalarType sd = kernel_dtype_of(student, kOp, "student logits");
    const ScalarType td = kernel_dtype_of(teacher, kOp, "teacher logits");
    TORCH_CHECK_TYPE((sd == ScalarType::Float64) == (td == ScalarType::Float64), kOp,
                     ": float64 logits need float64 logits on the other side, got ",
                     student.scalar_type(), " and ", teacher.scalar_type());
    c.acc = acc_dtype_of(student.scalar_type());
    c.reduction = reduction_of(reduction, kOp);
    c.rows = student.size(0);
    c.classes = student.size(1);
    TORCH_CHECK_VALUE(c.classes > 0 || c.rows == 0, kOp, ": the logits have 0 classes");
    TORCH_CHECK_VALUE(divergence >= 0 && divergence <= 2, kOp,
                      ": divergence must be 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got ",
                      divergence);
    TORCH_CHECK_VALUE(temperature > 0, kOp, ": temperature must be > 0, got ", temperature);
    TORCH_CHECK_VALUE(divergence != 2 || (beta > 0 && beta < 1), kOp,
                      ": jsd's beta must be in (0, 1) here (0 and 1 are forward and reverse KL), "
                      "got ", beta);
    TORCH_CHECK_VALUE(hard_weight >= 0 && hard_weight <= 1, kOp,
                      ": hard_weight must be in [0, 1], got ", hard_weight);
    c.student = unit_stride_rows(student);
    c.teacher = unit_stride_rows(teacher);
    if (indices.has_value() && indices->defined()) {
      TORCH_CHECK_VALUE(divergence == 0, kOp, ": a sparse teacher (teacher_indices) is defined "
                        "for forward_kl only");
      TORCH_CHECK_TYPE(indices->scalar_type() == at::kLong, kOp,
                       ": teacher_indices must be int64, got ", indices->scalar_type());
      TORCH_CHECK_VALUE(indices->sizes() == teacher.sizes(), kOp,
                        ": teacher_indices must have the teacher logits' shape ", teacher.sizes(),
                        ", got ", indices->sizes());
      TORCH_CHECK_VALUE(teacher.size(1) > 0 || c.rows == 0, kOp,
                        ": a sparse teacher needs at least one class per row");
      c.indices = indices->contiguous();
    } else {
      TORCH_CHECK_VALUE(teacher.size(1) == c.classes, kOp, ": teacher logits have ",
                        teacher.size(1), " classes, the student's ", c.classes);
    }
    c.teacher_classes = teacher.size(1);
    if (target.has_value() && target->defined()) {
      TORCH_CHECK_TYPE(target->scalar_type() == at::kLong, kOp, ": target must be int64, got ",
                       target->scalar_type());
      TORCH_CHECK_VALUE(target->dim() == 1 && target->size(0) == c.rows, kOp,
                        ": target must have shape (", c.rows, ",), got ", target->sizes());
      c.target = target->contiguous();
    }
    TORCH_CHECK_VALUE(hard_weight == 0 || c.target.defined(), kOp,
                      ": hard_weight > 0 needs a target");
    c.mask = acc_vector(mask, c.rows, c.acc, student.device(), kOp, "mask", "one per row")
                 .value_or(at::Tensor());
    if (c.reduction == Reduction::Mean) {
      TORCH_CHECK_VALUE(denominator.has_value() && denominator->numel() == 1, kOp,
                        ": reduction mean needs the mean's denominator (one value)");
      TORCH_CHECK(denominator->device() == student.device(), kOp, ": denominator is on ",
                  denominator->device(), " but the logits are on ", student.device());
      c.denominator = denominator->reshape({1}).to(c.acc);
    }
    if (B::kChecksValues && c.rows > 0) check_values(c);
    return c;
  }

  // Teacher indices in range and distinct within a row (the CPU: the values are here).
  static void check_values(const Call& c) {
    if (c.indices.defined()) {
      const int64_t* idx = c.indices.template data_ptr<int64_t>();
      for (int64_t r = 0; r < c.rows; ++r) {
        const int64_t* row = idx + r * c.teacher_classes;
        for (int64_t k = 0; k < c.teacher_classes; ++k) {
          TORCH_CHECK_INDEX(row[k] >= 0 && row[k] < c.classes, kOp, ": teacher_indices[", r,
                            ", ", k, "] = ", row[k], " is out of range for ", c.classes,
                            " classes");
        }
        for (int64_t k = 1; k < c.teacher_classes; ++k) {
          for (int64_t l = 0; l < k; ++l) {
            TORCH_CHECK_INDEX(row[k] != row[l], kOp, ": teacher_indices row ", r,
                              " repeats class ", row[k]);
          }
        }
      }
    }
  }

  // Targets in range where the hard part reads them.
  static void check_targets(const Call& c, int64_t ignore_index, double hard_weight) {
    if (!B::kChecksValues || hard_weight == 0 || c.rows == 0) return;
    const int64_t* t = c.target.template data_ptr<int64_t>();
    for (int64_t r = 0; r < c.rows; ++r) {
      TORCH_CHECK_INDEX(t[r] == ignore_index || (t[r] >= 0 && t[r] < c.classes), kOp,
                        ": target[", r, "] = ", t[r], " is out of range for ", c.classes,
                        " classes (ignore_index is ", ignore_index, ")");
    }
  }

  static DistillParams params(const Call& c, int64_t divergence, double temperature,
                              double beta, double hard_weight, int64_t ignore_index,
                              DistillMode mode) {
    DistillParams p{};
    p.student = c.student.data_ptr();
    p.teacher = c.teacher.data_ptr();
    p.teacher_indices = c.indices.defined() ? c.indices.template data_ptr<int64_t>() : nullptr;
    p.target = c.target.defined() ? c.target.template data_ptr<int64_t>() : nullptr;
    p.mask = c.mask.defined() ? c.mask.data_ptr() : nullptr;
    p.rows = c.rows;
    p.classes = c.classes;
    p.teacher_classes = c.teacher_classes;
    p.student_row_stride = c.student.stride(0);
    p.teacher_row_stride = c.teacher.stride(0);
    p.indices_row_stride = c.teacher_classes;
    p.ignore_index = ignore_index;
    p.temperature = temperature;
    p.beta = beta;
    p.hard_weight = hard_weight;
    p.student_dtype = kernel_dtype_of(c.student, kOp, "student logits");
    p.teacher_dtype = kernel_dtype_of(c.teacher, kOp, "teacher logits");
    p.divergence = static_cast<Divergence>(divergence);
    p.mode = mode;
    return p;
  }

  // Stages every input a kernel reads.
  static void stage(Call& c) {
    c.student = staged(c.student);
    c.teacher = staged(c.teacher);
    c.indices = staged(c.indices);
    c.target = staged(c.target);
    c.mask = staged(c.mask);
  }

  // mean: 1 / denominator (0 where it is 0), on the device.
  static at::Tensor mean_scale(const Call& c) {
    const at::Tensor d = c.denominator;
    return at::where(d.ne(0), d.reciprocal(), at::zeros_like(d));
  }

  static at::Tensor gradient(bool want, const at::Tensor& like) {
    return want ? B::empty(like.sizes(), like.options()) : at::empty({0}, like.options());
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& student, const at::Tensor& teacher,
      const c10::optional<at::Tensor>& indices, const c10::optional<at::Tensor>& target,
      const c10::optional<at::Tensor>& mask, int64_t divergence, double temperature,
      double beta, double hard_weight, int64_t ignore_index, int64_t reduction,
      const c10::optional<at::Tensor>& denominator, bool student_grad, bool teacher_grad) {
    typename B::Guard guard(student);
    Call c = prepare(student, teacher, indices, target, mask, divergence, temperature, beta,
                     hard_weight, reduction, denominator);
    check_targets(c, ignore_index, hard_weight);
    stage(c);
    at::Tensor gs = gradient(student_grad, student);
    at::Tensor gt = gradient(teacher_grad, teacher);
    auto [loss, row_stats] = run_forward(c, divergence, temperature, beta, hard_weight,
                                         ignore_index, student, gs, gt, student_grad,
                                         teacher_grad);
    return {loss, row_stats, gs, gt};
  }

  // distill_inplace: the student's gradient (mean/sum) written over the student's logits,
  // which must have unit-stride rows (nothing is copied).
  static std::tuple<at::Tensor, at::Tensor> inplace(
      at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& indices,
      const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask,
      int64_t divergence, double temperature, double beta, double hard_weight,
      int64_t ignore_index, int64_t reduction, const c10::optional<at::Tensor>& denominator) {
    typename B::Guard guard(student);
    TORCH_CHECK_VALUE(reduction != 0, kOp, "_inplace: reduction must be mean or sum");
    TORCH_CHECK_VALUE(student.dim() == 2 && (student.size(1) <= 1 || student.stride(1) == 1),
                      kOp, "_inplace: student logits must be 2-D with unit-stride rows, got "
                      "sizes ", student.sizes(), " strides ", student.strides());
    // A dense teacher: a sparse one's fix-ups read student logits the row has overwritten
    // (the CUDA kernel's, after its class loop).
    TORCH_CHECK_VALUE(!(indices.has_value() && indices->defined()), kOp,
                      "_inplace: a dense teacher only (teacher_indices must be None)");
    Call c = prepare(student, teacher, indices, target, mask, divergence, temperature, beta,
                     hard_weight, reduction, denominator);
    check_targets(c, ignore_index, hard_weight);
    stage(c);
    at::Tensor gt = at::empty({0}, teacher.options());
    auto out = run_forward(c, divergence, temperature, beta, hard_weight, ignore_index,
                           student, c.student, gt, true, false);
    B::writeback(student, c.student);
    return out;
  }

  static std::tuple<at::Tensor, at::Tensor> run_forward(
      const Call& c, int64_t divergence, double temperature, double beta, double hard_weight,
      int64_t ignore_index, const at::Tensor& student, const at::Tensor& gs,
      const at::Tensor& gt, bool student_grad, bool teacher_grad) {
    const auto acc_opts = student.options().dtype(c.acc);
    at::Tensor row_loss = B::empty({c.rows}, acc_opts);
    at::Tensor row_stats = B::empty({c.rows, kDistillStats}, acc_opts);
    at::Tensor scale;
    DistillParams p = params(c, divergence, temperature, beta, hard_weight, ignore_index,
                             DistillMode::Forward);
    if (c.reduction == Reduction::Mean) {
      scale = staged(mean_scale(c).contiguous());
      p.grad_scale = scale.data_ptr();
    }
    p.row_loss = row_loss.data_ptr();
    p.row_stats = row_stats.data_ptr();
    set_gradients(p, gs, gt, student_grad, teacher_grad);
    if (c.rows > 0) B::launch(p, c.student);
    at::Tensor loss;
    if (c.reduction == Reduction::None) {
      loss = row_loss;
    } else {
      loss = row_loss.sum();
      if (c.reduction == Reduction::Mean) {
        const at::Tensor d = c.denominator.reshape({});
        loss = at::where(d.ne(0), loss.div(d), at::zeros_like(loss));
      }
    }
    return {loss, row_stats};
  }

  static void set_gradients(DistillParams& p, const at::Tensor& gs, const at::Tensor& gt,
                            bool student_grad, bool teacher_grad) {
    if (student_grad) {
      p.grad_student = gs.data_ptr();
      p.grad_student_row_stride = gs.stride(0);
    }
    if (teacher_grad) {
      p.grad_teacher = gt.data_ptr();
      p.grad_teacher_row_stride = gt.stride(0);
    }
  }

  static std::tuple<at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
      const c10::optional<at::Tensor>& indices, const c10::optional<at::Tensor>& target,
      const c10::optional<at::Tensor>& mask, const at::Tensor& row_stats, int64_t divergence,
      double temperature, double beta, double hard_weight, int64_t ignore_index,
      int64_t reduction, const c10::optional<at::Tensor>& denominator, bool student_grad,
      bool teacher_grad, int64_t class_offset) {
    typename B::Guard guard(student);
    Call c = prepare(student, teacher, indices, target, mask, divergence, temperature, beta,
                     hard_weight, reduction, denominator);
    TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == c.rows &&
                          row_stats.size(1) == kDistillStats && row_stats.scalar_type() == c.acc,
                      kOp, "_backward: row_stats must be (", c.rows, ", ", int(kDistillStats),
                      ") in ", c.acc, ", got ", row_stats.sizes(), " ", row_stats.scalar_type());
    const bool per_row = c.reduction == Reduction::None;
    TORCH_CHECK_VALUE(per_row ? grad_loss.numel() == c.rows : grad_loss.numel() == 1, kOp,
                      "_backward: grad_loss must have ", per_row ? c.rows : 1,
                      " values, got shape ", grad_loss.sizes());
    stage(c);
    const at::Tensor stats = staged(row_stats.contiguous());
    const at::Tensor go = staged(grad_loss.to(c.acc).reshape({-1}).contiguous());
    at::Tensor gs = gradient(student_grad, student);
    at::Tensor gt = gradient(teacher_grad, teacher);
    DistillParams p = params(c, divergence, temperature, beta, hard_weight, ignore_index,
                             DistillMode::GradFromStats);
    at::Tensor scale;
    if (c.reduction == Reduction::Mean) {
      scale = staged(mean_scale(c).contiguous());
      p.grad_scale = scale.data_ptr();
    }
    p.row_stats = const_cast<void*>(stats.data_ptr());
    p.grad_loss = go.data_ptr();
    p.grad_loss_stride = per_row ? 1 : 0;
    TORCH_CHECK_VALUE(class_offset >= 0 && (class_offset == 0 || !c.indices.defined()), kOp,
                      "_backward: class_offset must be >= 0, and 0 for a sparse teacher, got ",
                      class_offset);
    p.class_offset = class_offset;
    set_gradients(p, gs, gt, student_grad, teacher_grad);
    if (c.rows > 0 && (student_grad || teacher_grad)) B::launch(p, c.student);
    return {gs, gt};
  }
};

}  // namespace fusedloss
