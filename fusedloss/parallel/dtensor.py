"""The DTensor adapter: logits sharded on the class dim, as the users of
torch.distributed.tensor.parallel.loss_parallel hold them. `unwrap` turns the DTensor call
into local tensors and the process group of the mesh dim that shards the classes; the caller
(fusedloss.cross_entropy) runs its own path on them, and `DTensorCall.rewrap` makes the result
what loss_parallel() returns. Nothing here calls a loss."""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._args import CrossEntropyOutput


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


class DTensorCall(NamedTuple):
    """A DTensor call in local tensors: the local logits, target, weight and mask, the process
    group of the class mesh dim (None where the logits are replicated), and what rewrap needs."""

    input: Tensor
    target: Tensor
    weight: Optional[Tensor]
    mask: Optional[Tensor]
    group: object
    mesh: object
    loss_placements: tuple
    position_placements: tuple

    def rewrap(self, out):
        """The local result as loss_parallel() returns it: a DTensor whose placements follow
        the target's (none) or Replicate on the class mesh dim and Partial on batch-sharded
        mesh dims (sum; mean only on a one-dimensional mesh, as there)."""
        from torch.distributed.tensor import DTensor

        def wrap(t, placements):
            if t is None:
                return None
            return DTensor.from_local(t, self.mesh, placements, run_check=False)

        if not isinstance(out, CrossEntropyOutput):
            return wrap(out, self.loss_placements)
        return CrossEntropyOutput(wrap(out.loss, self.loss_placements),
                                  wrap(out.z_loss, self.loss_placements),
                                  wrap(out.token_accuracy, self.loss_placements),
                                  wrap(out.lse, self.position_placements),
                                  wrap(out.predicted_tokens, self.position_placements))


def unwrap(input, target, weight, mask, reduction):
    """fusedloss.cross_entropy's DTensor operands as a DTensorCall (checks the placements)."""
    from torch.distributed.tensor import Partial, Replicate

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
    if reduction == "none":
        loss_placements = position_placements
    else:
        loss_placements = tuple(Replicate() if i == mesh_dim
                                else Partial() if p.is_shard() else p
                                for i, p in enumerate(placements))
    return DTensorCall(input.to_local(), local_target, local_weight, local_mask, group, mesh,
                       loss_placements, position_placements)
