// The op entries of the CUDA kernels: argument checks, layouts, allocation, parameter structs,
// the launch and its check. Written once, over a Platform that says how tensors reach a kernel:
//  - ops_cuda.cpp:        the GPU (device guard, current stream, launch check);
//  - tests/simt/ops_simt.cpp: the SIMT harness, which runs the very same launchers on the CPU
//    with every buffer copied into guard-paged memory.
// Semantics are those of csrc/cpu/ops_cpu.cpp; the differences are all device-side: no host
// synchronisation (the weight sum, the mean's denominators, the reduced loss and the extra
// outputs are computed by kernels), and a bad class-index target makes its row NaN instead of
// raising (the Python layer validates eagerly when asked to).
//
// A Platform provides:
//   Guard(tensor)                RAII: make the tensor's device current
//   stream(tensor) -> void*      the stream to launch on
//   device_info(tensor)          DeviceInfo of the tensor's device
//   stage(tensor) -> tensor      the tensor as a kernel may read it
//   empty(sizes, options)        a buffer a kernel writes
//   writeback(dst, staged)       after a kernel wrote `staged` (from stage(dst)): make dst hold it
//   check(err, op)               raise if a launch failed
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <limits>
#include <tuple>

#include "../distill_entry.h"
#include "../op_outputs.h"
#include "launch.h"

namespace fusedloss {
namespace cuda {

template <class P>
struct Ops {
  static constexpr const char* kSoftmaxOp = "fusedloss.softmax_ce";
  static constexpr const char* kSigmoidOp = "fusedloss.sigmoid_ce";

  static c10::optional<at::Tensor> stage(const c10::optional<at::Tensor>& t) {
    if (!t.has_value()) return c10::nullopt;
    return P::stage(*t);
  }

  using SoftmaxCall = SoftmaxTensors;

  // The shared preparation (op_checks.h), then every tensor a kernel reads staged for it.
  static SoftmaxCall prepare_softmax(const at::Tensor& logits_in, const at::Tensor& target_in,
                                     const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& mask, int64_t reduction,
                                     bool stage_logits = true, int64_t class_offset = 0,
                                     int64_t global_classes = 0) {
    SoftmaxCall c = softmax_tensors(logits_in, target_in, weight, mask, reduction, kSoftmaxOp,
                                    class_offset, global_classes);
    // Indices inside a row are 32-bit in the kernels (rows are offset in 64-bit).
    TORCH_CHECK_VALUE(c.shape.classes <= std::numeric_limits<int32_t>::max() - 64, kSoftmaxOp,
                      ": at most 2^31 - 65 classes are supported on CUDA, got ", c.shape.classes);
    if (stage_logits) c.logits = P::stage(c.logits);
    c.target = P::stage(c.target);
    c.weight = stage(c.weight);
    c.mask = stage(c.mask);
    return c;
  }

  // The sum of the class weights is computed on the device when it matters (launch.h); without
  // weights it is the classes' count (of the whole row; a slice's loss sets its own).
  static SoftmaxCEParams softmax_params(const SoftmaxCall& c, int64_t ignore_index,
                                        double label_smoothing, double z_loss, double softcap) {
    return softmax_params_of(c, ignore_index, label_smoothing, z_loss, softcap,
                             static_cast<double>(c.global_classes()), kSoftmaxOp);
  }

  // Runs a softmax launch with its workspace; `loss_out` receives the reduced loss.
  static void run_softmax(const SoftmaxCEParams& p, SoftmaxCEExtras x, const at::Tensor& like) {
    const DeviceInfo d = P::device_info(like);
    const SoftmaxCEPlan plan = plan_softmax_ce(p, x, d);
    at::Tensor ws = P::empty({plan.workspace_bytes}, like.options().dtype(at::kByte));
    x.workspace = ws.data_ptr();
    const int err = common::visit_dtype(p.dtype, -1, [&](auto dtype) {
      return launch_softmax_ce_of<decltype(dtype)::value>(p, x, d, P::stream(like));
    });
    P::check(err, kSoftmaxOp);
  }

