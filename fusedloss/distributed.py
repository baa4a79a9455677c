"""Vocab-parallel softmax cross-entropy on torch.distributed: each rank holds the logits of a
contiguous slice of the classes (tensor-parallel LM heads split the vocabulary), and every rank
gets the loss of the whole row, as fusedloss.cross_entropy on the gathered logits would give it.

Per call, on every rank:

1. A header all_gather (11 int64 per rank, once per call): whether this rank's own argument
   checks failed, rows, local classes, payload width, accumulation dtype, target kind, the
   class weight's length, the chunk size (linear CE), the smallest and largest non-ignored
   target and a target checksum. Every rank then runs the same checks on the same gathered
   header, so a mismatched shape, a bad argument or a bad target on ONE rank makes EVERY rank
   raise a clear error instead of leaving the others waiting in the next collective (targets
   are therefore always checked here, on CUDA too). The slice offsets come from the same header (no separate
   exchange of sizes, and no cache keyed by shape: a cache would let a rank whose shape changed
   take a different sequence of collectives from the others, which is exactly the hang the
   header prevents). On CUDA, reading the header back is the one host synchronisation of a call.
2. Read 1 of the slice: ``softmax_ce_shard_stats`` reduces each row of the slice once to
   (max m_r, log-sum-exp ls_r about m_r, the slice's part of the loss, the slice's correct flag,
   the slice's target mass Q_r).
3. ONE all_gather of that payload, 3 to 5 values per row in the accumulation dtype: 12 bytes per
   row per rank for float32/bfloat16 logits (16 with token accuracy, 16 with probability
   targets), against Megatron's three all-reduces of 4 bytes per row (max, target logit,
   sum of exp; an all-reduce moves each byte about twice) and flash-attention's all_gather of
   the 4-byte lse per row plus an all-reduce of the loss.
4. The combine (`combine`): every rank adds the gathered parts in rank order in float64, so the
   result is bitwise identical on every rank and from run to run. The mean's denominators and
   every sum stay on the device (no host synchronisation).
5. Read 2 of the slice (only when the logits need a gradient): ``softmax_ce_backward`` with the
   global row statistics writes the slice's gradient, pre-scaled for the reduction, so the
   backward only multiplies it by grad_output (no pass at all when that is 1) and needs no
   communication. reduction="none" instead recomputes it in the backward from the saved global
   statistics (also without communication).

Not here: gradients with respect to a probability target, a mask or class weights through the
distributed path (a clear error says so), double backward (a clear error), inplace_backward
(ignored: the slice's gradient is written to its own buffer).
"""

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _ops
from ._composite import _divide_or_zero
from ._ops import REDUCTIONS, acc_dtype

__all__ = ["cross_entropy", "agree", "shard_payload", "combine", "reduce_rows", "softmax_ce"]

# Header fields (one int64 row per rank).
(_ERROR, _ROWS, _CLASSES, _WIDTH, _ACC, _PROB, _WEIGHT, _CHUNK, _TMIN, _TMAX, _TSUM) = range(11)
_HEADER = 11
_NO_TARGET = 2**62  # min/max sentinel: no class-index target to check on this rank
_ACC_CODES = {torch.float32: 0, torch.float64: 1}

_DOUBLE_BACKWARD = (
    "fusedloss: double backward (create_graph=True) through the distributed cross_entropy "
    "(process_group=...) is not supported: its gradient comes from the fused kernel with the "
    "combined row statistics and is not itself differentiable.")


class Layout(NamedTuple):
    """How the classes are split: this rank's slice [offset, offset + sizes[rank]) of
    global_classes, every rank's slice size in group rank order."""

    rank: int
    offset: int
    global_classes: int
    sizes: tuple


class Local(NamedTuple):
    """What a rank's checked arguments bring to the header."""

    logits2d: Tensor
    target: Tensor
    weight: Optional[Tensor]
    ignore_index: int
    want_accuracy: bool
    chunk_rows: int = 0  # linear_cross_entropy's chunk_size (0: automatic)


