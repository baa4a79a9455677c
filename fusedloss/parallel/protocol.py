"""The vocab-parallel protocol: how the ranks agree on one call before any collective of its
own. Each rank holds the logits of a contiguous slice of the classes (tensor-parallel LM heads
split the vocabulary).

A header all_gather (11 int64 per rank, once per call) carries: whether this rank's own
argument checks failed, rows, local classes, payload width, accumulation dtype, target kind,
the class weight's length, the chunk size (linear CE), the smallest and largest non-ignored
target and a target checksum. Every rank then runs the same checks on the same gathered header,
so a mismatched shape, a bad argument or a bad target on ONE rank makes EVERY rank raise a clear
error instead of leaving the others waiting in the next collective (targets are therefore
always checked here, on CUDA too). The slice offsets come from the same header (no separate
exchange of sizes, and no cache keyed by shape: a cache would let a rank whose shape changed
take a different sequence of collectives from the others, which is exactly the hang the header
prevents). On CUDA, reading the header back is the one host synchronisation of a call.
"""

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .._common import acc_dtype, device_values

# Header fields (one int64 row per rank).
(_ERROR, _ROWS, _CLASSES, _WIDTH, _ACC, _PROB, _WEIGHT, _CHUNK, _TMIN, _TMAX, _TSUM) = range(11)
_HEADER = 11


_NO_TARGET = 2**62  # min/max sentinel: no class-index target to check on this rank


_ACC_CODES = {torch.float32: 0, torch.float64: 1}


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
    device: Optional[torch.device] = None  # the call's tensors' (default: logits2d's)


def world_and_rank(group):
    return dist.get_world_size(group), dist.get_rank(group)


def _uses_nccl(group):
    return "nccl" in str(dist.get_backend(group)).lower()


def _collective_device(group, device, who):
    """Where this call's header goes: for a group with NCCL, the device of the call's tensors
    (their CUDA device, not the current one: they may differ), or the CPU where the group also
    has a CPU backend ("cpu:gloo,cuda:nccl") and the tensors are on the CPU; for the others
    (gloo), the CPU, where the header is read. A ValueError for tensors NCCL cannot take."""
    if not _uses_nccl(group):
        return torch.device("cpu")
    if device.type == "cuda":
        return device
    backend = str(dist.get_backend(group))
    if device.type == "cpu" and "cpu:" in backend.lower():
        return device
    raise ValueError(f"{who}(process_group=...): the process group's backend is {backend}, "
                     f"whose collectives take CUDA tensors, but input is on {device}; move the "
                     f"call's tensors to this rank's GPU, or pass a gloo process group")


def _error_header_device(group, device):
    """The header's device on a rank whose own checks failed (it must still join the
    collective): the call's device where NCCL can take it, else the current CUDA device."""
    if not _uses_nccl(group):
        return torch.device("cpu")
    if device is not None and device.type == "cuda":
        return device
    return torch.device("cuda", torch.cuda.current_device())


def all_gather(t, group):
    """(world, *t.shape): every rank's t, in group rank order."""
    world, _ = world_and_rank(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def payload_width(prob_target, want_accuracy):
    """Values per row of the gathered payload: (m, ls, row loss [, correct] [, Q])."""
    return 3 + int(bool(want_accuracy)) + int(bool(prob_target))


def _header(local, device):
    """This rank's header, on the collectives' device: the host-known fields copied without a
    host synchronisation (_common.device_values), the target summary computed where the target
    is."""
    fields = [0] * _HEADER
    if local is None:
        fields[_ERROR] = 1
        return device_values(fields, torch.int64, device)
    prob = local.target.is_floating_point()
    fields[_ROWS], fields[_CLASSES] = local.logits2d.shape
    fields[_WIDTH] = payload_width(prob, local.want_accuracy)
    fields[_ACC] = _ACC_CODES[acc_dtype(local.logits2d.dtype)]
    fields[_PROB] = int(prob)
    fields[_WEIGHT] = local.weight.shape[0] if local.weight is not None else -1
    fields[_CHUNK] = local.chunk_rows
    fields[_TMIN], fields[_TMAX] = _NO_TARGET, -_NO_TARGET
    header = device_values(fields, torch.int64, device)
    if not prob and local.target.numel():
        t = local.target
        counted = t != local.ignore_index
        summary = torch.stack([torch.where(counted, t, _NO_TARGET).min(),
                               torch.where(counted, t, -_NO_TARGET).max(),
                               torch.where(counted, t, 0).sum()])
        header[_TMIN:] = summary.to(device)
    return header


@torch.compiler.disable  # a collective and a host read: run eagerly
def agree(group, prepare, who, device=None):
    """Runs prepare() (this rank's argument checks; returns (prepared, Local)), exchanges the
    header and returns (prepared, this rank's Layout). When any rank's checks failed, or the
    ranks' inputs do not fit together, EVERY rank raises (the failing rank its own error, the
    others the same kind of error naming that rank and quoting it): one rank raising alone
    would leave the others waiting in the next collective. The header goes on the device of
    the call's tensors (Local.device, else its logits'); device: the input's, for the header
    of a rank whose checks failed (else the current CUDA device under NCCL)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{who}: process_group was given but torch.distributed is not "
                           f"initialized (call torch.distributed.init_process_group first)")
    world, rank = world_and_rank(group)
    try:
        prepared, local = prepare()
        header_device = _collective_device(
            group, local.device if local.device is not None else local.logits2d.device, who)
        error = None
    except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
        prepared, local, error = None, None, err
        header_device = _error_header_device(group, device)
    header = _header(local, header_device)
    headers = all_gather(header, group).cpu().tolist()  # the call's one host read
    failed = [r for r, h in enumerate(headers) if h[_ERROR]]
    if failed:
        messages = [None] * world
        dist.all_gather_object(
            messages, None if error is None else (type(error).__name__, str(error)), group=group)
        if error is not None:
            raise error
        kind, message = messages[failed[0]]
        exc = {"TypeError": TypeError, "IndexError": IndexError, "ValueError": ValueError,
               "NotImplementedError": NotImplementedError}.get(kind, RuntimeError)
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


def refuse_token_scaling(token_scaling, who):
    """token_scaling needs each row's target logit beside the global statistics, which the
    vocab-parallel payload does not carry: a clear error (raised inside every rank's prepare(),
    so that every rank raises it)."""
    if token_scaling:
        raise NotImplementedError(f"{who}: token_scaling=True is not supported with "
                                  f"process_group (vocab-parallel logits) or a sharded DTensor")


def refuse_unsupported(target, weight, mask, who):
    """The vocab-parallel paths differentiate the logits only and run no torch.func
    transform: a clear error, naming the argument, where a call asks for more."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(f"{who}(process_group=...) does not support torch.func transforms")
    if not torch.is_grad_enabled():
        return
    for t, name in ((target, "target"), (weight, "weight"), (mask, "mask")):
        if t is not None and t.requires_grad:
            raise RuntimeError(f"{who}(process_group=...) differentiates with respect to the "
                               f"logits only, but {name} requires grad: pass {name}.detach()")
