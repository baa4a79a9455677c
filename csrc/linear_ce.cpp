// linear_ce / linear_ce_backward: fused linear + softmax cross-entropy, the chunk loop of
// fusedloss/linear_cross_entropy.py (its module docstring has the algorithm). One
// implementation for every device, registered as CompositeExplicitAutograd: the GEMMs are
// ATen's (MKL/oneDNN on the CPU, cuBLAS on CUDA, on the caller's stream), and each chunk's
// cross-entropy is this library's own softmax_ce kernel called through the dispatcher, so CPU
// tensors get the CPU kernel, CUDA tensors the CUDA one, and the SIMT harness (this file
// compiled again with FUSEDLOSS_LIBRARY=fusedloss_simt) its emulated CUDA kernels. The
// autograd formula and the fake kernel are registered in Python.
//
// Nothing here reads a device value on the host: on CUDA every chunk runs whatever its rows
// hold (an ignored or masked-out row has a zero row factor, so its loss and gradient are
// exactly 0), because the GEMM shapes are host parameters and skipping rows would need their
// count. On the CPU the live rows are listed first and the dead ones cost no GEMM work.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "op_checks.h"

#ifndef FUSEDLOSS_LIBRARY
#define FUSEDLOSS_LIBRARY fusedloss
#endif
#define FL_STRINGIFY_(x) #x
#define FL_STRINGIFY(x) FL_STRINGIFY_(x)

namespace fusedloss {
namespace {

using OptTensor = std::optional<at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The kernels of this library's namespace, called through the dispatcher (the signatures are
// csrc/fusedloss.cpp's schemas; the dispatcher checks them on first use).
template <class Signature>
c10::TypedOperatorHandle<Signature> kernel(const char* name) {
  const std::string qualified = std::string(FL_STRINGIFY(FUSEDLOSS_LIBRARY)) + "::" + name;
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified.c_str(), "").typed<Signature>();
}

Tensor4 softmax_ce(const at::Tensor& logits, const at::Tensor& target, const OptTensor& weight,
                   const OptTensor& mask, int64_t ignore_index, double label_smoothing,
                   double z_loss, double softcap, int64_t reduction, bool want_accuracy,
                   const OptTensor& denominators) {
  static const auto op =
      kernel<Tensor4(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                     int64_t, double, double, double, int64_t, double, bool, bool,
                     const OptTensor&)>("softmax_ce");
  return op.call(logits, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap,
                 reduction, /*mean_eps=*/0.0, /*compute_grad=*/false, want_accuracy,
                 denominators);
}

Tensor3 softmax_ce_inplace(at::Tensor& logits, const at::Tensor& target, const OptTensor& weight,
                           const OptTensor& mask, int64_t ignore_index, double label_smoothing,
                           double z_loss, double softcap, int64_t reduction, bool want_accuracy,
                           const OptTensor& denominators) {
  static const auto op =
      kernel<Tensor3(at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, int64_t,
                     double, double, double, int64_t, double, bool, const OptTensor&)>(
          "softmax_ce_inplace");
  return op.call(logits, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap,
                 reduction, /*mean_eps=*/0.0, want_accuracy, denominators);
}

at::Tensor softmax_ce_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                               const at::Tensor& target, const OptTensor& weight,
                               const OptTensor& mask, const at::Tensor& row_stats,
                               int64_t ignore_index, double label_smoothing, double z_loss,
                               double softcap) {
  static const auto op =
      kernel<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                        const OptTensor&, const at::Tensor&, int64_t, double, double, double,
                        int64_t, double, const OptTensor&, int64_t, int64_t, const OptTensor&)>(
          "softmax_ce_backward");
  return op.call(grad_loss, logits, target, weight, mask, row_stats, ignore_index,
                 label_smoothing, z_loss, softcap, static_cast<int64_t>(Reduction::None),
                 /*mean_eps=*/0.0, std::nullopt, /*class_offset=*/0, /*global_classes=*/0,
                 std::nullopt);
}

// The dtype the chunks' GEMMs and kernel run in (linear_cross_entropy.compute_dtype): 16-bit
// GEMMs are emulated on the CPU and 10-100x slower there, so 16-bit inputs compute in float32.
at::ScalarType compute_dtype(at::ScalarType t, const at::Device& device) {
  if (device.is_cpu() && (t == at::kHalf || t == at::kBFloat16)) return at::kFloat;
  return t;
}

constexpr const char* kLinearOp = "fusedloss.linear_ce";

