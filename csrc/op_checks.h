// Argument checks and layout helpers shared by the CPU and CUDA op entries. The Python layer
// checks the public arguments first, with the public names; these checks guard the ops
// themselves (called directly, through opcheck, or from another front end).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "common/dtype.h"
#include "common/params.h"

namespace fusedloss {

inline at::ScalarType acc_dtype_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// torch's dtype of a kernel dtype.
inline at::ScalarType torch_dtype_of(ScalarType dtype) {
  return common::visit_dtype(dtype, at::ScalarType::Undefined, [](auto d) {
    return c10::CppTypeToScalarType<
        common::storage_of<decltype(d)::value, c10::Half, c10::BFloat16>>::value;
  });
}

inline ScalarType kernel_dtype_of(const at::Tensor& t, const char* op, const char* arg) {
  for (ScalarType dtype : common::kDtypes) {
    if (torch_dtype_of(dtype) == t.scalar_type()) return dtype;
  }
  TORCH_CHECK_TYPE(false, op, ": ", arg, " must be float16, bfloat16, float32 or float64, got ",
                   t.scalar_type());
}

inline Reduction reduction_of(int64_t r, const char* op) {
  TORCH_CHECK_VALUE(r >= 0 && r <= 2, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                    r);
  return static_cast<Reduction>(r);
}

// A 2-D view whose rows are unit-stride (any row stride), copying only when they are not.
inline at::Tensor unit_stride_rows(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

// The class-weight or mask vector as a contiguous tensor of the accumulation type.
inline c10::optional<at::Tensor> acc_vector(const c10::optional<at::Tensor>& t, int64_t size,
                                            at::ScalarType acc, const at::Device& device,
                                            const char* op, const char* arg, const char* what) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == size, op, ": ", arg, " must have shape (",
                    size, ",) (", what, "), got ", t->sizes());
  TORCH_CHECK(t->device() == device, op, ": ", arg, " is on ", t->device(),
              " but the logits are on ", device);
  TORCH_CHECK_TYPE(t->is_floating_point() || t->scalar_type() == at::kBool, op, ": ", arg,
                   " must be a floating or bool tensor, got ", t->scalar_type());
  return t->to(acc).contiguous();
}

struct SoftmaxCEShape {
  int64_t rows;
  int64_t classes;
  bool prob_target;
};

inline SoftmaxCEShape check_softmax_ce(const at::Tensor& logits, const at::Tensor& target,
                                       const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D (rows, classes), got shape ",
                    logits.sizes());
  kernel_dtype_of(logits, op, "logits");
  const int64_t rows = logits.size(0), classes = logits.size(1);
  TORCH_CHECK_VALUE(classes >= 1, op, ": logits must have at least one class, got shape ",
                    logits.sizes());
  TORCH_CHECK(target.device() == logits.device(), op, ": target is on ", target.device(),
              " but the logits are on ", logits.device());
  if (target.is_floating_point()) {
    TORCH_CHECK_VALUE(target.sizes() == logits.sizes(), op,
                      ": probability targets must have the logits' shape ", logits.sizes(),
                      ", got ", target.sizes());
    return {rows, classes, true};
  }
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op,
                   ": class-index targets must be int64, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == rows, op,
                    ": class-index target must have shape (", rows, ",), got ", target.sizes());
  return {rows, classes, false};
}

// The (rows, cols) operand of the sigmoid cross-entropy as a BroadcastOperand-compatible
// tensor: accumulation dtype, column stride 0 or 1.
inline c10::optional<at::Tensor> broadcast_operand(const c10::optional<at::Tensor>& t, int64_t rows,
                                                   int64_t cols, at::ScalarType acc,
                                                   const at::Device& device, const char* op,
                                                   const char* arg) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == rows && t->size(1) == cols, op, ": ", arg,
                    " must be viewed as (", rows, ", ", cols, "), got ", t->sizes());
  TORCH_CHECK(t->device() == device, op, ": ", arg, " is on ", t->device(),
              " but the input is on ", device);
  at::Tensor v = t->scalar_type() == acc ? *t : t->to(acc);
  if (cols > 1 && v.stride(1) != 0 && v.stride(1) != 1) v = v.contiguous();
  return v;
}

