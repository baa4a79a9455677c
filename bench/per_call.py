"""Fixed cost of one eager call at small sizes, fusedloss next to PyTorch, interleaved.

At a few thousand logits a loss call costs its Python and C++ entry, not its kernel: this
measures that cost per call (CPU time of the process, one thread), for forward + backward
(`torch.autograd.grad`) and for a forward that records nothing (evaluation, `torch.no_grad`).

    python bench/per_call.py                 # the default sizes, 5 rounds of 2000 calls
    python bench/per_call.py --calls 500 --rounds 3 --sizes 8x10
    python bench/per_call.py --dtypes float32 bfloat16 float16

Each round runs every (size, mode, loss, contender) once, in turn, so that a busy spell of a
shared host falls on all contenders alike; the table gives the median over rounds of the
per-call time, the spread (min-max over rounds) and the ratio fusedloss / PyTorch.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fusedloss as fl

LOSSES = {
    "ce": (fl.cross_entropy, F.cross_entropy),
    "bce": (fl.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
}


def _inputs(loss, rows, cols, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g).to(dtype).requires_grad_()
    if loss == "ce":
        return x, torch.randint(0, cols, (rows,), generator=g)
    return x, torch.rand(rows, cols, generator=g)


def _call(fn, x, t, mode):
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(x, t), x)

    def forward_only():
        with torch.no_grad():
            return fn(x, t)

    return forward_only


def _time_per_call(step, calls):
    for _ in range(max(1, calls // 20)):  # warm-up
        step()
    start = time.process_time()
    for _ in range(calls):
        step()
    return (time.process_time() - start) / calls * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["8x10", "8x100", "64x1000", "256x4000"],
                    help="rows x cols (classes for CE, features for BCE)")
    ap.add_argument("--modes", nargs="+", default=["fwd+bwd", "fwd (no_grad)"],
                    choices=["fwd+bwd", "fwd (no_grad)"])
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    ap.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", nargs="+", default=["float32"],
                    choices=["float32", "bfloat16", "float16", "float64"], help="logits' dtype")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    cells = []  # (size, dtype, mode, loss, contender, step)
    for size in args.sizes:
        rows, cols = (int(v) for v in size.split("x"))
        for dtype in args.dtypes:
            for mode in args.modes:
                for loss in args.losses:
                    x, t = _inputs(loss, rows, cols, getattr(torch, dtype))
                    for name, fn in zip(("fusedloss", "torch"), LOSSES[loss]):
                        cells.append((size, dtype, mode, loss, name, _call(fn, x, t, mode)))
    times = {cell[:5]: [] for cell in cells}
    for _ in range(args.rounds):
        for *key, step in cells:
            times[tuple(key)].append(_time_per_call(step, args.calls))

    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds x {args.calls} calls, "
          f"CPU time per call (us): median over rounds [min-max]")
    print("| size | dtype | mode | loss | fusedloss us | torch us | fusedloss / torch |")
    print("|---|---|---|---|--:|--:|--:|")
    for size in args.sizes:
        for dtype in args.dtypes:
            for mode in args.modes:
                for loss in args.losses:
                    ours, theirs = (times[(size, dtype, mode, loss, n)]
                                    for n in ("fusedloss", "torch"))
                    mo, mt = statistics.median(ours), statistics.median(theirs)
                    print(f"| {size} | {dtype} | {mode} | {loss} | {mo:.1f} "
                          f"[{min(ours):.1f}-{max(ours):.1f}] | {mt:.1f} "
                          f"[{min(theirs):.1f}-{max(theirs):.1f}] | {mo / mt:.2f} |")


if __name__ == "__main__":
    main()
