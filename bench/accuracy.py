"""Error against a float64 reference, in units in the last place, of PyTorch's and fusedloss's
losses and gradients on the same data: float32 and float64 (whose error must be at most
PyTorch's) and the 16-bit dtypes (whose error budget bench/README.md writes down).

    python bench/accuracy.py [--classes 1000 32000 128256] [--rows N] [--seed S]

For each case (mean reduction, logits ~ N(0, 9)): the loss's error, and the max and mean error
over the gradient's elements, each measured in ulps of the dtype at the reference value, the
reference being computed in long double (64-bit mantissa)."""

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedloss as fl  # noqa: E402


def reference(loss_name, x, target):
    """Loss and gradient (mean reduction) in numpy's long double (a 64-bit mantissa on x86):
    a reference for float64 as well as for the narrower dtypes."""
    xl = x.double().numpy().astype(np.longdouble)
    rows = xl.shape[0]
    if loss_name == "cross_entropy":
        t = target.numpy()
        m = xl.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(xl - m).sum(axis=1))
        picked = xl[np.arange(rows), t]
        loss = (lse - picked).mean()
        grad = np.exp(xl - lse[:, None])
        grad[np.arange(rows), t] -= 1
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


def case(loss_name, rows, classes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3).to(dtype)
    if loss_name == "cross_entropy":
        target = torch.randint(0, classes, (rows,), generator=g)
        contenders = {"PyTorch": F.cross_entropy, "fusedloss": fl.cross_entropy}
    else:
        target = torch.rand(rows, classes, generator=g, dtype=torch.float64).to(dtype)
        contenders = {"PyTorch": F.binary_cross_entropy_with_logits,
                      "fusedloss": fl.binary_cross_entropy_with_logits}
    ref_loss, ref_grad = reference(loss_name, x, target)
    out = {}
    for name, fn in contenders.items():
        xx = x.clone().requires_grad_()
        loss = fn(xx, target)
        (grad,) = torch.autograd.grad(loss, xx)
        out[name] = (ulp_errors(loss.reshape(1), np.array([ref_loss]), dtype)[0],
                     *ulp_errors(grad, ref_grad, dtype))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 32000, 128256])
    parser.add_argument("--rows", type=int, default=0, help="default: ~4M elements per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64", "bfloat16"])
    args = parser.parse_args()
    print("| loss | dtype | rows x classes | contender | loss err (ulp) | grad max err (ulp) "
          "| grad mean err (ulp) |")
    print("|---|---|---|---|--:|--:|--:|")
    for loss_name in ("cross_entropy", "bce"):
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for classes in args.classes:
                rows = args.rows or max(1, (1 << 22) // classes)
                res = case(loss_name, rows, classes, dtype, args.seed)
                for name, (le, gmax, gmean) in res.items():
                    print(f"| {loss_name} | {dtype_name} | {rows} x {classes} | {name} | "
                          f"{le:.2f} | {gmax:.2f} | {gmean:.3f} |", flush=True)


if __name__ == "__main__":
    main()
