"""nn.Module drop-ins. CrossEntropyLoss and BCEWithLogitsLoss subclass torch's own modules,
so isinstance checks, the weight / pos_weight buffers and state_dict keys are torch's."""

from typing import Optional

import torch
from torch import Tensor

from . import functional as F
from .distillation import distillation_loss, linear_distillation_loss
from .linear import linear_cross_entropy

__all__ = ["CrossEntropyLoss", "BCEWithLogitsLoss", "SequenceLoss", "LinearCrossEntropyLoss",
           "DistillationLoss", "LinearDistillationLoss"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss with fusedloss's kernel; forward(input, target, mask=None).
    With any return_* flag set, forward returns a CrossEntropyOutput. ``token_scaling`` is
    fusedloss.cross_entropy's. With ``process_group`` the input is this rank's slice of the
    classes (see fusedloss.cross_entropy)."""

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None, inplace_backward: bool = False,
                 return_z_loss: bool = False, return_token_accuracy: bool = False,
                 return_lse: bool = False, return_predicted_tokens: bool = False,
                 token_scaling: bool = False, process_group=None) -> None:
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
        # vocab parallel: the input is this rank's slice of the classes, the weight buffer the
        # whole vocabulary's (fusedloss.parallel)
        self.process_group = process_group
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.return_z_loss = return_z_loss
        self.return_token_accuracy = return_token_accuracy
        self.return_lse = return_lse
        self.return_predicted_tokens = return_predicted_tokens
        self.token_scaling = token_scaling

    def forward(self, input: Tensor, target: Tensor, mask: Optional[Tensor] = None):
        """The loss of logits `input` against `target`; `mask` (the target's shape) weighs
        each position (0 = padding). A CrossEntropyOutput when a return_* flag is set."""
        return F.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                               self.label_smoothing, mask=mask, z_loss=self.z_loss,
                               softcap=self.softcap, inplace_backward=self.inplace_backward,
                               return_z_loss=self.return_z_loss,
                               return_token_accuracy=self.return_token_accuracy,
                               return_lse=self.return_lse,
                               return_predicted_tokens=self.return_predicted_tokens,
                               token_scaling=self.token_scaling,
                               process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, inplace_backward={self.inplace_backward}, "
                f"token_scaling={self.token_scaling}")


class _LinearCrossEntropyState(torch.nn.Module):
    """torch.nn.LinearCrossEntropyLoss's constructor and state (a ``linear`` submodule and a
    ``weight`` buffer, hence the same state_dict keys), for torch before 2.13, which lacks the
    module; from 2.13 on fusedloss's module subclasses torch's own."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Optional[Tensor] = None, ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, options=None) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device,
                                      dtype=dtype)
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}")


