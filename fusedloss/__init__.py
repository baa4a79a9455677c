"""fusedloss: softmax and sigmoid cross-entropy for PyTorch, loss and gradient in one pass.

C++ and CUDA kernels read each row of logits once and write the loss and its gradient together.
The API mirrors PyTorch's and TensorFlow's:

- ``cross_entropy``, ``binary_cross_entropy_with_logits``: drop-ins for torch.nn.functional's,
  with ``mask``, ``z_loss``, ``softcap``, ``label_smoothing`` for BCE, extra outputs
  (``CrossEntropyOutput``) and vocab-parallel ``process_group=``;
- ``linear_cross_entropy``: the loss of ``input @ weight.T`` without the logits ever whole;
- ``sequence_loss``, ``sparse_softmax_cross_entropy_with_logits``,
  ``sigmoid_cross_entropy_with_logits``: TensorFlow's names and semantics;
- ``CrossEntropyLoss``, ``BCEWithLogitsLoss``, ``LinearCrossEntropyLoss``, ``SequenceLoss``:
  the modules;
- ``fusedloss.integrations.transformers.apply_fusedloss``: one call for a transformers model.

``python -m fusedloss`` prints what this build compiled and runs a self-check. The docs are in
the repository's docs/ folder (docs/api.md lists every function and argument)."""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

from . import _C  # noqa: F401  (registers the fusedloss ops)
from . import _autograd, _ops
from .functional import (
    CrossEntropyOutput,
    binary_cross_entropy_with_logits,
    cross_entropy,
    set_target_validation,
    sequence_loss,
    sigmoid_cross_entropy_with_logits,
    sparse_softmax_cross_entropy_with_logits,
)
from .distillation import distillation_loss, linear_distillation_loss
from .linear import linear_cross_entropy
from .nn import (BCEWithLogitsLoss, CrossEntropyLoss, DistillationLoss, LinearCrossEntropyLoss,
                 LinearDistillationLoss, SequenceLoss)

# The ops' fake kernels and autograd, registered once, at import; the public functions call
# this OpSet (tests route them through the SIMT-emulated kernels with _ops.use).
_ops.set_default(_autograd.install("fusedloss"))

__version__ = "0.1.0"

__all__ = [
    "cross_entropy",
    "CrossEntropyOutput",
    "binary_cross_entropy_with_logits",
    "sequence_loss",
    "sparse_softmax_cross_entropy_with_logits",
    "sigmoid_cross_entropy_with_logits",
    "linear_cross_entropy",
    "CrossEntropyLoss",
    "BCEWithLogitsLoss",
    "SequenceLoss",
    "LinearCrossEntropyLoss",
    "distillation_loss",
    "linear_distillation_loss",
    "DistillationLoss",
    "LinearDistillationLoss",
    "build_info",
    "set_target_validation",
    "empty_cache",
]


def build_info() -> dict:
    """What this build compiled, as a dict: ``cpu_isas`` (the CPU kernels' instruction sets,
    e.g. ['DEFAULT', 'AVX2', 'AVX512']), ``cpu_isa`` (the one this CPU runs), ``cuda``
    (whether the CUDA kernels are compiled) and ``cuda_archs`` (their architectures)."""
    info = dict(line.split("=", 1) for line in torch.ops.fusedloss.build_info().splitlines())
    info["cpu_isas"] = info["cpu_isas"].split(",")
    info["cuda"] = info["cuda"] == "1"
    info["cuda_archs"] = [a for a in info["cuda_archs"].split(";") if a]
    return info


def empty_cache() -> None:
    """Free the CPU gradient buffers fusedloss keeps for reuse.

    A freed gradient of several MB is kept (at most two) and handed to the next call of the
    same size, so that a training loop does not fault a fresh N x C buffer in on every step.
    FUSEDLOSS_KEEP_OUTPUT_BUFFERS=0 turns the keeping off."""
    torch.ops.fusedloss.empty_cache()
