"""Vocab-parallel fused linear cross-entropy: the LM head's weight is split by rows (each rank
holds (V / P, H), a contiguous slice of the vocabulary), the input (N, H) and the targets are
the same on every rank (ColwiseParallel's layout), and no rank ever holds the (N, V) logits,
not even its own (N, V / P) slice whole.

Per row chunk (one reused logits buffer, as in the single-device loop of csrc/linear_ce.cpp),
on every rank:
local logits x_c @ W_r^T; the slice statistics (read 1, combine.shard_payload);
one all_gather of the payload and the float64 combine (combine.combine); the
chunk's logit gradient G from the global statistics (read 2, softmax_ce_backward, pre-scaled for
the reduction); then G @ W_r into this rank's part of the input gradient and G^T x_c (and G's
column sums) into the weight (bias) gradient, which is this rank's alone. Both GEMMs take the
chunk's operands in the compute dtype (16-bit on a GPU) and accumulate and write in the
accumulation dtype (float32). The input gradient parts are all-reduced (summed over the ranks)
once per call, after the last chunk, in float32, and rounded to the input's dtype once, after
the all-reduce.

reduction="none" cannot pre-scale by the unknown per-row grad_output: the forward keeps each
row's input gradient for grad_output 1 (all-reduced once, as above; scaling a row by its
grad_output commutes with the sum over ranks), and the backward recomputes the chunks' logits
and G for the weight and bias gradients, which are local. So no backward communicates.

Predicted tokens (return_predicted_tokens) take, per chunk, one more read of the chunk's
logits slice and one more all_gather of two values per row (combine.slice_argmax /
combine_argmax), only when asked for. token_scaling is refused (protocol.refuse_token_scaling).

One header exchange per call (protocol.agree) makes every rank raise when one
rank's input is bad; the chunks are the same on every rank (no row is skipped: the ranks
must run the same collectives, and a mask is not checked to be the same on every rank).
"""

import torch
import torch.distributed as dist

from .. import _args, _handover, _ops
from .._handover import wide_dtype
from .._common import MEAN, NONE, acc_dtype, auto_chunk_rows, compute_dtype
from .combine import (Combined, Options, combine, combine_argmax, mean_denominators,
                      reduce_rows, shard_payload, slice_argmax, slice_grad, slice_tables)
from .protocol import Local, agree, all_gather, refuse_token_scaling, refuse_unsupported

_DOUBLE_BACKWARD = (
    "fusedloss: double backward (create_graph=True) through linear_cross_entropy with "
    "process_group is not supported: its gradients come from a fused kernel and are not "
    "themselves differentiable.")


class _Chunks:
    """The row chunks of one call and their reused logits buffer (every row, in order)."""

    def __init__(self, input, weight, bias, target, chunk_rows):
        self.device = input.device
        self.dtype = compute_dtype(input.dtype, input.device)
        self.acc = acc_dtype(input.dtype)
        # the input is converted chunk by chunk; the weight once, as every chunk reads all of it
        self.x = input
        self.w = weight.to(self.dtype)
        self.b = bias.to(self.dtype) if bias is not None else None
        self.target = target
        self.rows = input.shape[0]
        self.chunk_rows = max(1, chunk_rows)
        self.buffer = torch.empty((min(self.chunk_rows, max(self.rows, 1)), weight.shape[0]),
                                  dtype=self.dtype, device=self.device)

    def __iter__(self):
        """(row slice, number of rows) per chunk."""
        for start in range(0, self.rows, self.chunk_rows):
            end = min(self.rows, start + self.chunk_rows)
            yield slice(start, end), end - start

    def rows_for_weight(self, xc, rows, ignore_index, mask):
        """The chunk's input rows for the weight's GEMM, padding rows (ignored or masked out)
        zeroed: every row runs through the GEMMs here, with a zero gradient row for padding,
        but 0 * NaN is NaN, and a NaN or inf in a padding row's input would reach the weight
        gradient. A select on the device, no host read (csrc/linear_ce.cpp does the same)."""
        dead = None if self.target.is_floating_point() else self.target[rows] == ignore_index
        if mask is not None:
            dead = mask[rows] == 0 if dead is None else dead | (mask[rows] == 0)
        return xc if dead is None else xc.masked_fill(dead[:, None], 0)

    def logits(self, rows, n):
        """(the chunk's input rows in the compute dtype, its logits in the reused buffer)."""
        x = self.x[rows].to(self.dtype)
        out = self.buffer[:n]
        if self.b is not None:
            torch.addmm(self.b, x, self.w.t(), out=out)
        else:
            torch.mm(x, self.w.t(), out=out)
        return x, out


