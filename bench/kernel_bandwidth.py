"""Each fusedloss CUDA kernel's achieved bandwidth: the bytes it must move (its reads and writes
of the N x C tensors, per bench/ROOFLINE.md's model) over its own time on the device (from
torch.profiler's kernel records), against the GPU's peak (memory clock x bus width from
torch.cuda's device properties, and the copy_ bandwidth measured here).

Bytes a kernel moves, e = the element size: rows kernel 2NCe when it writes the gradient
(forward with the gradient, or from saved statistics), NCe when it only reads (a loss-only
forward: a case where a from-statistics kernel also ran); split stats NCe; split finish 2NCe
(its re-read may come from L2); sigmoid 3NCe with the gradient (logits, targets, gradient),
2NCe loss only; scale_grad 2NCe. The small sums are listed with their time only.

    python bench/kernel_bandwidth.py --out DIR      # DIR/kernel_bandwidth.json and .md
    python bench/kernel_bandwidth.py --device cpu --quick   # the dry run: whole ops, no kernels
"""

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedloss as fl  # noqa: E402

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
# (label, loss, rows, classes, dtype, kwargs): each isolates a kernel or a pair
CASES = [
    ("ce rows, bfloat16, mean", "ce", 4096, 32000, BF16, {}),
    ("ce rows, float32, mean", "ce", 4096, 32000, F32, {}),
    ("ce rows, float16, mean, 20% ignored", "ce", 16384, 8000, F16, {"ignored": 0.2}),
    ("ce rows, bfloat16, reduction none (backward from statistics)", "ce", 4096, 32000, BF16,
     {"reduction": "none"}),
    ("ce rows, bfloat16, sum, grad_output 2.5 (scale_grad)", "ce", 4096, 32000, BF16,
     {"reduction": "sum", "go": 2.5}),
    ("ce split, bfloat16, 128256 classes", "ce", 1024, 128256, BF16, {}),
    ("ce split, float32, few rows", "ce", 64, 128256, F32, {}),
    ("bce, float32, mean", "bce", 65536, 128, F32, {}),
    ("bce, bfloat16, mean", "bce", 65536, 128, BF16, {}),
    ("bce, float16, 16384x512", "bce", 16384, 512, F16, {}),
]
QUICK = [(label, loss, min(rows, 256), min(cols, 4000), dtype, kw)
         for label, loss, rows, cols, dtype, kw in CASES[:4] + CASES[7:8]]


def make(loss, rows, cols, dtype, kw, dev):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(rows, cols, generator=g) * 2).to(dev, dtype).requires_grad_()
    if loss == "ce":
        t = torch.randint(0, cols, (rows,), generator=g)
        if kw.get("ignored"):
            t[torch.rand(rows, generator=g) < kw["ignored"]] = -100
        t = t.to(dev)
        red = kw.get("reduction", "mean")

        def step():
            out = fl.cross_entropy(x, t, reduction=red)
            (out.sum() * kw.get("go", 1.0) if red == "none" or "go" in kw else out).backward()
            x.grad = None
    else:
        y = torch.rand(rows, cols, generator=g).to(dev, dtype)

        def step():
            fl.binary_cross_entropy_with_logits(x, y).backward()
            x.grad = None
    return step


def from_stats(name):
    m = re.search(r"softmax_ce_rows_kernel<[^,]+, ?\d+, ?(true|false), ?(true|false)>", name)
    return bool(m) and m.group(2) == "true"


def kernel_bytes(name, nce, others):
    """Bytes the model counts for a kernel of this name; None for the small ones."""
    if "rows_kernel" in name:
        loss_only = not from_stats(name) and any(from_stats(o) for o in others)
        return nce if loss_only else 2 * nce
    if "split_stats" in name:
        return nce
    if "split_finish" in name:
        return 2 * nce
    if "sigmoid_ce" in name:
        return 3 * nce
    if "scale_grad" in name:
        return 2 * nce
    return None


def peak_bandwidth(dev):
    p = torch.cuda.get_device_properties(dev)
    clock, bus = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
    return 2 * clock * 1e3 * bus / 8 if clock and bus else None  # kHz, bits, double data rate