  // The caller's mean denominators, in the accumulation dtype on the kernels' side, or none.
  static at::Tensor stage_denominators(const c10::optional<at::Tensor>& d, const SoftmaxCall& c,
                                       const at::Tensor& logits) {
    if (!d.has_value()) return at::Tensor();
    return P::stage(check_denominators(*d, logits.device(), kSoftmaxOp).to(c.acc).contiguous());
  }

  static const void* data_or_null(const at::Tensor& t) {
    return t.defined() ? t.data_ptr() : nullptr;
  }

  // The forward kernel (softmax_ce's schema): the loss in the accumulation dtype (per row for
  // none, else reduced on the device), the row statistics and the extra outputs (none: (2,
  // rows), each row's z-loss part and correct; else (2,), the loss's z-loss part and the token
  // accuracy), and the gradient into `grad` (rows with stride grad_row_stride) unless null.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_softmax_forward(
      const SoftmaxCall& c, SoftmaxCEParams p, void* grad, int64_t grad_row_stride,
      double mean_eps, bool want_accuracy, bool want_argmax, const at::Tensor& denominators,
      const at::Tensor& like) {
    const auto acc_opts = like.options().dtype(c.acc);
    const int64_t rows = c.shape.rows;
    const bool per_row = c.reduction == Reduction::None;
    const SoftmaxRowBuffers row = softmax_row_buffers(rows, acc_opts, P::empty, want_argmax);
    at::Tensor loss, extras;
    if (!per_row) {
      loss = P::empty({}, acc_opts);
      extras = P::empty({2}, acc_opts);
    }
    set_softmax_forward_outputs(p, c, grad, grad_row_stride, row, want_accuracy);
    if (rows > 0) {
      SoftmaxCEExtras x{};
      x.reduction = c.reduction;
      x.mean_eps = mean_eps;
      x.loss_out = per_row ? nullptr : loss.data_ptr();
      x.extras_out = per_row ? nullptr : extras.data_ptr();
      x.denominators = data_or_null(denominators);
      x.grad_loss_stride = 1;
      run_softmax(p, x, like);
    } else if (!per_row) {
      loss.zero_();
      extras.zero_();
    }
    if (per_row) {
      return {p.row_z_loss != nullptr ? row.loss.add(row.extras[0]) : row.loss, row.stats,
              row.extras, row.argmax};
    }
    return {loss, row.stats, extras, row.argmax};
  }

