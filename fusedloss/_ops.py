"""Fake (meta) kernels and autograd for every fusedloss op.

The forward ops return the gradient already scaled for the reduction (mean/sum), so their
backward only multiplies it by grad_output, in place, and the kernel makes no pass at all when
grad_output is exactly 1. reduction="none" recomputes the gradient from the saved row
statistics instead: that moves fewer bytes than writing a gradient in the forward and scaling
it later (bench/README.md has the byte counts).

Every backward through one graph gives the same bits: a second backward (retain_graph)
recomputes the gradient with the forward kernel itself, so torch.autograd.gradcheck's
reentrancy check holds with its default settings. What the fused kernels do not compute
(second derivatives, the gradients of targets, masks and weights) comes from the
differentiable compositions in _composite.py.

Under torch.compile, mean/sum losses whose only differentiable input is the logits take the
autograd.Function of _compiled.py instead (the gradient over dead logits); the traced branch
below serves the rest (gradients of targets, masks or weights wanted too).
"""

import contextlib
import functools

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from . import _compiled

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_traced(t):
    """True while torch.compile / AOTAutograd traces (tensors are fake or functional)."""
    return torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))


_INPLACE_CONSUMED = (
    "fusedloss: {} with inplace_backward=True wrote its gradient over the logits, so it can "
    "be differentiated once only: a second backward (retain_graph=True) or a double backward "
    "(create_graph=True) needs the logits. Use inplace_backward=False there.")


class DefaultOverloads:
    """A namespace's ops as their default overloads (each op has only that one). Calling the
    packet `torch.ops.fusedloss.softmax_ce` resolves the overload on every call: measured
    42 us a call of softmax_ce on 8 x 10 logits against 25 us for `.default`."""

    def __init__(self, namespace):
        self._packets = getattr(torch.ops, namespace)

    def __getattr__(self, name):
        op = getattr(self._packets, name).default
        setattr(self, name, op)  # found on the instance from now on, without __getattr__
        return op


class OpSet:
    """The fusedloss ops of one library namespace, with their fakes and autograd registered.

    The product uses torch.ops.fusedloss; the SIMT test harness registers the same schemas as
    torch.ops.fusedloss_simt (the CUDA kernels emulated on the CPU) and runs the same tests
    through them with `use(...)`."""

    def __init__(self, namespace):
        self.namespace = namespace
        lib = DefaultOverloads(namespace)
        self.lib = lib
        for name in ("softmax_ce", "softmax_ce_inplace", "softmax_ce_backward",
                     "softmax_ce_shard_stats", "sigmoid_ce", "sigmoid_ce_backward", "scale_grad_"):
            setattr(self, name, getattr(lib, name))
        _register_fakes(namespace)
        # The loss ops for eager calls (the same autograd formula, less per-call overhead:
        # _eager_function); compiled and traced calls use the registered ops themselves.
        self._eager = dict(zip(("softmax_ce", "sigmoid_ce"), _register_autograd(namespace, lib)))
        self.SoftmaxCEInplace = _make_inplace_function(lib)
        self.SoftmaxCECompiled = _compiled.make_function(lib)

    def loss_op(self, name, input, needs_grad):
        """The form of loss op `name` to call on `input`: the registered op while tracing, else
        (eager) the autograd.Function of _eager_function when a gradient is recorded, and
        otherwise the op below autograd, which records nothing (no Function, no context)."""
        if is_traced(input):
            return getattr(self, name)
        if needs_grad:
            return self._eager[name]
        return functools.partial(_below_autograd, getattr(self.lib, name))