def copy_bandwidth(dev, nbytes=1 << 30, reps=10):
    a = torch.empty(nbytes // 4, device=dev)
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * nbytes * reps / (start.elapsed_time(end) * 1e-3)


def profile_kernels(step, reps):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for evt in prof.events():
        if getattr(evt, "device_type", None) is None or "CUDA" not in str(evt.device_type):
            continue
        us = evt.time_range.elapsed_us()  # a kernel record's own duration
        k = kernels.setdefault(evt.name, [0.0, 0])
        k[0] += us
        k[1] += 1
    return {name: (us / n, n / reps) for name, (us, n) in kernels.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="small sizes (CPU dry run)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", help="folder for kernel_bandwidth.json and kernel_bandwidth.md")
    args = p.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "quick": args.quick, "reps": args.reps}
    if cuda:
        meta["peak_bytes_per_s"] = peak_bandwidth(dev)
        meta["copy_bytes_per_s"] = copy_bandwidth(dev)
    rows_out, failed = [], 0
    for label, loss, rows, cols, dtype, kw in (QUICK if args.quick else CASES):
        nce = rows * cols * torch.tensor([], dtype=dtype).element_size()
        case = {"case": label, "rows": rows, "cols": cols, "dtype": str(dtype)[6:],
                "kernels": []}
        try:
            step = make(loss, rows, cols, dtype, kw, dev)
            for _ in range(3):
                step()
            if cuda:
                torch.cuda.synchronize()
                try:
                    kernels = profile_kernels(step, args.reps)
                except Exception as e:  # noqa: BLE001 -- the profiler (CUPTI) is not there
                    kernels, case["profiler_error"] = {}, f"{type(e).__name__}: {e}"[:200]
                if not any("fusedloss" in k for k in kernels):
                    # no kernel records: the whole step's time, CUDA events
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(args.reps):
                        step()
                    end.record()
                    end.synchronize()
                    case["step_us"] = start.elapsed_time(end) * 1e3 / args.reps
                for name, (us, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0]):
                    if "fusedloss" not in name:
                        continue
                    b = kernel_bytes(name, nce, list(kernels))
                    k = {"name": name, "us": us, "calls_per_step": calls, "bytes": b}
                    if b and us > 0:
                        k["bytes_per_s"] = b / (us * 1e-6)
                        if meta.get("peak_bytes_per_s"):
                            k["of_peak"] = k["bytes_per_s"] / meta["peak_bytes_per_s"]
                        k["of_copy"] = k["bytes_per_s"] / meta["copy_bytes_per_s"]
                    case["kernels"].append(k)
            else:  # no kernels to time: the whole step, for the dry run
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    step()
                case["step_us"] = (time.perf_counter() - t0) / args.reps * 1e6
        except Exception as e:  # noqa: BLE001 -- report every case
            case["error"] = f"{type(e).__name__}: {e}"[:300]
            failed += 1
        rows_out.append(case)
        print(json.dumps({k: v for k, v in case.items() if k != "kernels"}), flush=True)
        if cuda:
            torch.cuda.empty_cache()
    lines = [f"fusedloss kernels' achieved bandwidth — {meta['device']}, torch {meta['torch']}"]
    if cuda:
        peak = meta.get("peak_bytes_per_s")
        lines[0] += (f"; peak {peak / 1e12:.2f} TB/s (memory clock x bus width)" if peak else
                     "; peak unknown") + f", copy_ {meta['copy_bytes_per_s'] / 1e12:.2f} TB/s"
    lines += ["", "| case | kernel | µs | bytes (model) | TB/s | of peak | of copy_ |",
              "|---|---|--:|--:|--:|--:|--:|"]
    for c in rows_out:
        if "error" in c:
            lines.append(f"| {c['case']} | ERROR: {c['error']} | | | | | |")
        elif not c["kernels"]:
            lines.append(f"| {c['case']} | (whole step on {dev.type}) | "
                         f"{c.get('step_us', 0):.0f} | | | | |")
        for k in c["kernels"]:
            short = k["name"].replace("fusedloss::cuda::", "").replace("void ", "")
            short = short.split("(")[0]
            bps = k.get("bytes_per_s")
            lines.append(f"| {c['case']} | `{short}` | {k['us']:.1f} | "
                         f"{k['bytes'] or '—'} | {bps / 1e12 if bps else 0:.2f} | "
                         f"{format(k['of_peak'], '.0%') if 'of_peak' in k else '—'} | "
                         f"{format(k['of_copy'], '.0%') if 'of_copy' in k else '—'} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernel_bandwidth.json"), "w") as f:
            json.dump({"meta": meta, "cases": rows_out}, f, indent=1)
        with open(os.path.join(args.out, "kernel_bandwidth.md"), "w") as f:
            f.write(md)
    print(f"{len(rows_out) - failed}/{len(rows_out)} cases measured on {dev.type}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
