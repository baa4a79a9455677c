"""fusedloss benchmark: forward+backward against PyTorch eager, torch.compile (and, on a GPU,
Liger-Kernel and QuACK when importable), interleaved in one run, with the copy floor, the
effective bandwidth and the peak extra memory. See bench/README.md.

    python bench/run.py                      # default: 3 LLM-shaped cases, 10 reps (a few minutes)
    python bench/run.py --full               # every LLM-shaped case, 20 reps
    python bench/run.py --quick              # small shapes and few reps: a smoke test
    python bench/run.py --cases ce-4096x32000-float32,bce --reps 30 --out /tmp/bench
    python bench/run.py --distributed        # vocab-parallel CE on 2 gloo processes
    python bench/run.py --cases distill      # distillation (forward KL, JSD) 4096x32000
    python bench/run.py --linear-distill     # fused linear distillation against the logits
"""

import argparse
import datetime
import fnmatch
import gc
import json
import os
import shlex
import subprocess
import sys
import time

import torch

import _measure
import _report
import compiled
from _contenders import (CONTENDERS, DEFAULT_CASES, DISTILL_CASES, FLOORS, FULL_CASES,
                         GRAD_TOLERANCE, INPLACE, QUICK_CASES, Case, build_runners, grad_error,
                         input_sets, make_inputs, reference_grad)

CONTENDERS.update(compiled.run_contenders())
HERE = os.path.dirname(os.path.abspath(__file__))
TIMED = ("per repetition and contender: loss = f(logits, target); grad = torch.autograd.grad("
         "loss, logits), end to end (forward, backward, allocating the gradient); logits are a "
         "leaf requiring grad, or for contenders that overwrite them (fusedloss inplace, liger) "
         "a fresh non-leaf logits = pristine * one built outside the timed region")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, 5 reps (smoke test)")
    p.add_argument("--full", action="store_true",
                   help="every LLM-shaped case (6), 20 reps (default: 3 cases, 10 reps)")
    p.add_argument("--cases", help="comma-separated: case names (any NxC shape, e.g. "
                   "ce-64x1000-float32), globs (*bfloat16) or name prefixes (ce, bce-65536); "
                   "distill: the distillation cases (distill_fkl-..., distill_jsd-...)")
    p.add_argument("--contenders", help="comma-separated subset of: " + ", ".join(CONTENDERS))
    p.add_argument("--reps", type=int, help="timed repetitions (default 10, full 20, quick 5)")
    p.add_argument("--warmup", type=int, help="untimed repetitions first (default 3, quick 1)")
    # Not bench/results/ (tracked: the published runs): a run must not dirty the checkout.
    p.add_argument("--out", default=os.path.join(HERE, "results", "local"),
                   help="output folder (default bench/results/local/, ignored by git)")
    p.add_argument("--tag", help="output file stem (default: device, plus -quick or -full)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--compiled", action="store_true",
                   help="also run bench/compiled.py's cases (layer + loss and small LM steps, "
                   "compiled and eager) with --quick, --out and --reps passed on")
    p.add_argument("--memory-probe", nargs=2, metavar=("CASE", "CONTENDER"),
                   help=argparse.SUPPRESS)  # internal: the child process of the memory column
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.quick and args.full:
        p.error("--quick and --full exclude each other")
    args.reps = args.reps or (5 if args.quick else 20 if args.full else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    return args


def select_cases(args):
    presets = QUICK_CASES if args.quick else FULL_CASES
    if not args.cases:
        return presets if args.quick or args.full else DEFAULT_CASES
    chosen = []
    for token in args.cases.split(","):
        try:
            hits = [Case.parse(token)]  # an explicit case name: any shape
        except ValueError:
            # the distillation presets only when the token names none of the others
            hits = ([c for c in presets if fnmatch.fnmatch(c.name, token)
                     or c.name.startswith(token)]
                    or [c for c in DISTILL_CASES if fnmatch.fnmatch(c.name, token)
                        or c.name.startswith(token)])
            if not hits:
                raise SystemExit(f"--cases: {token!r} matches none of "
                                 f"{', '.join(c.name for c in presets + DISTILL_CASES)}")
        chosen += [c for c in hits if c not in chosen]
    return chosen


def select_contenders(args):
    if not args.contenders:
        return list(CONTENDERS)
    names = [n.strip() for n in args.contenders.split(",")]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"--contenders: unknown {unknown}; choose from {list(CONTENDERS)}")
    names += [f for f in ("copy_", "add") if f not in names]  # every ratio is against a floor
    return [n for n in CONTENDERS if n in names]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def check_pass(case, runners, skipped, x, t):
    """Runs every contender once (its first call: torch.compile compiles here) and checks its
    gradient against float32 eager, so that a wrong kernel is never reported as fast. A
    contender that raises (e.g. no kernel for this device yet) is moved to `skipped`."""
    ref = reference_grad(case, x, t)
    checks = {}
    for name, run in list(runners.items()):
        t0 = time.perf_counter()
        try:
            run.prepare()
            out = run.step()
        except Exception as e:  # noqa: BLE001 -- reported in the table, the run goes on
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            skipped[name] = f"failed on its first call: {type(e).__name__}: {first_line}"
            del runners[name]
            log(f"  {name}: {skipped[name]}")
            continue
        if x.is_cuda:
            torch.cuda.synchronize()
        info = {"first_call_ms": (time.perf_counter() - t0) * 1e3}
        if name not in FLOORS:
            err = grad_error(out, ref)
            info.update(grad_error=err, grad_ok=err <= GRAD_TOLERANCE[case.dtype])
        if name in INPLACE:
            info["inplace_taken"] = out.data_ptr() == run.x.data_ptr()
        checks[name] = info
        del out
    return checks