  // The kernel parameters of a forward: softmax_params with token_scaling, checked.
  static SoftmaxCEParams forward_params(const SoftmaxCall& c, int64_t ignore_index,
                                        double label_smoothing, double z_loss, double softcap,
                                        bool token_scaling) {
    check_token_scaling(c, token_scaling, kSoftmaxOp);
    SoftmaxCEParams p = softmax_params(c, ignore_index, label_smoothing, z_loss, softcap);
    p.token_scaling = token_scaling;
    return p;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_ce(
      const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
      const c10::optional<at::Tensor>& mask, int64_t ignore_index, double label_smoothing,
      double z_loss, double softcap, int64_t reduction, double mean_eps, bool compute_grad,
      bool want_accuracy, const c10::optional<at::Tensor>& denominators, bool token_scaling,
      bool want_argmax) {
    typename P::Guard guard(logits);
    const SoftmaxCall c = prepare_softmax(logits, target, weight, mask, reduction);
    const SoftmaxCEParams p =
        forward_params(c, ignore_index, label_smoothing, z_loss, softcap, token_scaling);
    const at::Tensor dens = stage_denominators(denominators, c, logits);
    at::Tensor grad =
        gradient_or_empty(compute_grad, {c.shape.rows, c.shape.classes}, logits.options(), P::empty);
    auto [loss, row_stats, extras, argmax] = run_softmax_forward(
        c, p, compute_grad ? grad.data_ptr() : nullptr, c.shape.classes, mean_eps, want_accuracy,
        want_argmax, dens, c.logits);
    return {loss, row_stats, grad, extras, argmax};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_ce_inplace(
      at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
      const c10::optional<at::Tensor>& mask, int64_t ignore_index, double label_smoothing,
      double z_loss, double softcap, int64_t reduction, double mean_eps, bool want_accuracy,
      const c10::optional<at::Tensor>& denominators, bool token_scaling, bool want_argmax) {
    check_softmax_inplace(logits, reduction);
    typename P::Guard guard(logits);
    SoftmaxCall c = prepare_softmax(logits, target, weight, mask, reduction, false);
    const at::Tensor dens = stage_denominators(denominators, c, logits);
    at::Tensor staged = P::stage(logits);  // read as logits, written as the gradient
    c.logits = staged;
    auto out = run_softmax_forward(
        c, forward_params(c, ignore_index, label_smoothing, z_loss, softcap, token_scaling),
        staged.data_ptr(), staged.stride(0), mean_eps, want_accuracy, want_argmax, dens, staged);
    if (c.shape.rows > 0) P::writeback(logits, staged);
    return out;
  }

  // A class slice's part of each row (csrc/fusedloss.cpp, params.h).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_ce_shard_stats(
      const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
      const c10::optional<at::Tensor>& mask, int64_t ignore_index, double label_smoothing,
      double softcap, int64_t class_offset, int64_t global_classes, bool want_accuracy) {
    check_global_classes(global_classes);
    typename P::Guard guard(logits);
    const SoftmaxCall c = prepare_softmax(logits, target, weight, mask, /*reduction=*/0, true,
                                          class_offset, global_classes);
    const int64_t rows = c.shape.rows;
    const SoftmaxRowBuffers row =
        softmax_row_buffers(rows, c.logits.options().dtype(c.acc), P::empty);
    SoftmaxCEParams p = softmax_params(c, ignore_index, label_smoothing, 0.0, softcap);
    p.weight_sum = static_cast<double>(c.shape.classes);  // the slice's (weights: on the device)
    set_shard_stats_outputs(p, c, row, want_accuracy);
    if (rows > 0) {
      SoftmaxCEExtras x{};
      x.reduction = Reduction::None;
      x.grad_loss_stride = 1;
      run_softmax(p, x, c.logits);
    }
    return {row.loss, row.stats, row.extras};
  }

  static at::Tensor softmax_ce_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                        const at::Tensor& target,
                                        const c10::optional<at::Tensor>& weight,
                                        const c10::optional<at::Tensor>& mask,
                                        const at::Tensor& row_stats, int64_t ignore_index,
                                        double label_smoothing, double z_loss, double softcap,
                                        int64_t reduction, double mean_eps,
                                        const c10::optional<at::Tensor>& denominators,
                                        int64_t class_offset, int64_t global_classes,
                                        const c10::optional<at::Tensor>& row_target_mass,
                                        bool token_scaling) {
    typename P::Guard guard(logits);
    const SoftmaxCall c = prepare_softmax(logits, target, weight, mask, reduction, true,
                                          class_offset, global_classes);
    check_token_scaling(c, token_scaling, kSoftmaxOp);
    const at::Tensor dens = stage_denominators(denominators, c, logits);
    const at::Tensor target_mass = check_row_target_mass(c, row_target_mass, kSoftmaxOp);
    const at::Tensor staged_mass = target_mass.defined() ? P::stage(target_mass) : target_mass;
    check_row_stats(row_stats, c.shape.rows, kSoftmaxOp);
    TORCH_CHECK(grad_loss.device() == logits.device() && row_stats.device() == logits.device(),
                kSoftmaxOp, ": grad_loss and row_stats must be on the logits' device ",
                logits.device());
    const at::Tensor go = P::stage(softmax_grad_loss(grad_loss, c, kSoftmaxOp));
    // a reduced loss: one value for every row, times the mean's scales (computed on the device)
    const int64_t go_stride = c.reduction == Reduction::None ? 1 : 0;
    const at::Tensor stats = P::stage(row_stats.to(c.acc).contiguous());
    at::Tensor grad = P::empty({c.shape.rows, c.shape.classes}, logits.options());
    SoftmaxCEParams p = softmax_params(c, ignore_index, label_smoothing, z_loss, softcap);
    p.token_scaling = token_scaling;
    set_softmax_backward_outputs(p, grad, go, stats, staged_mass);
    if (c.shape.rows > 0) {
      SoftmaxCEExtras x{};
      x.reduction = c.reduction;
      x.mean_eps = mean_eps;
      x.denominators = data_or_null(dens);
      x.grad_loss_stride = go_stride;
      run_softmax(p, x, c.logits);
    }
    return grad;
  }

