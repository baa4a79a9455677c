// The outputs of the CPU and CUDA op entries: which buffers each op allocates and how they are
// wired into the kernels' parameters. Written once over `empty`, how a backend makes a buffer a
// kernel writes (the CPU: at::empty or new_output; CUDA: the Platform's, which the SIMT harness
// guard-pages), so that the two backends cannot drift apart in what they return.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "op_checks.h"

namespace fusedloss {

// The per-row buffers of a softmax forward (softmax_ce, softmax_ce_inplace, shard_stats):
// each row's cross-entropy part, its statistics (max, log_sum), and `extras` (2, rows), each
// row's z-loss part and correct (shard_stats: the slice's Q and correct). The kernels write the
// extras only when asked, so they start at zero. `argmax`: each row's first argmax (int64,
// -1 for rows not read) when asked, else an empty (0,).
struct SoftmaxRowBuffers {
  at::Tensor loss, stats, extras, argmax;
};

template <class Empty>
SoftmaxRowBuffers softmax_row_buffers(int64_t rows, const at::TensorOptions& acc_opts,
                                      Empty&& empty, bool want_argmax = false) {
  SoftmaxRowBuffers b{empty({rows}, acc_opts), empty({rows, 2}, acc_opts),
                      empty({2, rows}, acc_opts),
                      want_argmax ? empty({rows}, acc_opts.dtype(at::kLong))
                                  : at::empty({0}, acc_opts.dtype(at::kLong))};
  b.extras.zero_();
  return b;
}

// The gradient a forward computes alongside the loss, or an empty placeholder when not asked.
template <class Empty>
at::Tensor gradient_or_empty(bool want, at::IntArrayRef sizes, const at::TensorOptions& options,
                             Empty&& empty) {
  return want ? empty(sizes, options) : at::empty({0}, options);
}

// The forward's outputs in softmax_ce's parameters: the gradient (null: loss only) and the
// per-row buffers; the z-loss part is written when z_loss != 0, correct for class indices when
// want_accuracy.
inline void set_softmax_forward_outputs(SoftmaxCEParams& p, const SoftmaxTensors& c, void* grad,
                                        int64_t grad_row_stride, const SoftmaxRowBuffers& b,
                                        bool want_accuracy) {
  p.grad = grad;
  p.grad_row_stride = grad_row_stride;
  p.row_loss = b.loss.data_ptr();
  p.row_z_loss = p.z_loss != 0 ? b.extras[0].data_ptr() : nullptr;
  p.row_correct = want_accuracy && !c.shape.prob_target ? b.extras[1].data_ptr() : nullptr;
  p.row_argmax = b.argmax.numel() != 0 ? b.argmax.data_ptr<int64_t>() : nullptr;
  p.row_stats = b.stats.data_ptr();
  p.mode = grad ? SoftmaxCEMode::LossAndGrad : SoftmaxCEMode::Loss;
}

// softmax_ce_shard_stats: the loss of the slice without its z-loss (the caller adds the z-loss
// of the combined row), and Q of probability targets in the first row of the extras.
inline void set_shard_stats_outputs(SoftmaxCEParams& p, const SoftmaxTensors& c,
                                    const SoftmaxRowBuffers& b, bool want_accuracy) {
  set_softmax_forward_outputs(p, c, nullptr, 0, b, want_accuracy);
  p.row_target_mass = c.shape.prob_target ? b.extras[0].data_ptr() : nullptr;
}

// softmax_ce_backward: the gradient recomputed from the saved statistics, times grad_loss;
// `row_target_mass` the whole rows' Q of a class slice of probability targets, or undefined.
inline void set_softmax_backward_outputs(SoftmaxCEParams& p, const at::Tensor& grad,
                                         const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                         const at::Tensor& row_target_mass) {
  p.grad = grad.data_ptr();
  p.grad_row_stride = grad.size(1);
  p.grad_loss = grad_loss.data_ptr();
  p.row_stats = row_stats.data_ptr();
  p.row_target_mass = row_target_mass.defined() ? row_target_mass.data_ptr() : nullptr;
  p.mode = SoftmaxCEMode::GradFromLse;
}

// What a sigmoid_ce forward computes: every element's loss (reduction none), else the chunks'
// sums, with the gradient when one is allocated.
inline SigmoidCEMode sigmoid_forward_mode(bool per_element, bool with_grad) {
  if (per_element) return SigmoidCEMode::LossElements;
  return with_grad ? SigmoidCEMode::LossSumAndGrad : SigmoidCEMode::LossSum;
}

}  // namespace fusedloss
