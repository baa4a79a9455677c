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
on CUDA. This module checks the arguments and registers the op's fake kernel and autograd
formula, so ``torch.compile(fullgraph=True)`` keeps the whole loss as one opaque call.
On the CPU, ignored and masked-out rows are left out of the chunks (their loss and gradient
are 0), so they cost no GEMM work; on CUDA they run through the GEMMs with a zero row factor
(their count is only known on the device, and the GEMM shapes are host parameters).
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _ops
from . import functional as F
from ._ops import REDUCTIONS, acc_dtype, is_traced

__all__ = ["linear_cross_entropy", "auto_chunk_rows"]

# Chunk size rule (auto_chunk_rows): a chunk holds 1/16 of the rows, so that its logits buffer
# is at most 1/16 of the whole logits, but at least _MIN_CHUNK_ROWS rows, and at most what fits
# in _MAX_CHUNK_BYTES (a very long batch's 1/16 would be gigabytes). Why not smaller (PyTorch's
# chunked path makes its buffer about the input's size, 64 rows at N x H x V = 4096 x 256 x
# 32000): every chunk streams the whole (V, H) weight three times, and the GEMMs of a thin chunk
# run far below the big ones' FLOP rate (MKL repacks all of W for each call); measured on 2 CPU
# cores (bench/README.md, "Chunk rows: time against memory"), 64-row chunks took 1.44x as long
# as 256-row ones (1.92 s against 1.34 s) to save 24 MB of 67 MB. chunk_size= trades the other way.
_CHUNK_FRACTION = 16
_MIN_CHUNK_ROWS = 128
_MAX_CHUNK_BYTES = 256 << 20
_ROW_ALIGN = 16  # a multiple of 16 rows keeps the GEMMs' row blocks whole