  using SigmoidCall = SigmoidTensors;

  static SigmoidCall prepare_sigmoid(const at::Tensor& input, const at::Tensor& target,
                                     const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& pos_weight,
                                     const c10::optional<at::Tensor>& mask, int64_t reduction) {
    SigmoidCall c = sigmoid_tensors(input, target, weight, pos_weight, mask, reduction, kSigmoidOp);
    c.input = P::stage(c.input);
    c.target = P::stage(c.target);
    c.weight = stage(c.weight);
    c.pos_weight = stage(c.pos_weight);
    c.mask = stage(c.mask);
    return c;
  }

  static SigmoidCEParams sigmoid_params(const SigmoidCall& c, double label_smoothing) {
    return sigmoid_params_of(c, label_smoothing, kSigmoidOp);
  }

  static void run_sigmoid(const SigmoidCEParams& p, SigmoidCEExtras x, const at::Tensor& like) {
    const SigmoidCEPlan plan = plan_sigmoid_ce(p, x);
    at::Tensor ws = P::empty({plan.workspace_bytes}, like.options().dtype(at::kByte));
    x.workspace = ws.data_ptr();
    P::check(launch_sigmoid_ce(p, x, P::stream(like)), kSigmoidOp);
  }

  static std::tuple<at::Tensor, at::Tensor> sigmoid_ce(
      const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
      const c10::optional<at::Tensor>& pos_weight, const c10::optional<at::Tensor>& mask,
      double label_smoothing, int64_t reduction, bool compute_grad) {
    typename P::Guard guard(input);
    const SigmoidCall c = prepare_sigmoid(input, target, weight, pos_weight, mask, reduction);
    const bool per_element = c.reduction == Reduction::None;
    at::Tensor grad =
        gradient_or_empty(compute_grad && !per_element, input.sizes(), input.options(), P::empty);
    const auto acc_opts = input.options().dtype(c.acc);
    at::Tensor loss = per_element ? P::empty(input.sizes(), acc_opts) : P::empty({}, acc_opts);
    SigmoidCEParams p = sigmoid_params(c, label_smoothing);
    p.loss = per_element ? loss.data_ptr() : nullptr;
    p.grad = grad.numel() ? grad.data_ptr() : nullptr;
    p.mode = sigmoid_forward_mode(per_element, grad.numel() != 0);
    if (input.numel() > 0) {
      run_sigmoid(p, {c.reduction, per_element ? nullptr : loss.data_ptr(), nullptr, nullptr}, c.input);
    } else if (!per_element) {
      loss.zero_();
    }
    return {loss, grad};
  }

  static at::Tensor sigmoid_ce_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                                        const at::Tensor& target,
                                        const c10::optional<at::Tensor>& weight,
                                        const c10::optional<at::Tensor>& pos_weight,
                                        const c10::optional<at::Tensor>& mask,
                                        double label_smoothing, int64_t reduction) {
    typename P::Guard guard(input);
    const SigmoidCall c = prepare_sigmoid(input, target, weight, pos_weight, mask, reduction);
    TORCH_CHECK(grad_loss.device() == input.device(), kSigmoidOp, ": grad_loss is on ",
                grad_loss.device(), " but the input is on ", input.device());
    check_sigmoid_grad_loss(grad_loss, c, kSigmoidOp);
    at::Tensor grad = P::empty(input.sizes(), input.options());
    SigmoidCEParams p = sigmoid_params(c, label_smoothing);
    at::Tensor go, factor;
    if (c.reduction == Reduction::None) {
      // Read as it is when in the accumulation dtype (the loss's): no conversion pass.
      const bool in_acc = grad_loss.scalar_type() == c.acc;
      go = P::stage(unit_stride_rows(in_acc ? grad_loss : grad_loss.to(input.scalar_type())));
      p.grad_loss_in_acc = in_acc && c.acc != input.scalar_type();
      p.grad_loss = go.data_ptr();
      p.grad_loss_row_stride = go.stride(0);
    } else {
      factor = P::stage(grad_loss.to(c.acc).reshape({1}).contiguous());
    }
    p.grad = grad.data_ptr();
    p.mode = SigmoidCEMode::GradFromGradLoss;
    if (input.numel() > 0)
      run_sigmoid(p, {c.reduction, nullptr, factor.defined() ? factor.data_ptr() : nullptr, nullptr},
                  c.input);
    return grad;
  }