inline BroadcastOperand operand_of(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return {nullptr, 0, 0};
  // Expanded dims already have stride 0; a single column is read at offset 0 either way.
  return {t->data_ptr(), t->stride(0), t->size(1) <= 1 ? 1 : t->stride(1)};
}

// The caller's mean denominators of softmax_ce (a loss split over several calls): two values,
// (weighted denominator, count of valid positions), on the logits' device.
inline at::Tensor check_denominators(const at::Tensor& d, const at::Device& device,
                                     const char* op) {
  TORCH_CHECK_VALUE(d.numel() == 2 && d.is_floating_point(), op,
                    ": denominators must be a floating tensor of 2 values (weighted "
                    "denominator, count of valid positions), got ", d.scalar_type(), " of shape ",
                    d.sizes());
  TORCH_CHECK(d.device() == device, op, ": denominators is on ", d.device(),
              " but the logits are on ", device);
  return d.reshape({2}).contiguous();
}

// softmax_ce_inplace writes the gradient over the logits: only for a reduced loss, and only
// into rows the kernels can stream through.
inline void check_softmax_inplace(const at::Tensor& logits, int64_t reduction) {
  TORCH_CHECK_VALUE(reduction != 0, "fusedloss.softmax_ce_inplace: reduction must be mean or sum");
  TORCH_CHECK_VALUE(logits.dim() == 2 && (logits.size(1) <= 1 || logits.stride(1) == 1),
                    "fusedloss.softmax_ce_inplace: logits must be 2-D with unit-stride rows, got "
                    "shape ", logits.sizes(), " and strides ", logits.strides());
}

inline void check_sigmoid_ce(const at::Tensor& input, const at::Tensor& target, const char* op) {
  TORCH_CHECK_VALUE(input.dim() == 2, op, ": input must be 2-D (rows, cols), got shape ",
                    input.sizes());
  kernel_dtype_of(input, op, "input");
  TORCH_CHECK_VALUE(target.sizes() == input.sizes(), op, ": target must have the input's shape ",
                    input.sizes(), ", got ", target.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == input.scalar_type() ||
                       target.scalar_type() == acc_dtype_of(input.scalar_type()),
                   op, ": target must have the input's dtype ", input.scalar_type(),
                   " or the accumulation dtype ", acc_dtype_of(input.scalar_type()), ", got ",
                   target.scalar_type());
  TORCH_CHECK(target.device() == input.device(), op, ": target is on ", target.device(),
              " but the input is on ", input.device());
}

// Which classes the logits hold: all of them, or a contiguous slice of a vocab-parallel row
// (params.h). `global_classes` 0 in an op's arguments means "not sharded".
struct ClassSlice {
  int64_t offset = 0;
  int64_t global_classes = 0;  // 0: the logits' own classes
  bool sharded() const { return global_classes != 0; }
};

inline ClassSlice check_class_slice(int64_t class_offset, int64_t global_classes,
                                    int64_t classes, const char* op) {
  if (global_classes == 0 && class_offset == 0) return {};
  TORCH_CHECK_VALUE(global_classes > 0 && class_offset >= 0 &&
                        class_offset <= global_classes - classes,
                    op, ": the logits' ", classes, " classes at class_offset=", class_offset,
                    " must lie inside global_classes=", global_classes);
  return {class_offset, global_classes};
}

// The tensors of a softmax cross-entropy call as every backend's kernels take them: checked,
// rows unit-stride, probability targets in the logits' dtype, class indices contiguous, weight
// and mask contiguous vectors of the accumulation type. (The CPU entry adds its target check
// and host-side sums; the CUDA entry stages them for the device and sums on it.)
struct SoftmaxTensors {
  SoftmaxCEShape shape;
  at::Tensor logits, target;
  c10::optional<at::Tensor> weight, mask;  // weight: every class's, also when sharded
  at::ScalarType acc;
  Reduction reduction;
  ClassSlice slice;
  int64_t global_classes() const { return slice.sharded() ? slice.global_classes : shape.classes; }
};

