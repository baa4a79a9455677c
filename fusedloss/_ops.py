"""The op table and the test seam.

An OpSet holds the ops of one library namespace (csrc/fusedloss.cpp's schemas) as resolved
overloads, and the autograd forms that _autograd.install builds on them. The product uses
the namespace ``fusedloss``; the SIMT test harness registers the same schemas as
``fusedloss_simt`` (the CUDA kernels emulated on the CPU) and routes the public functions
through them with ``use(...)``.
"""

import contextlib

import torch

# The ops every namespace defines (csrc/fusedloss.cpp).
OP_NAMES = ("softmax_ce", "softmax_ce_inplace", "softmax_ce_backward", "softmax_ce_shard_stats",
            "sigmoid_ce", "sigmoid_ce_backward", "scale_grad_", "linear_ce",
            "linear_ce_backward", "distill", "distill_inplace", "distill_backward")


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
    """The fusedloss ops of one namespace: ``lib`` (every op, below autograd when called
    under torch._C._AutoDispatchBelowAutograd), each op by name (the registered op: traced
    calls and opcheck), and the autograd forms _autograd.install fills in:

    - ``eager``: loss op name -> the autograd.Function for eager calls (the registered
      formula, less per-call overhead);
    - ``SoftmaxCEInplace``: cross_entropy(inplace_backward=True)'s Function;
    - ``SoftmaxCECompiled``: the Function compiled mean/sum cross-entropy takes;
    - ``DistillInplace``: distillation_loss(inplace_backward=True)'s Function."""

    def __init__(self, namespace):
        self.namespace = namespace
        self.lib = DefaultOverloads(namespace)
        for name in OP_NAMES:
            setattr(self, name, getattr(self.lib, name))
        self.eager = {}
        self.SoftmaxCEInplace = None
        self.SoftmaxCECompiled = None
        self.DistillInplace = None


_active = None


def set_default(opset):
    """The OpSet the public functions call outside `use` (fusedloss/__init__.py sets it)."""
    global _active
    _active = opset


def current():
    """The OpSet the public functions call: the one `use` set, else the package's."""
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
