"""The two losses written in differentiable PyTorch ops, with the kernels' exact semantics.

The kernels compute the loss and the first derivative with respect to the logits in one pass.
Everything beyond that is taken from these compositions, so that nothing a PyTorch user
differentiates is silently dropped:
  - double backward (``create_graph=True``): the backward differentiates these instead of
    handing over the fused gradient, so second derivatives are exact;
  - gradients with respect to a probability target, BCE's target, a floating mask, class
    weights and pos_weight;
  - torch.func transforms (grad, vmap, jacrev), which run these in place of the ops.

Each function takes the op's arguments (the (rows, classes) layout, weight and mask already
in the accumulation dtype) and returns what the op returns, in the accumulation dtype.
"""

import math

import torch

from ._common import acc_dtype, divide_or_zero


def softmax_ce(logits, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap,
               reduction, mean_eps, want_accuracy=False, denominators=None, token_scaling=False,
               want_argmax=False):
    """softmax_ce's (loss, row_stats, extras, argmax) (csrc/fusedloss.cpp), differentiably;
    argmax is None unless want_argmax."""
    acc = acc_dtype(logits.dtype)
    x = logits.to(acc)
    rows, classes = x.shape
    prob_target = target.is_floating_point()
    m = mask if mask is not None else x.new_ones(rows)
    if prob_target:
        valid = torch.ones(rows, dtype=torch.bool, device=x.device)
        safe_t = None
    else:
        valid = target != ignore_index
        safe_t = torch.where(valid, target, 0)
    # Skipped positions are never read by the kernels: their logits may be NaN or inf. A mask
    # that requires grad is the exception: d loss / d mask_i at mask_i = 0 is position i's
    # loss term, so its logits are read.
    kept = valid if m.requires_grad else valid & (m != 0)
    x = torch.where(kept[:, None], x, 0)
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    row_max = x.detach().amax(dim=1, keepdim=True)
    shifted = x - row_max
    log_sum = torch.logsumexp(shifted, dim=1)
    log_p = shifted - log_sum[:, None]
    lse = row_max[:, 0] + log_sum
    w = weight if weight is not None else x.new_ones(classes)
    e = label_smoothing
    if prob_target:
        q = target.to(acc) * (1 - e) + e / classes
        ce = -(w * q * log_p).sum(dim=1)
        denominator_weight = x.new_ones(rows)
    else:
        w_t = w[safe_t]
        nll = -log_p.gather(1, safe_t[:, None])[:, 0]
        ce = (1 - e) * w_t * nll - (e / classes) * (w * log_p).sum(dim=1)
        denominator_weight = w_t
    zero = x.new_zeros(())
    # token_scaling: every part of the row's loss times p_t, a constant (detached)
    f = m * log_p.detach().gather(1, safe_t[:, None])[:, 0].exp() if token_scaling else m
    ce = torch.where(kept, f * ce, zero)
    z_part = torch.where(kept, f * z_loss * lse * lse, zero)
    argmax = None
    if want_argmax:  # rows not read: -1 (a mask that requires grad reads them all)
        argmax = torch.where(valid & (m != 0), x.detach().argmax(dim=1), -1)
    correct = None
    if want_accuracy and not prob_target:
        hit = x.detach().argmax(dim=1) == safe_t
        correct = torch.where(kept & hit, m.detach(), zero)
    stats = torch.stack([torch.where(kept, row_max[:, 0], zero),
                         torch.where(kept, log_sum, zero)], dim=1).detach()
    if reduction == 0:
        extras = torch.stack([z_part.detach(),
                              correct if correct is not None else torch.zeros_like(ce)])
        return ce + z_part, stats, extras, argmax
    valid_m = torch.where(valid, m, zero)
    if denominators is not None:
        denominator, count = denominators[0], denominators[1]
    else:
        denominator = (valid_m * denominator_weight).sum() + mean_eps
        count = valid_m.sum() + mean_eps
    ce_total, z_total = ce.sum(), z_part.sum()
    if reduction == 1:
        ce_total = divide_or_zero(ce_total, denominator)
        z_total = divide_or_zero(z_total, count)
    accuracy = (divide_or_zero(correct.sum(), count.detach()) if correct is not None
                else zero)
    extras = torch.stack([z_total.detach(), accuracy.detach()])
    return ce_total + z_total, stats, extras, argmax


