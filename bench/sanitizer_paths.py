"""A short run of every CUDA kernel path, for compute-sanitizer (memcheck, racecheck).

Each case is one forward and backward through the public API on shapes chosen so that an
H200 (132 SMs, 60 MB of L2) takes the path named (see csrc/cuda/launch.h), on every dtype,
and its loss and gradient are compared with PyTorch in float64 on the same device, so that a
path that silently computes garbage also fails. The distillation cases call the distill ops
themselves and compare with the CPU kernels on the same inputs (tests/test_distill_kernels.py
holds those to float64). The shapes are small: under the sanitizer
every access is checked, and the whole run must take seconds, not minutes.

    compute-sanitizer --tool memcheck python bench/sanitizer_paths.py
    python bench/sanitizer_paths.py --device cpu     # the same calls on the CPU kernels
"""

import argparse
import os
import sys
import time

import torch

import fusedloss as fl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import reference  # noqa: E402  (the tests' float64 reference: one definition of the losses)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
# relative tolerance of the comparison with float64, per dtype (a wrong path is far off)
RTOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 5e-3}

# (name, rows, classes): the launch plan each takes on an H200
CE_SHAPES = [
    ("rows path, several rows a block", 300, 100),
    ("rows path, a block a row", 160, 32000),
    ("split path, few rows (occupancy)", 4, 20000),
    ("split path, long rows in L2-sized groups", 200, 40000),
    ("two-stage sums (rows > 16384)", 20000, 8),
]


def close(ours, ref, dtype):
    ours, ref = ours.detach().double(), ref.detach().double()
    scale = ref.abs().max().clamp_min(1e-30) if ref.numel() else 1.0
    return bool(((ours - ref).abs() <= RTOL[dtype] * (ref.abs() + scale)).all()
                or (ours.isnan() == ref.isnan()).all() and ref.isnan().all())


def run_ce(dev, dtype, rows, classes, *, reduction="mean", probs=False, misaligned=False,
           inplace=False, options=False, go=1.0):
    """fl.cross_entropy forward + backward against the tests' float64 reference."""
    width = classes + 1 if misaligned else classes
    base = torch.randn(rows, width, device=dev, dtype=torch.float64) * 3
    if probs:
        target = torch.softmax(torch.randn(rows, classes, device=dev, dtype=torch.float64), -1)
        target = target.to(dtype)
    else:
        target = torch.randint(0, classes, (rows,), device=dev)
        target[::7] = -100  # ignored rows (skipped by the kernels)
    kw = {}
    if options:
        mask = torch.rand(rows, device=dev)  # fractional mask, zero on some rows
        mask[::5] = 0
        kw = dict(weight=torch.rand(classes, device=dev) + 0.5, label_smoothing=0.1, mask=mask,
                  z_loss=1e-3, softcap=20.0)
    leaf = base.to(dtype).requires_grad_()
    x = leaf[:, 1:] if misaligned else leaf
    if inplace:
        x = x * 1  # a non-leaf the op may overwrite
    loss = fl.cross_entropy(x, target, reduction=reduction, inplace_backward=inplace, **kw)
    (loss * go).sum().backward()
    xr = (base[:, 1:] if misaligned else base).to(dtype).double().detach().clone()
    xr.requires_grad_()
    expected = reference.cross_entropy(xr, target, reduction=reduction, **kw)
    (expected * go).sum().backward()
    grad = leaf.grad[:, 1:] if misaligned else leaf.grad
    return close(loss, expected, dtype) and close(grad, xr.grad, dtype)


