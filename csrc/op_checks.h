// Argument checks and layout helpers shared by the CPU and CUDA op entries. The Python layer
// checks the public arguments first, with the public names; these checks guard the ops
// themselves (called directly, through opcheck, or from another front end).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "common/params.h"

namespace fusedloss {

inline at::ScalarType acc_dtype_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline ScalarType kernel_dtype_of(const at::Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kHalf: return ScalarType::Float16;
    case at::kBFloat16: return ScalarType::BFloat16;
    case at::kFloat: return ScalarType::Float32;
    case at::kDouble: return ScalarType::Float64;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", arg, " must be float16, bfloat16, float32 or float64, got ",
                       t.scalar_type());
  }
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

inline void check_sigmoid_ce(const at::Tensor& input, const at::Tensor& target, const char* op) {
  TORCH_CHECK_VALUE(input.dim() == 2, op, ": input must be 2-D (rows, cols), got shape ",
                    input.sizes());
  kernel_dtype_of(input, op, "input");
  TORCH_CHECK_VALUE(target.sizes() == input.sizes(), op, ": target must have the input's shape ",
                    input.sizes(), ", got ", target.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == input.scalar_type(), op,
                   ": target must have the input's dtype ", input.scalar_type(), ", got ",
                   target.scalar_type());
  TORCH_CHECK(target.device() == input.device(), op, ": target is on ", target.device(),
              " but the input is on ", input.device());
}

// Elements per chunk of the sigmoid cross-entropy's flat index: fixed, so that the chunked
// loss sum does not depend on the thread count.
constexpr int64_t kSigmoidChunkElems = 16384;

}  // namespace fusedloss
