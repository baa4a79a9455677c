"""Fused linear + cross-entropy benchmark (``python bench/run.py --linear-ce``): the loss of
``x @ W.T`` against a target, forward+backward (gradients to x and W), for each contender, timed
interleaved in one run, with the peak extra memory of each measured in a fresh subprocess.

    python bench/run.py --linear-ce                       # the cases of bench/README.md
    python bench/run.py --linear-ce --cases 512x64x4000-float32 --reps 3

Contenders: the logits materialised, then F.cross_entropy / fusedloss / fusedloss in place;
PyTorch's chunked F.linear_cross_entropy (options=LinearCrossEntropyOptions()); fusedloss's
linear_cross_entropy, plain and with softcap + z_loss (which PyTorch's chunked path lacks).
"""

import argparse
import datetime
import gc
import json
import os
import shlex
import subprocess
import sys

import torch
import torch.nn.functional as F

import _measure
import fusedloss as fl
from fusedloss.linear import auto_chunk_rows, compute_dtype

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ["4096x256x32000-float32", "4096x256x32000-bfloat16",
         "2048x1024x128256-float32", "2048x1024x128256-bfloat16"]
CONTENDERS = ["logits + F.cross_entropy", "logits + fl.cross_entropy", "logits + fl inplace",
              "torch chunked", "fl.linear_cross_entropy", "fl linear softcap+z_loss"]
UNFUSED = CONTENDERS[:3]
SOFTCAP, Z_LOSS = 30.0, 1e-4
TIMED = ("per repetition and contender: loss = f(x, W, target); torch.autograd.grad(loss, "
         "(x, W)), end to end; x (N x H) and W (V x H) are leaves requiring grad")


def parse_case(name):
    shape, dtype = name.rsplit("-", 1)
    n, h, v = (int(s) for s in shape.split("x"))
    return n, h, v, getattr(torch, dtype)


def make_inputs(name, device):
    n, h, v, dtype = parse_case(name)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, h, generator=g) / h ** 0.5).to(dtype).to(device).requires_grad_()
    w = (torch.randn(v, h, generator=g)).to(dtype).to(device).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(device)
    t[torch.rand(n, generator=g).to(device) < 0.05] = -100  # a few ignored positions
    return x, w, t


def loss_fn(name):
    if name == "logits + F.cross_entropy":
        return lambda x, w, t: F.cross_entropy(F.linear(x, w), t)
    if name == "logits + fl.cross_entropy":
        return lambda x, w, t: fl.cross_entropy(F.linear(x, w), t)
    if name == "logits + fl inplace":
        return lambda x, w, t: fl.cross_entropy(F.linear(x, w), t, inplace_backward=True)
    if name == "torch chunked":
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=opts)
    if name == "fl.linear_cross_entropy":
        return lambda x, w, t: fl.linear_cross_entropy(x, w, t)
    if name == "fl linear softcap+z_loss":
        return lambda x, w, t: fl.linear_cross_entropy(x, w, t, softcap=SOFTCAP, z_loss=Z_LOSS)
    rows = chunk_rows_of(name)
    if rows:
        return lambda x, w, t: fl.linear_cross_entropy(x, w, t, chunk_size=rows)
    raise ValueError(f"unknown contender {name!r}")


CHUNK_PREFIX = "fl chunk="


def chunk_rows_of(name):
    """R for a contender "fl chunk=R" (fl.linear_cross_entropy with chunk_size=R: the points
    of the time and memory against chunk rows curve, --chunk-rows), else None."""
    if name.startswith(CHUNK_PREFIX) and name[len(CHUNK_PREFIX):].isdigit():
        return int(name[len(CHUNK_PREFIX):])
    return None


class Runner:
    def __init__(self, name, inputs):
        self.fn, self.inputs = loss_fn(name), inputs

    def prepare(self):
        pass

    def step(self):
        x, w, t = self.inputs
        loss = self.fn(x, w, t)
        return torch.autograd.grad(loss, (x, w))


def skip_reason(case, name, device):
    """Contenders not run, and why (said in the table, never silently dropped)."""
    _, _, _, dtype = parse_case(case)
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and name in UNFUSED:
        return ("16-bit GEMMs are emulated on this CPU: its bfloat16 grad_input GEMM alone "
                "(N x V @ V x H) measured ~100x slower than float32, minutes per step")
    return None