class LinearCrossEntropyLoss(getattr(torch.nn, "LinearCrossEntropyLoss",
                                     _LinearCrossEntropyState)):
    """torch.nn.LinearCrossEntropyLoss (same constructor, ``linear`` submodule, ``weight``
    buffer and state_dict keys) computed by fusedloss.linear_cross_entropy;
    forward(input, target, mask=None).

    Beyond torch: ``z_loss``, ``softcap``, ``chunk_size`` (rows per chunk; None: automatic),
    ``token_scaling`` and the ``return_*`` flags of fusedloss.linear_cross_entropy (any of them
    makes forward return a CrossEntropyOutput). ``options`` (torch's chunking options) is
    accepted and kept for state compatibility, but fusedloss always chunks. ``ignore_index=None``
    means -100, as in torch. K-dimensional losses (``out_features != ()``) are not supported."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Optional[Tensor] = None, ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, options=None, z_loss: float = 0.0,
                 softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 return_z_loss: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False, token_scaling: bool = False) -> None:
        if tuple(out_features) != ():
            raise ValueError(f"out_features must be () (fusedloss.LinearCrossEntropyLoss has no "
                             f"K-dimensional loss), got {tuple(out_features)!r}")
        super().__init__(in_features, num_classes, out_features=(), bias=bias, device=device,
                         dtype=dtype, reduction=reduction, weight=weight,
                         ignore_index=ignore_index, label_smoothing=label_smoothing,
                         options=options)
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.return_z_loss = return_z_loss
        self.return_token_accuracy = return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens
        self.token_scaling = token_scaling

    def forward(self, input: Tensor, target: Tensor, mask: Optional[Tensor] = None):
        """The loss of ``self.linear(input)`` against `target`, without the logits whole; a
        CrossEntropyOutput when a return_* flag is set."""
        ignore_index = -100 if self.ignore_index is None else self.ignore_index
        return linear_cross_entropy(input, self.linear.weight, target,
                                    linear_bias=self.linear.bias, weight=self.weight,
                                    reduction=self.reduction, ignore_index=ignore_index,
                                    label_smoothing=self.label_smoothing, mask=mask,
                                    z_loss=self.z_loss, softcap=self.softcap,
                                    chunk_size=self.chunk_size, return_z_loss=self.return_z_loss,
                                    return_token_accuracy=self.return_token_accuracy,
                                    return_predicted_tokens=self.return_predicted_tokens,
                                    token_scaling=self.token_scaling)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"chunk_size={self.chunk_size}, token_scaling={self.token_scaling}")


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """torch.nn.BCEWithLogitsLoss with fusedloss's kernel; forward(input, target, mask=None).

    Same constructor, ``weight`` / ``pos_weight`` buffers and state_dict keys as torch's.
    Beyond torch: ``label_smoothing`` e (targets become y * (1 - e) + e / 2) and forward's
    ``mask`` (broadcast to the input; multiplies each element's loss, and ``mean`` divides by
    its sum). See fusedloss.binary_cross_entropy_with_logits."""

    def __init__(self, weight: Optional[Tensor] = None, reduction: str = "mean",
                 pos_weight: Optional[Tensor] = None, *, label_smoothing: float = 0.0) -> None:
        super().__init__(weight=weight, reduction=reduction, pos_weight=pos_weight)
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The loss of logits `input` against `target` (the input's shape), `mask` optional."""
        return F.binary_cross_entropy_with_logits(input, target, self.weight, self.reduction,
                                                  self.pos_weight, mask=mask,
                                                  label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"


class SequenceLoss(torch.nn.Module):
    """tf.contrib.seq2seq.sequence_loss as a module; forward(logits, targets, weights).

    logits (batch, time, classes), targets (batch, time) class indices, weights (batch, time).
    The averaging flags, ``label_smoothing``, ``z_loss``, ``softcap`` and ``process_group``
    (this rank's slice of the classes) are fusedloss.sequence_loss's."""

    def __init__(self, average_across_timesteps: bool = True, average_across_batch: bool = True,
                 *, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, process_group=None) -> None:
        super().__init__()
        self.process_group = process_group
        self.average_across_timesteps = average_across_timesteps
        self.average_across_batch = average_across_batch
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
        """The weighted cross-entropy, averaged as the constructor's flags say."""
        return F.sequence_loss(logits, targets, weights, self.average_across_timesteps,
                               self.average_across_batch, label_smoothing=self.label_smoothing,
                               z_loss=self.z_loss, softcap=self.softcap,
                               process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"average_across_timesteps={self.average_across_timesteps}, "
                f"average_across_batch={self.average_across_batch}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}")


class _DistillationOptions(torch.nn.Module):
    """The options of the distillation losses (fusedloss.distillation_loss), kept as
    attributes; no parameters or buffers."""

    def __init__(self, *, divergence: str = "forward_kl", temperature: float = 1.0,
                 beta: float = 0.5, hard_weight: float = 0.0, ignore_index: int = -100,
                 reduction: str = "mean", process_group=None) -> None:
        super().__init__()
        self.divergence = divergence
        self.temperature = temperature
        self.beta = beta
        self.hard_weight = hard_weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.process_group = process_group

    def _options(self, mask):
        return dict(divergence=self.divergence, temperature=self.temperature, beta=self.beta,
                    hard_weight=self.hard_weight, ignore_index=self.ignore_index, mask=mask,
                    reduction=self.reduction, process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, temperature={self.temperature}, "
                f"beta={self.beta}, hard_weight={self.hard_weight}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")


class DistillationLoss(_DistillationOptions):
    """fusedloss.distillation_loss as a module: DistillationLoss(**options)(student_logits,
    teacher_logits, target=None, mask=None, teacher_indices=None)."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                target: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                teacher_indices: Optional[Tensor] = None) -> Tensor:
        return distillation_loss(student_logits, teacher_logits, target,
                                 teacher_indices=teacher_indices, **self._options(mask))


class LinearDistillationLoss(_DistillationOptions):
    """fusedloss.linear_distillation_loss as a module: LinearDistillationLoss(**options,
    chunk_size=None)(student_input, student_weight, teacher_input, teacher_weight,
    target=None, mask=None, student_bias=None, teacher_bias=None)."""

    def __init__(self, *, chunk_size: Optional[int] = None, **options) -> None:
        super().__init__(**options)
        self.chunk_size = chunk_size

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor,
                teacher_weight: Tensor, target: Optional[Tensor] = None,
                mask: Optional[Tensor] = None, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None) -> Tensor:
        return linear_distillation_loss(student_input, student_weight, teacher_input,
                                        teacher_weight, target, student_bias=student_bias,
                                        teacher_bias=teacher_bias, chunk_size=self.chunk_size,
                                        **self._options(mask))