def run_bce(dev, dtype, rows, cols, *, reduction="mean", strided=False, broadcast=False, go=1.0):
    """fl.binary_cross_entropy_with_logits against the tests' float64 reference."""
    base = torch.randn(rows, cols + 3 if strided else cols, device=dev, dtype=torch.float64) * 3
    y = torch.rand(rows, cols, device=dev).to(dtype)
    kw = {}
    if broadcast:  # a weight and pos_weight per column, a mask per row
        kw = dict(weight=(torch.rand(cols, device=dev) + 0.5).to(dtype),
                  pos_weight=(torch.rand(cols, device=dev) + 0.5).to(dtype),
                  mask=(torch.rand(rows, 1, device=dev) > 0.2).float())
    leaf = base.to(dtype).requires_grad_()
    x = leaf[:, :cols] if strided else leaf
    loss = fl.binary_cross_entropy_with_logits(x, y, reduction=reduction, **kw)
    (loss * go).sum().backward()
    xr = (base[:, :cols] if strided else base).to(dtype).double().detach().clone()
    xr.requires_grad_()
    expected = reference.binary_cross_entropy_with_logits(xr, y, reduction=reduction, **kw)
    (expected * go).sum().backward()
    grad = leaf.grad[:, :cols] if strided else leaf.grad
    return close(loss, expected, dtype) and close(grad, xr.grad, dtype)


def run_distill(dev, sdtype, tdtype, rows, classes, divergence, *, topk=0, reduction=1):
    """The distill op's forward (loss, statistics, both gradients) and backward from the
    statistics, against the CPU kernels (tests/test_distill_kernels.py holds them to a float64
    reference) on the same inputs: a bad target and hard_weight, an ignored row and a padding
    row included."""
    s = (torch.randn(rows, classes, dtype=torch.float64) * 3).to(sdtype)
    width = topk or classes
    t = (torch.randn(rows, width, dtype=torch.float64) * 3).to(tdtype)
    idx = torch.stack([torch.randperm(classes)[:topk] for _ in range(rows)]) if topk else None
    target = torch.randint(0, classes, (rows,))
    target[1], target[2] = -100, classes  # ignored; out of range (NaN row on CUDA)
    acc = torch.float64 if sdtype == torch.float64 else torch.float32
    mask = torch.rand(rows, dtype=acc) + 0.5
    mask[3] = 0
    den = (mask * (target != -100)).sum().reshape(1)
    args = (divergence, 2.0, 0.3, 0.4, -100, reduction, den if reduction == 1 else None, True,
            True)

    ref_target = target.clone()
    ref_target[2] = -100  # the CPU raises for it; on CUDA its row is checked for NaN below
    dev_target = target if dev.type == "cuda" else ref_target

    def both(op, dev_args, ref_args):
        ours = op(*[a.to(dev) if torch.is_tensor(a) else a for a in dev_args], *args)
        return [o.cpu() for o in ours], op(*ref_args, *args)

    fwd, fwd_ref = both(torch.ops.fusedloss.distill, (s, t, idx, dev_target, mask),
                        (s, t, idx, ref_target, mask))
    go = torch.ones((), dtype=acc) if reduction else torch.rand(rows, dtype=acc) + 0.5
    # each from its own forward's statistics (the bad target's row: NaN ones on CUDA)
    bwd, bwd_ref = both(torch.ops.fusedloss.distill_backward,
                        (go, s, t, idx, dev_target, mask, fwd[1]),
                        (go, s, t, idx, ref_target, mask, fwd_ref[1]))
    keep = torch.arange(rows) != 2
    ok = all(close(a[keep], b[keep], a.dtype) for a, b in zip(fwd[1:] + bwd, fwd_ref[1:] + bwd_ref))
    ok = ok and (reduction != 0 or close(fwd[0][keep], fwd_ref[0][keep], acc))
    if dev.type == "cuda":
        ok = ok and bool(fwd[2][2].isnan().all() and bwd[0][2].isnan().all())
    return ok


