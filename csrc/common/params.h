// Plain parameter structs: the only interface between the op entries (which know tensors)
// and the kernels (which know pointers, sizes and strides). No torch type crosses this line,
// which is what keeps torch headers out of the .cu files.
#pragma once

#include <cstdint>

namespace fusedloss {

enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };

enum class ScalarType : int32_t { Float16 = 0, BFloat16 = 1, Float32 = 2, Float64 = 3 };

// What a softmax cross-entropy kernel call produces.
enum class SoftmaxCEMode : int32_t {
  Loss = 0,         // row losses and row statistics only
  LossAndGrad = 1,  // row losses, row statistics and the gradient pre-scaled by mask and reduction
  GradFromLse = 2,  // gradient only, recomputed from the saved row_stats and a per-row grad_loss
};

// Softmax cross-entropy over `rows` rows of `classes` logits (class dim last).
// acc_t is float for 16/32-bit logits and double for float64 logits; every acc_t pointer
// below points at that type.
struct SoftmaxCEParams {
  const void* logits;           // scalar_t, row r at logits + r * logits_row_stride
  void* grad;                   // scalar_t, rows x classes, row stride grad_row_stride
  const int64_t* target;        // class-index targets (rows), or null for probability targets
  const void* target_probs;     // probability targets, scalar_t (or acc_t when target_in_acc),
                                // row stride target_row_stride
  bool target_in_acc;           // target_probs are acc_t (float32 beside 16-bit logits)
  const void* class_weight;     // acc_t[classes] or null
  const void* mask;             // acc_t[rows] or null
  const void* grad_loss;        // GradFromLse: acc_t[rows], d(total)/d(row loss)
  void* row_loss;               // acc_t[rows]: the masked cross-entropy part of each row's
                                // loss, z-loss excluded, unscaled; may be null in GradFromLse
  void* row_z_loss;             // acc_t[rows]: the masked z-loss part (m z_loss lse^2); may be
                                // null when z_loss is 0 or in GradFromLse
  void* row_correct;            // acc_t[rows] or null: m [argmax_c z_c == target] (the first
                                // maximum, as torch.argmax; class-index targets only)
  void* row_stats;              // acc_t[rows][2]: (max, log_sum) of each row's softmax
                                // (0, 0 for skipped rows); read in GradFromLse
  const void* grad_scale;       // acc_t[2]: the factors of the cross-entropy and z-loss parts
                                // of the gradient: mean 1/denominator and 1/(valid count),
                                // sum 1 and 1; null means 1 and 1
  void* row_target_mass;        // probability targets of a class slice, acc_t[rows] or null:
                                // Loss writes each row's Q = sum_c w_c q_c over the slice
                                // (unmasked), GradFromLse reads the whole row's Q from it
  int64_t* row_argmax;          // int64[rows] or null: each row's first argmax of z (the first
                                // maximum, as torch.argmax; a NaN row's first NaN), -1 for a
                                // skipped row; written by Loss and LossAndGrad
  int64_t rows;
  int64_t classes;              // the classes of the logits given (a slice, when sharded)
  // A class slice (vocab-parallel logits): the logits hold classes [class_offset, class_offset
  // + classes) of rows of global_classes classes. Targets are global class ids, class_weight is
  // the whole (global_classes) vector, smoothing spreads over global_classes. A row's target
  // outside the slice contributes no target term (its w_t still scales the gradient), and the
  // loss, statistics and Q are the slice's (the caller combines them). Unsharded: 0, classes.
  int64_t class_offset;
  int64_t global_classes;
  int64_t logits_row_stride;
  int64_t grad_row_stride;
  int64_t target_row_stride;
  int64_t ignore_index;
  double label_smoothing;
  double z_loss;
  double softcap;               // 0: no softcap
  bool token_scaling;           // class-index targets of whole rows: each row's loss (every
                                // part) and gradient times its p_t = exp(z_t - lse), a constant
                                // of the gradient (Dynamic Fine-Tuning's token scaling)
  double weight_sum;            // sum of class weights (classes when there are none); of the
                                // slice's in a sharded Loss call, of all in GradFromLse
  ScalarType dtype;
  SoftmaxCEMode mode;
};

// An operand of the sigmoid cross-entropy that broadcasts to the (rows, cols) view of the
// input: element (r, c) is at data[r * row_stride + c * col_stride], col_stride 0 or 1.
struct BroadcastOperand {
  const void* data;  // acc_t, or null for "absent" (the neutral value)
  int64_t row_stride;
  int64_t col_stride;
};

enum class SigmoidCEMode : int32_t {
  LossSum = 0,       // partial sums of the loss per chunk (mean/sum), no gradient
  LossSumAndGrad = 1,
  LossElements = 2,  // reduction="none": the loss of every element
  GradFromGradLoss = 3,
};

struct SigmoidCEParams {
  const void* input;   // scalar_t
  const void* target;  // scalar_t (or acc_t when target_in_acc), same (rows, cols) view
  bool target_in_acc;
  BroadcastOperand weight, pos_weight, mask;
  const void* grad_loss;  // GradFromGradLoss: scalar_t (or acc_t when grad_loss_in_acc)
                          // (rows, cols), row stride grad_loss_row_stride; null: every
                          // element's factor is *grad_scale
  bool grad_loss_in_acc;  // the per-element loss's gradient in the accumulation dtype, as the
                          // loss is (the CUDA entries pass it as it is; the CPU one converts)
  void* loss;             // LossElements: acc_t (rows, cols) contiguous
  void* grad;             // scalar_t (rows, cols) contiguous
  void* chunk_loss;       // LossSum*: acc_t[num_chunks]
  const void* grad_scale; // acc_t[1]: the gradient's factor (mean scale [x grad_loss]), null: 1
  double grad_divisor;    // CPU kernels: the gradient is then divided by this (the mean's
                          // denominator, as PyTorch divides, rather than multiplied by its
                          // rounded inverse); 0 means none. The CUDA entries fold the mean
                          // into grad_scale on the device instead.
  int64_t rows;
  int64_t cols;
  int64_t input_row_stride;
  int64_t target_row_stride;
  int64_t grad_loss_row_stride;
  int64_t chunk_elems;  // the flat (rows*cols) range is cut into chunks of this many elements
  double label_smoothing;
  ScalarType dtype;
  SigmoidCEMode mode;
};

}  // namespace fusedloss