def _round_up(n, k):
    return -(-n // k) * k


def auto_chunk_rows(rows: int, in_features: int, classes: int, dtype: torch.dtype) -> int:
    """Rows per chunk when ``chunk_size`` is None: ceil(rows / 16) rounded up to a multiple of
    16, at least 128 and at most the rows whose logits fit in 256 MB (in the dtype the chunk is
    computed in), never more than ``rows``. ``in_features`` does not enter: the GEMMs' FLOPs and
    the weight's bytes streamed per chunk both scale with it."""
    del in_features  # see the docstring
    if rows <= 0:
        return 1
    element = torch.empty((), dtype=dtype).element_size()
    sixteenth = _round_up(-(-rows // _CHUNK_FRACTION), _ROW_ALIGN)
    by_bytes = max(1, _MAX_CHUNK_BYTES // max(1, classes * element))
    return max(1, min(rows, by_bytes, max(_MIN_CHUNK_ROWS, sixteenth)))


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the chunks' GEMMs and kernel run in. On the CPU, float16/bfloat16 GEMMs are
    emulated and measured here 10-100x slower than float32 ones (a 512 x 32000 x 256 bfloat16
    G @ W: 27 s against 0.22 s), so 16-bit inputs are computed in float32 there (as PyTorch's
    own chunked path does on the CPU); elsewhere the input dtype is used."""
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _sequential_sum(v: Tensor) -> Tensor:
    """sum(v) in float64 added in index order (a running sum, like the CPU op's denominator):
    the same bits for any thread count. A 0-d tensor on v's device; no host synchronisation."""
    if v.numel() == 0:
        return v.new_zeros((), dtype=torch.float64)
    return torch.cumsum(v.to(torch.float64), 0)[-1]


def mean_denominators(target, class_weight, mask, ignore_index, rows, device):
    """For mean/sum, handed to every chunk's kernel call (the linear_ce op's, the vocab-parallel
    paths'): the whole loss's (weighted denominator, count of valid positions), float64 on the device
    (no host synchronisation): sum_i mask_i * w[t_i] * [t_i != ignore_index] and
    sum_i mask_i * [t_i != ignore_index] for class indices, the mask's sum (or the row count)
    twice for probabilities, as softmax_ce computes them for one call."""
    ones = torch.ones(rows, dtype=torch.float64, device=device)
    counted = mask.to(torch.float64) if mask is not None else ones
    if target.is_floating_point():
        count = _sequential_sum(counted)
        return torch.stack([count, count])
    valid = target != ignore_index
    counted = torch.where(valid, counted, 0)
    weighted = counted
    if class_weight is not None:
        safe = torch.where(valid, target, 0).clamp(0, class_weight.shape[0] - 1)
        weighted = counted * class_weight.to(torch.float64)[safe]
    return torch.stack([_sequential_sum(weighted), _sequential_sum(counted)])


_REGISTERED = {}


def ops_for(namespace: str):
    """(forward op, per-row backward op) of one op namespace (fusedloss; fusedloss_simt in the
    tests), registered on first use."""
    if namespace not in _REGISTERED:
        _REGISTERED[namespace] = _register(namespace)
    return _REGISTERED[namespace]


def _register(ns):
    """The fake kernels and the autograd formula of the chunk loop's ops (csrc/linear_ce.cpp:
    one C++ implementation for every device, defined in csrc/fusedloss.cpp's schemas)."""
    lib = _ops.DefaultOverloads(ns)
    linear_ce, linear_ce_backward = lib.linear_ce, lib.linear_ce_backward

    @torch.library.register_fake(f"{ns}::linear_ce")
    def _(input, weight, bias, target, class_weight, mask, ignore_index, label_smoothing,
          z_loss, softcap, reduction, denominators, chunk_rows, need_input_grad,
          need_weight_grad, need_bias_grad, need_accuracy):
        rows = input.shape[0]
        acc = acc_dtype(input.dtype)
        per_row = reduction == REDUCTIONS["none"]
        any_grad = not per_row and (need_input_grad or need_weight_grad or need_bias_grad)
        loss = input.new_empty((rows,) if per_row else (), dtype=acc)
        stats = input.new_empty((rows, 2), dtype=acc)
        gi = input.new_empty(input.shape if any_grad and need_input_grad else (0,))
        gw = weight.new_empty(weight.shape if any_grad and need_weight_grad else (0,))
        gb = weight.new_empty((weight.shape[0],) if any_grad and need_bias_grad else (0,))
        extras = input.new_empty((2, rows) if per_row else (2,), dtype=acc)
        return loss, stats, gi, gw, gb, extras

    @torch.library.register_fake(f"{ns}::linear_ce_backward")
    def _(grad_loss, input, weight, bias, target, class_weight, mask, row_stats, ignore_index,
          label_smoothing, z_loss, softcap, chunk_rows, need_input_grad, need_weight_grad,
          need_bias_grad):
        gi = input.new_empty(input.shape if need_input_grad else (0,))
        gw = weight.new_empty(weight.shape if need_weight_grad else (0,))
        gb = weight.new_empty((weight.shape[0],) if need_bias_grad else (0,))
        return gi, gw, gb

    def setup_context(ctx, inputs, output):
        (input, weight, bias, target, class_weight, mask, ignore_index, label_smoothing, z_loss,
         softcap, reduction, denominators, chunk_rows, need_input_grad, need_weight_grad,
         need_bias_grad, _need_accuracy) = inputs
        _loss, stats, gi, gw, gb, _correct = output
        ctx.set_materialize_grads(False)
        ctx.reduction = reduction
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
        ctx.chunk_rows = chunk_rows
        ctx.needs = (need_input_grad, need_weight_grad, need_bias_grad)
        ctx.has_bias = bias is not None
        # The inputs (input: N x H, the weight, O(N) targets) are kept for reduction none's
        # recompute and for a second backward of mean/sum; never anything N x V.
        ctx.save_for_backward(input, weight, bias, target, class_weight, mask, stats,
                              denominators)
        if reduction != REDUCTIONS["none"]:
            # detached: the outputs hold this node, so holding them as they are would make a
            # reference cycle only the garbage collector frees
            ctx.saved_grads = [g.detach() for g in (gi, gw, gb)]

    def backward(ctx, grad_loss, *_grads_of_other_outputs):
        nones = (None,) * 14
        if grad_loss is None:
            return (None, None, None) + nones
        traced = is_traced(grad_loss)
        input, weight, bias, target, class_weight, mask, stats, denominators = ctx.saved_tensors
        need_input_grad, need_weight_grad, need_bias_grad = ctx.needs
        if torch.is_grad_enabled() and not traced:  # create_graph=True: a double backward
            gi, gw, gb = _definition_grads(ctx, grad_loss, input, weight, bias, target,
                                           class_weight, mask)
        elif ctx.reduction == REDUCTIONS["none"]:
            gi, gw, gb = linear_ce_backward(grad_loss, input, weight, bias, target, class_weight,
                                            mask, stats, *ctx.options, ctx.chunk_rows,
                                            need_input_grad, need_weight_grad, need_bias_grad)
        else:
            grads = getattr(ctx, "saved_grads", None)
            if traced:
                gi, gw, gb = (g * grad_loss for g in grads)
            else:
                if grads is None:  # a second backward (retain_graph=True): the same forward
                    _, _, *grads, _ = linear_ce(input, weight, bias, target, class_weight, mask,
                                                *ctx.options, ctx.reduction, denominators,
                                                ctx.chunk_rows, need_input_grad,
                                                need_weight_grad, need_bias_grad, False)
                # handed over without a copy, scaled in place (no pass when grad_loss is 1)
                ctx.saved_grads = None
                for g in grads:
                    lib.scale_grad_(g, grad_loss)
                gi, gw, gb = grads
        return (gi if need_input_grad else None, gw if need_weight_grad else None,
                gb if need_bias_grad and ctx.has_bias else None) + nones

    torch.library.register_autograd(f"{ns}::linear_ce", backward, setup_context=setup_context)
    return linear_ce, linear_ce_backward


def _definition_grads(ctx, grad_loss, x, weight, bias, target, class_weight, mask):
    """The gradients of (input, weight, bias) under grad_loss, themselves differentiable: those
    of the definition, cross_entropy of the whole logits, whose backward with create_graph
    differentiates its compositions. For double backward (a Hessian-vector product, a
    gradient penalty); the fused gradients are not differentiable."""
    ignore_index, label_smoothing, z_loss, softcap = ctx.options
    a = LinearCEArgs(x, target, class_weight, mask, ignore_index, ctx.reduction, label_smoothing,
                     z_loss, softcap, ctx.chunk_rows, (x.shape[0],))
    wanted = [t for t, need in zip((x, weight, bias), ctx.needs) if need]
    with torch.enable_grad():
        loss = _composed(a, weight, bias, False, False)
        grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True,
                                         allow_unused=True))
    return tuple(next(grads) if need else None for need in ctx.needs)


def _check_matrix_operand(t, name, input, shape):
    F._check_tensor(t, name)
    F._check_device(t, name, input, "input")
    if t.dtype != input.dtype:
        raise TypeError(f"{name} must have the input's dtype {input.dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_no_grad(t, name):
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"linear_cross_entropy does not differentiate with respect to {name}, "
                           f"which requires grad: pass {name}.detach(), or use "
                           f"fusedloss.cross_entropy on the logits")


def _chunk_size_value(chunk_size, rows, hidden, classes, dtype, device):
    if chunk_size is None:
        return auto_chunk_rows(rows, hidden, classes, compute_dtype(dtype, device))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1 (rows per chunk), "
                         f"got {chunk_size!r}")
    return chunk_size


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         reduction: str = "mean", ignore_index: int = -100,
                         label_smoothing: float = 0.0, mask: Optional[Tensor] = None,
                         z_loss: float = 0.0, softcap: Optional[float] = None,
                         chunk_size: Optional[int] = None, return_z_loss: bool = False,
                         return_token_accuracy: bool = False, process_group=None):
    """``fusedloss.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``
    without the (N, V) logits ever existing whole (see the module docstring).

    input ``(..., H)``; linear_weight ``(V, H)``; linear_bias ``(V,)``; target class indices
    of shape ``input.shape[:-1]`` or class probabilities ``(..., V)``. ``weight``,
    ``reduction``, ``ignore_index``, ``label_smoothing``, ``mask``, ``z_loss`` and ``softcap``
    are fusedloss.cross_entropy's. ``chunk_size``: rows per chunk (default
    :func:`auto_chunk_rows`). With ``return_z_loss`` or ``return_token_accuracy`` the result is
    a ``CrossEntropyOutput(loss, z_loss, token_accuracy, lse=None)``, as cross_entropy's: the
    z-loss part of the loss and the (mask-weighted) share of valid positions where argmax of
    the logits == target, both per position for reduction="none"; from the same pass.

    The gradients go to input, linear_weight and linear_bias; the target, mask and class weight
    must not require grad. The forward computes the gradients, so a frozen weight or an input
    without grad skips its GEMM. Under torch.func transforms and forward-mode AD the definition
    runs instead, on the whole logits.

    ``process_group`` (vocab parallel, fusedloss.distributed_linear): linear_weight (and
    linear_bias) hold this rank's contiguous slice of the vocabulary's rows, input and target
    are the same on every rank, ``weight`` is the whole vocabulary's; the loss is the same on
    every rank and the input's gradient is summed over the ranks.
    """
    if process_group is not None:
        from . import distributed_linear
        return distributed_linear.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            mask=mask, z_loss=z_loss, softcap=softcap, chunk_size=chunk_size,
            return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
            process_group=process_group)
    a = _linear_ce_args(input, linear_weight, target, linear_bias, weight, reduction,
                        ignore_index, label_smoothing, mask, z_loss, softcap, chunk_size,
                        return_token_accuracy)
    if F._compositions_needed():
        return _composed(a, linear_weight, linear_bias, return_z_loss, return_token_accuracy)
    grad_on = torch.is_grad_enabled()
    need_input_grad = grad_on and input.requires_grad
    need_weight_grad = grad_on and linear_weight.requires_grad
    need_bias_grad = grad_on and linear_bias is not None and linear_bias.requires_grad
    op, _ = ops_for(_ops.current().namespace)
    denominators = (None if a.reduction == REDUCTIONS["none"] else
                    mean_denominators(a.target, a.weight, a.mask, a.ignore_index, a.x.shape[0],
                                      a.x.device))
    loss, _stats, _gi, _gw, _gb, extras = op(
        a.x, linear_weight, linear_bias, a.target, a.weight, a.mask, a.ignore_index,
        a.label_smoothing, a.z_loss, a.softcap, a.reduction, denominators, a.chunk_rows,
        need_input_grad, need_weight_grad, need_bias_grad, return_token_accuracy)
    return linear_ce_result(a, input, loss, extras, return_z_loss, return_token_accuracy)


