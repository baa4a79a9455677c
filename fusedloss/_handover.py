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

float16 gradients are not pre-scaled (`defers`): a mean's gradient (p - y) / N loses every
entry below float16's smallest subnormal (6e-8) before a loss scale of 2^16 could bring it
back, where PyTorch rounds to float16 once, after every factor. For float16 the forward keeps
nothing (`defer`), and every backward writes the gradient with grad_output known (`take`'s
`write`: the backward kernel, one read of the logits and one write, rounded once). bfloat16
has float32's exponent range: pre-scaling costs it no digits, and it keeps the one-pass
hand-over.

reduction="none" does not come here: each row's grad_output is known only in the backward,
which recomputes the gradient from the saved row statistics instead.
"""

import torch

from ._common import is_traced

_DEFERRED = "written in the backward"


def defers(dtype):
    """Whether a gradient of `dtype` is written in the backward with grad_output known
    (float16: see the module docstring) instead of pre-scaled in the forward."""
    return dtype == torch.float16


def wide_dtype(dtype):
    """The dtype in which an op that accumulates a gradient (the fused linear cross-entropy)
    returns a gradient of `dtype`: float32 where `defers(dtype)`, rounded once by the backward
    after grad_output; the dtype itself otherwise."""
    return torch.float32 if defers(dtype) else dtype


def narrow(grads, operands):
    """Each gradient in its operand's dtype: a float16 gradient that came wide (`wide_dtype`)
    is rounded here, once, after grad_output was applied; the others are returned as they
    are."""
    return tuple(g if g is None else g.to(t.dtype) for g, t in zip(grads, operands))


def defer(ctx):
    """Forward: keep nothing; every backward writes the gradient (`take`'s `write`)."""
    ctx.handover = _DEFERRED


def keep(ctx, *grads):
    """Forward: keep the pre-scaled gradients for the backward (None where there is none;
    when there is none at all, the backward recomputes them)."""
    # (loops, not generators: this runs on every eager call, where microseconds count)
    kept = tuple([g if g is None else g.detach() for g in grads])
    ctx.handover = None
    for g in kept:
        if g is not None:
            ctx.handover = kept
            break


def take(ctx, lib, grad_loss, recompute, write=None):
    """Backward: the kept gradients times grad_loss (a tuple, None where there is none).
    `recompute()` returns the same tuple afresh, for a backward after the first; after
    `defer`, `write(grad_loss)` returns the gradients with grad_loss applied, rounded once."""
    grads = ctx.handover
    if grads is _DEFERRED:
        return write(grad_loss)
    if grads is not None and is_traced(grad_loss):
        return tuple([g if g is None else g * grad_loss for g in grads])
    ctx.handover = None
    if grads is None:
        grads = recompute()
    for g in grads:
        if g is not None:
            lib.scale_grad_(g, grad_loss)
    return grads