def _below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _register_fakes(namespace):
    @torch.library.register_fake(f"{namespace}::softmax_ce")
    def _softmax_ce_fake(logits, target, weight, mask, ignore_index, label_smoothing, z_loss,
                         softcap, reduction, mean_eps, compute_grad, want_accuracy=False,
                         denominators=None):
        torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.dim()}-D")
        torch._check(0 <= reduction <= 2, lambda: f"reduction must be 0, 1 or 2, got {reduction}")
        rows, classes = logits.shape
        acc = acc_dtype(logits.dtype)
        per_row = reduction == 0
        loss = logits.new_empty((rows,) if per_row else (), dtype=acc)
        row_stats = logits.new_empty((rows, 2), dtype=acc)
        grad = logits.new_empty((rows, classes) if compute_grad else (0,))
        extras = logits.new_empty((2, rows) if per_row else (2,), dtype=acc)
        return loss, row_stats, grad, extras

    @torch.library.register_fake(f"{namespace}::softmax_ce_inplace")
    def _softmax_ce_inplace_fake(logits, target, weight, mask, ignore_index, label_smoothing,
                                 z_loss, softcap, reduction, mean_eps, want_accuracy=False,
                                 denominators=None):
        torch._check(reduction != 0, lambda: "softmax_ce_inplace needs reduction mean or sum")
        acc = acc_dtype(logits.dtype)
        return (logits.new_empty((), dtype=acc),
                logits.new_empty((logits.shape[0], 2), dtype=acc),
                logits.new_empty((2,), dtype=acc))

    @torch.library.register_fake(f"{namespace}::softmax_ce_backward")
    def _softmax_ce_backward_fake(grad_loss, logits, target, weight, mask, row_stats, ignore_index,
                                  label_smoothing, z_loss, softcap, reduction, mean_eps,
                                  denominators=None, class_offset=0, global_classes=0,
                                  row_target_mass=None):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake(f"{namespace}::softmax_ce_shard_stats")
    def _softmax_ce_shard_stats_fake(logits, target, weight, mask, ignore_index, label_smoothing,
                                     softcap, class_offset, global_classes, want_accuracy):
        torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.dim()}-D")
        rows = logits.shape[0]
        acc = acc_dtype(logits.dtype)
        return (logits.new_empty((rows,), dtype=acc), logits.new_empty((rows, 2), dtype=acc),
                logits.new_empty((2, rows), dtype=acc))

    @torch.library.register_fake(f"{namespace}::sigmoid_ce")
    def _sigmoid_ce_fake(input, target, weight, pos_weight, mask, label_smoothing, reduction,
                         compute_grad):
        torch._check(input.dim() == 2, lambda: f"input must be 2-D, got {input.dim()}-D")
        per_element = reduction == 0
        loss = input.new_empty(input.shape if per_element else (), dtype=acc_dtype(input.dtype))
        grad = input.new_empty(input.shape if compute_grad and not per_element else (0,))
        return loss, grad

    @torch.library.register_fake(f"{namespace}::sigmoid_ce_backward")
    def _sigmoid_ce_backward_fake(grad_loss, input, target, weight, pos_weight, mask,
                                  label_smoothing, reduction):
        return input.new_empty(input.shape)

    @torch.library.register_fake(f"{namespace}::scale_grad_")
    def _scale_grad_fake(grad, scale):
        return None


def _composite_grads(composite, args, diff_positions, grad_loss, create_graph):
    """Gradients of composite(*args) (its first output) with respect to args[i] for i in
    diff_positions, under the incoming grad_loss; differentiable when create_graph."""
    with torch.enable_grad():
        loss = composite(*args)
        if isinstance(loss, tuple):
            loss = loss[0]
        inputs = [args[i] for i in diff_positions]
        grads = torch.autograd.grad(loss, inputs, grad_loss, create_graph=create_graph,
                                    allow_unused=True)
    return dict(zip(diff_positions, grads))


