"""Error against a float64 reference, in units in the last place, of PyTorch's and fusedloss's
losses and gradients on the same data: float32 and float64 (whose error must be at most
PyTorch's) and the 16-bit dtypes (whose error budget bench/README.md writes down).

    python bench/accuracy.py [--classes 1000 32000 128256] [--rows N] [--seed S]

For each case: the loss's error, and the max and mean error over the gradient's elements, each
element's error measured in ulps of the dtype at the reference value."""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedloss as fl  # noqa: E402


def ulp(reference, dtype):
    """The spacing of `dtype` at each reference value (its smallest normal's at 0)."""
    r = reference.abs().to(dtype)
    tiny = torch.finfo(dtype).tiny
    r = torch.where(r < tiny, torch.full_like(r, tiny), r)
    return (torch.nextafter(r, torch.full_like(r, float("inf"))) - r).double()


def errors(value, reference, dtype):
    e = (value.double() - reference).abs() / ulp(reference, dtype)
    return float(e.max()), float(e.mean())


def case(loss_name, rows, classes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3
    x = x64.to(dtype)
    x64 = x.double()  # both see the same rounded inputs
    if loss_name == "cross_entropy":
        t = torch.randint(0, classes, (rows,), generator=g)
        ours_fn = lambda x: fl.cross_entropy(x, t)  # noqa: E731
        theirs_fn = lambda x: F.cross_entropy(x, t)  # noqa: E731
    else:
        y = torch.rand(rows, classes, generator=g, dtype=torch.float64).to(dtype)
        ours_fn = lambda x: fl.binary_cross_entropy_with_logits(x, y)  # noqa: E731
        theirs_fn = lambda x: F.binary_cross_entropy_with_logits(x, y)  # noqa: E731
    ref_x = x64.clone().requires_grad_()
    ref_loss = theirs_fn(ref_x) if loss_name == "cross_entropy" else \
        F.binary_cross_entropy_with_logits(ref_x, y.double())
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_x)
    out = {}
    for name, fn in (("PyTorch", theirs_fn), ("fusedloss", ours_fn)):
        xx = x.clone().requires_grad_()
        loss = fn(xx)
        (grad,) = torch.autograd.grad(loss, xx)
        out[name] = (errors(loss.detach(), ref_loss.detach(), dtype)[0],
                     *errors(grad, ref_grad, dtype))
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