// The op's own checks (the Python layer checks the public arguments first, with their public
// names): the shapes the chunk loop slices, so that a direct call with a bad argument gets an
// error naming it, never an out-of-range slice. The kernels check the rest (target values,
// class weights, dtypes of the kernel's operands) per chunk.
void check_operands(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                    const at::Tensor& target, const OptTensor& mask, int64_t chunk_rows) {
  kernel_dtype_of(input, kLinearOp, "input");
  TORCH_CHECK_VALUE(input.dim() == 2, kLinearOp, ": input must be 2-D (rows, in_features), got ",
                    input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == input.size(1) && weight.size(0) > 0,
                    kLinearOp, ": weight must have shape (classes > 0, ", input.size(1),
                    "), got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == input.scalar_type(), kLinearOp,
                   ": weight must have the input's dtype ", input.scalar_type(), ", got ",
                   weight.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), kLinearOp, ": weight is on ", weight.device(),
              " but the input is on ", input.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), kLinearOp,
                      ": bias must have shape (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(), kLinearOp,
                     ": bias must have the input's dtype ", input.scalar_type(), ", got ",
                     bias->scalar_type());
    TORCH_CHECK(bias->device() == input.device(), kLinearOp, ": bias is on ", bias->device(),
                " but the input is on ", input.device());
  }
  const bool prob = target.is_floating_point();
  TORCH_CHECK_VALUE(prob ? (target.dim() == 2 && target.size(0) == input.size(0) &&
                            target.size(1) == weight.size(0))
                         : (target.dim() == 1 && target.size(0) == input.size(0)),
                    kLinearOp, ": target must have shape (", input.size(0), ",) (class indices) or (",
                    input.size(0), ", ", weight.size(0), ") (probabilities), got ", target.sizes());
  TORCH_CHECK(target.device() == input.device(), kLinearOp, ": target is on ", target.device(),
              " but the input is on ", input.device());
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == input.size(0), kLinearOp,
                      ": mask must have shape (", input.size(0), ",), got ", mask->sizes());
    TORCH_CHECK(mask->device() == input.device(), kLinearOp, ": mask is on ", mask->device(),
                " but the input is on ", input.device());
  }
  TORCH_CHECK_VALUE(chunk_rows >= 1, kLinearOp, ": chunk_rows must be >= 1, got ", chunk_rows);
}

// CPU only (the list is built on the host): the indices of the rows that contribute, or an
// undefined tensor when all do (or on another device: see the file comment).
at::Tensor live_rows(const at::Tensor& target, const OptTensor& mask, int64_t ignore_index) {
  if (!target.device().is_cpu()) return {};
  at::Tensor live;
  if (!target.is_floating_point()) live = target.ne(ignore_index);
  if (mask.has_value()) live = live.defined() ? live.logical_and(mask->ne(0)) : mask->ne(0);
  if (!live.defined() || live.all().item<bool>()) return {};
  return live.nonzero().squeeze(1);
}

// The chunk loop's state, shared by the forward and the recomputing backward.
struct Chunks {
  Chunks(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
         const at::Tensor& target_, const OptTensor& class_weight_, const OptTensor& mask_,
         int64_t ignore_index_, int64_t chunk_rows_)
      : x(input),
        target(target_),
        class_weight(class_weight_),
        mask(mask_),
        ignore_index(ignore_index_),
        dtype(compute_dtype(input.scalar_type(), input.device())),
        rows(input.size(0)),
        classes(weight.size(0)) {
    // The weight is converted once (every chunk's GEMMs read all of it); the input and
    // probability targets chunk by chunk (a whole float32 copy of 16-bit data would be extra
    // memory the size of the input, or of the logits).
    w = weight.to(dtype);
    if (bias.has_value()) b = bias->to(dtype);
    live = live_rows(target, mask, ignore_index);
    count = live.defined() ? live.size(0) : rows;
    chunk_rows = std::max<int64_t>(1, chunk_rows_);
    buffer = at::empty({std::min(chunk_rows, std::max<int64_t>(count, 1)), classes},
                       input.options().dtype(dtype));
  }

  int64_t chunks() const { return (count + chunk_rows - 1) / chunk_rows; }
  int64_t start(int64_t k) const { return k * chunk_rows; }
  int64_t size(int64_t k) const { return std::min(count, start(k) + chunk_rows) - start(k); }

  // The chunk's rows of a tensor indexed by row on dim `dim` (a view when no row is skipped).
  at::Tensor take(const at::Tensor& t, int64_t k, int64_t dim = 0) const {
    if (!live.defined()) return t.narrow(dim, start(k), size(k));
    return t.index_select(dim, live.narrow(0, start(k), size(k)));
  }
  OptTensor take(const OptTensor& t, int64_t k) const {
    return t.has_value() ? OptTensor(take(*t, k)) : std::nullopt;
  }