def _world(group):
    return dist.get_world_size(group), dist.get_rank(group)


def _collective_device(group):
    """Where the group's collectives take tensors: the current CUDA device for NCCL."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(t, group):
    """(world, *t.shape): every rank's t, in group rank order."""
    world, _ = _world(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def payload_width(prob_target, want_accuracy):
    """Values per row of the gathered payload: (m, ls, row loss [, correct] [, Q])."""
    return 3 + int(bool(want_accuracy)) + int(bool(prob_target))


def _header(local, device):
    """This rank's header, on the collectives' device (built there: no host read)."""
    header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    if local is None:
        header[_ERROR] = 1
        return header
    prob = local.target.is_floating_point()
    header[_ROWS], header[_CLASSES] = local.logits2d.shape
    header[_WIDTH] = payload_width(prob, local.want_accuracy)
    header[_ACC] = _ACC_CODES[acc_dtype(local.logits2d.dtype)]
    header[_PROB] = int(prob)
    header[_WEIGHT] = local.weight.shape[0] if local.weight is not None else -1
    header[_CHUNK] = local.chunk_rows
    header[_TMIN], header[_TMAX] = _NO_TARGET, -_NO_TARGET
    if not prob and local.target.numel():
        t = local.target
        counted = t != local.ignore_index
        summary = torch.stack([torch.where(counted, t, _NO_TARGET).min(),
                               torch.where(counted, t, -_NO_TARGET).max(),
                               torch.where(counted, t, 0).sum()])
        header[_TMIN:] = summary.to(device)
    return header


@torch.compiler.disable  # a collective and a host read: run eagerly
def agree(group, prepare, who):
    """Runs prepare() (this rank's argument checks; returns (prepared, Local)), exchanges the
    header and returns (prepared, this rank's Layout). When any rank's checks failed, or the
    ranks' inputs do not fit together, EVERY rank raises (the failing rank its own error, the
    others the same kind of error naming that rank and quoting it): one rank raising alone
    would leave the others waiting in the next collective."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{who}: process_group was given but torch.distributed is not "
                           f"initialized (call torch.distributed.init_process_group first)")
    world, rank = _world(group)
    try:
        prepared, local = prepare()
        error = None
    except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
        prepared, local, error = None, None, err
    header = _header(local, _collective_device(group))
    headers = _all_gather(header, group).cpu().tolist()  # the call's one host read
    failed = [r for r, h in enumerate(headers) if h[_ERROR]]
    if failed:
        messages = [None] * world
        dist.all_gather_object(
            messages, None if error is None else (type(error).__name__, str(error)), group=group)
        if error is not None:
            raise error
        kind, message = messages[failed[0]]
        exc = {"TypeError": TypeError, "IndexError": IndexError,
               "ValueError": ValueError}.get(kind, RuntimeError)
        raise exc(f"{who}(process_group=...): rank {failed[0]} raised {kind}: {message}")
    _check_headers(headers, rank, local, who)
    sizes = tuple(h[_CLASSES] for h in headers)
    return prepared, Layout(rank, sum(sizes[:rank]), sum(sizes), sizes)


def _check_headers(headers, rank, local, who):
    """The same checks, in the same order, on every rank (so every rank raises the same)."""
    who = f"{who}(process_group=...)"
    first = headers[0]
    for r, h in enumerate(headers):
        if h[_ROWS] != first[_ROWS]:
            raise ValueError(f"{who}: input has {h[_ROWS]} positions on rank {r} but "
                             f"{first[_ROWS]} on rank 0; every rank must hold the logits of the "
                             f"same positions (its own slice of the classes)")
        if h[_PROB] != first[_PROB]:
            raise ValueError(f"{who}: target holds class probabilities on rank "
                             f"{r if h[_PROB] else 0} but class indices on rank "
                             f"{0 if h[_PROB] else r}; every rank must pass the same kind")
        if h[_ACC] != first[_ACC]:
            raise TypeError(f"{who}: input is float64 on rank {r if h[_ACC] else 0} but not on "
                            f"rank {0 if h[_ACC] else r}; every rank must pass logits of the "
                            f"same precision")
        if h[_WIDTH] != first[_WIDTH]:
            raise ValueError(f"{who}: return_token_accuracy differs between rank 0 and rank "
                             f"{r}; every rank must pass the same options")
        if h[_CHUNK] != first[_CHUNK]:
            raise ValueError(f"{who}: chunk_size is {h[_CHUNK] or None} on rank {r} but "
                             f"{first[_CHUNK] or None} on rank 0; every rank must run the same "
                             f"chunks")
        if h[_CLASSES] < 1:
            raise ValueError(f"{who}: input has no classes on rank {r} (shape (rows, "
                             f"{h[_CLASSES]})); every rank must hold at least one class")
    classes = sum(h[_CLASSES] for h in headers)
    for r, h in enumerate(headers):
        if h[_WEIGHT] != first[_WEIGHT] or h[_WEIGHT] not in (-1, classes):
            given = "no weight" if h[_WEIGHT] == -1 else f"shape ({h[_WEIGHT]},)"
            raise ValueError(f"{who}: weight must have shape ({classes},) (one weight per class "
                             f"of the whole vocabulary, the sum of every rank's slice) on every "
                             f"rank or be None on every rank, got {given} on rank {r}")
    for r, h in enumerate(headers):
        if h[_TMIN] == _NO_TARGET:
            continue
        bad = h[_TMIN] if h[_TMIN] < 0 else h[_TMAX] if h[_TMAX] >= classes else None
        if bad is not None:
            where = ""
            if r == rank:
                where = f" at position {int((local.target == bad).nonzero()[0, 0])}"
            raise IndexError(f"{who}: target {bad}{where} on rank {r} is out of bounds for "
                             f"{classes} classes (the sum of every rank's slice; expected 0 <= "
                             f"target < {classes}, or ignore_index={local.ignore_index})")
    for r, h in enumerate(headers):
        if (h[_TMIN], h[_TMAX], h[_TSUM]) != (first[_TMIN], first[_TMAX], first[_TSUM]):
            raise ValueError(f"{who}: target differs between rank 0 and rank {r}; targets are "
                             f"global class ids, the same on every rank")


def shard_payload(lib, logits2d, target, weight, mask, ignore_index, label_smoothing, softcap,
                  layout, want_accuracy):
    """Read 1 of the slice: (payload (rows, width) in the accumulation dtype, the slice's
    row statistics)."""
    row_loss, row_stats, row_extras = lib.softmax_ce_shard_stats(
        logits2d, target, weight, mask, ignore_index, label_smoothing, softcap, layout.offset,
        layout.global_classes, want_accuracy)
    columns = [row_stats[:, 0], row_stats[:, 1], row_loss]
    if want_accuracy:
        columns.append(row_extras[1])
    if target.is_floating_point():
        columns.append(row_extras[0])
    return torch.stack(columns, dim=1), row_stats


def _rank_sum(parts):
    """parts (world, rows) summed over ranks in rank order (the same bits on every rank)."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _slice_weight_sums(weight, sizes, device):
    """W_r, float64 (world,): each slice's sum of class weights (its size without weights)."""
    if weight is None:
        return torch.tensor(sizes, dtype=torch.float64, device=device)
    w = weight.to(torch.float64)
    sums, start = [], 0
    for size in sizes:
        sums.append(torch.cumsum(w[start:start + size], 0)[-1])
        start += size
    return torch.stack(sums)


class Combined(NamedTuple):
    """Per row, float64: the cross-entropy part (masked), the z-loss part, correct (mask
    weighted), the global (max, log-sum-exp about it) (0 on rows not kept), the global target
    mass Q (probability targets; else None)."""

    ce: Tensor
    z: Tensor
    correct: Optional[Tensor]
    stats: Tensor
    target_mass: Optional[Tensor]


def combine(gathered, layout, target, weight, mask, ignore_index, label_smoothing, z_loss,
            want_accuracy):
    """The gathered payloads (world, rows, width) -> Combined, in float64. Per row, with the
    ranks' (m_r, ls_r, loss_r [, correct_r] [, Q_r]), smoothing e, C classes, mask m, W_r the
    slice's sum of class weights:
        M = max_r m_r,  ls = log sum_r exp(m_r - M + ls_r),  lse = M + ls,
        lse - lse_r = (M - m_r) + (ls - ls_r)   (no cancellation of two large numbers);
        class index t:  ce = sum_r loss_r + m [(1-e) w_t (lse - lse_owner(t))
                                                + (e/C) sum_r W_r (lse - lse_r)]
        probabilities:  ce = sum_r loss_r + m sum_r Q_r (lse - lse_r)
    (each slice's loss_r is its part taken about its own lse_r; the bracket moves it to the
    global lse); z part = z_loss m lse^2; correct = the owner's, when no lower rank reached M."""
    g = gathered.to(torch.float64)
    m_r, ls_r, loss_r = g[:, :, 0], g[:, :, 1], g[:, :, 2]
    device = g.device
    rows = g.shape[1]
    prob = target.is_floating_point()
    e = label_smoothing
    classes = layout.global_classes
    m_row = (mask.to(torch.float64) if mask is not None
             else torch.ones(rows, dtype=torch.float64, device=device))
    valid = (torch.ones(rows, dtype=torch.bool, device=device) if prob
             else target != ignore_index)
    kept = valid & (m_row != 0)

    top = m_r.amax(0)
    ls = torch.log(_rank_sum(torch.exp(m_r - top + ls_r)))
    lse = top + ls
    lse_gap = (top - m_r) + (ls - ls_r)  # lse - lse_r, each rank's slice, without cancellation
    ce = _rank_sum(loss_r)
    target_mass = None
    if prob:
        q_r = g[:, :, -1]
        ce = ce + m_row * _rank_sum(q_r * lse_gap)
        target_mass = _rank_sum(q_r)
    else:
        safe = torch.where(valid, target, 0).clamp(0, classes - 1)
        ends = torch.tensor(layout.sizes, device=device).cumsum(0)
        owner = torch.bucketize(safe, ends, right=True)
        owner_gap = lse_gap.gather(0, owner[None])[0]
        w_t = (weight.to(torch.float64)[safe] if weight is not None
               else torch.ones(rows, dtype=torch.float64, device=device))
        smooth = _rank_sum(_slice_weight_sums(weight, layout.sizes, device)[:, None] * lse_gap)
        ce = ce + m_row * ((1 - e) * w_t * owner_gap + (e / classes) * smooth)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    ce = torch.where(kept, ce, zero)
    z = torch.where(kept, z_loss * m_row * lse * lse, zero)
    correct = None
    if want_accuracy and not prob:
        # the owner's slice holds the row's first argmax only if no lower rank reached the
        # global max (torch.argmax's rule: the first maximal value)
        first_top_rank = (m_r == top).to(torch.int64).argmax(0)
        owner_correct = g[:, :, 3].gather(0, owner[None])[0]
        correct = torch.where(kept & (first_top_rank == owner), owner_correct, zero)
    stats = torch.where(kept[:, None], torch.stack([top, ls], dim=1), zero)
    return Combined(ce, z, correct, stats, target_mass)


def mean_denominators(target, weight, mask, ignore_index, rows, mean_eps, device):
    """(weighted denominator, count of valid positions), float64 on the device, as the
    single-device op computes them (+ mean_eps each)."""
    from .linear_cross_entropy import mean_denominators as denominators_of
    return denominators_of(target, weight, mask, ignore_index, rows, device) + mean_eps


def _sequential_sum(v):
    from .linear_cross_entropy import _sequential_sum as in_index_order
    return in_index_order(v)


def reduce_rows(combined, reduction, denominators, acc):
    """(loss, extras) as softmax_ce returns them: per row for none, else the sums (divided for
    mean); extras = (z-loss part, correct) per row, or (z-loss part, token accuracy)."""
    c = combined
    correct = c.correct if c.correct is not None else torch.zeros_like(c.z)
    if reduction == REDUCTIONS["none"]:
        return (c.ce + c.z).to(acc), torch.stack([c.z, correct]).to(acc)
    ce_total, z_total = _sequential_sum(c.ce), _sequential_sum(c.z)
    if reduction == REDUCTIONS["mean"]:
        ce_total = _divide_or_zero(ce_total, denominators[0])
        z_total = _divide_or_zero(z_total, denominators[1])
    accuracy = _divide_or_zero(_sequential_sum(correct), denominators[1])
    return (ce_total + z_total).to(acc), torch.stack([z_total, accuracy]).to(acc)


class _Options(NamedTuple):
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float
    reduction: int
    mean_eps: float


def _slice_grad(lib, grad_loss, logits2d, target, weight, mask, stats, target_mass,
                denominators, options, layout):
    """Read 2 of the slice: its gradient from the global row statistics, scaled for the
    reduction (by grad_loss: per row for none, a scalar otherwise)."""
    o = options
    return lib.softmax_ce_backward(grad_loss, logits2d, target, weight, mask, stats,
                                   o.ignore_index, o.label_smoothing, o.z_loss, o.softcap,
                                   o.reduction, o.mean_eps, denominators, layout.offset,
                                   layout.global_classes, target_mass)


class VocabParallelCE(torch.autograd.Function):
    """The collectives live in the forward; the backward is local (the pre-scaled gradient
    times grad_output, or for reduction none the gradient recomputed from the saved global
    statistics)."""

    @staticmethod
    def forward(ctx, logits2d, target, weight, mask, options, layout, group, want_accuracy,
                compute_grad):
        lib = _ops.current().lib
        o = options
        acc = acc_dtype(logits2d.dtype)
        rows = logits2d.shape[0]
        payload, _ = shard_payload(lib, logits2d, target, weight, mask, o.ignore_index,
                                   o.label_smoothing, o.softcap, layout, want_accuracy)
        gathered = _all_gather(payload, group)
        c = combine(gathered, layout, target, weight, mask, o.ignore_index, o.label_smoothing,
                    o.z_loss, want_accuracy)
        per_row = o.reduction == REDUCTIONS["none"]
        denominators = (None if per_row else
                        mean_denominators(target, weight, mask, o.ignore_index, rows, o.mean_eps,
                                          logits2d.device))
        loss, extras = reduce_rows(c, o.reduction, denominators, acc)
        stats = c.stats.to(acc)
        target_mass = c.target_mass.to(acc) if c.target_mass is not None else None

        ctx.options, ctx.layout = options, layout
        ctx.save_for_backward(logits2d, target, weight, mask, stats, target_mass, denominators)
        ctx.saved_grad = None
        if not per_row and compute_grad:
            one = torch.ones((), dtype=acc, device=logits2d.device)
            ctx.saved_grad = _slice_grad(lib, one, logits2d, target, weight, mask, stats,
                                         target_mass, denominators, options, layout)
        ctx.mark_non_differentiable(stats, extras)
        ctx.set_materialize_grads(False)
        return loss, stats, extras

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_extras):
        nones = (None,) * 8
        if grad_loss is None:
            return (None,) + nones
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        lib = _ops.current().lib
        logits2d, target, weight, mask, stats, target_mass, denominators = ctx.saved_tensors
        if ctx.options.reduction == REDUCTIONS["none"]:
            grad = _slice_grad(lib, grad_loss.to(stats.dtype), logits2d, target, weight, mask,
                               stats, target_mass, None, ctx.options, ctx.layout)
            return (grad,) + nones
        grad = ctx.saved_grad
        ctx.saved_grad = None
        if grad is None:  # a second backward (retain_graph=True): the same kernel, same bits
            one = torch.ones((), dtype=stats.dtype, device=logits2d.device)
            grad = _slice_grad(lib, one, logits2d, target, weight, mask, stats, target_mass,
                               denominators, ctx.options, ctx.layout)
        lib.scale_grad_(grad, grad_loss)
        return (grad,) + nones


