"""Fused linear + softmax cross-entropy: the loss of ``input @ linear_weight.T (+ bias)`` without
ever holding the (N, V) logits whole.

The rows are cut into chunks. Per chunk, the forward

1. writes the chunk's logits into one reused (rows, V) buffer (ATen matmul: MKL/oneDNN on the
   CPU, cuBLAS on CUDA);
2. runs the fused softmax cross-entropy kernel in place on that buffer (``softmax_ce_inplace``:
   the loss, the row statistics and d loss / d logits, written over the logits);
3. turns the chunk's logit gradient G into the chunk's input gradient (G @ W) and adds G.T @ x
   into one weight-gradient accumulator (``addmm_``; float32 for 16-bit weights) and G's column
   sums into the bias-gradient accumulator.

So the forward returns the loss and every gradient, already scaled for the reduction, and the
backward only multiplies them by grad_output (in place, and not at all when it is exactly 1).
reduction="none" cannot pre-scale (each row's grad_output is unknown in the forward): its
backward recomputes the chunks' logits and gradients instead.

The mean's two denominators (the weighted one of the cross-entropy part, the count of valid
positions of the z-loss part) are global over all rows: they are computed once, on the device
(no host synchronisation), and handed to every chunk's kernel call (the op's `denominators`),
which then produces exactly the mean-scaled loss, extra outputs and gradient of its rows.

The chunk loop is C++ (csrc/linear_ce.cpp), one op ``<namespace>::linear_ce`` for every device:
the GEMMs through ATen, each chunk's kernel through the dispatcher, no host synchronisation
on CUDA. The op's fake kernel and autograd formula are registered with every other op's (_fake.py,
_autograd.py), so ``torch.compile(fullgraph=True)`` keeps the whole loss as one opaque call.
On the CPU, ignored and masked-out rows are left out of the chunks (their loss and gradient
are 0), so they cost no GEMM work; on CUDA they run through the GEMMs with a zero row factor
(their count is only known on the device, and the GEMM shapes are host parameters).
"""

from typing import Optional

import torch
from torch import Tensor

from . import _args, _ops, _route, functional
from ._args import CrossEntropyOutput
from ._common import NONE, REDUCTION_NAMES, auto_chunk_rows, compute_dtype, mean_denominators
from .parallel import linear as vocab_parallel

__all__ = ["linear_cross_entropy", "auto_chunk_rows", "compute_dtype"]


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         reduction: str = "mean", ignore_index: int = -100,
                         label_smoothing: float = 0.0, mask: Optional[Tensor] = None,
                         z_loss: float = 0.0, softcap: Optional[float] = None,
                         chunk_size: Optional[int] = None, return_z_loss: bool = False,
                         return_token_accuracy: bool = False,
                         return_predicted_tokens: bool = False, token_scaling: bool = False,
                         process_group=None):
    """``fusedloss.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``
    without the (N, V) logits ever existing whole (see the module docstring).

    input ``(..., H)``; linear_weight ``(V, H)``; linear_bias ``(V,)``; target class indices
    of shape ``input.shape[:-1]`` or class probabilities ``(..., V)``. ``weight``,
    ``reduction``, ``ignore_index``, ``label_smoothing``, ``mask``, ``z_loss`` and ``softcap``
    are fusedloss.cross_entropy's. ``chunk_size``: rows per chunk (default
    :func:`auto_chunk_rows`). With ``return_z_loss``, ``return_token_accuracy`` or
    ``return_predicted_tokens`` the result is a ``CrossEntropyOutput(loss, z_loss,
    token_accuracy, lse=None, predicted_tokens)``, as cross_entropy's: the z-loss part of the
    loss and the (mask-weighted) share of valid positions where argmax of the logits == target,
    both per position for reduction="none", and each position's argmax (int64, -1 where not
    read); from the same pass. ``token_scaling`` scales each position's loss by its target's
    detached probability, as in cross_entropy, in the same pass.

    The gradients go to input, linear_weight and linear_bias; the target, mask and class weight
    must not require grad. The forward computes the gradients, so a frozen weight or an input
    without grad skips its GEMM. Under torch.func transforms and forward-mode AD the definition
    runs instead, on the whole logits.

    ``process_group`` (vocab parallel, fusedloss.parallel.linear): linear_weight (and
    linear_bias) hold this rank's contiguous slice of the vocabulary's rows, input and target
    are the same on every rank, ``weight`` is the whole vocabulary's; the loss is the same on
    every rank and the input's gradient is summed over the ranks.
    """
    if process_group is not None:
        return vocab_parallel.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            mask=mask, z_loss=z_loss, softcap=softcap, chunk_size=chunk_size,
            return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
            return_predicted_tokens=return_predicted_tokens, token_scaling=token_scaling,
            process_group=process_group)
    a = _args.linear_ce_args(input, linear_weight, target, linear_bias, weight, reduction,
                             ignore_index, label_smoothing, mask, z_loss, softcap, chunk_size,
                             return_token_accuracy, token_scaling=token_scaling,
                             return_predicted_tokens=return_predicted_tokens)
    if _route.compositions_needed():
        return _composed(a, linear_weight, linear_bias, return_z_loss, return_token_accuracy,
                         return_predicted_tokens)
    grad_on = torch.is_grad_enabled()
    need_input_grad = grad_on and input.requires_grad
    need_weight_grad = grad_on and linear_weight.requires_grad
    need_bias_grad = grad_on and linear_bias is not None and linear_bias.requires_grad
    denominators = (None if a.reduction == NONE else
                    mean_denominators(a.target, a.weight, a.mask, a.ignore_index, a.x.shape[0],
                                      a.x.device))
    loss, _stats, _gi, _gw, _gb, extras, predicted = _ops.current().linear_ce(
        a.x, linear_weight, linear_bias, a.target, a.weight, a.mask, a.ignore_index,
        a.label_smoothing, a.z_loss, a.softcap, a.reduction, denominators, a.chunk_rows,
        need_input_grad, need_weight_grad, need_bias_grad, return_token_accuracy,
        a.token_scaling, return_predicted_tokens)
    return _args.linear_ce_result(a, input, loss, extras, return_z_loss, return_token_accuracy,
                                  predicted if return_predicted_tokens else None)


def _composed(a, linear_weight, linear_bias, return_z_loss, return_token_accuracy,
              return_predicted_tokens):
    """Under a torch.func transform or forward-mode AD: the definition itself, cross_entropy of
    the whole (rows, V) logits, which runs its differentiable compositions there (the chunked
    op has no batching rule and no jvp). The logits then exist whole."""
    logits = torch.nn.functional.linear(a.x, linear_weight, linear_bias)
    reduction = REDUCTION_NAMES[a.reduction]
    out = functional.cross_entropy(logits, a.target, a.weight, a.ignore_index, reduction,
                                   a.label_smoothing, mask=a.mask, z_loss=a.z_loss,
                                   softcap=a.softcap or None, return_z_loss=return_z_loss,
                                   return_token_accuracy=return_token_accuracy,
                                   return_predicted_tokens=return_predicted_tokens,
                                   token_scaling=a.token_scaling)
    per_row = a.reduction == NONE

    def positions(t, per_position=True):  # (rows,) -> the input's positions
        return t.reshape(a.positions) if t is not None and per_position else t

    if not (return_z_loss or return_token_accuracy or return_predicted_tokens):
        return positions(out, per_row)
    return CrossEntropyOutput(positions(out.loss, per_row), positions(out.z_loss, per_row),
                              positions(out.token_accuracy, per_row), None,
                              positions(out.predicted_tokens))
