// Every fusedloss op schema, and the Python module stub that loads them. Backends register
// their kernels in csrc/cpu/ops_cpu.cpp and csrc/cuda/ops_cuda.cpp.
#include <Python.h>
#include <torch/library.h>

// softmax_ce: softmax cross-entropy over rows of class logits (class dim last). `target` is
// int64 class indices (rows,) or floating class probabilities (rows, classes). Returns
//  - the loss (reduced, or per row for reduction=0) in the accumulation dtype (float32 for
//    16-bit logits: the Python layer casts, except under autocast);
//  - the row statistics (rows, 2) of the softmax, (max, log sum exp(z - max)), accumulation
//    dtype;
//  - when compute_grad, d(loss)/d(logits) pre-scaled for the reduction (else an empty (0,));
//  - the extra outputs, accumulation dtype: for reduction=0 (2, rows), each row's z-loss part
//    and m [argmax == target]; else (2,), the z-loss part of the loss and the token accuracy
//    (mask-weighted share of valid positions whose argmax is the target). The accuracy is
//    computed only when want_accuracy (else 0);
//  - when want_argmax, each row's first argmax of the (softcapped) logits, int64 (rows,): the
//    first maximum, as torch.argmax (a NaN row's first NaN), -1 for rows not read (padding,
//    ignored); else an empty (0,).
// token_scaling (class-index targets, whole rows): each row's loss, every part, and its
// gradient are multiplied by its target's probability p_t = exp(z_t - lse), a constant of the
// gradient; the mean's denominators are unchanged.
// mean divides the cross-entropy part by (sum of valid mask * class weight + mean_eps) and the
// z-loss part by (sum of valid mask + mean_eps), each 0 when its denominator is 0; a caller
// that splits one loss over several calls passes the whole loss's two denominators instead.
//
// softmax_ce_inplace: the same for mean/sum, writing the gradient into `logits` (its outputs
// are softmax_ce's less the gradient).
// softmax_ce_backward: the gradient recomputed from the logits and the row statistics; grad_loss is
// per row for reduction=0, a scalar otherwise (reduction=0 always, and a second backward of
// mean/sum, take this path).
// Vocab-parallel rows (a class slice per device, combined by fusedloss/parallel/combine.py):
// softmax_ce_shard_stats reads a slice once and returns its part of each row, accumulation
// dtype: the loss's cross-entropy part (masked; the target term only where the slice holds the
// target, smoothing over global_classes), the slice's statistics (rows, 2), and (2, rows)
// extras: the slice's Q = sum_c w_c q_c (probability targets, unmasked; 0 for class indices)
// and m [the slice's first argmax == target] (when want_accuracy). `weight` is the whole
// (global_classes,) vector, targets global ids, probability targets the slice's columns.
// softmax_ce_backward with global_classes > 0 is the slice's gradient from the whole rows'
// statistics (and, for probability targets, the whole rows' Q in row_target_mass).
// sigmoid_ce / sigmoid_ce_backward: the same pair for sigmoid cross-entropy over a
// (rows, cols) view; weight, pos_weight and mask are (rows, cols) broadcast views. The loss
// (per element for reduction=0) is in the accumulation dtype, as softmax_ce's.
// linear_ce: fused linear + softmax cross-entropy over row chunks (csrc/linear_ce.cpp, one
// implementation for every device): input (rows, H) @ weight (V, H).T (+ bias), then softmax_ce;
// returns (loss, row_stats, grad_input, grad_weight, grad_bias, extras, argmax), the gradients
// pre-scaled for mean/sum (empty when not asked for, and always for reduction=0; float16's
// in float32, for the caller to round once after grad_output);
// denominators (mean/sum): the whole loss's two, as softmax_ce's (fusedloss/_common.py,
// mean_denominators); token_scaling and want_argmax as softmax_ce's (argmax: -1 for the rows
// no chunk reads).
// linear_ce_backward: reduction=0's gradients for a per-row grad_loss, the chunks recomputed
// (token_scaling: the forward's).
// distill: the distillation losses (csrc/common/distill.h) of student logits (rows, classes)
// against teacher logits (rows, classes), or (rows, K) at teacher_indices (forward_kl only).
// divergence 0 forward_kl, 1 reverse_kl, 2 jsd (beta in (0, 1)); hard_weight a mixes in the
// cross-entropy of the student against target (a > 0 needs one). Rows whose target is
// ignore_index or whose mask is 0 are skipped. Returns the loss in the accumulation dtype (per
// row for reduction=0; mean divides by `denominator`, the caller's: the mask's sum over the
// valid rows), the row statistics (rows, 8), and the gradients of the student and the teacher
// (each when asked, else empty), pre-scaled for the reduction.
// distill_inplace: the same for mean/sum, writing the student's gradient into `student`
// (the teacher's gradient is not computed); returns (loss, row_stats).
// distill_backward: the gradients recomputed from row_stats, times grad_loss (per row for
// reduction=0, one value otherwise). With class_offset (vocab-parallel, dense teacher): the
// logits are the classes [class_offset, class_offset + classes) of the rows, row_stats the
// whole rows' (fusedloss/parallel/distillation.py), targets global class ids.
// scale_grad_: grad *= scale in place, no pass at all when scale is exactly 1.
// build_info / empty_cache / cached_bytes: what was compiled; the CPU output buffers kept
// for reuse (csrc/cpu/output_buffer.h).
// The SIMT test harness compiles this file again with FUSEDLOSS_LIBRARY=fusedloss_simt, so that
// its emulated CUDA kernels are registered under the very same schemas.
#ifndef FUSEDLOSS_LIBRARY
#define FUSEDLOSS_LIBRARY fusedloss
#endif
#define FL_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