def sigmoid_ce(input, target, weight, pos_weight, mask, label_smoothing, reduction):
    """sigmoid_ce's loss (csrc/fusedloss.cpp), differentiably: (rows, cols) operands, weight,
    pos_weight and mask as broadcast views in the accumulation dtype."""
    acc = acc_dtype(input.dtype)
    x = input.to(acc)
    y = target.to(acc) * (1 - label_smoothing) + label_smoothing / 2
    log_weight = 1 + (pos_weight - 1) * y if pos_weight is not None else 1
    # softplus(-x) = max(-x, 0) + log1p(exp(-|x|)), which never overflows
    softplus_neg = torch.clamp(-x, min=0) + torch.log1p(torch.exp(-x.abs()))
    loss = (1 - y) * x + log_weight * softplus_neg
    if weight is not None:
        loss = loss * weight
    if mask is not None:
        loss = loss * mask
    if reduction == 0:
        return loss
    total = loss.sum()
    if reduction == 2:
        return total
    # new_full fills on the device (new_tensor would copy from the host: a synchronisation)
    denominator = mask.sum() if mask is not None else x.new_full((), float(x.numel()))
    return divide_or_zero(total, denominator)


def weighted_sum(w, d):
    """sum_c w_c d_c over each row, a class whose weight is 0 adding 0 whatever its d (x log x
    at 0: a -inf logit)."""
    return torch.where(w == 0, w.new_zeros(()), w * d).sum(dim=1)


def jsd_log_mixture(log_p, log_q, beta):
    """log m, m = beta p + (1 - beta) q, from the two logs (either side may underflow)."""
    return torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))


def distill(student, teacher, teacher_indices, target, mask, divergence, temperature, beta,
            hard_weight, ignore_index, reduction, denominator=None):
    """distill's loss (csrc/common/distill.h), differentiably: (rows, classes) student logits,
    the teacher's (rows, classes) or (rows, K) at teacher_indices, the mask in the accumulation
    dtype. `denominator`: the mean's, or None for the mask's sum over the valid rows (computed
    here, so that a mask that requires grad gets the mean's whole derivative)."""
    acc = acc_dtype(student.dtype)
    s, t = student.to(acc), teacher.to(acc)
    rows = s.shape[0]
    m = mask if mask is not None else s.new_ones(rows)
    valid = (target != ignore_index if target is not None
             else torch.ones(rows, dtype=torch.bool, device=s.device))
    # As softmax_ce: skipped rows are not read (their logits may be NaN), except under a mask
    # that requires grad, whose derivative at 0 is the row's loss.
    kept = valid if m.requires_grad else valid & (m != 0)
    s = torch.where(kept[:, None], s, 0)
    t = torch.where(kept[:, None], t, 0)
    log_q = torch.log_softmax(s / temperature, dim=1)
    log_p = torch.log_softmax(t / temperature, dim=1)
    p = log_p.exp()
    zero = s.new_zeros(())
    if teacher_indices is not None:
        d = weighted_sum(p, log_p - log_q.gather(1, teacher_indices))
    elif divergence == 0:
        d = weighted_sum(p, log_p - log_q)
    elif divergence == 1:
        d = weighted_sum(log_q.exp(), log_q - log_p)
    else:
        log_m = jsd_log_mixture(log_p, log_q, beta)
        d = (beta * weighted_sum(p, log_p - log_m)
             + (1 - beta) * weighted_sum(log_q.exp(), log_q - log_m))
    row = temperature * temperature * d
    if hard_weight > 0:
        safe_t = torch.where(valid, target, 0)
        ce = -torch.log_softmax(s, dim=1).gather(1, safe_t[:, None])[:, 0]
        row = (1 - hard_weight) * row + hard_weight * ce
    row = torch.where(kept, m * row, zero)
    if reduction == 0:
        return row
    total = row.sum()
    if reduction == 2:
        return total
    if denominator is None:
        denominator = torch.where(valid, m, zero).sum()
    return divide_or_zero(total, denominator.reshape(()).to(acc))
