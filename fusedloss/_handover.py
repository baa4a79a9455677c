"""The gradient hand-over: how every fused loss passes the gradients its forward computed to
its backward. Written once here; the loss ops, the in-place and vocab-parallel paths and the
fused linear cross-entropy all use it.

The protocol:
1. For reduction mean/sum the forward computes the gradients already scaled for the reduction
   and keeps them on the autograd context (`keep`), detached: an output holds the node as its
   grad_fn, so keeping them as they are would make a reference cycle that only the garbage
   collector frees (and with it an N x C buffer).
2. The first backward hands the buffers over without a copy and multiplies them by
   grad_output in place (`take`); the kernel makes no pass at all when grad_output is exactly
   1 (scale_grad_ reads it on the device: no host synchronisation).
3. A second backward through a retained graph finds the buffers handed over and calls
   `recompute`: the forward's kernel again, with the forward's exact arithmetic, so that every
   backward through one graph gives the same bits (torch.autograd.gradcheck's reentrancy
   check holds with its default settings). A path that cannot recompute passes a `recompute`
   that raises the reason.
4. While a graph is traced (torch.compile), the buffers are not mutated: `gradient *
   grad_output` is a functional product that the compiler can fuse and place.

reduction="none" does not come here: each row's grad_output is known only in the backward,
which recomputes the gradient from the saved row statistics instead.
"""

from ._common import is_traced


def keep(ctx, *grads):
    """Forward: keep the pre-scaled gradients for the backward (None where there is none;
    when there is none at all, the backward recomputes them)."""
    if all(g is None for g in grads):
        ctx.handover = None
    else:
        ctx.handover = tuple(None if g is None else g.detach() for g in grads)


def take(ctx, lib, grad_loss, recompute):
    """Backward: the kept gradients times grad_loss (a tuple, None where there is none).
    `recompute()` returns the same tuple afresh, for a backward after the first."""
    grads = ctx.handover
    if grads is not None and is_traced(grad_loss):
        return tuple(None if g is None else g * grad_loss for g in grads)
    ctx.handover = None
    if grads is None:
        grads = recompute()
    for g in grads:
        if g is not None:
            lib.scale_grad_(g, grad_loss)
    return grads