def memory_column(case, names, device):
    """{contender: probe result}. CPU: one fresh subprocess per contender (the process's RSS
    high-water mark keeps every earlier allocation). CUDA: in this process, which costs no
    torch start-up or recompilation (the caching allocator's peak counts live tensors only)."""
    out = {}
    if device.type == "cuda":
        for name in names:
            runners, _ = build_runners(case, device, [name], [make_inputs(case, device)])
            if runners:
                out[name] = _measure.probe_memory(runners[name], device)
            del runners
            gc.collect()
            torch.cuda.empty_cache()
        return out
    env = dict(os.environ, **_measure.PROBE_ENV)
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", case.name, name,
               "--device", device.type]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                raise RuntimeError(tail[0])
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
            log(f"  memory probe of {name} failed: {e}")
    return out


def memory_probe_child(args, device):
    case = Case.parse(args.memory_probe[0])
    runners, skipped = build_runners(case, device, [args.memory_probe[1]],
                                     [make_inputs(case, device)])
    if not runners:
        raise SystemExit(f"cannot run {args.memory_probe[1]}: {skipped}")
    print(json.dumps(_measure.probe_memory(next(iter(runners.values())), device)))


def run_case(case, names, device, args, index, total):
    sets = input_sets(case, device, _measure.cache_bytes(device))
    runners, skipped = build_runners(case, device, names, sets)
    log(f"[{index}/{total}] {case.name}: {', '.join(runners)} ({len(sets)} input set"
        f"{'s' if len(sets) > 1 else ''}, {args.warmup}+{args.reps} reps)")
    torch._dynamo.reset()
    checks = check_pass(case, runners, skipped, *sets[0])
    bad = [n for n, c in checks.items() if not c.get("grad_ok", True)]
    if bad:
        errs = ", ".join(f"{n} (err {checks[n]['grad_error']:.1e})" for n in bad)
        log(f"  WRONG GRADIENT: {errs}")
    timer = _measure.cuda_timer() if device.type == "cuda" else _measure.cpu_timer
    bar = None if args.no_progress else f"[{index}/{total}] {case.name}"
    times = _measure.interleaved(runners, args.reps, args.warmup, timer, progress=bar)
    results = {n: {**_measure.summarize(times[n]), **checks[n]} for n in runners}
    n_sets = len(sets)
    del runners, sets
    gc.collect()
    probed = [n for n in results if n not in FLOORS]
    if not args.no_memory:
        log(f"  peak memory of {len(probed)} contenders"
            + (" (a fresh process each)" if device.type == "cpu" else ""))
    memory = {} if args.no_memory else memory_column(case, probed, device)
    res = {"name": case.name, "loss": case.loss, "rows": case.rows, "cols": case.cols,
           "dtype": case.dtype, "model_bytes": case.model_bytes, "grad_bytes": case.grad_bytes,
           "input_sets": n_sets, "results": results,
           "memory": memory, "skipped": skipped}
    _report.analyze(case, res, device.type)
    for n, r in results.items():
        log(f"  {n:18s} {r['median_ms']:9.2f} ms  {r['gbps']:7.1f} GB/s  {r.get('status', '')}")
    return res


def finish_meta(meta, report):
    meta["load_after"] = _measure.load_average()
    # Noise is read from the repetitions themselves, not the load average (other processes may
    # or may not compete for memory bandwidth): the copy floor is the steadiest workload there
    # is, so a wide spread of its repetitions means the machine disturbed the run.
    meta["floor_iqr_pct"] = max((r["iqr_pct"] for c in report["cases"]
                                 for name, r in c["results"].items() if name in ("copy_", "add")),
                                default=0.0)
    meta["noisy"] = bool(meta["floor_iqr_pct"] > _report.NOISY_IQR_PCT)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--linear-ce" in argv:  # the fused linear + cross-entropy cases: bench/linear_ce.py
        import linear_ce

        return linear_ce.main([a for a in argv if a != "--linear-ce"])
    if "--linear-distill" in argv:  # the fused linear distillation: bench/linear_distill.py
        import linear_distill

        return linear_distill.main([a for a in argv if a != "--linear-distill"])
    if "--distributed" in argv:  # vocab-parallel cross-entropy on gloo: bench/distributed.py
        import distributed

        return distributed.main([a for a in argv if a != "--distributed"])
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.memory_probe:
        return memory_probe_child(args, device)
    cases, names = select_cases(args), select_contenders(args)
    meta = _measure.machine_info(device)
    argv = sys.argv[1:] if argv is None else argv
    meta.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command=shlex.join(["python", "bench/run.py", *argv]), timed=TIMED,
                reps=args.reps, warmup=args.warmup, load_before=_measure.load_average())
    report = {"meta": meta, "cases": []}
    tag = args.tag or device.type + ("-quick" if args.quick else "-full" if args.full else "")
    for i, case in enumerate(cases, 1):
        report["cases"].append(run_case(case, names, device, args, i, len(cases)))
        finish_meta(meta, report)
        _report.write(report, args.out, tag, json_only=True)  # a run cut short keeps its cases
    paths = _report.write(report, args.out, tag)
    table = _report.markdown(report)
    print(table, end="")
    log("wrote " + ", ".join(paths.values()))
    if args.compiled:
        compiled.main(["--out", args.out, "--reps", str(min(args.reps, 10))]
                      + (["--quick"] if args.quick else []))


if __name__ == "__main__":
    main()