def _mm_wide(a, b, out, accumulate):
    """out (+)= a @ b, out in the accumulation dtype. For 16-bit a and b (the chunks on a GPU)
    one GEMM of the 16-bit operands with float32 accumulation and output (addmm's out_dtype,
    as csrc/linear_ce.cpp's at::addmm_out), not a float32 GEMM of float32 copies (about an
    order of magnitude slower on a GPU). Where the backend has no such GEMM (the CPU, whose
    chunks are float32 already: compute_dtype), the operands are converted."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    if out.device.type == "cuda":
        return torch.addmm(out, a, b, beta=1 if accumulate else 0, out_dtype=out.dtype, out=out)
    return _mm_wide(a.to(out.dtype), b.to(out.dtype), out, accumulate)


def _inverse_power_of_two(magnitude):
    """2^-e for magnitude = m 2^e, m in [0.5, 1), on the device (no host read): a float16 chunk
    gradient computed at 2^e times its size keeps float16's digits where a mean's 1/N (or a
    small grad_output) would push its entries below float16's smallest subnormal (6e-8) before
    the GEMMs; the float32 accumulators are multiplied by 2^-e at the end, exactly (as
    csrc/linear_ce.cpp's inverse_power_of_two)."""
    _, exponent = torch.frexp(magnitude.to(torch.float64))
    return torch.ldexp(torch.ones((), dtype=torch.float64, device=magnitude.device), -exponent)


def _rows_or_none(t, rows):
    return None if t is None else t[rows]


def _options_of(a, mean_eps=0.0):
    return Options(a.ignore_index, a.label_smoothing, a.z_loss, a.softcap, a.reduction,
                   mean_eps)


class VocabParallelLinearCE(torch.autograd.Function):
    """The chunk loop of the module docstring in the forward (every gradient computed there,
    pre-scaled for mean/sum, and handed over); a local backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, layout, group, needs, want_accuracy, want_argmax):
        lib = _ops.current().lib
        need_input_grad, need_weight_grad, need_bias_grad = needs
        options = _options_of(a)
        per_row = a.reduction == NONE
        c = _Chunks(x, weight, bias, a.target, a.chunk_rows)
        rows, hidden = x.shape
        prob = a.target.is_floating_point()
        denominators = (None if per_row else
                        mean_denominators(a.target, a.weight, a.mask, a.ignore_index, rows,
                                          0.0, c.device))
        any_grad = need_input_grad or need_weight_grad or need_bias_grad
        f64 = dict(dtype=torch.float64, device=c.device)
        ce, z = torch.zeros(rows, **f64), torch.zeros(rows, **f64)
        correct = torch.zeros(rows, **f64) if want_accuracy else None
        stats = torch.zeros((rows, 2), dtype=c.acc, device=c.device)
        mass = torch.zeros(rows, dtype=c.acc, device=c.device) if prob else None
        # rows in no chunk (the CPU lists only the rows read) are not read: -1
        argmax = (torch.full((rows,), -1, dtype=torch.int64, device=c.device) if want_argmax
                  else None)
        # each row's input gradient, summed over the ranks in the accumulation dtype (the
        # slices' parts cancel: a 16-bit part or a 16-bit all-reduce loses the digits the total
        # needs) and rounded to the input's dtype once, after the all-reduce
        grad_input = (torch.zeros((rows, hidden), dtype=c.acc, device=c.device)
                      if need_input_grad else None)
        grad_weight = (torch.zeros(weight.shape, dtype=c.acc, device=c.device)
                       if need_weight_grad and not per_row else None)
        grad_bias = (torch.zeros(weight.shape[:1], dtype=c.acc, device=c.device)
                     if need_bias_grad and not per_row else None)
        one = torch.ones((), dtype=c.acc, device=c.device)
        chunk_denominators, unscale = denominators, None
        if c.dtype == torch.float16 and a.reduction == MEAN and any_grad:
            unscale = _inverse_power_of_two(denominators[0])
            chunk_denominators = denominators * unscale
        tables = None if prob else slice_tables(layout, a.weight, c.device)  # once per call

        for idx, n in c:
            xc, logits = c.logits(idx, n)
            t, m = c.target[idx], _rows_or_none(a.mask, idx)
            payload, _ = shard_payload(lib, logits, t, a.weight, m, a.ignore_index,
                                       a.label_smoothing, a.softcap, layout, want_accuracy)
            part = combine(all_gather(payload, group), layout, t, a.weight, m,
                           a.ignore_index, a.label_smoothing, a.z_loss, want_accuracy,
                           tables=tables)
            ce[idx], z[idx], stats[idx] = part.ce, part.z, part.stats.to(c.acc)
            if correct is not None:
                correct[idx] = part.correct
            if argmax is not None:
                argmax[idx] = combine_argmax(
                    all_gather(slice_argmax(logits, a.softcap, layout.offset), group), t, m,
                    a.ignore_index)
            chunk_mass = part.target_mass.to(c.acc) if prob else None
            if prob:
                mass[idx] = chunk_mass
            if not any_grad:
                continue
            scale = torch.ones(n, dtype=c.acc, device=c.device) if per_row else one
            g = slice_grad(lib, scale, logits, t, a.weight, m, part.stats.to(c.acc),
                           chunk_mass, chunk_denominators, options, layout)
            if grad_input is not None:
                _mm_wide(g, c.w, grad_input[idx], accumulate=False)
            if grad_weight is not None:
                _mm_wide(g.t(), c.rows_for_weight(xc, idx, a.ignore_index, a.mask), grad_weight,
                         accumulate=True)
            if grad_bias is not None:
                grad_bias += g.sum(0, dtype=c.acc)
        if grad_input is not None:  # the one collective of the gradients, in c.acc
            dist.all_reduce(grad_input, group=group)
        if unscale is not None:
            for grad in (grad_input, grad_weight, grad_bias):
                if grad is not None:
                    grad.mul_(unscale)

        combined = Combined(ce, z, correct, stats, None)
        loss, extras = reduce_rows(combined, a.reduction, denominators, c.acc)
        ctx.a, ctx.layout, ctx.needs, ctx.chunk_rows = a, layout, needs, c.chunk_rows
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias, stats, mass)
        # float16 gradients stay in float32 until grad_output is applied (_handover.wide_dtype)
        grad_input = grad_input.to(wide_dtype(x.dtype)) if grad_input is not None else None
        if per_row:  # each row's input gradient for grad_output 1 (scaled in the backward)
            ctx.row_input_grad = grad_input
        else:
            _handover.keep(
                ctx, grad_input,
                grad_weight.to(wide_dtype(weight.dtype)) if grad_weight is not None else None,
                grad_bias.to(wide_dtype(weight.dtype)) if grad_bias is not None else None)
        ctx.differentiated = False
        ctx.mark_non_differentiable(extras)
        if argmax is not None:
            ctx.mark_non_differentiable(argmax)
        ctx.set_materialize_grads(False)
        return loss, extras, argmax

    @staticmethod
    def backward(ctx, grad_loss, _grad_extras, _grad_argmax):
        nones = (None,) * 6
        if grad_loss is None:
            return (None, None, None) + nones
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        if ctx.differentiated:
            _differentiated_once()
        ctx.differentiated = True
        lib = _ops.current().lib
        need_input_grad, need_weight_grad, need_bias_grad = ctx.needs
        x, weight = ctx.saved_tensors[:2]
        if ctx.a.reduction != NONE:
            gi, gw, gb = _handover.take(ctx, lib, grad_loss, _differentiated_once)
        else:
            gi, gw, gb = ctx.row_input_grad, None, None
            ctx.row_input_grad = None
            go = grad_loss.reshape(-1)
            if gi is not None:
                gi = gi * go.to(gi.dtype)[:, None]
            if need_weight_grad or (need_bias_grad and ctx.has_bias):
                gw, gb = _recomputed_param_grads(lib, ctx, go)
        gi, gw, gb = _handover.narrow((gi, gw, gb), (x, weight, weight))
        return (gi if need_input_grad else None, gw if need_weight_grad else None,
                gb if need_bias_grad and ctx.has_bias else None) + nones


def _differentiated_once():
    raise RuntimeError("linear_cross_entropy(process_group=...) can be differentiated once per "
                       "forward (a second backward would need the forward's collectives again)")


def _recomputed_param_grads(lib, ctx, grad_loss):
    """reduction none: the weight (bias) gradient of this rank's slice for a per-row
    grad_loss, the chunks' logits and logit gradients recomputed (local, no collective)."""
    x, weight, bias, stats, mass = ctx.saved_tensors
    a = ctx.a
    c = _Chunks(x, weight, bias, a.target, ctx.chunk_rows)
    need_weight_grad, need_bias_grad = ctx.needs[1], ctx.needs[2] and bias is not None
    gw = torch.zeros(weight.shape, dtype=c.acc, device=c.device) if need_weight_grad else None
    gb = torch.zeros(weight.shape[:1], dtype=c.acc, device=c.device) if need_bias_grad else None
    go = grad_loss.to(c.acc)
    unscale = None
    if c.dtype == torch.float16 and go.numel():  # see _inverse_power_of_two
        scale = _inverse_power_of_two(go.abs().max())
        go, unscale = go * scale.to(go.dtype), scale.reciprocal()
    for idx, n in c:
        xc, logits = c.logits(idx, n)
        g = slice_grad(lib, go[idx], logits, c.target[idx], a.weight, _rows_or_none(a.mask, idx),
                       stats[idx], _rows_or_none(mass, idx), None, _options_of(a), ctx.layout)
        if gw is not None:
            _mm_wide(g.t(), c.rows_for_weight(xc, idx, a.ignore_index, a.mask), gw,
                     accumulate=True)
        if gb is not None:
            gb += g.sum(0, dtype=c.acc)
    for grad in (gw, gb):
        if grad is not None and unscale is not None:
            grad.mul_(unscale)
    return (gw.to(weight.dtype) if gw is not None else None,
            gb.to(weight.dtype) if gb is not None else None)


@torch.compiler.disable  # collectives and a host read of the header: run eagerly
def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=-100, label_smoothing=0.0, mask=None,
                         z_loss=0.0, softcap=None, chunk_size=None, return_z_loss=False,
                         return_token_accuracy=False, return_predicted_tokens=False,
                         token_scaling=False, process_group):
    """fusedloss.linear_cross_entropy(..., process_group=...) (see its docstring)."""

    def prepare():
        a = _args.linear_ce_args(input, linear_weight, target, linear_bias, weight, reduction,
                                 ignore_index, label_smoothing, mask, z_loss, softcap,
                                 chunk_size, return_token_accuracy, vocab_parallel=True,
                                 token_scaling=token_scaling,
                                 return_predicted_tokens=return_predicted_tokens)
        refuse_unsupported(None, None, None, "linear_cross_entropy")
        refuse_token_scaling(a.token_scaling, "linear_cross_entropy")
        rows = a.x.shape[0]
        slice_logits = torch.empty((rows, linear_weight.shape[0]), dtype=input.dtype,
                                   device="meta")  # the header reads its shape and dtype only
        return a, Local(slice_logits, a.target, a.weight, a.ignore_index,
                        return_token_accuracy, a.chunk_rows or 0, a.x.device)

    a, layout = agree(process_group, prepare, "linear_cross_entropy",
                      input.device if isinstance(input, torch.Tensor) else None)
    if a.chunk_rows is None:  # from the largest slice, so that every rank runs the same chunks
        a = a._replace(chunk_rows=auto_chunk_rows(
            a.x.shape[0], a.x.shape[1], max(layout.sizes),
            compute_dtype(input.dtype, input.device)))
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and input.requires_grad, grad_on and linear_weight.requires_grad,
             grad_on and linear_bias is not None and linear_bias.requires_grad)
    # The operands as they are: under torch.autocast the chunks' GEMMs would otherwise be cast.
    with torch.autocast(input.device.type, enabled=False):
        loss, extras, predicted = VocabParallelLinearCE.apply(
            a.x, linear_weight, linear_bias, a, layout, process_group, needs,
            return_token_accuracy, bool(return_predicted_tokens))
    return _args.linear_ce_result(a, input, loss, extras, return_z_loss, return_token_accuracy,
                                  predicted)