def _composed(a, linear_weight, linear_bias, return_z_loss, return_token_accuracy):
    """Under a torch.func transform or forward-mode AD: the definition itself, cross_entropy of
    the whole (rows, V) logits, which runs its differentiable compositions there (the chunked
    op has no batching rule and no jvp). The logits then exist whole."""
    logits = torch.nn.functional.linear(a.x, linear_weight, linear_bias)
    reduction = {code: name for name, code in REDUCTIONS.items()}[a.reduction]
    out = F.cross_entropy(logits, a.target, a.weight, a.ignore_index, reduction,
                          a.label_smoothing, mask=a.mask, z_loss=a.z_loss,
                          softcap=a.softcap or None, return_z_loss=return_z_loss,
                          return_token_accuracy=return_token_accuracy)
    if a.reduction != REDUCTIONS["none"]:
        return out
    if not (return_z_loss or return_token_accuracy):
        return out.reshape(a.positions)
    return F.CrossEntropyOutput(*(None if t is None else t.reshape(a.positions)
                                  for t in out[:3]), None)


class LinearCEArgs(NamedTuple):
    """linear_cross_entropy's arguments checked and laid out: x (rows, hidden), target (rows,)
    or (rows, classes), class weight and mask in the accumulation dtype."""

    x: Tensor
    target: Tensor
    weight: Optional[Tensor]
    mask: Optional[Tensor]
    ignore_index: int
    reduction: int
    label_smoothing: float
    z_loss: float
    softcap: float
    chunk_rows: Optional[int]
    positions: tuple


