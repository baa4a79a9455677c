"""fusedloss: softmax and sigmoid cross-entropy for PyTorch, loss and gradient in one pass."""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

from . import _C  # noqa: F401  (registers the fusedloss ops)
from . import _ops  # noqa: F401  (fake kernels and autograd)
from .functional import (
    CrossEntropyOutput,
    binary_cross_entropy_with_logits,
    cross_entropy,
    set_target_validation,
    sequence_loss,
    sigmoid_cross_entropy_with_logits,
    sparse_softmax_cross_entropy_with_logits,
)
from .linear_cross_entropy import linear_cross_entropy
from .nn import BCEWithLogitsLoss, CrossEntropyLoss, LinearCrossEntropyLoss, SequenceLoss

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
    "build_info",
    "set_target_validation",
    "empty_cache",
]


def build_info() -> dict:
    """What this build compiled: CPU instruction sets (and the one in use), CUDA archs."""
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
