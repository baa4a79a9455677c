"""float64 references, written from PyTorch's ops and the formulas of DESIGN.md, never from
fusedloss's kernels."""

import torch
import torch.nn.functional as F


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, mask=None, z_loss=0.0, softcap=None):
    """fusedloss.cross_entropy in float64: PyTorch's loss per position, plus mask, z-loss and
    softcap; a mean over no valid position is 0."""
    x = input.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    w = weight.double() if weight is not None else None
    if target.is_floating_point():
        per = F.cross_entropy(x, target.double(), weight=w, reduction="none",
                              label_smoothing=label_smoothing)
        valid = torch.ones_like(per, dtype=torch.bool)
        denom_weight = torch.ones_like(per)
    else:
        target = target.long()
        per = F.cross_entropy(x, target, weight=w, ignore_index=ignore_index, reduction="none",
                              label_smoothing=label_smoothing)
        valid = target != ignore_index
        safe_t = torch.where(valid, target, torch.zeros_like(target))
        denom_weight = w[safe_t] if w is not None else torch.ones_like(per)
    lse = torch.logsumexp(x, dim=1 if x.dim() > 1 else 0)
    per = per + z_loss * lse**2 * valid
    m = mask.double() if mask is not None else torch.ones_like(per)
    # masked (0) and ignored positions contribute exactly 0, whatever their logits
    per = torch.where((m != 0) & valid, per * m, torch.zeros_like(per))
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    denom = (m * denom_weight * valid).sum()
    return per.sum() / denom if denom != 0 else per.sum() * 0


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean",
                                     pos_weight=None, mask=None, label_smoothing=0.0):
    x = input.double()
    y = target.double()
    if label_smoothing:
        y = y * (1 - label_smoothing) + label_smoothing / 2
    per = F.binary_cross_entropy_with_logits(
        x, y, weight=weight.double() if weight is not None else None, reduction="none",
        pos_weight=pos_weight.double() if pos_weight is not None else None)
    if mask is not None:
        per = per * mask.double()
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    denom = mask.double().expand(x.shape).sum() if mask is not None else float(x.numel())
    return per.sum() / denom if denom != 0 else per.sum() * 0


def sequence_loss(logits, targets, weights, average_across_timesteps=True,
                  average_across_batch=True):
    """TF r1.4 tf.contrib.seq2seq.sequence_loss, transcribed."""
    b, t, c = logits.shape
    crossent = F.cross_entropy(logits.double().reshape(-1, c), targets.reshape(-1),
                               reduction="none")
    crossent = crossent * weights.double().reshape(-1)
    if average_across_timesteps and average_across_batch:
        return crossent.sum() / (weights.double().sum() + 1e-12)
    crossent = crossent.reshape(b, t)
    if average_across_timesteps:
        return crossent.sum(1) / (weights.double().sum(1) + 1e-12)
    if average_across_batch:
        return crossent.sum(0) / (weights.double().sum(0) + 1e-12)
    return crossent


def tolerances(dtype):
    """(rtol, atol) for comparing a dtype's result with the float64 reference."""
    return {
        torch.float64: (1e-10, 1e-12),
        torch.float32: (2e-5, 2e-6),
        torch.bfloat16: (2e-2, 1e-3),
        torch.float16: (4e-3, 2e-4),
    }[dtype]