inline SoftmaxTensors softmax_tensors(const at::Tensor& logits, const at::Tensor& target,
                                      const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& mask, int64_t reduction,
                                      const char* op, int64_t class_offset = 0,
                                      int64_t global_classes = 0) {
  SoftmaxTensors c;
  c.shape = check_softmax_ce(logits, target, op);
  c.slice = check_class_slice(class_offset, global_classes, c.shape.classes, op);
  c.reduction = reduction_of(reduction, op);
  c.acc = acc_dtype_of(logits.scalar_type());
  c.logits = unit_stride_rows(logits);
  // A probability target in the accumulation dtype (float32 beside 16-bit logits) is read as
  // it is: rounding it to the logits' dtype would change the loss.
  c.target = c.shape.prob_target
                 ? unit_stride_rows(target.scalar_type() == c.acc ? target
                                                                 : target.to(logits.scalar_type()))
                 : target.contiguous();
  c.weight = acc_vector(weight, c.global_classes(), c.acc, logits.device(), op, "weight",
                        "one weight per class");
  c.mask = acc_vector(mask, c.shape.rows, c.acc, logits.device(), op, "mask", "one value per row");
  return c;
}

// The whole rows' Q = sum_c w_c q_c that a class slice's gradient of probability targets needs
// (params.h): required exactly then, (rows,) in the accumulation dtype; undefined otherwise.
inline at::Tensor check_row_target_mass(const SoftmaxTensors& c,
                                        const c10::optional<at::Tensor>& row_target_mass,
                                        const char* op) {
  const bool needed = c.slice.sharded() && c.shape.prob_target;
  const bool given = row_target_mass.has_value() && row_target_mass->defined();
  TORCH_CHECK_VALUE(needed == given, op, ": row_target_mass is ",
                    needed ? "required for probability targets of a class slice"
                           : "only for probability targets of a class slice");
  if (!needed) return at::Tensor();
  TORCH_CHECK_VALUE(row_target_mass->dim() == 1 && row_target_mass->size(0) == c.shape.rows, op,
                    ": row_target_mass must have shape (", c.shape.rows, ",), got ",
                    row_target_mass->sizes());
  TORCH_CHECK(row_target_mass->device() == c.logits.device(), op, ": row_target_mass is on ",
              row_target_mass->device(), " but the logits are on ", c.logits.device());
  return row_target_mass->to(c.acc).contiguous();
}

// softmax_ce_shard_stats: the logits are a slice of rows of global_classes classes.
inline void check_global_classes(int64_t global_classes) {
  TORCH_CHECK_VALUE(global_classes > 0, "fusedloss.softmax_ce_shard_stats: global_classes must be "
                    "positive, got ", global_classes);
}

// softmax_ce_backward's saved statistics: (max, log_sum) of each row.
inline void check_row_stats(const at::Tensor& row_stats, int64_t rows, const char* op) {
  TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == rows && row_stats.size(1) == 2,
                    op, ": row_stats must have shape (", rows, ", 2), got ", row_stats.sizes());
}

// softmax_ce_backward's incoming gradient in the accumulation dtype: (rows,) for reduction none,
// else the reduced loss's one value as (1,).
inline at::Tensor softmax_grad_loss(const at::Tensor& grad_loss, const SoftmaxTensors& c,
                                    const char* op) {
  if (c.reduction == Reduction::None) {
    TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == c.shape.rows, op,
                      ": grad_loss must have shape (", c.shape.rows, ",), got ", grad_loss.sizes());
    return grad_loss.to(c.acc).contiguous();
  }
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, op,
                    ": grad_loss of a reduced loss must have one element, got ", grad_loss.sizes());
  return grad_loss.to(c.acc).reshape({1}).contiguous();
}

