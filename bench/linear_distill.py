"""Fused linear distillation benchmark (``python bench/run.py --linear-distill``): the
distillation loss of a student ``x @ Ws.T`` against a frozen teacher ``xt @ Wt.T`` (its input
and weight require no gradient), forward+backward (gradients to x and Ws), for each contender,
timed interleaved in one run, with the peak extra memory of each in a fresh subprocess.

    python bench/run.py --linear-distill                  # 4096 x 256 (teacher 512) x 32000 float32
    python bench/run.py --linear-distill --cases 512x64x128x4000-float32 --reps 3

Contenders: the student's and the teacher's logits materialised by F.linear, then the PyTorch
composite (bench/_contenders.py's distill_composite) or fl.distillation_loss; and
fl.linear_distillation_loss, which never holds either N x V logits whole. Loss: --divergence
(forward_kl), temperature 2, hard_weight 0.5, 5% of the targets ignore_index.
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F

import _measure
import fusedloss as fl
from _contenders import DISTILL_BETA, DISTILL_HARD_WEIGHT, DISTILL_TEMPERATURE, distill_composite
from linear_ce import HERE, check_grads, log, memory_column, run_and_write

CASES = ["4096x256x512x32000-float32"]
CONTENDERS = ["logits + composite", "logits + fl.distillation_loss",
              "fl.linear_distillation_loss"]
UNFUSED = CONTENDERS[:2]
TIMED = ("per repetition and contender: loss = f(x, Ws, xt, Wt, target); torch.autograd.grad("
         "loss, (x, Ws)), end to end; x (N x H) and Ws (V x H) are leaves requiring grad, the "
         "teacher's xt (N x Ht) and Wt (V x Ht) require none")


def parse_case(name):
    """'NxHxHtxV-dtype' -> (N, H, Ht, V, dtype)."""
    shape, dtype = name.rsplit("-", 1)
    n, h, ht, v = (int(s) for s in shape.split("x"))
    return n, h, ht, v, getattr(torch, dtype)


def make_inputs(name, device):
    n, h, ht, v, dtype = parse_case(name)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, h, generator=g) / h ** 0.5).to(dtype).to(device).requires_grad_()
    w = torch.randn(v, h, generator=g).to(dtype).to(device).requires_grad_()
    xt = (torch.randn(n, ht, generator=g) / ht ** 0.5).to(dtype).to(device)
    wt = torch.randn(v, ht, generator=g).to(dtype).to(device)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    t[torch.rand(n, generator=g).to(device) < 0.05] = -100  # a few ignored positions
    return x, w, xt, wt, t


def loss_fn(name, divergence):
    opts = dict(divergence=divergence, temperature=DISTILL_TEMPERATURE, beta=DISTILL_BETA,
                hard_weight=DISTILL_HARD_WEIGHT)
    if name == "logits + composite":
        return lambda x, w, xt, wt, t: distill_composite(F.linear(x, w), F.linear(xt, wt), t,
                                                         divergence)
    if name == "logits + fl.distillation_loss":
        return lambda x, w, xt, wt, t: fl.distillation_loss(F.linear(x, w), F.linear(xt, wt), t,
                                                             **opts)
    if name == "fl.linear_distillation_loss":
        return lambda x, w, xt, wt, t: fl.linear_distillation_loss(x, w, xt, wt, t, **opts)
    raise ValueError(f"unknown contender {name!r}")


class Runner:
    def __init__(self, name, inputs, divergence="forward_kl"):
        self.fn, self.inputs = loss_fn(name, divergence), inputs

    def prepare(self):
        pass

    def step(self):
        x, w, xt, wt, t = self.inputs
        loss = self.fn(x, w, xt, wt, t)
        return torch.autograd.grad(loss, (x, w))


def skip_reason(case, name, device):
    """Contenders not run, and why (said in the table, never silently dropped)."""
    if device.type == "cpu" and parse_case(case)[4] != torch.float32 and name in UNFUSED:
        return ("16-bit GEMMs are emulated on this CPU (see bench/linear_ce.py): minutes per "
                "materialised step")
    return None


def run_case(case, names, device, args):
    inputs = make_inputs(case, device)
    skipped = {n: skip_reason(case, n, device) for n in names}
    run = [n for n in names if not skipped[n]]
    log(f"{case}: {', '.join(run)} ({args.warmup}+{args.reps} reps)")
    checks = check_grads(case, run, inputs,
                         runner=lambda n, i: Runner(n, i, args.divergence))
    runners = {n: Runner(n, inputs, args.divergence) for n in run}
    times = _measure.interleaved(runners, args.reps, args.warmup, _measure.cpu_timer
                                 if device.type == "cpu" else _measure.cuda_timer())
    results = {n: {**_measure.summarize(times[n]), **checks[n]} for n in run}
    del runners, inputs
    memory = {} if args.no_memory else memory_column(
        case, run, device, flag="--linear-distill", extra_args=["--divergence", args.divergence])
    n, _, _, v, dtype = parse_case(case)
    for name in run:
        mem = memory.get(name, {}).get("extra_bytes")
        log(f"  {name:30s} {results[name]['median_ms']:10.1f} ms  "
            f"{'' if mem is None else f'{mem / 2**20:8.0f} MB'}")
    return {"name": case, "divergence": args.divergence, "results": results, "memory": memory,
            "skipped": {k: r for k, r in skipped.items() if r},
            "logits_bytes_whole": n * v * torch.empty((), dtype=dtype).element_size()}


def markdown(report):
    m = report["meta"]
    lines = [f"Measured {m['date']} on {m['device_name']} ({m['torch_threads']} threads), "
             f"torch {m['torch']}, commit {m['commit']}{' (dirty)' if m['dirty'] else ''}; "
             f"`{m['command']}`; median of {m['reps']} interleaved repetitions after "
             f"{m['warmup']} warm-up.", "",
             "| case (N x H x Ht x V, dtype) | divergence | contender | fwd+bwd ms | "
             "vs logits + composite | vs logits + fl | peak extra MB | vs logits + composite "
             "| / one logits size |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]

    def ratio(a, b):
        return f"{a / b:.2f}x" if a is not None and b else "-"

    for c in report["cases"]:
        res, mem = c["results"], c["memory"]
        base_t = res.get("logits + composite", {}).get("median_ms")
        fl_t = res.get("logits + fl.distillation_loss", {}).get("median_ms")
        base_m = mem.get("logits + composite", {}).get("extra_bytes")
        for name in CONTENDERS:
            if name in c["skipped"]:
                lines.append(f"| {c['name']} | {c['divergence']} | {name} | not run "
                             "| | | | | |")
                continue
            if name not in res:
                continue
            t = res[name]["median_ms"]
            mb = mem.get(name, {}).get("extra_bytes")
            share = "-" if mb is None else f"{mb / c['logits_bytes_whole']:.3f}"
            lines.append(
                f"| {c['name']} | {c['divergence']} | {name} | {t:.0f} | {ratio(t, base_t)} "
                f"| {ratio(t, fl_t)} | {'-' if mb is None else f'{mb / 2**20:.0f}'} "
                f"| {ratio(mb, base_m)} "
                f"| {share} |")
    for r in sorted({r for c in report["cases"] for r in c["skipped"].values()}):
        lines.append(f"\nNot run: {r}.")
    return "\n".join(lines) + "\n"


def main(argv):
    p = argparse.ArgumentParser(prog="bench/run.py --linear-distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", help="comma-separated NxHxHtxV-dtype cases (default "
                   f"{','.join(CASES)})")
    p.add_argument("--contenders", help="comma-separated subset of: " + ", ".join(CONTENDERS))
    p.add_argument("--divergence", default="forward_kl",
                   choices=["forward_kl", "reverse_kl", "jsd"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results", "local"),
                   help="output folder (default bench/results/local/, ignored by git)")
    p.add_argument("--tag", help="output file stem (default linear-distill-<device>)")
    p.add_argument("--memory-probe", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.memory_probe:  # the child process of the memory column
        case, name = args.memory_probe
        runner = Runner(name, make_inputs(case, device), args.divergence)
        print(json.dumps(_measure.probe_memory(runner, device)))
        return None
    cases = args.cases.split(",") if args.cases else CASES
    names = args.contenders.split(",") if args.contenders else list(CONTENDERS)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        p.error(f"--contenders: unknown {unknown}; choose from {CONTENDERS}")
    return run_and_write(cases, names, device, args, "--linear-distill", argv, TIMED, run_case,
                         markdown, f"linear-distill-{device.type}")
