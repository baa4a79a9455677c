"""Fake (meta) kernels and autograd for every fusedloss op.

The forward ops return the gradient already scaled for the reduction (mean/sum), so their
backward only multiplies it by grad_output, in place, and the kernel makes no pass at all when
grad_output is exactly 1. reduction="none" recomputes the gradient from the saved logsumexp
instead: that moves fewer bytes than writing a gradient in the forward and scaling it later
(bench/README.md has the byte counts).
"""

import contextlib
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_traced(t):
    """True while torch.compile / AOTAutograd traces (tensors are fake or functional)."""
    return torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))



_DOUBLE_BACKWARD = (
    "fusedloss: double backward (create_graph=True) through {} is not supported: its gradient "
    "comes from a fused kernel and is not itself differentiable. Use the torch.nn.functional "
    "loss where second derivatives are needed.")
_CONSUMED = (
    "fusedloss: a second backward through this {} (retain_graph=True) needs its logits, which "
    "are gone or were modified since the forward (the first backward handed its gradient "
    "over without a copy). Keep the logits alive and unmodified, or use reduction='none'.")


class _LogitsRef:
    """The logits of a mean/sum loss, kept for a second backward only if that is free: a
    strong reference to a leaf or a view of one (the caller holds it anyway), a weak one
    otherwise (holding a non-leaf would keep an N x C buffer alive until the backward)."""

    def __init__(self, logits):
        self.version = logits._version
        base = logits if logits._base is None else logits._base  # a view keeps its base alive
        self.strong = logits if base.is_leaf else None
        self.weak = weakref.ref(logits)

    def get(self):
        logits = self.strong if self.strong is not None else self.weak()
        if logits is None or logits._version != self.version:
            return None
        return logits


def _scaled_saved_grad(lib, ctx, grad_output, what):
    """The forward's pre-scaled gradient times grad_output, handed over without a copy; a
    second backward recomputes it from the logits (``ctx.recompute(grad_output)``)."""
    grad = ctx.saved_grad
    if grad is not None and grad.numel() == 0 and ctx.input_numel != 0:
        raise RuntimeError(f"fusedloss: {what} ran without a gradient (its input did not "
                           "require grad when the forward ran)")
    if is_traced(grad_output):
        return grad * grad_output
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD.format(what))
    if grad is None:
        grad = ctx.recompute(grad_output)
        if grad is None:
            raise RuntimeError(_CONSUMED.format(what))
        return grad
    ctx.saved_grad = None
    lib.scale_grad_(grad, grad_output)
    return grad


class OpSet:
    """The fusedloss ops of one library namespace, with their fakes and autograd registered.

    The product uses torch.ops.fusedloss; the SIMT test harness registers the same schemas as
    torch.ops.fusedloss_simt (the CUDA kernels emulated on the CPU) and runs the same tests
    through them with `use(...)`."""

    def __init__(self, namespace):
        self.namespace = namespace
        lib = getattr(torch.ops, namespace)
        self.lib = lib
        for name in ("softmax_ce", "softmax_ce_inplace", "softmax_ce_backward", "sigmoid_ce",
                     "sigmoid_ce_backward", "scale_grad_"):
            setattr(self, name, getattr(lib, name))
        _register_fakes(namespace)
        _register_autograd(namespace, lib)
        self.SoftmaxCEInplace = _make_inplace_function(lib)


def _register_fakes(namespace):
    @torch.library.register_fake(f"{namespace}::softmax_ce")
    def _softmax_ce_fake(logits, target, weight, mask, ignore_index, label_smoothing, z_loss,
                         softcap, reduction, mean_eps, compute_grad):
        torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.dim()}-D")
        torch._check(0 <= reduction <= 2, lambda: f"reduction must be 0, 1 or 2, got {reduction}")
        rows, classes = logits.shape
        loss = logits.new_empty((rows,) if reduction == 0 else ())
        row_stats = logits.new_empty((rows, 2), dtype=acc_dtype(logits.dtype))
        grad = logits.new_empty((rows, classes) if compute_grad else (0,))
        return loss, row_stats, grad

    @torch.library.register_fake(f"{namespace}::softmax_ce_inplace")
    def _softmax_ce_inplace_fake(logits, target, weight, mask, ignore_index, label_smoothing,
                                 z_loss, softcap, reduction, mean_eps):
        torch._check(reduction != 0, lambda: "softmax_ce_inplace needs reduction mean or sum")
        return (logits.new_empty(()),
                logits.new_empty((logits.shape[0], 2), dtype=acc_dtype(logits.dtype)))

    @torch.library.register_fake(f"{namespace}::softmax_ce_backward")
    def _softmax_ce_backward_fake(grad_loss, logits, target, weight, mask, row_stats, ignore_index,
                                  label_smoothing, z_loss, softcap, reduction, mean_eps):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake(f"{namespace}::sigmoid_ce")
    def _sigmoid_ce_fake(input, target, weight, pos_weight, mask, label_smoothing, reduction,
                         compute_grad):
        torch._check(input.dim() == 2, lambda: f"input must be 2-D, got {input.dim()}-D")
        per_element = reduction == 0
        loss = input.new_empty(input.shape if per_element else ())
        grad = input.new_empty(input.shape if compute_grad and not per_element else (0,))
        return loss, grad

    @torch.library.register_fake(f"{namespace}::sigmoid_ce_backward")
    def _sigmoid_ce_backward_fake(grad_loss, input, target, weight, pos_weight, mask,
                                  label_smoothing, reduction):
        return input.new_empty(input.shape)

    @torch.library.register_fake(f"{namespace}::scale_grad_")
    def _scale_grad_fake(grad, scale):
        return None