def refuse_unsupported(target, weight, mask, who):
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(f"{who}(process_group=...) does not support torch.func transforms")
    if not torch.is_grad_enabled():
        return
    for t, name in ((target, "target"), (weight, "weight"), (mask, "mask")):
        if t is not None and t.requires_grad:
            raise RuntimeError(f"{who}(process_group=...) differentiates with respect to the "
                               f"logits only, but {name} requires grad: pass {name}.detach()")


@torch.compiler.disable  # collectives and a host read of the header: run eagerly
def softmax_ce(logits2d, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap,
               reduction, mean_eps=0.0, inplace_backward=False, input=None, want_accuracy=False,
               *, layout, group):
    """functional._softmax_ce's counterpart (same arguments and outputs), once agree() has
    made the layout: logits2d (rows, local classes) is this rank's slice, target (rows,)
    global class ids or (rows, local classes) this slice of the probabilities, weight the
    whole vocabulary's. Returns (loss in the accumulation dtype, the global row statistics,
    extras), identical on every rank. inplace_backward is not used (see the module docstring)."""
    del inplace_backward, input
    options = _Options(int(ignore_index), float(label_smoothing), float(z_loss), float(softcap),
                       int(reduction), float(mean_eps))
    compute_grad = torch.is_grad_enabled() and logits2d.requires_grad
    return VocabParallelCE.apply(logits2d, target, weight, mask, options, layout, group,
                                 bool(want_accuracy), compute_grad)


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, *, mask=None, z_loss=0.0, softcap=None,
                  return_z_loss=False, return_token_accuracy=False, return_lse=False,
                  process_group):
    """fusedloss.cross_entropy(..., process_group=...) (see its docstring)."""
    from . import functional as F

    def prepare():
        a = F._cross_entropy_args(input, target, weight, ignore_index, reduction,
                                  label_smoothing, mask, z_loss, softcap, return_token_accuracy,
                                  weight_classes=0)
        refuse_unsupported(a.target, a.weight, a.mask, "cross_entropy")
        return a, Local(a.logits2d, a.target, a.weight, a.ignore_index, return_token_accuracy)

    a, layout = agree(process_group, prepare, "cross_entropy")
    loss, row_stats, extras = softmax_ce(
        a.logits2d, a.target, a.weight, a.mask, a.ignore_index, a.label_smoothing, a.z_loss,
        a.softcap, a.reduction, want_accuracy=return_token_accuracy, layout=layout,
        group=process_group)
    return F._cross_entropy_result(a, loss, row_stats, extras, return_z_loss,
                                   return_token_accuracy, return_lse)