// The kernel parameters every softmax call shares (outputs and mode are the caller's).
inline SoftmaxCEParams softmax_params_of(const SoftmaxTensors& c, int64_t ignore_index,
                                         double label_smoothing, double z_loss, double softcap,
                                         double weight_sum, const char* op) {
  SoftmaxCEParams p{};
  p.logits = c.logits.data_ptr();
  p.logits_row_stride = c.logits.stride(0);
  if (c.shape.prob_target) {
    p.target = nullptr;
    p.target_probs = c.target.data_ptr();
    p.target_in_acc = c.target.scalar_type() != c.logits.scalar_type();
    p.target_row_stride = c.target.stride(0);
  } else {
    p.target = c.target.data_ptr<int64_t>();
  }
  p.class_weight = c.weight.has_value() ? c.weight->data_ptr() : nullptr;
  p.mask = c.mask.has_value() ? c.mask->data_ptr() : nullptr;
  p.rows = c.shape.rows;
  p.classes = c.shape.classes;
  p.class_offset = c.slice.offset;
  p.global_classes = c.global_classes();
  p.weight_sum = weight_sum;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.z_loss = z_loss;
  p.softcap = softcap;
  p.dtype = kernel_dtype_of(c.logits, op, "logits");
  return p;
}

// token_scaling (params.h) scales a row by its target's probability: class-index targets of
// whole rows only.
inline void check_token_scaling(const SoftmaxTensors& c, bool token_scaling, const char* op) {
  if (!token_scaling) return;
  TORCH_CHECK_VALUE(!c.shape.prob_target, op,
                    ": token_scaling needs class-index targets, got probability targets");
  TORCH_CHECK_VALUE(!c.slice.sharded(), op,
                    ": token_scaling is not supported on a class slice (vocab-parallel logits)");
}

// The same for the sigmoid cross-entropy over a (rows, cols) view.
struct SigmoidTensors {
  at::Tensor input, target;
  c10::optional<at::Tensor> weight, pos_weight, mask;
  at::ScalarType acc;
  Reduction reduction;
};

inline SigmoidTensors sigmoid_tensors(const at::Tensor& input, const at::Tensor& target,
                                      const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& pos_weight,
                                      const c10::optional<at::Tensor>& mask, int64_t reduction,
                                      const char* op) {
  check_sigmoid_ce(input, target, op);
  SigmoidTensors c;
  c.reduction = reduction_of(reduction, op);
  c.acc = acc_dtype_of(input.scalar_type());
  c.input = unit_stride_rows(input);
  c.target = unit_stride_rows(target);
  const int64_t R = input.size(0), C = input.size(1);
  c.weight = broadcast_operand(weight, R, C, c.acc, input.device(), op, "weight");
  c.pos_weight = broadcast_operand(pos_weight, R, C, c.acc, input.device(), op, "pos_weight");
  c.mask = broadcast_operand(mask, R, C, c.acc, input.device(), op, "mask");
  return c;
}

inline SigmoidCEParams sigmoid_params_of(const SigmoidTensors& c, double label_smoothing,
                                         const char* op) {
  SigmoidCEParams p{};
  p.input = c.input.data_ptr();
  p.target = c.target.data_ptr();
  p.target_in_acc = c.target.scalar_type() != c.input.scalar_type();
  p.weight = operand_of(c.weight);
  p.pos_weight = operand_of(c.pos_weight);
  p.mask = operand_of(c.mask);
  p.rows = c.input.size(0);
  p.cols = c.input.size(1);
  p.input_row_stride = c.input.stride(0);
  p.target_row_stride = c.target.stride(0);
  p.label_smoothing = label_smoothing;
  p.dtype = kernel_dtype_of(c.input, op, "input");
  return p;
}

// sigmoid_ce_backward's incoming gradient: the input's shape for reduction none, else one value.
inline void check_sigmoid_grad_loss(const at::Tensor& grad_loss, const SigmoidTensors& c,
                                    const char* op) {
  if (c.reduction == Reduction::None) {
    TORCH_CHECK_VALUE(grad_loss.sizes() == c.input.sizes(), op,
                      ": grad_loss must have the input's shape ", c.input.sizes(), ", got ",
                      grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, op,
                      ": grad_loss of a reduced loss must have one element, got ",
                      grad_loss.sizes());
  }
}

// scale_grad_'s factor.
inline void check_grad_scale(const at::Tensor& scale) {
  TORCH_CHECK_VALUE(scale.numel() == 1, "fusedloss.scale_grad_: scale must have one element, got ",
                    scale.sizes());
}

// Elements per chunk of the sigmoid cross-entropy's flat index: fixed, so that the chunked
// loss sum does not depend on the thread count.
constexpr int64_t kSigmoidChunkElems = 16384;

}  // namespace fusedloss
