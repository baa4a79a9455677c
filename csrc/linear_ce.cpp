// linear_ce / linear_ce_backward: fused linear + softmax cross-entropy, the chunk loop of
// fusedloss/linear.py (its module docstring has the algorithm). One
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
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
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
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor>;

// The kernels of this library's namespace, called through the dispatcher (the signatures are
// csrc/fusedloss.cpp's schemas; the dispatcher checks them on first use).
template <class Signature>
c10::TypedOperatorHandle<Signature> kernel(const char* name) {
  const std::string qualified = std::string(FL_STRINGIFY(FUSEDLOSS_LIBRARY)) + "::" + name;
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified.c_str(), "").typed<Signature>();
}

// The options every chunk's kernel call takes besides the tensors.
struct ChunkOptions {
  int64_t ignore_index;
  double label_smoothing, z_loss, softcap;
  bool want_accuracy, token_scaling, want_argmax;
};

// (loss, row_stats, grad, extras, argmax) of a chunk, no gradient.
Tensor5 softmax_ce(const at::Tensor& logits, const at::Tensor& target, const OptTensor& weight,
                   const OptTensor& mask, const ChunkOptions& o, int64_t reduction,
                   const OptTensor& denominators) {
  static const auto op =
      kernel<Tensor5(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                     int64_t, double, double, double, int64_t, double, bool, bool,
                     const OptTensor&, bool, bool)>("softmax_ce");
  return op.call(logits, target, weight, mask, o.ignore_index, o.label_smoothing, o.z_loss,
                 o.softcap, reduction, /*mean_eps=*/0.0, /*compute_grad=*/false, o.want_accuracy,
                 denominators, o.token_scaling, o.want_argmax);
}

// (loss, row_stats, extras, argmax) of a chunk, its gradient written over the logits.
Tensor4 softmax_ce_inplace(at::Tensor& logits, const at::Tensor& target, const OptTensor& weight,
                           const OptTensor& mask, const ChunkOptions& o, int64_t reduction,
                           const OptTensor& denominators) {
  static const auto op =
      kernel<Tensor4(at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, int64_t,
                     double, double, double, int64_t, double, bool, const OptTensor&, bool,
                     bool)>("softmax_ce_inplace");
  return op.call(logits, target, weight, mask, o.ignore_index, o.label_smoothing, o.z_loss,
                 o.softcap, reduction, /*mean_eps=*/0.0, o.want_accuracy, denominators,
                 o.token_scaling, o.want_argmax);
}

at::Tensor softmax_ce_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                               const at::Tensor& target, const OptTensor& weight,
                               const OptTensor& mask, const at::Tensor& row_stats,
                               const ChunkOptions& o) {
  static const auto op =
      kernel<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                        const OptTensor&, const at::Tensor&, int64_t, double, double, double,
                        int64_t, double, const OptTensor&, int64_t, int64_t, const OptTensor&,
                        bool)>("softmax_ce_backward");
  return op.call(grad_loss, logits, target, weight, mask, row_stats, o.ignore_index,
                 o.label_smoothing, o.z_loss, o.softcap, static_cast<int64_t>(Reduction::None),
                 /*mean_eps=*/0.0, std::nullopt, /*class_offset=*/0, /*global_classes=*/0,
                 std::nullopt, o.token_scaling);
}

// Whether the chunk loop runs as on a GPU: chunks in the operands' own dtype, every row through
// the GEMMs (their shapes are host parameters there, and the live rows' count is a device
// value). Test-only: FUSEDLOSS_TEST_DEVICE_CHUNKS=1 makes a CPU call run it so, so that this
// arithmetic (float16 chunk gradients, padding rows) is tested on a machine without a GPU.
bool device_chunks(const at::Device& device) {
  if (!device.is_cpu()) return true;
  const char* test = std::getenv("FUSEDLOSS_TEST_DEVICE_CHUNKS");
  return test != nullptr && test[0] == '1';
}

