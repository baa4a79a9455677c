"""Compiled training steps: fusedloss against PyTorch's cross-entropy, eager and under
torch.compile, peak extra memory and step time of each, one fresh process per contender.

Cases (each built from code, nothing downloaded):
  linear-loss  logits = h @ W.t(), then the mean loss; N 4096, H 64, V 32000, float32;
               forward and backward compiled together (fullgraph). Memory in logits-sized
               buffers (N x V x 4 bytes).
  tiny-lm      a causal LM (vocabulary 32000, sequence 128, batch 8, hidden 64, 2 layers):
               model, loss and backward compiled (fullgraph), AdamW step eager for everyone.
  small-lm     the same model with 5000 classes and 512 tokens a step (batch 4 x 128).

    python bench/compiled.py                       # every case, results in bench/results/
    python bench/compiled.py --cases linear-loss --reps 5
    python bench/compiled.py --quick               # small shapes: a smoke test
    python bench/compiled.py --profile --cases small-lm --contenders "compiled torch,compiled fusedloss"
                                                   # where each step's time goes (_step_profile.py)

One thread by default (--threads): the numbers are per core and the machine's other work
disturbs them less. Each step is timed by the wall clock and by the process's CPU time: on a
shared machine the wall clock also counts the time other processes held the core, the CPU
time does not (it still feels their cache and memory traffic).
"""

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import _measure
import _step_profile
import fusedloss as fl

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (loss function, compiled). Order = table order.
CONTENDERS = {
    "eager torch": (lambda x, t: F.cross_entropy(x, t), False),
    "compiled torch": (lambda x, t: F.cross_entropy(x, t), True),
    "eager fusedloss": (lambda x, t: fl.cross_entropy(x, t), False),
    "eager fusedloss inplace": (lambda x, t: fl.cross_entropy(x, t, inplace_backward=True),
                                False),
    "compiled fusedloss": (lambda x, t: fl.cross_entropy(x, t), True),
    "compiled fusedloss inplace": (
        lambda x, t: fl.cross_entropy(x, t, inplace_backward=True), True),
}

def run_contenders():
    """bench/run.py's contender entries for the loss alone compiled by itself (the logits are
    an input of the compiled function, so its gradient takes a buffer of its own, as
    torch.compile's does); the cases above compile the layer before the loss with it."""
    from _contenders import ALL, LossRunner, _compiled, fused_fn

    return {"fusedloss compiled": (
        ALL, {"cpu", "cuda"}, lambda case, sets: LossRunner(_compiled(fused_fn(case)), sets))}


CASES = {  # name -> (kind, shape); quick shapes after
    "linear-loss": ("linear", dict(rows=4096, hidden=64, vocab=32000)),
    "tiny-lm": ("lm", dict(vocab=32000, seq=128, batch=8, hidden=64)),
    "small-lm": ("lm", dict(vocab=5000, seq=128, batch=4, hidden=64)),
}
QUICK = {
    "linear-loss": ("linear", dict(rows=256, hidden=16, vocab=1000)),
    "tiny-lm": ("lm", dict(vocab=1000, seq=16, batch=4, hidden=16)),
    "small-lm": ("lm", dict(vocab=500, seq=16, batch=2, hidden=16)),
}


class TinyLM(nn.Module):
    """Token and position embeddings, pre-norm causal attention blocks, an untied LM head."""

    def __init__(self, vocab, seq, hidden, layers=2, heads=4):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(seq, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(ln1=nn.LayerNorm(hidden), qkv=nn.Linear(hidden, 3 * hidden),
                               proj=nn.Linear(hidden, hidden), ln2=nn.LayerNorm(hidden),
                               up=nn.Linear(hidden, 4 * hidden),
                               down=nn.Linear(4 * hidden, hidden)))
            for _ in range(layers))
        self.ln = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        b, s = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(s, device=ids.device))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).view(b, s, 3, self.heads, -1).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True)
            x = x + blk["proj"](a.transpose(1, 2).reshape(b, s, -1))
            x = x + blk["down"](F.gelu(blk["up"](blk["ln2"](x))))
        return self.head(self.ln(x))


class LinearLossStep:
    """loss(h @ W.t(), t); backward into h and W."""

    def __init__(self, loss, compiled, rows, hidden, vocab):
        g = torch.Generator().manual_seed(0)
        self.h = torch.randn(rows, hidden, generator=g).requires_grad_()
        self.W = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).requires_grad_()
        self.t = torch.randint(0, vocab, (rows,), generator=g)
        self.logits_bytes = rows * vocab * 4

        def forward(h, W, t):
            return loss(h @ W.t(), t)
        self.forward = torch.compile(forward, fullgraph=True) if compiled else forward

    def step(self):
        self.h.grad = self.W.grad = None
        self.forward(self.h, self.W, self.t).backward()


class LMStep:
    """One AdamW step of TinyLM on random tokens (next-token targets)."""

    def __init__(self, loss, compiled, vocab, seq, batch, hidden):
        torch.manual_seed(0)
        self.model = TinyLM(vocab, seq, hidden)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        self.ids, self.labels = tokens[:, :-1], tokens[:, 1:].reshape(-1)
        self.logits_bytes = batch * seq * vocab * 4
        vocab_ = vocab

        def forward(ids, labels):
            return loss(self.model(ids).view(-1, vocab_), labels)
        self.forward = torch.compile(forward, fullgraph=True) if compiled else forward

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        self.forward(self.ids, self.labels).backward()
        self.opt.step()


