"""Error against a float64 reference, in units in the last place, of PyTorch's and fusedloss's
losses and gradients on the same data: float32 and float64 (whose error must be at most
PyTorch's) and the 16-bit dtypes (whose error budget bench/README.md writes down).

    python bench/accuracy.py [--classes 1000 32000 128256] [--rows N] [--seed S] [--margin M]

For each case (mean reduction, logits ~ N(0, 9)): the loss's error, and the max and mean error
over the gradient's elements, each measured in ulps of the dtype at the reference value, the
reference being computed in long double (64-bit mantissa). --margin M (cross-entropy only):
each row's target logit is raised by M, as a trained model's confident predictions are, and
the loss is taken per row (reduction "none"): the loss column gives the max and the mean
error over the rows' losses, which are small there (a sum of exps near 1)."""

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedloss as fl  # noqa: E402


def reference(loss_name, x, target, per_row=False):
    """Loss and gradient (mean reduction; per_row: reduction "none" under a grad_output of
    ones) in numpy's long double (a 64-bit mantissa on x86): a reference for float64 as well
    as for the narrower dtypes."""
    xl = x.double().numpy().astype(np.longdouble)
    rows = xl.shape[0]
    if loss_name == "cross_entropy":
        # Relative to the target's logit, without a cancellation: loss = log1p(r) with
        # r = sum over j != t of exp(x_j - x_t) (the differences are exact in long double), and
        # the target's gradient p_t - 1 = -r / (1 + r).
        t = target.numpy()
        picked = xl[np.arange(rows), t]
        e = np.exp(xl - picked[:, None])
        e[np.arange(rows), t] = 0
        r = e.sum(axis=1)
        row_loss = np.log1p(r)
        loss = row_loss if per_row else row_loss.mean()
        grad = e / (1 + r)[:, None]
        grad[np.arange(rows), t] = -r / (1 + r)
        if not per_row:
            grad /= rows
    else:
        y = target.double().numpy().astype(np.longdouble)
        e = np.exp(-np.abs(xl))
        loss = (np.maximum(xl, 0) - xl * y + np.log1p(e)).mean()
        sig = np.where(xl >= 0, 1 / (1 + e), e / (1 + e))
        grad = (sig - y) / xl.size
    return loss, grad


def ulp_errors(value, ref, dtype):
    """(max, mean) over the elements of |value - ref| in ulps of dtype at ref."""
    v = value.detach().double().numpy().astype(np.longdouble)
    r = np.abs(np.asarray(ref, dtype=np.longdouble))
    finfo = torch.finfo(dtype)
    exponent = np.floor(np.log2(np.maximum(r, finfo.tiny).astype(np.float64)))
    spacing = np.exp2(exponent).astype(np.longdouble) * np.longdouble(finfo.eps)
    err = (np.abs(v - np.asarray(ref, dtype=np.longdouble)) / spacing).astype(np.float64)
    return float(err.max()), float(err.mean())


def case(loss_name, rows, classes, dtype, seed, margin=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3
    per_row = margin is not None
    if loss_name == "cross_entropy":
        target = torch.randint(0, classes, (rows,), generator=g)
        if per_row:
            x[torch.arange(rows), target] += margin
        reduction = "none" if per_row else "mean"
        contenders = {
            "PyTorch": lambda x, t: F.cross_entropy(x, t, reduction=reduction),
            "fusedloss": lambda x, t: fl.cross_entropy(x, t, reduction=reduction)}
    else:
        target = torch.rand(rows, classes, generator=g, dtype=torch.float64).to(dtype)
        contenders = {"PyTorch": F.binary_cross_entropy_with_logits,
                      "fusedloss": fl.binary_cross_entropy_with_logits}
    x = x.to(dtype)
    ref_loss, ref_grad = reference(loss_name, x, target, per_row)
    out = {}
    for name, fn in contenders.items():
        xx = x.clone().requires_grad_()
        loss = fn(xx, target)
        (grad,) = torch.autograd.grad(loss, xx, torch.ones_like(loss))
        loss_err = ulp_errors(loss.reshape(-1), np.atleast_1d(ref_loss), dtype)
        out[name] = (loss_err if per_row else loss_err[0], *ulp_errors(grad, ref_grad, dtype))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 32000, 128256])
    parser.add_argument("--rows", type=int, default=0, help="default: ~4M elements per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64", "bfloat16"])
    parser.add_argument("--margin", type=float, default=None,
                        help="confident rows: raise each target logit by this much and measure "
                             "the per-row losses (cross-entropy only)")
    args = parser.parse_args()
    loss_column = "row loss err max / mean (ulp)" if args.margin is not None else "loss err (ulp)"
    print(f"| loss | dtype | rows x classes | contender | {loss_column} | grad max err (ulp) "
          "| grad mean err (ulp) |")
    print("|---|---|---|---|--:|--:|--:|")
    for loss_name in ("cross_entropy",) if args.margin is not None else ("cross_entropy", "bce"):
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for classes in args.classes:
                rows = args.rows or max(1, (1 << 22) // classes)
                res = case(loss_name, rows, classes, dtype, args.seed, args.margin)
                for name, (le, gmax, gmean) in res.items():
                    le = f"{le[0]:.2f} / {le[1]:.3f}" if isinstance(le, tuple) else f"{le:.2f}"
                    print(f"| {loss_name} | {dtype_name} | {rows} x {classes} | {name} | "
                          f"{le} | {gmax:.2f} | {gmean:.3f} |", flush=True)


if __name__ == "__main__":
    main()
