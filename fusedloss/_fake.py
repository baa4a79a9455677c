"""Fake (meta) kernels of every op: the shapes and dtypes of the outputs, so that
torch.compile and FakeTensor trace the ops without running them. ``register(namespace)``
registers them for one namespace (fusedloss; fusedloss_simt in the tests)."""

import torch

from ._common import NONE, acc_dtype
from ._handover import wide_dtype


def register(namespace):
    """Registers the fake kernel of every op of `namespace`."""
    _register_softmax(namespace)
    _register_sigmoid(namespace)
    _register_linear(namespace)
    _register_distill(namespace)

    @torch.library.register_fake(f"{namespace}::scale_grad_")
    def _scale_grad_fake(grad, scale):
        return None


def _register_softmax(namespace):
    @torch.library.register_fake(f"{namespace}::softmax_ce")
    def _softmax_ce_fake(logits, target, weight, mask, ignore_index, label_smoothing, z_loss,
                         softcap, reduction, mean_eps, compute_grad, want_accuracy=False,
                         denominators=None, token_scaling=False, want_argmax=False):
        torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.dim()}-D")
        torch._check(0 <= reduction <= 2, lambda: f"reduction must be 0, 1 or 2, got {reduction}")
        rows, classes = logits.shape
        acc = acc_dtype(logits.dtype)
        per_row = reduction == NONE
        loss = logits.new_empty((rows,) if per_row else (), dtype=acc)
        row_stats = logits.new_empty((rows, 2), dtype=acc)
        grad = logits.new_empty((rows, classes) if compute_grad else (0,))
        extras = logits.new_empty((2, rows) if per_row else (2,), dtype=acc)
        return loss, row_stats, grad, extras, _argmax_fake(logits, want_argmax)

    @torch.library.register_fake(f"{namespace}::softmax_ce_inplace")
    def _softmax_ce_inplace_fake(logits, target, weight, mask, ignore_index, label_smoothing,
                                 z_loss, softcap, reduction, mean_eps, want_accuracy=False,
                                 denominators=None, token_scaling=False, want_argmax=False):
        torch._check(reduction != NONE, lambda: "softmax_ce_inplace needs reduction mean or sum")
        acc = acc_dtype(logits.dtype)
        return (logits.new_empty((), dtype=acc),
                logits.new_empty((logits.shape[0], 2), dtype=acc),
                logits.new_empty((2,), dtype=acc), _argmax_fake(logits, want_argmax))

    @torch.library.register_fake(f"{namespace}::softmax_ce_backward")
    def _softmax_ce_backward_fake(grad_loss, logits, target, weight, mask, row_stats, ignore_index,
                                  label_smoothing, z_loss, softcap, reduction, mean_eps,
                                  denominators=None, class_offset=0, global_classes=0,
                                  row_target_mass=None, token_scaling=False):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake(f"{namespace}::softmax_ce_shard_stats")
    def _softmax_ce_shard_stats_fake(logits, target, weight, mask, ignore_index, label_smoothing,
                                     softcap, class_offset, global_classes, want_accuracy):
        torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.dim()}-D")
        rows = logits.shape[0]
        acc = acc_dtype(logits.dtype)
        return (logits.new_empty((rows,), dtype=acc), logits.new_empty((rows, 2), dtype=acc),
                logits.new_empty((2, rows), dtype=acc))


def _argmax_fake(x, want_argmax):
    """Each row's argmax (int64 (rows,)) when asked, else an empty (0,)."""
    return x.new_empty((x.shape[0],) if want_argmax else (0,), dtype=torch.int64)


def _register_sigmoid(namespace):
    @torch.library.register_fake(f"{namespace}::sigmoid_ce")
    def _sigmoid_ce_fake(input, target, weight, pos_weight, mask, label_smoothing, reduction,
                         compute_grad):
        torch._check(input.dim() == 2, lambda: f"input must be 2-D, got {input.dim()}-D")
        per_element = reduction == NONE
        loss = input.new_empty(input.shape if per_element else (), dtype=acc_dtype(input.dtype))
        grad = input.new_empty(input.shape if compute_grad and not per_element else (0,))
        return loss, grad

    @torch.library.register_fake(f"{namespace}::sigmoid_ce_backward")
    def _sigmoid_ce_backward_fake(grad_loss, input, target, weight, pos_weight, mask,
                                  label_smoothing, reduction):
        return input.new_empty(input.shape)