def build(case, contender, quick):
    kind, shape = (QUICK if quick else CASES)[case]
    loss, compiled = CONTENDERS[contender]
    return (LinearLossStep if kind == "linear" else LMStep)(loss, compiled, **shape)


def probe(case, contender, quick, reps, warmup):
    """In this fresh process: warm-up steps (compilation, optimizer state), then the peak
    extra RSS of one step over the state after the warm-up, then the timed steps."""
    run = build(case, contender, quick)
    for _ in range(max(1, warmup)):
        run.step()
    gc.collect()
    fl.empty_cache()  # the eager path's kept gradient buffer would hide one step's allocation
    reset = _measure._reset_hwm()
    base = _measure._status_kib("VmHWM") if reset else _measure._status_kib("VmRSS")
    run.step()
    peak = _measure._status_kib("VmHWM")
    times, cpu_times = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        run.step()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu_times.append((time.process_time() - c0) * 1e3)
    return {"extra_bytes": peak - base, "logits_bytes": run.logits_bytes,
            "extra_logits": (peak - base) / run.logits_bytes, "peak_was_reset": reset,
            "median_ms": statistics.median(times), "times_ms": times,
            "median_cpu_ms": statistics.median(cpu_times), "cpu_times_ms": cpu_times}


def profile(case, contender, quick, reps, warmup):
    """In this fresh process: the warm-up steps, then where the time of `reps` steps goes."""
    _step_profile.enable_kernel_profile()
    run = build(case, contender, quick)
    for _ in range(max(1, warmup)):
        run.step()
    return _step_profile.breakdown(run.step, reps)


def run_case(case, names, args):
    out = {}
    env = dict(os.environ, **_measure.PROBE_ENV)
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--probe", case, name,
               "--reps", str(args.reps), "--warmup", str(args.warmup),
               "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        if args.profile:
            cmd.append("--profile")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{case} / {name} failed: {proc.stderr.strip()[-2000:]}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = out[name]
        if args.profile:
            print(_step_profile.format_breakdown(f"{case} / {name}", r), flush=True)
            continue
        print(f"  {case:12s} {name:28s} {r['median_ms']:9.2f} ms  {r['median_cpu_ms']:9.2f} ms CPU  "
              f"{r['extra_bytes'] / 2**20:8.1f} MiB  {r['extra_logits']:5.2f} logits",
              file=sys.stderr, flush=True)
    base = out.get("compiled torch")
    if args.profile:
        return out
    for r in out.values():
        r["time_vs_compiled_torch"] = r["median_ms"] / base["median_ms"] if base else None
        r["cpu_vs_compiled_torch"] = (r["median_cpu_ms"] / base["median_cpu_ms"]
                                      if base else None)
        r["mem_vs_compiled_torch"] = (r["extra_bytes"] / base["extra_bytes"]
                                      if base and base["extra_bytes"] > 0 else None)
    return out


def markdown(report):
    meta = report["meta"]
    lines = [f"Compiled steps, {meta['date']}, {meta['threads']} thread(s), "
             f"median of {meta['reps']} steps, load average {meta['load_before']} before and "
             f"{meta['load_after']} after; step time by the wall clock and as the process's CPU "
             f"time; memory: peak extra RSS of one step in logits-sized buffers (and MiB); time "
             f"and memory also as a ratio to compiled PyTorch (lower is better).", ""]
    for case, rows in report["cases"].items():
        lines += [f"**{case}** ({', '.join(f'{k} {v}' for k, v in report['shapes'][case].items())})",
                  "", "| contender | step ms | x compiled torch | CPU ms | x compiled torch "
                  "| peak extra (logits) | MiB |", "|---|--:|--:|--:|--:|--:|--:|"]

        def ratio(x):
            return "—" if x is None else f"{x:.2f}"
        for name, r in rows.items():
            lines.append(f"| {name} | {r['median_ms']:.2f} | {ratio(r['time_vs_compiled_torch'])} "
                         f"| {r['median_cpu_ms']:.2f} | {ratio(r['cpu_vs_compiled_torch'])} | "
                         f"{r['extra_logits']:.2f} | {r['extra_bytes'] / 2**20:.1f} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    p.add_argument("--reps", type=int, default=10, help="timed steps (after the memory step)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "results", "local"),
                   help="output folder (default bench/results/local/, ignored by git)")
    p.add_argument("--tag", default="compiled")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: where each contender's step time goes (--reps steps "
                   "profiled), printed; nothing written")
    p.add_argument("--probe", nargs=2, metavar=("CASE", "CONTENDER"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        fn = profile if args.profile else probe
        print(json.dumps(fn(*args.probe, args.quick, args.reps, args.warmup)))
        return None
    cases = [c.strip() for c in args.cases.split(",")]
    names = [n.strip() for n in args.contenders.split(",")]
    for bad in [c for c in cases if c not in CASES] + [n for n in names if n not in CONTENDERS]:
        raise SystemExit(f"unknown case or contender {bad!r}")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "threads": args.threads, "reps": args.reps, "warmup": args.warmup,
            "quick": args.quick, "load_before": _measure.load_average(),
            "torch": torch.__version__}
    shapes = {c: (QUICK if args.quick else CASES)[c][1] for c in cases}
    report = {"meta": meta, "shapes": shapes,
              "cases": {c: run_case(c, names, args) for c in cases}}
    meta["load_after"] = _measure.load_average()
    if args.profile:
        return report
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.tag + ("-quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