  // Writes a chunk's per-row values back into the whole tensor's rows.
  void put(at::Tensor& whole, int64_t k, const at::Tensor& part, int64_t dim = 0) const {
    if (!live.defined()) {
      whole.narrow(dim, start(k), size(k)).copy_(part);
    } else {
      whole.index_copy_(dim, live.narrow(0, start(k), size(k)), part.to(whole.scalar_type()));
    }
  }

  // The chunk's targets: class indices as they are, probabilities in the compute dtype.
  at::Tensor targets(int64_t k) const {
    at::Tensor t = take(target, k);
    return t.is_floating_point() ? t.to(dtype) : t;
  }

  // (the chunk's input rows in the compute dtype, its logits in the reused buffer)
  std::pair<at::Tensor, at::Tensor> logits(int64_t k) {
    at::Tensor xk = take(x, k).to(dtype);
    at::Tensor out = buffer.narrow(0, 0, size(k));
    if (b.defined()) {
      at::addmm_out(out, b, xk, w.t());
    } else {
      at::mm_out(out, xk, w.t());
    }
    return {xk, out};
  }

  at::Tensor x, target;
  OptTensor class_weight, mask;
  int64_t ignore_index;
  at::ScalarType dtype;
  int64_t rows, classes;
  at::Tensor w, b, live, buffer;
  int64_t count = 0, chunk_rows = 1;
};

// The gradient accumulators of one call (empty where not asked for).
struct Grads {
  Grads(const at::Tensor& input, const at::Tensor& weight, bool any, bool need_input,
        bool need_weight, bool need_bias) {
    const at::ScalarType acc = acc_dtype_of(input.scalar_type());
    input_grad = any && need_input ? at::zeros(input.sizes(), input.options())
                                   : at::empty({0}, input.options());
    // float32 accumulation for 16-bit weights (on the CPU the chunks already are float32)
    if (any && need_weight) weight_acc = at::zeros(weight.sizes(), weight.options().dtype(acc));
    if (any && need_bias) bias_acc = at::zeros({weight.size(0)}, weight.options().dtype(acc));
  }

  // The chunk's share of every gradient, from its logit gradient (already scaled).
  void accumulate(const Chunks& c, int64_t k, const at::Tensor& xk, const at::Tensor& chunk_grad) {
    if (input_grad.numel() > 0) {
      if (!c.live.defined() && c.dtype == input_grad.scalar_type()) {
        at::Tensor rows = input_grad.narrow(0, c.start(k), c.size(k));
        at::mm_out(rows, chunk_grad, c.w);
      } else {
        c.put(input_grad, k, at::mm(chunk_grad, c.w));
      }
    }
    if (weight_acc.defined()) {
      if (chunk_grad.scalar_type() == weight_acc.scalar_type()) {
        weight_acc.addmm_(chunk_grad.t(), xk);
      } else {  // 16-bit chunks on CUDA: the GEMM accumulates into the float32 buffer
        at::addmm_out(weight_acc, weight_acc, chunk_grad.t(), xk, weight_acc.scalar_type());
      }
    }
    if (bias_acc.defined()) bias_acc.add_(chunk_grad.sum(0, false, bias_acc.scalar_type()));
  }

  // (input, weight, bias) gradients, the accumulators in the weight's dtype. Called once the
  // chunk buffer and a converted weight are freed, so that a 16-bit gradient made here never
  // coexists with them (on the CPU that lowers a 16-bit step's peak by the gradient's size).
  Tensor3 finish(const at::Tensor& weight) {
    auto to_weight_dtype = [&](at::Tensor& acc) {
      at::Tensor out = acc.defined() ? acc.to(weight.scalar_type()) : at::empty({0}, weight.options());
      acc.reset();
      return out;
    };
    at::Tensor gw = to_weight_dtype(weight_acc);
    at::Tensor gb = to_weight_dtype(bias_acc);
    return {input_grad, gw, gb};
  }

  at::Tensor input_grad, weight_acc, bias_acc;
};