// The dtype the chunks' GEMMs and kernel run in (fusedloss/_common.py compute_dtype): 16-bit
// GEMMs are emulated on the CPU and 10-100x slower there, so 16-bit inputs compute in float32.
at::ScalarType compute_dtype(at::ScalarType t, const at::Device& device) {
  if (!device_chunks(device) && (t == at::kHalf || t == at::kBFloat16)) return at::kFloat;
  return t;
}

// A float16 chunk gradient is computed at S times its size, S a power of two: a mean's 1/N
// (or a small per-row grad_loss) would otherwise push its entries below float16's smallest
// subnormal (6e-8) before the GEMMs. S = 2^-e for magnitude = m 2^e, m in [0.5, 1), formed on
// the device (no host read); the float32 accumulators are divided by S at the end, exactly.
at::Tensor inverse_power_of_two(const at::Tensor& magnitude) {
  const at::Tensor exponent = std::get<1>(at::frexp(magnitude.to(at::kDouble)));
  return at::ldexp(at::ones({}, magnitude.options().dtype(at::kDouble)), exponent.neg());
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
// undefined tensor when all do (or on the device path: see the file comment).
at::Tensor live_rows(const at::Tensor& target, const OptTensor& mask, int64_t ignore_index) {
  if (device_chunks(target.device())) return {};
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

  // The chunk's input rows for the weight's GEMM. On the device path padding rows (ignored,
  // or masked out) run through the GEMMs with a zero gradient row, but 0 * NaN is NaN: a NaN
  // or inf in a padding row's input would reach the weight gradient, where PyTorch's is finite.
  // Those rows are zeroed, on the device (no host read). On the CPU they are not in the chunk.
  at::Tensor rows_for_weight(const at::Tensor& xk, int64_t k) const {
    if (live.defined() || !device_chunks(xk.device())) return xk;
    at::Tensor dead;
    if (!target.is_floating_point()) dead = take(target, k).eq(ignore_index);
    if (mask.has_value()) {
      at::Tensor masked = take(*mask, k).eq(0);
      dead = dead.defined() ? dead.logical_or(masked) : masked;
    }
    return dead.defined() ? xk.masked_fill(dead.unsqueeze(1), 0) : xk;
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

// The dtype of the gradients the op returns: the operands' own, but float32 for float16. The
// caller rounds a float16 gradient once, after grad_output (fusedloss/_handover.py): a mean's
// gradient divided by the row count loses its small entries in float16's range before a loss
// scale of 2^16 could bring them back.
at::ScalarType grad_dtype_of(at::ScalarType t) { return t == at::kHalf ? at::kFloat : t; }

// The gradient accumulators of one call (empty where not asked for).
struct Grads {
  Grads(const at::Tensor& input, const at::Tensor& weight, bool any, bool need_input,
        bool need_weight, bool need_bias) {
    const at::ScalarType acc = acc_dtype_of(input.scalar_type());
    const auto grad_opts = input.options().dtype(grad_dtype_of(input.scalar_type()));
    input_grad = any && need_input ? at::zeros(input.sizes(), grad_opts)
                                   : at::empty({0}, grad_opts);
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
      const at::Tensor x_rows = c.rows_for_weight(xk, k);
      if (chunk_grad.scalar_type() == weight_acc.scalar_type()) {
        weight_acc.addmm_(chunk_grad.t(), x_rows);
      } else if (chunk_grad.is_cuda() && addmm_has_out_dtype.load(std::memory_order_relaxed)) {
        // 16-bit chunks: the GEMM reads 16-bit operands and accumulates into the float32 buffer
        try {
          at::addmm_out(weight_acc, weight_acc, chunk_grad.t(), x_rows, weight_acc.scalar_type());
        } catch (const c10::NotImplementedError&) {
          addmm_has_out_dtype.store(false);  // a torch without it for these dtypes: as below
          accumulate_converted(chunk_grad, x_rows);
        }
      } else {
        // (the CPU has no addmm with a float32 output of 16-bit operands: the operands are
        // converted to float32 first, exactly, for the same arithmetic)
        accumulate_converted(chunk_grad, x_rows);
      }
    }
    if (bias_acc.defined()) bias_acc.add_(chunk_grad.sum(0, false, bias_acc.scalar_type()));
  }

  // (input, weight, bias) gradients, the accumulators in grad_dtype_of(the weight's dtype).
  // Called once the
  // chunk buffer and a converted weight are freed, so that a 16-bit gradient made here never
  // coexists with them (on the CPU that lowers a 16-bit step's peak by the gradient's size).
  // weight_acc += chunk_grad.T @ x_rows with the 16-bit operands converted to float32 first
  // (exact): the arithmetic of a GEMM of 16-bit operands accumulating in float32.
  void accumulate_converted(const at::Tensor& chunk_grad, const at::Tensor& x_rows) {
    weight_acc.addmm_(chunk_grad.t().to(weight_acc.scalar_type()),
                      x_rows.to(weight_acc.scalar_type()));
  }

  // Whether at::addmm_out with a float32 output accepts 16-bit operands on CUDA (every torch
  // from 2.11 has addmm.dtype_out there; a build without it falls back, once, to the above).
  static inline std::atomic<bool> addmm_has_out_dtype{true};

  // The accumulators divided by `scale` (a power of two, for float16 chunks; exact).
  void unscale(const at::Tensor& scale) {
    for (at::Tensor* g : {&input_grad, &weight_acc, &bias_acc}) {
      if (g->defined() && g->numel() > 0) g->mul_(scale);
    }
  }

  Tensor3 finish(const at::Tensor& weight) {
    auto to_weight_dtype = [&](at::Tensor& acc) {
      const auto opts = weight.options().dtype(grad_dtype_of(weight.scalar_type()));
      at::Tensor out = acc.defined() ? acc.to(opts.dtype()) : at::empty({0}, opts);
      acc.reset();
      return out;
    };
    at::Tensor gw = to_weight_dtype(weight_acc);
    at::Tensor gb = to_weight_dtype(bias_acc);
    return {input_grad, gw, gb};
  }

  at::Tensor input_grad, weight_acc, bias_acc;
};

Tensor7 linear_ce(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                  const at::Tensor& target, const OptTensor& class_weight, const OptTensor& mask,
                  int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
                  int64_t reduction, const OptTensor& denominators, int64_t chunk_rows,
                  bool need_input_grad, bool need_weight_grad, bool need_bias_grad,
                  bool need_accuracy, bool token_scaling, bool want_argmax) {
  // The op takes its operands as they are: under torch.autocast the GEMMs below would
  // otherwise be cast (float32 chunks to float16 on the CPU, rounding the chunk gradient).
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
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
  // each row's first argmax; rows no chunk holds (skipped on the CPU) are not read: -1
  at::Tensor argmax = want_argmax ? at::full({rows}, -1, acc_opts.dtype(at::kLong))
                                  : at::empty({0}, acc_opts.dtype(at::kLong));
  const ChunkOptions options{ignore_index, label_smoothing, z_loss,      softcap,
                             need_accuracy, token_scaling,  want_argmax};
  Grads grads(input, weight, any_grad, need_input_grad, need_weight_grad, need_bias_grad);
  // float16 chunks of a mean: the kernel is handed the denominators divided by S (a power of
  // two near the first one: see inverse_power_of_two), so that the chunk gradient, the loss and
  // the extra outputs come out S times their size; all are divided by S after the loop.
  OptTensor chunk_denominators = denominators;
  at::Tensor unscale;
  if (compute_dtype(input.scalar_type(), input.device()) == at::kHalf && any_grad &&
      reduction_of(reduction, kLinearOp) == Reduction::Mean) {
    // den = m 2^e: the kernel divides by m in [0.5, 1) instead, so its outputs are 2^e times
    // their size, and 2^-e undoes that
    unscale = inverse_power_of_two(denominators->select(0, 0));
    chunk_denominators = *denominators * unscale;
  }
  {
    Chunks c(input, weight, bias, target, class_weight, mask, ignore_index, chunk_rows);
    for (int64_t k = 0; k < c.chunks(); ++k) {
      auto [xk, logits] = c.logits(k);
      const at::Tensor t = c.targets(k);
      const OptTensor m = c.take(mask, k);
      at::Tensor loss, row_stats, chunk_extras, chunk_argmax;
      if (per_row) {
        std::tie(loss, row_stats, std::ignore, chunk_extras, chunk_argmax) =
            softmax_ce(logits, t, class_weight, m, options, reduction, std::nullopt);
        c.put(loss_rows, k, loss);
        c.put(extras, k, chunk_extras, /*dim=*/1);
      } else if (!any_grad) {
        std::tie(loss, row_stats, std::ignore, chunk_extras, chunk_argmax) =
            softmax_ce(logits, t, class_weight, m, options, reduction, denominators);
      } else {
        std::tie(loss, row_stats, chunk_extras, chunk_argmax) = softmax_ce_inplace(
            logits, t, class_weight, m, options, reduction, chunk_denominators);
        grads.accumulate(c, k, xk, logits);  // the logits buffer now holds their gradient
      }
      if (!per_row) {
        loss_total.add_(loss);
        extras.add_(chunk_extras);
      }
      c.put(stats, k, row_stats);
      if (want_argmax) c.put(argmax, k, chunk_argmax);
    }
  }  // the chunk buffer and the converted weight are freed here (see Grads::finish)
  if (unscale.defined()) {
    loss_total.mul_(unscale);
    extras.mul_(unscale);
    grads.unscale(unscale);
  }
  auto [gi, gw, gb] = grads.finish(weight);
  return {per_row ? loss_rows : loss_total, stats, gi, gw, gb, extras, argmax};
}

// reduction none: the gradients for a per-row grad_loss, the chunks' logits recomputed.
Tensor3 linear_ce_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                           const at::Tensor& weight, const OptTensor& bias,
                           const at::Tensor& target, const OptTensor& class_weight,
                           const OptTensor& mask, const at::Tensor& row_stats,
                           int64_t ignore_index, double label_smoothing, double z_loss,
                           double softcap, int64_t chunk_rows, bool need_input_grad,
                           bool need_weight_grad, bool need_bias_grad, bool token_scaling) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // as above
  check_operands(input, weight, bias, target, mask, chunk_rows);
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == input.size(0), kLinearOp,
                    "_backward: grad_loss must have shape (", input.size(0), ",), got ",
                    grad_loss.sizes());
  TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == input.size(0) &&
                        row_stats.size(1) == 2,
                    kLinearOp, "_backward: row_stats must have shape (", input.size(0),
                    ", 2), got ", row_stats.sizes());
  Grads grads(input, weight, true, need_input_grad, need_weight_grad, need_bias_grad);
  const ChunkOptions options{ignore_index, label_smoothing, z_loss, softcap,
                             /*want_accuracy=*/false, token_scaling, /*want_argmax=*/false};
  at::Tensor go = grad_loss.to(acc_dtype_of(input.scalar_type()));
  // float16 chunks: grad_loss times S, the accumulators divided by S (inverse_power_of_two)
  at::Tensor unscale;
  if (compute_dtype(input.scalar_type(), input.device()) == at::kHalf && go.numel() > 0) {
    const at::Tensor scale = inverse_power_of_two(go.abs().max());
    go = go * scale.to(go.scalar_type());
    unscale = scale.reciprocal();
  }
  {
    Chunks c(input, weight, bias, target, class_weight, mask, ignore_index, chunk_rows);
    for (int64_t k = 0; k < c.chunks(); ++k) {
      auto [xk, logits] = c.logits(k);
      const at::Tensor chunk_grad =
          softmax_ce_backward(c.take(go, k), logits, c.targets(k), class_weight,
                              c.take(mask, k), c.take(row_stats, k), options);
      grads.accumulate(c, k, xk, chunk_grad);
    }
  }
  if (unscale.defined()) grads.unscale(unscale);
  return grads.finish(weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(FUSEDLOSS_LIBRARY, CompositeExplicitAutograd, m) {
  m.impl("linear_ce", &linear_ce);
  m.impl("linear_ce_backward", &linear_ce_backward);
}

}  // namespace fusedloss