def chunk_model(case, device):
    """Bytes and FLOPs of one fusedloss chunk (the README's per-chunk table)."""
    n, h, v, dtype = parse_case(case)
    cdt = compute_dtype(dtype, device)
    es = torch.empty((), dtype=cdt).element_size()
    rows = auto_chunk_rows(n, h, v, cdt)
    return {"chunk_rows": rows, "chunks": -(-n // rows), "compute_dtype": str(cdt).split(".")[-1],
            "chunk_buffer_bytes": rows * v * es,
            "weight_bytes_streamed_per_chunk": 3 * v * h * es,
            "gemm_flops_per_chunk": 3 * 2 * rows * v * h,
            "kernel_bytes_per_chunk": 2 * rows * v * es,
            "logits_bytes_whole": n * v * torch.empty((), dtype=dtype).element_size()}


def check_grads(case, names, inputs, runner=None):
    """Every contender's gradients against the first one run (max abs difference of dx, dW).
    `runner(name, inputs)`: a Runner whose step() returns (dx, dW) (default: this file's)."""
    out = {}
    ref = None
    for name in names:
        gx, gw = (runner or Runner)(name, inputs).step()
        if ref is None:
            ref = (gx.double(), gw.double())
        out[name] = {"max_abs_diff_dx": float((gx.double() - ref[0]).abs().max()),
                     "max_abs_diff_dw": float((gw.double() - ref[1]).abs().max())}
    return out


def memory_probe(case, name, device):
    """Child process: the peak extra memory of one forward+backward of `name`."""
    if os.environ.get("LINEAR_CE_PROBE_WARMUP", "1") == "0":
        # The large cases: one measured step, after a warm-up step on a small problem of the same
        # kind (it loads the code and the GEMM library's buffers, which would otherwise count as
        # the step's memory; a full-size warm-up step would double the probe's time).
        n, h, v, dtype = parse_case(case)
        small = f"{min(n, 256)}x{h}x{min(v, 4096)}-{str(dtype).split('.')[-1]}"
        warm = Runner(name, make_inputs(small, device))
        warm.step()
        del warm
        gc.collect()
        r = Runner(name, make_inputs(case, device))
        fl.empty_cache()
        reset = _measure._reset_hwm()
        base = _measure._status_kib("VmHWM") if reset else _measure._status_kib("VmRSS")
        out = r.step()
        peak = _measure._status_kib("VmHWM")
        del out
        print(json.dumps({"extra_bytes": peak - base, "baseline_bytes": base, "peak_bytes": peak,
                          "peak_was_reset": reset, "warmup": small}))
        return
    r = Runner(name, make_inputs(case, device))
    print(json.dumps(_measure.probe_memory(r, device)))


def memory_column(case, names, device, flag="--linear-ce", extra_args=()):
    """{contender: peak memory}, each from `bench/run.py <flag> --memory-probe ... <extra_args>`
    in a fresh process."""
    out = {}
    env = dict(os.environ, **_measure.PROBE_ENV)
    for name in names:
        cmd = [sys.executable, os.path.join(HERE, "run.py"), flag, "--memory-probe",
               case, name, "--device", device.type, *extra_args]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
            if proc.returncode != 0:
                raise RuntimeError((proc.stderr.strip().splitlines() or ["?"])[-1])
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
            log(f"  memory probe of {name} failed: {e}")
    return out


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_case(case, names, device, args):
    inputs = make_inputs(case, device)
    skipped = {n: skip_reason(case, n, device) for n in names}
    run = [n for n in names if not skipped[n]]
    log(f"{case}: {', '.join(run)} ({args.warmup}+{args.reps} reps)")
    checks = check_grads(case, [n for n in run if n != "fl linear softcap+z_loss"], inputs)
    runners = {n: Runner(n, inputs) for n in run}
    times = _measure.interleaved(runners, args.reps, args.warmup, _measure.cpu_timer
                                 if device.type == "cpu" else _measure.cuda_timer())
    results = {n: {**_measure.summarize(times[n]), **checks.get(n, {})} for n in run}
    del runners, inputs
    gc.collect()
    memory = {} if args.no_memory else memory_column(case, run, device)
    for n in run:
        mem = memory.get(n, {}).get("extra_bytes")
        log(f"  {n:26s} {results[n]['median_ms']:10.1f} ms  "
            f"{'' if mem is None else f'{mem / 2**20:8.0f} MB'}")
    return {"name": case, "results": results, "memory": memory,
            "skipped": {n: r for n, r in skipped.items() if r},
            "chunk": chunk_model(case, device)}


def markdown(report):
    lines = [f"Measured {report['meta']['date']} on {report['meta']['device_name']} "
             f"({report['meta']['torch_threads']} threads), torch {report['meta']['torch']}; "
             f"`{report['meta']['command']}`; median of {report['meta']['reps']} interleaved "
             f"repetitions after {report['meta']['warmup']} warm-up.", "",
             "| case (N x H x V, dtype) | contender | fwd+bwd ms | vs logits + fl | "
             "vs torch chunked | peak extra MB | vs torch chunked | / logits size |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in report["cases"]:
        res, mem = c["results"], c["memory"]
        logits_mb = c["chunk"]["logits_bytes_whole"] / 2**20

        def ratio(a, b):
            return f"{a / b:.2f}x" if a is not None and b else "-"

        base_t = res.get("logits + fl.cross_entropy", {}).get("median_ms")
        ch_t = res.get("torch chunked", {}).get("median_ms")
        ch_m = mem.get("torch chunked", {}).get("extra_bytes")
        for n in CONTENDERS + sorted((n for n in res if chunk_rows_of(n)), key=chunk_rows_of):
            if n in c["skipped"]:
                lines.append(f"| {c['name']} | {n} | not run | | | | | |")
                continue
            if n not in res:
                continue
            t = res[n]["median_ms"]
            m = mem.get(n, {}).get("extra_bytes")
            lines.append(
                f"| {c['name']} | {n} | {t:.0f} | {ratio(t, base_t)} | {ratio(t, ch_t)} | "
                f"{'-' if m is None else f'{m / 2**20:.0f}'} | {ratio(m, ch_m)} | "
                f"{'-' if m is None else f'1/{logits_mb * 2**20 / m:.1f}'} |")
    lines.append("")
    lines.append("| case | chunk rows x chunks | compute dtype | chunk buffer MB | weight bytes "
                 "streamed per chunk (3 GEMMs) MB | GEMM GFLOP per chunk | CE kernel bytes per "
                 "chunk MB |")
    lines.append("|---|---|---|---:|---:|---:|---:|")
    for c in report["cases"]:
        k = c["chunk"]
        lines.append(f"| {c['name']} | {k['chunk_rows']} x {k['chunks']} | {k['compute_dtype']} | "
                     f"{k['chunk_buffer_bytes'] / 2**20:.0f} | "
                     f"{k['weight_bytes_streamed_per_chunk'] / 2**20:.0f} | "
                     f"{k['gemm_flops_per_chunk'] / 1e9:.1f} | "
                     f"{k['kernel_bytes_per_chunk'] / 2**20:.0f} |")
    skipped = {r for c in report["cases"] for r in c["skipped"].values()}
    for r in sorted(skipped):
        lines.append(f"\nNot run: {r}.")
    return "\n".join(lines) + "\n"


def main(argv):
    p = argparse.ArgumentParser(prog="bench/run.py --linear-ce", description=__doc__)
    p.add_argument("--cases", help="comma-separated NxHxV-dtype cases (default: the README's)")
    p.add_argument("--contenders", help="comma-separated subset of: " + ", ".join(CONTENDERS))
    p.add_argument("--chunk-rows", help="comma-separated chunk sizes R: adds the contenders "
                   "'fl chunk=R' (fl.linear_cross_entropy with chunk_size=R)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--tag", help="output file stem (default linear_ce-<device>)")
    p.add_argument("--memory-probe", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.memory_probe:
        return memory_probe(*args.memory_probe, device)
    cases = args.cases.split(",") if args.cases else CASES
    names = args.contenders.split(",") if args.contenders else list(CONTENDERS)
    if args.chunk_rows:
        names += [f"{CHUNK_PREFIX}{int(r)}" for r in args.chunk_rows.split(",")]
    return run_and_write(cases, names, device, args, "--linear-ce", argv, TIMED, run_case,
                         markdown, f"linear_ce-{device.type}")


def run_and_write(cases, names, device, args, flag, argv, timed, run_case, markdown, stem):
    """Runs `run_case` over the cases, then writes <args.out>/<args.tag or stem>.json (the
    machine, the command `bench/run.py <flag> <argv>`, every repetition) and .md (the table
    `markdown` makes), prints the table, and returns the report."""
    meta = _measure.machine_info(device)
    meta.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command=shlex.join(["python", "bench/run.py", flag, *argv]),
                timed=timed, reps=args.reps, warmup=args.warmup,
                load_before=_measure.load_average())
    report = {"meta": meta, "cases": [run_case(c, names, device, args) for c in cases]}
    meta["load_after"] = _measure.load_average()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.tag or stem)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table, end="")
    log(f"wrote {stem}.json, {stem}.md")
    return report