def _register_loss_autograd(namespace, lib, op, spec):
    """Autograd of a loss op (softmax_ce, sigmoid_ce); `spec` says how its inputs and outputs
    are laid out (_SoftmaxSpec, _SigmoidSpec)."""

    def setup(ctx, inputs, output):
        # Only the loss is differentiable: no zero-filled N x C gradient for the other outputs.
        ctx.set_materialize_grads(False)
        ctx.n_inputs = len(inputs)
        ctx.reduction = spec.reduction(inputs)
        # Saved by reference (no copy); read only by a second or double backward and by the
        # gradients of the non-logit inputs. Like PyTorch's own losses, which keep an N x C
        # log-softmax for their backward, this holds the logits until the backward has run.
        ctx.save_for_backward(*spec.tensors(inputs, output))
        ctx.nontensors = spec.nontensors(inputs)
        grad = spec.fused_grad(output)
        # Kept detached: an output holds this node as its grad_fn, so keeping it as is on ctx
        # would make a reference cycle that only the garbage collector frees (and with it the
        # N x C gradient).
        ctx.saved_grad = grad.detach() if ctx.reduction != 0 and grad.numel() else None

    def backward(ctx, grad_loss, *_grads_of_other_outputs):
        grads = [None] * ctx.n_inputs
        if grad_loss is None:  # no gradient flows into the loss (undefined, not zero-filled)
            return tuple(grads)
        needs = ctx.needs_input_grad
        traced = is_traced(grad_loss)
        create_graph = torch.is_grad_enabled() and not traced
        composite_for = [i for i in spec.differentiable if needs[i]
                         and (i != 0 or create_graph)]
        if composite_for:
            args = spec.composite_args(ctx.saved_tensors, ctx.nontensors)
            for i, g in _composite_grads(spec.composite, args, composite_for, grad_loss,
                                         create_graph).items():
                grads[i] = g
        if needs[0] and not create_graph:
            grads[0] = _fused_logits_grad(lib, spec, ctx, grad_loss, traced)
        return tuple(grads)

    torch.library.register_autograd(f"{namespace}::{op}", backward, setup_context=setup)
    return _eager_function(getattr(lib, op), setup, backward)