def _linear_ce_args(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                    label_smoothing, mask, z_loss, softcap, chunk_size, return_token_accuracy,
                    vocab_parallel=False):
    """The checks (errors name the argument and value). vocab_parallel: the class weight may
    have any length here (the whole vocabulary's, checked across ranks), and chunk_rows stays
    None when chunk_size is None (the ranks agree on it from every slice's size)."""
    red, label_smoothing = F._check_loss_args(input, target, reduction, label_smoothing)
    z_loss = F._z_loss_value(z_loss)
    cap = F._softcap_value(softcap)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (in_features), got a 0-d tensor")
    F._check_tensor(linear_weight, "linear_weight")
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must be 2-D (classes, in_features), got shape "
                         f"{tuple(linear_weight.shape)}")
    classes, hidden = linear_weight.shape
    _check_matrix_operand(linear_weight, "linear_weight", input, (classes, input.shape[-1]))
    if classes == 0:
        raise ValueError(f"linear_weight must have at least one class (row), got shape "
                         f"{tuple(linear_weight.shape)}")
    if linear_bias is not None:
        _check_matrix_operand(linear_bias, "linear_bias", input, (classes,))
    positions = tuple(input.shape[:-1])
    acc = acc_dtype(input.dtype)
    x = input.reshape(-1, hidden)
    if target.is_floating_point():  # class probabilities
        if tuple(target.shape) != positions + (classes,):
            raise ValueError(f"probability target must have shape {positions + (classes,)} "
                             f"(the logits' shape), got {tuple(target.shape)}")
        if return_token_accuracy:
            raise ValueError("return_token_accuracy needs class-index targets, got class "
                             "probabilities")
        t = target.reshape(-1, classes)
        ignore_index = F._NO_IGNORE_INDEX
    else:
        t = F._class_indices(target, positions, input)
        if F._validate_targets and not torch.compiler.is_compiling() and not vocab_parallel:
            F._check_targets_eagerly(t, classes, ignore_index)
    for tensor, name in ((target, "target"), (mask, "mask"), (weight, "weight")):
        _check_no_grad(tensor, name)
    if vocab_parallel and weight is not None:
        F._check_tensor(weight, "weight")
        if weight.dim() != 1:
            raise ValueError(f"weight must be 1-D (one weight per class of the whole "
                             f"vocabulary), got shape {tuple(weight.shape)}")
    w = F._class_weight(weight, weight.shape[0] if vocab_parallel and weight is not None
                        else classes, acc, input)
    m = F._row_vector(mask, "mask", positions, acc, input)
    if vocab_parallel and chunk_size is None:
        chunk = None
    else:
        chunk = _chunk_size_value(chunk_size, x.shape[0], hidden, classes, input.dtype,
                                  input.device)
    return LinearCEArgs(x, t, w, m, int(ignore_index), red, label_smoothing, z_loss, cap, chunk,
                        positions)


def linear_ce_result(a, input, loss, extras, return_z_loss, return_token_accuracy):
    """The op's outputs as linear_cross_entropy returns them."""
    red, positions = a.reduction, a.positions
    per_position = red == REDUCTIONS["none"]
    loss = loss.to(F._loss_dtype(input))
    if per_position:
        loss = loss.reshape(positions)
    if not (return_z_loss or return_token_accuracy):
        return loss
    extras = extras.detach()
    if per_position:
        extras = extras.reshape((2,) + positions)
    return F.CrossEntropyOutput(loss, extras[0] if return_z_loss else None,
                                extras[1] if return_token_accuracy else None, None)