Tensor6 linear_ce(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                  const at::Tensor& target, const OptTensor& class_weight, const OptTensor& mask,
                  int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
                  int64_t reduction, const OptTensor& denominators, int64_t chunk_rows,
                  bool need_input_grad, bool need_weight_grad, bool need_bias_grad,
                  bool need_accuracy) {
  check_operands(input, weight, bias, target, mask, chunk_rows);
  const int64_t rows = input.size(0);
  const at::ScalarType acc = acc_dtype_of(input.scalar_type());
  const auto acc_opts = input.options().dtype(acc);
  const bool per_row = reduction_of(reduction, kLinearOp) == Reduction::None;
  const bool any_grad = !per_row && (need_input_grad || need_weight_grad || need_bias_grad);
  TORCH_CHECK_VALUE(per_row || (denominators.has_value() && denominators->numel() == 2),
                    kLinearOp, ": mean and sum need the whole loss's two denominators, got ",
                    denominators.has_value() ? denominators->sizes() : at::IntArrayRef{});

  at::Tensor loss_rows = at::zeros({per_row ? rows : 0}, acc_opts);
  at::Tensor loss_total = at::zeros({}, acc_opts);
  at::Tensor stats = at::zeros({rows, 2}, acc_opts);
  // the extra outputs, as softmax_ce's: per row (z-loss part, correct) for none, else the
  // chunks' (z-loss part, accuracy) summed (each chunk divides by the whole loss's count)
  at::Tensor extras = per_row ? at::zeros({2, rows}, acc_opts) : at::zeros({2}, acc_opts);
  Grads grads(input, weight, any_grad, need_input_grad, need_weight_grad, need_bias_grad);
  {
    Chunks c(input, weight, bias, target, class_weight, mask, ignore_index, chunk_rows);
    for (int64_t k = 0; k < c.chunks(); ++k) {
      auto [xk, logits] = c.logits(k);
      const at::Tensor t = c.targets(k);
      const OptTensor m = c.take(mask, k);
      at::Tensor loss, row_stats, chunk_extras;
      if (per_row) {
        std::tie(loss, row_stats, std::ignore, chunk_extras) =
            softmax_ce(logits, t, class_weight, m, ignore_index, label_smoothing, z_loss,
                       softcap, reduction, need_accuracy, std::nullopt);
        c.put(loss_rows, k, loss);
        c.put(extras, k, chunk_extras, /*dim=*/1);
      } else if (!any_grad) {
        std::tie(loss, row_stats, std::ignore, chunk_extras) =
            softmax_ce(logits, t, class_weight, m, ignore_index, label_smoothing, z_loss,
                       softcap, reduction, need_accuracy, denominators);
      } else {
        std::tie(loss, row_stats, chunk_extras) =
            softmax_ce_inplace(logits, t, class_weight, m, ignore_index, label_smoothing, z_loss,
                               softcap, reduction, need_accuracy, denominators);
        grads.accumulate(c, k, xk, logits);  // the logits buffer now holds their gradient
      }
      if (!per_row) {
        loss_total.add_(loss);
        extras.add_(chunk_extras);
      }
      c.put(stats, k, row_stats);
    }
  }  // the chunk buffer and the converted weight are freed here (see Grads::finish)
  auto [gi, gw, gb] = grads.finish(weight);
  return {per_row ? loss_rows : loss_total, stats, gi, gw, gb, extras};
}

// reduction none: the gradients for a per-row grad_loss, the chunks' logits recomputed.
Tensor3 linear_ce_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                           const at::Tensor& weight, const OptTensor& bias,
                           const at::Tensor& target, const OptTensor& class_weight,
                           const OptTensor& mask, const at::Tensor& row_stats,
                           int64_t ignore_index, double label_smoothing, double z_loss,
                           double softcap, int64_t chunk_rows, bool need_input_grad,
                           bool need_weight_grad, bool need_bias_grad) {
  check_operands(input, weight, bias, target, mask, chunk_rows);
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == input.size(0), kLinearOp,
                    "_backward: grad_loss must have shape (", input.size(0), ",), got ",
                    grad_loss.sizes());
  TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == input.size(0) &&
                        row_stats.size(1) == 2,
                    kLinearOp, "_backward: row_stats must have shape (", input.size(0),
                    ", 2), got ", row_stats.sizes());
  Grads grads(input, weight, true, need_input_grad, need_weight_grad, need_bias_grad);
  const at::Tensor go = grad_loss.to(acc_dtype_of(input.scalar_type()));
  {
    Chunks c(input, weight, bias, target, class_weight, mask, ignore_index, chunk_rows);
    for (int64_t k = 0; k < c.chunks(); ++k) {
      auto [xk, logits] = c.logits(k);
      const at::Tensor chunk_grad =
          softmax_ce_backward(c.take(go, k), logits, c.targets(k), class_weight,
                              c.take(mask, k), c.take(row_stats, k), ignore_index,
                              label_smoothing, z_loss, softcap);
      grads.accumulate(c, k, xk, chunk_grad);
    }
  }
  return grads.finish(weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(FUSEDLOSS_LIBRARY, CompositeExplicitAutograd, m) {
  m.impl("linear_ce", &linear_ce);
  m.impl("linear_ce_backward", &linear_ce_backward);
}

}  // namespace fusedloss