def _register_loss_autograd(namespace, lib, op, backward_op, split, what):
    """Autograd of a loss op whose outputs are (loss, ...) and whose backward op is called as
    backward_op(grad_loss, x, *aux, *options).

    split(inputs, output) -> (x, aux tensors, options, reduction, pre-scaled gradient).
    reduction="none" saves x and aux and recomputes; mean/sum hand the forward's gradient over
    and keep only what a second backward needs to recompute it."""

    def setup(ctx, inputs, output):
        x, aux, options, reduction, grad = split(inputs, output)
        ctx.n_inputs = len(inputs)
        # Only the loss is differentiable: no zero-filled N x C gradient for the other outputs.
        ctx.set_materialize_grads(False)
        ctx.reduction = reduction
        ctx.input_numel = x.numel()
        ctx.options = options
        if reduction == 0:
            ctx.save_for_backward(x, *aux)
            return
        # Kept detached: an output holds this node as its grad_fn, so keeping it as is on ctx
        # would make a reference cycle that only the garbage collector frees (and with it the
        # N x C gradient).
        ctx.saved_grad = grad.detach()
        aux = [t.detach() if t is not None else None for t in aux]
        x_ref = _LogitsRef(x)

        def recompute(grad_loss):
            live_x = x_ref.get()
            if live_x is None:
                return None
            return backward_op(grad_loss, live_x, *aux, *options)

        ctx.recompute = recompute

    def backward(ctx, grad_loss, *_grads_of_other_outputs):
        none_for_the_rest = (None,) * (ctx.n_inputs - 1)
        if grad_loss is None:  # no gradient flows into the loss (undefined, not zero-filled)
            return (None,) + none_for_the_rest
        if ctx.reduction == 0:
            if torch.is_grad_enabled() and not is_traced(grad_loss):
                raise RuntimeError(_DOUBLE_BACKWARD.format(what))
            grad = backward_op(grad_loss, *ctx.saved_tensors, *ctx.options)
        else:
            grad = _scaled_saved_grad(lib, ctx, grad_loss, what)
        return (grad,) + none_for_the_rest

    torch.library.register_autograd(f"{namespace}::{op}", backward, setup_context=setup)


def _register_autograd(namespace, lib):
    def softmax_split(inputs, output):
        (logits, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap, reduction,
         mean_eps, _compute_grad) = inputs
        _loss, row_stats, grad = output
        return (logits, (target, weight, mask, row_stats),
                (ignore_index, label_smoothing, z_loss, softcap, reduction, mean_eps), reduction,
                grad)

    def sigmoid_split(inputs, output):
        input, target, weight, pos_weight, mask, label_smoothing, reduction, _compute_grad = inputs
        _loss, grad = output
        return (input, (target, weight, pos_weight, mask), (label_smoothing, reduction),
                reduction, grad)

    _register_loss_autograd(namespace, lib, "softmax_ce", lib.softmax_ce_backward,
                            softmax_split, "cross_entropy")
    _register_loss_autograd(namespace, lib, "sigmoid_ce", lib.sigmoid_ce_backward,
                            sigmoid_split, "binary_cross_entropy_with_logits")


def _make_inplace_function(lib):
    class SoftmaxCEInplace(torch.autograd.Function):
        """cross_entropy(inplace_backward=True): the forward writes the gradient into the
        logits' storage (no N x C buffer). Autograd sees the write: the logits' version
        counter moves, so any other op that saved them refuses to run its backward rather
        than read the gradient as logits. functional.py takes this path only where it is safe
        (see _inplace_is_safe)."""

        @staticmethod
        def forward(ctx, logits, target, weight, mask, ignore_index, label_smoothing, z_loss,
                    softcap, reduction, mean_eps):
            version = logits._version
            loss, _row_stats = lib.softmax_ce_inplace(logits, target, weight, mask, ignore_index,
                                                label_smoothing, z_loss, softcap, reduction,
                                                mean_eps)
            if logits._version == version:
                torch.autograd.graph.increment_version(logits)
            ctx.saved_grad = logits.detach()
            ctx.input_numel = logits.numel()
            ctx.recompute = lambda grad_loss: None  # the logits are gone: they hold the gradient
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            grad = _scaled_saved_grad(lib, ctx, grad_loss, "cross_entropy")
            return (grad,) + (None,) * 9

    return SoftmaxCEInplace


_active = OpSet("fusedloss")


def current():
    """The OpSet the public functions call."""
    return _active


@contextlib.contextmanager
def use(opset):
    """Route the public functions through another OpSet (tests: the SIMT-emulated kernels)."""
    global _active
    previous, _active = _active, opset
    try:
        yield opset
    finally:
        _active = previous