def _register_linear(namespace):
    @torch.library.register_fake(f"{namespace}::linear_ce")
    def _linear_ce_fake(input, weight, bias, target, class_weight, mask, ignore_index,
                        label_smoothing, z_loss, softcap, reduction, denominators, chunk_rows,
                        need_input_grad, need_weight_grad, need_bias_grad, need_accuracy,
                        token_scaling=False, want_argmax=False):
        rows = input.shape[0]
        acc = acc_dtype(input.dtype)
        per_row = reduction == NONE
        any_grad = not per_row and (need_input_grad or need_weight_grad or need_bias_grad)
        loss = input.new_empty((rows,) if per_row else (), dtype=acc)
        stats = input.new_empty((rows, 2), dtype=acc)
        gi = input.new_empty(input.shape if any_grad and need_input_grad else (0,),
                             dtype=wide_dtype(input.dtype))
        gw = weight.new_empty(weight.shape if any_grad and need_weight_grad else (0,),
                              dtype=wide_dtype(weight.dtype))
        gb = weight.new_empty((weight.shape[0],) if any_grad and need_bias_grad else (0,),
                              dtype=wide_dtype(weight.dtype))
        extras = input.new_empty((2, rows) if per_row else (2,), dtype=acc)
        return loss, stats, gi, gw, gb, extras, _argmax_fake(input, want_argmax)

    @torch.library.register_fake(f"{namespace}::linear_ce_backward")
    def _linear_ce_backward_fake(grad_loss, input, weight, bias, target, class_weight, mask,
                                 row_stats, ignore_index, label_smoothing, z_loss, softcap,
                                 chunk_rows, need_input_grad, need_weight_grad, need_bias_grad,
                                 token_scaling=False):
        gi = input.new_empty(input.shape if need_input_grad else (0,),
                             dtype=wide_dtype(input.dtype))
        gw = weight.new_empty(weight.shape if need_weight_grad else (0,),
                              dtype=wide_dtype(weight.dtype))
        gb = weight.new_empty((weight.shape[0],) if need_bias_grad else (0,),
                              dtype=wide_dtype(weight.dtype))
        return gi, gw, gb


# The row statistics a distillation forward keeps per row (csrc/common/distill.h DistillStat).
DISTILL_STATS = 8


def _register_distill(namespace):
    @torch.library.register_fake(f"{namespace}::distill")
    def _distill_fake(student, teacher, teacher_indices, target, mask, divergence, temperature,
                      beta, hard_weight, ignore_index, reduction, denominator, student_grad,
                      teacher_grad):
        torch._check(student.dim() == 2, lambda: f"student must be 2-D, got {student.dim()}-D")
        rows = student.shape[0]
        acc = acc_dtype(student.dtype)
        loss = student.new_empty((rows,) if reduction == NONE else (), dtype=acc)
        stats = student.new_empty((rows, DISTILL_STATS), dtype=acc)
        gs = student.new_empty(student.shape if student_grad else (0,))
        gt = teacher.new_empty(teacher.shape if teacher_grad else (0,))
        return loss, stats, gs, gt

    @torch.library.register_fake(f"{namespace}::distill_inplace")
    def _distill_inplace_fake(student, teacher, teacher_indices, target, mask, divergence,
                              temperature, beta, hard_weight, ignore_index, reduction,
                              denominator):
        acc = acc_dtype(student.dtype)
        return (student.new_empty((), dtype=acc),
                student.new_empty((student.shape[0], DISTILL_STATS), dtype=acc))

    @torch.library.register_fake(f"{namespace}::distill_backward")
    def _distill_backward_fake(grad_loss, student, teacher, teacher_indices, target, mask,
                               row_stats, divergence, temperature, beta, hard_weight,
                               ignore_index, reduction, denominator, student_grad,
                               teacher_grad, class_offset=0):
        return (student.new_empty(student.shape if student_grad else (0,)),
                teacher.new_empty(teacher.shape if teacher_grad else (0,)))