  static void scale_grad_(at::Tensor& grad, const at::Tensor& scale) {
    check_grad_scale(scale);
    if (grad.numel() == 0) return;
    typename P::Guard guard(grad);
    const at::ScalarType acc = acc_dtype_of(grad.scalar_type());
    // Read on the device by the kernel: no synchronisation, even when the scale is 1.
    const at::Tensor s = P::stage(scale.to(grad.options().dtype(acc)).reshape({1}).contiguous());
    int64_t rows, cols, row_stride;
    if (grad.is_contiguous()) {
      rows = 1;
      cols = grad.numel();
      row_stride = cols;
    } else if (grad.dim() == 2 && grad.stride(1) == 1) {
      rows = grad.size(0);
      cols = grad.size(1);
      row_stride = grad.stride(0);
    } else {
      grad.mul_(s);
      return;
    }
    at::Tensor staged = P::stage(grad);
    P::check(launch_scale_grad(staged.data_ptr(), kernel_dtype_of(grad, "fusedloss.scale_grad_", "grad"),
                               rows, cols, row_stride, s.data_ptr(), P::stream(grad)),
             "fusedloss.scale_grad_");
    P::writeback(grad, staged);
  }
};

// The backend of the distillation entries (distill_entry.h) over a Platform: its buffers, and
// the launcher of the student's dtype on the platform's stream. Targets and teacher indices
// stay on the device (kChecksValues false): a bad target makes its row NaN in the kernel.
template <class P>
struct DistillBackend {
  static constexpr bool kChecksValues = false;
  using Guard = typename P::Guard;
  static at::Tensor stage(const at::Tensor& t) { return P::stage(t); }
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return P::empty(sizes, options);
  }
  static void launch(const DistillParams& p, const at::Tensor& like) {
    const int err = common::visit_dtype(p.student_dtype, -1, [&](auto student) {
      return launch_distill_of<decltype(student)::value>(p, P::stream(like));
    });
    P::check(err, DistillOps<DistillBackend>::kOp);
  }
  static void writeback(const at::Tensor& dst, const at::Tensor& staged) {
    P::writeback(dst, staged);
  }
};

}  // namespace cuda
}  // namespace fusedloss

// Registers the entries of Ops<P> and the distillation entries over P for one library
// namespace and dispatch key.
#define FUSEDLOSS_REGISTER_CUDA_OPS(ns, key, P)                                   \
  TORCH_LIBRARY_IMPL(ns, key, m) {                                               \
    m.impl("softmax_ce", &::fusedloss::cuda::Ops<P>::softmax_ce);                \
    m.impl("softmax_ce_inplace", &::fusedloss::cuda::Ops<P>::softmax_ce_inplace); \
    m.impl("softmax_ce_backward", &::fusedloss::cuda::Ops<P>::softmax_ce_backward); \
    m.impl("softmax_ce_shard_stats", &::fusedloss::cuda::Ops<P>::softmax_ce_shard_stats); \
    m.impl("sigmoid_ce", &::fusedloss::cuda::Ops<P>::sigmoid_ce);                \
    m.impl("sigmoid_ce_backward", &::fusedloss::cuda::Ops<P>::sigmoid_ce_backward); \
    m.impl("scale_grad_", &::fusedloss::cuda::Ops<P>::scale_grad_);              \
    m.impl("distill",                                                            \
           &::fusedloss::DistillOps<::fusedloss::cuda::DistillBackend<P>>::forward); \
    m.impl("distill_backward",                                                   \
           &::fusedloss::DistillOps<::fusedloss::cuda::DistillBackend<P>>::backward); \
    m.impl("distill_inplace",                                                    \
           &::fusedloss::DistillOps<::fusedloss::cuda::DistillBackend<P>>::inplace); \
  }
