"""float64 references, written from PyTorch's ops and the formulas of DESIGN.md, never from
fusedloss's kernels."""

import math

import torch
import torch.nn.functional as F


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, mask=None, z_loss=0.0, softcap=None, read_masked=False,
                  token_scaling=False):
    """fusedloss.cross_entropy in float64: PyTorch's loss per position, plus mask, z-loss and
    softcap; a mean over no valid position is 0. Positions with mask 0 contribute exactly 0
    whatever their logits, unless read_masked (then their loss term is computed and multiplied
    by 0, so that d loss / d mask is that term: what a mask that requires grad gets).
    token_scaling (class indices): each position's whole loss times its detached p_t =
    softmax(z)_t, the denominators of the mean unchanged (Liger-Kernel's definition)."""
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
    z_part = z_loss * lse**2 * valid
    if token_scaling:
        class_dim = 1 if x.dim() > 1 else 0
        p_t = torch.softmax(x.detach(), class_dim).gather(
            class_dim, safe_t.unsqueeze(class_dim)).squeeze(class_dim)
        per, z_part = per * p_t, z_part * p_t
    m = mask.double() if mask is not None else torch.ones_like(per)
    # masked (0) and ignored positions contribute exactly 0, whatever their logits
    kept = valid if read_masked else (m != 0) & valid
    per = torch.where(kept, per * m, torch.zeros_like(per))
    z_part = torch.where(kept, z_part * m, torch.zeros_like(z_part))
    if reduction == "none":
        return per + z_part
    if reduction == "sum":
        return per.sum() + z_part.sum()
    # mean: the cross-entropy part over the weighted denominator, the z-loss part over the
    # count of valid positions (PaLM's convention): class weights never scale the z-loss
    denom = (m * denom_weight * valid).sum()
    count = (m * valid).sum()
    return _divide_or_zero(per.sum(), denom) + _divide_or_zero(z_part.sum(), count)


def _divide_or_zero(total, denominator):
    return total / denominator if denominator != 0 else total * 0


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
    return _divide_or_zero(per.sum(), denom)


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


def distillation(student, teacher, target=None, divergence="forward_kl", temperature=1.0,
                 beta=0.5, hard_weight=0.0, ignore_index=-100, mask=None, reduction="mean",
                 teacher_indices=None, read_masked=False):
    """fusedloss.distillation_loss in float64, from PyTorch's kl_div, log_softmax and
    cross_entropy: T^2 KL(P || Q), T^2 KL(Q || P), or the generalised JSD (beta 0 and 1 are
    the two KLs), mixed with the hard cross-entropy; masked and ignored positions contribute
    exactly 0 (unless read_masked, as cross_entropy's); mean over the mask's sum of valid
    positions, 0 over none."""
    classes = student.shape[-1]
    positions = student.shape[:-1]
    s = student.double().reshape(-1, classes)
    t = teacher.double().reshape(s.shape[0], teacher.shape[-1])
    temp = temperature
    log_q = F.log_softmax(s / temp, dim=-1)
    if teacher_indices is not None:
        idx = teacher_indices.reshape(s.shape[0], -1).long()
        p = torch.zeros_like(s).scatter(1, idx, F.softmax(t / temp, dim=-1))
        d = F.kl_div(log_q, p, reduction="none").sum(-1)  # target p, 0 log 0 = 0
    else:
        log_p = F.log_softmax(t / temp, dim=-1)
        forward = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
        reverse = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
        if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
            d = forward
        elif divergence == "reverse_kl" or beta == 1:
            d = reverse
        else:
            log_m = torch.logsumexp(torch.stack([log_p + math.log(beta),
                                                 log_q + math.log(1 - beta)]), dim=0)
            d = (beta * F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
                 + (1 - beta) * F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1))
    row = temp * temp * d
    rows = s.shape[0]
    valid = torch.ones(rows, dtype=torch.bool)
    if target is not None:
        tg = target.reshape(-1).long()
        valid = tg != ignore_index
        if hard_weight > 0:
            ce = F.cross_entropy(s, torch.where(valid, tg, 0), reduction="none")
            row = (1 - hard_weight) * row + hard_weight * ce
    m = mask.reshape(-1).double() if mask is not None else torch.ones(rows, dtype=torch.float64)
    kept = valid if read_masked else valid & (m != 0)
    row = torch.where(kept, row * m, torch.zeros_like(row))
    if reduction == "none":
        return row.reshape(positions)
    if reduction == "sum":
        return row.sum()
    denominator = torch.where(valid, m, torch.zeros_like(m)).sum()
    return row.sum() / denominator if denominator != 0 else row.sum() * 0