def _eager_function(op, setup, backward):
    """`op` with the registered autograd formula (the same setup and backward), as an
    autograd.Function whose forward calls the op below autograd, for eager calls. The
    registration's generic wrapper (torch.library's) fills in the op's default arguments and
    redispatches in Python on every call: measured with cProfile at 8 x 100 logits, ~90 us of
    a 280 us forward+backward (fill_defaults 60 us, redispatch 32 us), where PyTorch's own
    cross-entropy takes 83 us in all."""

    class EagerLoss(torch.autograd.Function):
        # forward(ctx, ...) rather than a separate setup_context: with one, Function.apply
        # binds the arguments through inspect.signature on every call (~50 us). torch.func
        # transforms never reach this class (functional.py runs the compositions for them).
        @staticmethod
        def forward(ctx, *inputs):
            with torch._C._AutoDispatchBelowAutograd():
                output = op(*inputs)
            setup(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    return EagerLoss.apply


def _fused_logits_grad(lib, spec, ctx, grad_loss, traced):
    """d loss / d logits from the kernels: the forward's pre-scaled gradient times grad_output
    (handed over without a copy, and with no pass when grad_output is 1), or for
    reduction="none" the backward kernel."""
    if ctx.reduction == 0:
        return spec.backward_op(lib)(grad_loss, *spec.backward_args(ctx.saved_tensors,
                                                                    ctx.nontensors))
    grad = ctx.saved_grad
    if traced:
        return grad * grad_loss
    ctx.saved_grad = None
    if grad is None:
        # A second backward through a retained graph (the first one consumed the gradient):
        # the forward kernel again, so that every backward gives the same bits.
        grad = spec.recompute_grad(lib, ctx.saved_tensors, ctx.nontensors)
    lib.scale_grad_(grad, grad_loss)
    return grad


class _SoftmaxSpec:
    """softmax_ce(logits, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap,
    reduction, mean_eps, compute_grad, want_accuracy, denominators) ->
    (loss, row_stats, grad, extras)."""

    differentiable = (0, 1, 2, 3)  # logits, a probability target, weight, mask

    @staticmethod
    def reduction(inputs):
        return inputs[8]

    @staticmethod
    def tensors(inputs, output):
        logits, target, weight, mask = inputs[:4]
        denominators = inputs[12] if len(inputs) > 12 else None
        return logits, target, weight, mask, output[1], denominators

    @staticmethod
    def nontensors(inputs):
        return tuple(inputs[4:10])  # ignore_index .. mean_eps

    @staticmethod
    def fused_grad(output):
        return output[2]

    @staticmethod
    def backward_op(lib):
        return lib.softmax_ce_backward

    @staticmethod
    def backward_args(saved, nontensors):
        logits, target, weight, mask, row_stats, denominators = saved
        return (logits, target, weight, mask, row_stats, *nontensors, denominators)

    @staticmethod
    def recompute_grad(lib, saved, nontensors):
        logits, target, weight, mask, _row_stats, denominators = saved
        return lib.softmax_ce(logits, target, weight, mask, *nontensors, True, False,
                              denominators)[2]

    @staticmethod
    def composite_args(saved, nontensors):
        logits, target, weight, mask, _row_stats, denominators = saved
        return (logits, target, weight, mask, *nontensors, False, denominators)

    @staticmethod
    def composite(*args):
        from . import _composite
        return _composite.softmax_ce(*args)


class _SigmoidSpec:
    """sigmoid_ce(input, target, weight, pos_weight, mask, label_smoothing, reduction,
    compute_grad) -> (loss, grad)."""

    differentiable = (0, 1, 2, 3, 4)  # input, target, weight, pos_weight, mask

    @staticmethod
    def reduction(inputs):
        return inputs[6]

    @staticmethod
    def tensors(inputs, output):
        return tuple(inputs[:5])

    @staticmethod
    def nontensors(inputs):
        return tuple(inputs[5:7])  # label_smoothing, reduction

    @staticmethod
    def fused_grad(output):
        return output[1]

    @staticmethod
    def backward_op(lib):
        return lib.sigmoid_ce_backward

    @staticmethod
    def backward_args(saved, nontensors):
        return (*saved, *nontensors)

    @staticmethod
    def recompute_grad(lib, saved, nontensors):
        return lib.sigmoid_ce(*saved, *nontensors, True)[1]

    @staticmethod
    def composite_args(saved, nontensors):
        return (*saved, *nontensors)

    @staticmethod
    def composite(*args):
        from . import _composite
        return _composite.sigmoid_ce(*args)


def _register_autograd(namespace, lib):
    """Registers the loss ops' autograd; returns their eager forms (softmax_ce, sigmoid_ce)."""
    return (_register_loss_autograd(namespace, lib, "softmax_ce", _SoftmaxSpec),
            _register_loss_autograd(namespace, lib, "sigmoid_ce", _SigmoidSpec))


def _make_inplace_function(lib):
    class SoftmaxCEInplace(torch.autograd.Function):
        """cross_entropy(inplace_backward=True): the forward writes the gradient into the
        logits' storage (no N x C buffer). Autograd sees the write: the logits' version
        counter moves, so any other op that saved them refuses to run its backward rather
        than read the gradient as logits. functional.py takes this path only where it is safe
        (see _inplace_is_safe), and only when the logits are the one input that needs a
        gradient. Returns (loss, row_stats, extras) like softmax_ce, less the gradient."""

        @staticmethod
        def forward(ctx, logits, target, weight, mask, ignore_index, label_smoothing, z_loss,
                    softcap, reduction, mean_eps, want_accuracy):
            version = logits._version
            loss, row_stats, extras = lib.softmax_ce_inplace(
                logits, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap,
                reduction, mean_eps, want_accuracy)
            if logits._version == version:
                torch.autograd.graph.increment_version(logits)
            ctx.saved_grad = logits.detach()
            ctx.mark_non_differentiable(row_stats, extras)
            ctx.set_materialize_grads(False)
            return loss, row_stats, extras

        @staticmethod
        def backward(ctx, grad_loss, *_grads_of_other_outputs):
            none_for_the_rest = (None,) * 10
            if grad_loss is None:
                return (None,) + none_for_the_rest
            grad = ctx.saved_grad
            if grad is None or (torch.is_grad_enabled() and not is_traced(grad_loss)):
                raise RuntimeError(_INPLACE_CONSUMED.format("cross_entropy"))
            ctx.saved_grad = None
            lib.scale_grad_(grad, grad_loss)
            return (grad,) + none_for_the_rest

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