# DTensor input: logits sharded on the class dim, as loss_parallel() users hold them.

def is_dtensor(x):
    """Whether x is a DTensor (routed to dtensor_cross_entropy, with no process_group)."""
    if isinstance(x, Tensor) and type(x) in (Tensor, torch.nn.Parameter):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(x, DTensor)


def _class_mesh_dim(placements, class_dim, ndim):
    """The one mesh dim that shards the class dim (loss_parallel's "TP" dim); None for a
    DTensor replicated everywhere (each rank then holds the whole logits)."""
    found = [i for i, p in enumerate(placements)
             if p.is_shard() and p.dim % ndim == class_dim]
    bad = [p for p in placements if p.is_partial()]
    if not found and all(p.is_replicate() for p in placements):
        return None
    if len(found) != 1 or bad:
        raise ValueError(f"cross_entropy: a DTensor input must be sharded on the class dim "
                         f"({class_dim}) on exactly one mesh dim (Shard or Replicate on the "
                         f"others), got placements {tuple(placements)}")
    return found[0]


def _local_of(t, name, mesh, placements):
    """A target / mask / weight: a DTensor's local tensor (checked against the placements it
    must have), or a plain tensor where those placements are all Replicate."""
    from torch.distributed.tensor import DTensor, Replicate
    if t is None:
        return None
    if isinstance(t, DTensor):
        if tuple(t.placements) != tuple(placements) or t.device_mesh != mesh:
            raise ValueError(f"cross_entropy: {name} must be placed {tuple(placements)} on the "
                             f"input's mesh, got {tuple(t.placements)}")
        return t.to_local()
    if any(p != Replicate() for p in placements):
        raise ValueError(f"cross_entropy: {name} must be a DTensor placed {tuple(placements)} "
                         f"(the input is sharded on a batch dim too), got a plain tensor")
    return t