FL_TORCH_LIBRARY(FUSEDLOSS_LIBRARY, m) {
  m.def(
      "softmax_ce(Tensor logits, Tensor target, Tensor? weight, Tensor? mask, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap, int reduction, float mean_eps, "
      "bool compute_grad, bool want_accuracy=False, Tensor? denominators=None, "
      "bool token_scaling=False, bool want_argmax=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "softmax_ce_inplace(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor? mask, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, int reduction, "
      "float mean_eps, bool want_accuracy=False, Tensor? denominators=None, "
      "bool token_scaling=False, bool want_argmax=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "softmax_ce_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor? mask, Tensor row_stats, int ignore_index, float label_smoothing, float z_loss, "
      "float softcap, int reduction, float mean_eps, Tensor? denominators=None, "
      "int class_offset=0, int global_classes=0, Tensor? row_target_mass=None, "
      "bool token_scaling=False) -> Tensor");
  m.def(
      "softmax_ce_shard_stats(Tensor logits, Tensor target, Tensor? weight, Tensor? mask, "
      "int ignore_index, float label_smoothing, float softcap, int class_offset, "
      "int global_classes, bool want_accuracy) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sigmoid_ce(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, Tensor? mask, "
      "float label_smoothing, int reduction, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "sigmoid_ce_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor? pos_weight, Tensor? mask, float label_smoothing, int reduction) -> Tensor");
  m.def(
      "linear_ce(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, "
      "Tensor? mask, int ignore_index, float label_smoothing, float z_loss, float softcap, "
      "int reduction, Tensor? denominators, int chunk_rows, bool need_input_grad, "
      "bool need_weight_grad, bool need_bias_grad, bool need_accuracy, "
      "bool token_scaling=False, bool want_argmax=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_ce_backward(Tensor grad_loss, Tensor input, Tensor weight, Tensor? bias, "
      "Tensor target, Tensor? class_weight, Tensor? mask, Tensor row_stats, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap, int chunk_rows, "
      "bool need_input_grad, bool need_weight_grad, bool need_bias_grad, "
      "bool token_scaling=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "distill(Tensor student, Tensor teacher, Tensor? teacher_indices, Tensor? target, "
      "Tensor? mask, int divergence, float temperature, float beta, float hard_weight, "
      "int ignore_index, int reduction, Tensor? denominator, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "distill_inplace(Tensor(a!) student, Tensor teacher, Tensor? teacher_indices, "
      "Tensor? target, Tensor? mask, int divergence, float temperature, float beta, "
      "float hard_weight, int ignore_index, int reduction, Tensor? denominator) "
      "-> (Tensor, Tensor)");
  m.def(
      "distill_backward(Tensor grad_loss, Tensor student, Tensor teacher, "
      "Tensor? teacher_indices, Tensor? target, Tensor? mask, Tensor row_stats, int divergence, "
      "float temperature, float beta, float hard_weight, int ignore_index, int reduction, "
      "Tensor? denominator, bool student_grad, bool teacher_grad, int class_offset=0) "
      "-> (Tensor, Tensor)");
  m.def("scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
  m.def("build_info() -> str");
  m.def("empty_cache() -> ()");
  m.def("cached_bytes() -> int");
}

#ifndef FUSEDLOSS_NO_PYINIT
// `import fusedloss._C` loads this library, whose static initialisers register the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