def cases():
    """(label, thunk(device)) for every path, on every dtype where the path has its own code."""
    out = []
    for dname, dtype in DTYPES.items():
        for label, rows, classes in CE_SHAPES:
            out.append((f"ce {label}, {dname}",
                        lambda d, dt=dtype, r=rows, c=classes: run_ce(d, dt, r, c)))
        out.append((f"bce 128-bit path, none, {dname}",
                    lambda d, dt=dtype: run_bce(d, dt, 256, 96, reduction="none")))
        out.append((f"bce strided path, mean, {dname}",
                    lambda d, dt=dtype: run_bce(d, dt, 64, 50, strided=True)))
    bf16, f32 = torch.bfloat16, torch.float32
    for label, rows, classes in CE_SHAPES[:4]:
        for dtype in (bf16, f32):
            tag = f"{label}, {str(dtype)[6:]}"
            out += [
                (f"ce every option (weight, smoothing, mask, z-loss, softcap): {tag}",
                 lambda d, dt=dtype, r=rows, c=classes: run_ce(d, dt, r, c, options=True)),
                (f"ce reduction=none (recompute from the saved statistics): {tag}",
                 lambda d, dt=dtype, r=rows, c=classes: run_ce(d, dt, r, c, reduction="none")),
                (f"ce probability targets: {tag}",
                 lambda d, dt=dtype, r=rows, c=classes: run_ce(d, dt, r, c, probs=True)),
                (f"ce misaligned rows (a column sliced off): {tag}",
                 lambda d, dt=dtype, r=rows, c=classes: run_ce(d, dt, r, c, misaligned=True)),
                (f"ce inplace_backward: {tag}",
                 lambda d, dt=dtype, r=rows, c=classes: run_ce(d, dt, r, c, inplace=True)),
                (f"ce sum, grad_output 2.5 (scale_grad_): {tag}",
                 lambda d, dt=dtype, r=rows, c=classes: run_ce(d, dt, r, c, reduction="sum",
                                                                go=2.5)),
            ]
    out += [
        ("bce broadcast weight, pos_weight and mask, mean (two-stage mask sum)",
         lambda d: run_bce(d, f32, 200, 100, broadcast=True)),
        ("bce sum, grad_output 2.5 (scale_grad_)",
         lambda d: run_bce(d, bf16, 128, 64, reduction="sum", go=2.5)),
        ("bce 67M elements (two-stage loss sum over > 16384 blocks; 1/10 of it on a CPU)",
         lambda d: run_bce(d, f32, 16400 if d.type == "cuda" else 1640, 4096)),
        ("ce out-of-range target: NaN row on CUDA, never an out-of-bounds read",
         bad_target),
    ]
    # distill: one block a row; 4000 classes take 16 strides of the block, 300 top-K classes two
    f16, f64 = torch.float16, torch.float64
    for sd, td in ((f32, f32), (bf16, bf16), (f16, f16), (f32, bf16), (f64, f64)):
        tag = f"{str(sd)[6:]} student, {str(td)[6:]} teacher"
        for name, div in (("forward_kl", 0), ("reverse_kl", 1), ("jsd", 2)):
            out.append((f"distill {name}, mean, bad target and ignored rows: {tag}",
                        lambda d, sd=sd, td=td, div=div: run_distill(d, sd, td, 6, 4000, div)))
        out.append((f"distill top-K teacher, none (gradients from the statistics): {tag}",
                    lambda d, sd=sd, td=td: run_distill(d, sd, td, 6, 4000, 0, topk=300,
                                                        reduction=0)))
    return out


def bad_target(dev):
    x = torch.randn(8, 1000, device=dev)
    t = torch.randint(0, 1000, (8,), device=dev)
    t[3] = 1000
    if dev.type == "cpu":
        try:
            fl.cross_entropy(x, t, reduction="none")
        except IndexError:
            return True
        return False
    per = fl.cross_entropy(x, t, reduction="none")
    return bool(per[3].isnan()) and bool(per[[0, 1, 2, 4, 5, 6, 7]].isfinite().all())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("-k", help="run only the cases whose label contains this")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not (fl.build_info()["cuda"] and torch.cuda.is_available()):
        raise SystemExit("no CUDA kernels or no CUDA device here (use --device cpu)")
    torch.manual_seed(0)
    failed, start = [], time.perf_counter()
    todo = [(label, fn) for label, fn in cases() if not args.k or args.k in label]
    for label, fn in todo:
        t0 = time.perf_counter()
        try:
            ok = fn(dev)
        except Exception as e:  # noqa: BLE001 -- report every case, then fail
            ok, label = False, f"{label}: {type(e).__name__}: {e}"
        if dev.type == "cuda":
            torch.cuda.synchronize()
        print(f"{'ok  ' if ok else 'FAIL'} {time.perf_counter() - t0:6.2f} s  {label}", flush=True)
        if not ok:
            failed.append(label)
    print(f"{len(todo) - len(failed)}/{len(todo)} kernel-path cases ok on {dev.type} in "
          f"{time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