def _without_class_dim(placements, class_dim, mesh_dim):
    """loss_parallel's target placements: Replicate on the class mesh dim, Shard(d) for d past
    the class dim shifted down by one."""
    from torch.distributed.tensor import Replicate, Shard
    out = []
    for i, p in enumerate(placements):
        if i == mesh_dim:
            out.append(Replicate())
        elif p.is_shard() and p.dim > class_dim:
            out.append(Shard(p.dim - 1))
        else:
            out.append(p)
    return tuple(out)


def dtensor_cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                          label_smoothing=0.0, *, mask=None, z_loss=0.0, softcap=None,
                          return_z_loss=False, return_token_accuracy=False, return_lse=False):
    """fusedloss.cross_entropy of a DTensor sharded on the class dim: the local shard through
    the process group of that mesh dim. Returns what loss_parallel() returns: a DTensor whose
    placements follow the target's (none) or Replicate on the class mesh dim and Partial on
    batch-sharded mesh dims (sum; mean only on a one-dimensional mesh, as there)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    from . import functional as F
    mesh, placements = input.device_mesh, tuple(input.placements)
    class_dim = 1 if input.dim() >= 2 else 0
    mesh_dim = _class_mesh_dim(placements, class_dim, input.dim())
    position_placements = _without_class_dim(placements, class_dim, mesh_dim)
    group = mesh.get_group(mesh_dim) if mesh_dim is not None else None
    if reduction == "mean" and mesh.ndim > 1:
        raise NotImplementedError(f"cross_entropy: reduction='mean' of a DTensor needs a "
                                  f"one-dimensional mesh (as loss_parallel), got a mesh with "
                                  f"ndim={mesh.ndim}; use reduction='sum' or 'none'")
    if target.is_floating_point():
        local_target = _local_of(target, "target", mesh, placements)
    else:
        local_target = _local_of(target, "target", mesh, position_placements)
    local_mask = _local_of(mask, "mask", mesh, position_placements)
    local_weight = (_local_of(weight, "weight", mesh, (Replicate(),) * mesh.ndim)
                    if weight is not None else None)
    out = F.cross_entropy(input.to_local(), local_target, local_weight, ignore_index,
                          reduction, label_smoothing, mask=local_mask, z_loss=z_loss,
                          softcap=softcap, return_z_loss=return_z_loss,
                          return_token_accuracy=return_token_accuracy, return_lse=return_lse,
                          process_group=group)
    if reduction == "none":
        loss_placements = position_placements
    else:
        loss_placements = tuple(Replicate() if i == mesh_dim
                                else Partial() if p.is_shard() else p
                                for i, p in enumerate(placements))

    def wrap(t, placements_of_t):
        if t is None:
            return None
        return DTensor.from_local(t, mesh, placements_of_t, run_check=False)

    if not isinstance(out, F.CrossEntropyOutput):
        return wrap(out, loss_placements)
    return F.CrossEntropyOutput(wrap(out.loss, loss_placements),
                                wrap(out.z_loss, loss_placements),
                                wrap(out.token_accuracy, loss_placements),
                                wrap(out.lse, position_placements))
