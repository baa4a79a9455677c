"""The two ops of the vocab-parallel path written in plain PyTorch, from their documented
semantics (csrc/fusedloss.cpp): softmax_ce_shard_stats and softmax_ce_backward on a class slice
(global_classes > 0). A reference to check the kernels' shard outputs against, and a stand-in
OpSet (`reference_opset`) that runs fusedloss.parallel on them."""

import torch

import fusedloss  # noqa: F401  (loads the real ops: scale_grad_ and the unsliced ones)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(logits, target, mask, ignore_index, softcap):
    """(z in float64 with skipped rows zeroed, kept, row mask, valid) of a slice."""
    x = logits.double()
    rows = x.shape[0]
    prob = target.is_floating_point()
    m = mask.double() if mask is not None else torch.ones(rows, dtype=torch.float64)
    valid = torch.ones(rows, dtype=torch.bool) if prob else target != ignore_index
    kept = valid & (m != 0)
    x = torch.where(kept[:, None], x, 0)
    z = softcap * torch.tanh(x / softcap) if softcap else x
    return z, kept, m, valid


def softmax_ce_shard_stats(logits, target, weight, mask, ignore_index, label_smoothing,
                           softcap, class_offset, global_classes, want_accuracy):
    acc = _acc(logits.dtype)
    z, kept, m, _valid = _rows(logits, target, mask, ignore_index, softcap)
    rows, local = z.shape
    e, classes = label_smoothing, global_classes
    top = z.amax(1)
    shifted = z - top[:, None]
    ls = torch.logsumexp(shifted, 1)
    w = (weight.double()[class_offset:class_offset + local] if weight is not None
         else torch.ones(local, dtype=torch.float64))
    zero = torch.zeros((), dtype=torch.float64)
    mass = torch.zeros(rows, dtype=torch.float64)
    correct = torch.zeros(rows, dtype=torch.float64)
    if target.is_floating_point():
        q = target.double() * (1 - e) + e / classes
        mass = (w * q).sum(1)
        loss = mass * ls - (w * q * shifted).sum(1)
    else:
        local_t = target - class_offset
        in_slice = (local_t >= 0) & (local_t < local)
        safe = torch.where(in_slice, local_t, 0)
        z_t = shifted.gather(1, safe[:, None])[:, 0]
        loss = ((1 - e) * torch.where(in_slice, w[safe] * (ls - z_t), zero)
                + (e / classes) * (w.sum() * ls - (w * shifted).sum(1)))
        if want_accuracy:
            correct = torch.where(kept & in_slice & (shifted.argmax(1) == safe), m, zero)
    loss = torch.where(kept, m * loss, zero)
    stats = torch.where(kept[:, None], torch.stack([top, ls], 1), zero)
    return loss.to(acc), stats.to(acc), torch.stack([mass, correct]).to(acc)


def softmax_ce_backward(grad_loss, logits, target, weight, mask, row_stats, ignore_index,
                        label_smoothing, z_loss, softcap, reduction, mean_eps, denominators=None,
                        class_offset=0, global_classes=0, row_target_mass=None):
    assert global_classes > 0, "the reference covers the sliced form only"
    z, kept, m, valid = _rows(logits, target, mask, ignore_index, softcap)
    rows, local = z.shape
    e, classes = label_smoothing, global_classes
    lse = row_stats.double().sum(1)
    p = torch.exp(z - lse[:, None])
    w_all = weight.double() if weight is not None else torch.ones(classes, dtype=torch.float64)
    w = w_all[class_offset:class_offset + local]
    if target.is_floating_point():
        q = target.double() * (1 - e) + e / classes
        d_ce = row_target_mass.double()[:, None] * p - w * q
    else:
        safe = torch.where(valid, target, 0)
        local_t = safe - class_offset
        onehot = torch.zeros_like(z)
        in_slice = (local_t >= 0) & (local_t < local)
        onehot[in_slice, local_t[in_slice]] = 1.0
        d_ce = ((1 - e) * w_all[safe][:, None] * (p - onehot)
                + (e / classes) * (w_all.sum() * p - w))
    d_z = 2 * z_loss * lse[:, None] * p
    if reduction == 0:
        ce_factor = z_factor = grad_loss.double() * m
    else:
        if reduction == 1:
            d = denominators.double()
            inv = torch.where(d != 0, 1 / torch.where(d != 0, d, 1), 0)
            ce_factor, z_factor = m * inv[0], m * inv[1]
        else:
            ce_factor = z_factor = m
        ce_factor = ce_factor * grad_loss.double()
        z_factor = z_factor * grad_loss.double()
    grad = ce_factor[:, None] * d_ce + z_factor[:, None] * d_z
    if softcap:
        grad = grad * (1 - (z / softcap) ** 2)
    grad = torch.where(kept[:, None], grad, 0)
    return grad.to(logits.dtype)


class _ReferenceLib:
    """torch.ops.fusedloss with the two sliced ops replaced by the references above."""

    softmax_ce_shard_stats = staticmethod(softmax_ce_shard_stats)

    def softmax_ce_backward(self, *args, **kwargs):
        sliced = (kwargs.get("global_classes", args[14] if len(args) > 14 else 0) or 0) > 0
        if sliced:
            return softmax_ce_backward(*args, **kwargs)
        return torch.ops.fusedloss.softmax_ce_backward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(torch.ops.fusedloss, name)


class _ReferenceOpSet:
    """fusedloss's OpSet, but with _ReferenceLib as its lib (what fusedloss.parallel calls)."""

    def __init__(self):
        from fusedloss import _ops
        self._real = _ops.current()
        self.lib = _ReferenceLib()

    def __getattr__(self, name):
        return getattr(self._real, name)


def reference_opset():
    """An OpSet-like object for fusedloss._ops.use(...): fusedloss.parallel then runs on the
    reference ops above; everything else on the real kernels."""
    return _ReferenceOpSet()
