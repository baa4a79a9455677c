"""Vocab-parallel cross-entropy benchmark (``python bench/run.py --distributed``): the logits
(N, V) split by classes over P gloo processes on this machine, each holding (N, V / P);
forward+backward of the loss (the gradient of each rank's slice), per contender:

- fusedloss:                ``fl.cross_entropy(local, target, process_group=pg)``
- torch loss_parallel:      ``DTensor.from_local(local, mesh, [Shard(1)])`` and
                            ``F.cross_entropy`` inside ``torch.distributed.tensor.parallel.
                            loss_parallel()`` (PyTorch's own vocab-parallel loss)
- gather + F.cross_entropy: all_gather the slices into the full (N, V) logits on every rank,
                            then ``F.cross_entropy`` (the backward keeps the rank's slice)

    python bench/run.py --distributed                          # 4096x32000, float32 and bfloat16
    python bench/run.py --distributed --cases 512x4000-float32 --reps 3 --no-memory

Reported per contender: the median over repetitions of the slowest rank's time (every
repetition starts at a barrier; contenders interleaved, in rotation); the peak extra memory of one
forward+backward per process (RSS high-water mark growth, in a fresh group of processes per
contender, the largest over the ranks); and the bytes each rank hands to collectives per row,
counted, not derived: every c10d / functional-collective op the step dispatches (forward and
backward) is intercepted and the size of the tensor this rank contributes is added up. The wire
column is what a ring algorithm then sends per rank: (P - 1) x that for an all_gather,
2 (P - 1) / P x that for an all_reduce.
"""

import argparse
import datetime
import gc
import json
import os
import shlex
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import _measure
import fusedloss as fl

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ["4096x32000-float32", "4096x32000-bfloat16"]
CONTENDERS = ["fusedloss", "torch loss_parallel", "gather + F.cross_entropy"]
TIMED = ("per repetition and contender, on every rank after a barrier: loss = f(local logits, "
         "target); torch.autograd.grad(loss, local logits); the slowest rank's time")


def parse_case(name):
    shape, dtype = name.rsplit("-", 1)
    n, v = (int(s) for s in shape.split("x"))
    return n, v, getattr(torch, dtype)


def class_slice(classes, world_size, rank):
    base, extra = divmod(classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def make_inputs(case, rank, world_size):
    """This rank's slice of the (N, V) logits (a leaf requiring grad; drawn per rank, never the
    whole matrix) and the global target, the same on every rank."""
    n, v, dtype = parse_case(case)
    start, stop = class_slice(v, world_size, rank)
    local = (torch.randn(n, stop - start, generator=torch.Generator().manual_seed(1 + rank)) * 2
             ).to(dtype).requires_grad_()
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < 0.05] = -100  # a few ignored positions
    return local, target


# --- the contenders --------------------------------------------------------------------------

class _GatherClasses(torch.autograd.Function):
    """The full logits from every rank's (equal-width) class slice; the backward keeps this
    rank's slice of the gradient (every rank computes the same loss from the same logits)."""

    @staticmethod
    def forward(ctx, local, group):
        p, r = dist.get_world_size(group), dist.get_rank(group)
        n, width = local.shape
        parts = torch.empty(p * n, width, dtype=local.dtype)
        dist.all_gather_into_tensor(parts, local.contiguous(), group=group)
        ctx.rank, ctx.width = r, width
        return parts.view(p, n, width).permute(1, 0, 2).reshape(n, p * width)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(1, ctx.rank * ctx.width, ctx.width), None


def loss_fn(name, group, mesh):
    if name == "fusedloss":
        return lambda x, t: fl.cross_entropy(x, t, process_group=group)
    if name == "torch loss_parallel":
        from torch.distributed.tensor import DTensor, Replicate, Shard

        def torch_loss_parallel(x, t):  # called inside loss_parallel() (Runner.step)
            return F.cross_entropy(DTensor.from_local(x, mesh, [Shard(1)], run_check=False),
                                   DTensor.from_local(t, mesh, [Replicate()], run_check=False))
        return torch_loss_parallel
    if name == "gather + F.cross_entropy":
        return lambda x, t: F.cross_entropy(_GatherClasses.apply(x, group), t)
    raise ValueError(f"unknown contender {name!r}")


class Runner:
    def __init__(self, name, inputs, group, mesh):
        self.name, self.inputs = name, inputs
        self.fn = loss_fn(name, group, mesh)

    def prepare(self):
        pass

    def step(self):
        x, t = self.inputs
        if self.name == "torch loss_parallel":  # its backward must run inside the context too
            from torch.distributed.tensor.parallel import loss_parallel

            with loss_parallel():
                loss = self.fn(x, t)  # a DTensor: so must its incoming gradient be
                return torch.autograd.grad(loss, x, torch.ones_like(loss))[0]
        return torch.autograd.grad(self.fn(x, t), x)[0]


# --- counting what goes over the wire --------------------------------------------------------

# for each collective op: the argument holding what this rank contributes
_SENT_ARGUMENT = {
    "c10d.allgather_": 1, "c10d._allgather_base_": 1, "c10d.allgather_into_tensor_coalesced_": 1,
    "c10d.allreduce_": 0, "c10d.allreduce_coalesced_": 0, "c10d.broadcast_": 0,
    "c10d.reduce_scatter_": 1, "c10d._reduce_scatter_base_": 1, "c10d.alltoall_base_": 1,
    "_c10d_functional.all_reduce": 0, "_c10d_functional.all_gather_into_tensor": 0,
    "_c10d_functional.reduce_scatter_tensor": 0, "_c10d_functional.broadcast": 0,
    "_c10d_functional.all_to_all_single": 0, "_c10d_functional.all_reduce_coalesced": 0,
    "_c10d_functional.all_gather_into_tensor_coalesced": 0,
}


class CollectiveBytes(TorchDispatchMode):
    """Every collective dispatched inside the context: [(op, bytes this rank contributes)].
    A DTensor op is let through first (NotImplemented), so that its collectives, issued while
    DTensor runs it, reach this mode on plain tensors (as in PyTorch's CommDebugMode)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented
        name = f"{func.namespace}.{func._opname}"
        if name in _SENT_ARGUMENT:
            sent = args[_SENT_ARGUMENT[name]]
            tensors = sent if isinstance(sent, (list, tuple)) else [sent]
            self.calls.append((name, sum(t.numel() * t.element_size() for t in tensors)))
        return func(*args, **(kwargs or {}))


def wire_bytes(calls, world_size):
    """Bytes each rank sends on a ring: all_gather (P-1) x contribution, all_reduce
    2 (P-1)/P x contribution."""
    total = 0.0
    for name, b in calls:
        factor = (world_size - 1) if "gather" in name else 2 * (world_size - 1) / world_size
        total += factor * b
    return total


# --- the worker processes --------------------------------------------------------------------

def _init(rank, world_size, port, threads):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False,
                          timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=600))
    from torch.distributed.device_mesh import init_device_mesh

    return dist.group.WORLD, init_device_mesh("cpu", (world_size,))


def _timing_worker(rank, world_size, port, threads, cases, names, reps, warmup, results):
    group, mesh = _init(rank, world_size, port, threads)
    out = {}
    for case in cases:
        inputs = make_inputs(case, rank, world_size)
        runners, failed, grad_diff = {}, {}, {}
        reference = None  # the gather baseline's gradient, run first when it is a contender
        for name in sorted(names, key=lambda n: n != "gather + F.cross_entropy"):
            try:
                run = Runner(name, inputs, group, mesh)
                grad = run.step()  # the first call: also the gradient check
            except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
                first = (str(e).strip().splitlines() or [""])[0][:200]
                failed[name] = f"failed on its first call: {type(e).__name__}: {first}"
                if rank == 0:
                    print(f"  {case} {name}: {failed[name]}", file=sys.stderr, flush=True)
                continue
            runners[name] = run
            if name == "gather + F.cross_entropy":
                reference = grad
            grad_diff[name] = (None if reference is None
                               else float((grad.double() - reference.double()).abs().max()))
            del grad
        runners = {n: runners[n] for n in names if n in runners}  # the order asked for
        # every rank must agree on who runs, or the collectives would pair up wrongly
        ok = torch.tensor([n in runners for n in names], dtype=torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        for n, keep in zip(names, ok.tolist()):
            if not keep and n in runners:
                failed[n] = "failed on another rank"
                del runners[n]
        counted = {}
        for name, run in runners.items():
            with CollectiveBytes() as mode:
                run.step()
            counted[name] = mode.calls

        def timer(step):
            dist.barrier()
            return _measure.cpu_timer(step)

        times = _measure.interleaved(runners, reps, warmup, timer) if runners else {}
        out[case] = {"times_ms": times, "failed": failed, "collectives": counted,
                     "grad_max_abs_diff": {n: grad_diff[n] for n in runners}}
        del runners, inputs, reference
        gc.collect()
    results.put((rank, out))
    dist.destroy_process_group()


def _memory_worker(rank, world_size, port, threads, case, name, results):
    """One contender's peak extra memory in a fresh process: a warm-up step, then the RSS
    high-water mark's growth over one measured step."""
    group, mesh = _init(rank, world_size, port, threads)
    run = Runner(name, make_inputs(case, rank, world_size), group, mesh)
    try:
        results.put((rank, _measure.probe_memory(run, torch.device("cpu"))))
    except Exception as e:  # noqa: BLE001
        results.put((rank, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}))
    dist.destroy_process_group()


def _spawn(world_size, target, args, timeout):
    """Runs target(rank, world_size, port, *args, results) on world_size fresh processes;
    returns {rank: what it put}. A process that has not answered by `timeout` is killed."""
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False)
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world_size, store.port, *args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    answers = {}
    deadline = time.monotonic() + timeout
    try:
        while len(answers) < world_size and time.monotonic() < deadline:
            try:
                rank, value = results.get(timeout=5)
                answers[rank] = value
            except Exception:  # noqa: BLE001 - queue.Empty: check the processes are alive
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return answers


# --- the report ------------------------------------------------------------------------------

def summarize(case, world_size, per_rank, memory):
    n, v, dtype = parse_case(case)
    ranks = sorted(per_rank)
    first = per_rank[ranks[0]][case]
    rows = {}
    for name in first["times_ms"]:
        # each repetition: the slowest rank (the step ends for everyone when it ends there)
        slowest = [max(per_rank[r][case]["times_ms"][name][i] for r in ranks)
                   for i in range(len(first["times_ms"][name]))]
        calls = first["collectives"][name]
        payload = sum(b for _, b in calls)
        ops = {}
        for op, _ in calls:
            ops[op] = ops.get(op, 0) + 1
        rows[name] = {"median_ms": statistics.median(slowest), "min_ms": min(slowest),
                      "times_ms": [round(t, 3) for t in slowest],
                      "collectives": ops, "sent_bytes_per_row": payload / n,
                      "wire_bytes_per_row": wire_bytes(calls, world_size) / n,
                      "grad_max_abs_diff_vs_gather": first["grad_max_abs_diff"][name]}
        mem = memory.get(name, {})
        if mem and all("extra_bytes" in m for m in mem.values()):
            rows[name]["peak_extra_bytes"] = max(m["extra_bytes"] for m in mem.values())
        elif mem:
            rows[name]["memory_error"] = next(m.get("error") for m in mem.values()
                                              if "error" in m)
    base = rows.get("fusedloss")
    for r in rows.values():
        if base:
            r["time_vs_fusedloss"] = r["median_ms"] / base["median_ms"]
    return {"name": case, "rows": n, "classes": v, "dtype": str(dtype).split(".")[-1],
            "world_size": world_size, "logits_bytes_per_rank": n * (v // world_size)
            * torch.empty((), dtype=dtype).element_size(), "results": rows,
            "failed": first["failed"]}


def markdown(report):
    lines = [f"Vocab-parallel cross-entropy, {report['meta']['world_size']} gloo processes "
             f"({report['meta']['threads']} thread(s) each), {report['meta']['date']}; "
             f"`{report['meta']['command']}`", "",
             "| case | contender | fwd+bwd ms (slowest rank) | vs fusedloss | peak extra MiB "
             "per process | collectives per step | bytes sent per row per rank | "
             "ring wire bytes per row per rank |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for c in report["cases"]:
        for name, r in c["results"].items():
            mem = r.get("peak_extra_bytes")
            ops = ", ".join(f"{k} x{v}" for k, v in r["collectives"].items()) or "none"
            lines.append(f"| {c['name']} | {name} | {r['median_ms']:.1f} | "
                         f"{r.get('time_vs_fusedloss', float('nan')):.2f}x | "
                         f"{'—' if mem is None else f'{mem / 2**20:.0f}'} | {ops} | "
                         f"{r['sent_bytes_per_row']:.0f} | {r['wire_bytes_per_row']:.0f} |")
        for name, why in c["failed"].items():
            lines.append(f"| {c['name']} | {name} | {why} | | | | | |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated NxV-dtype")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads per process (default: the "
                   "machine's cores divided among the processes, at least 1)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--out", default=os.path.join(HERE, "results", "local"))
    p.add_argument("--tag", default="distributed-cpu")
    args = p.parse_args(argv)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.world_size)
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cases = args.cases.split(",")
    names = [n.strip() for n in args.contenders.split(",")]
    for name in names:
        if name not in CONTENDERS:
            raise SystemExit(f"--contenders: unknown {name!r}; choose from {CONTENDERS}")
    meta = _measure.machine_info(torch.device("cpu"))
    meta.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command=shlex.join(["python", "bench/run.py", "--distributed", *(argv or [])]),
                timed=TIMED, reps=args.reps, warmup=args.warmup, world_size=args.world_size,
                threads=args.threads, load_before=_measure.load_average())
    print(f"timing {', '.join(names)} on {', '.join(cases)} ({args.world_size} processes, "
          f"{args.warmup}+{args.reps} reps)", file=sys.stderr, flush=True)
    per_rank = _spawn(args.world_size, _timing_worker,
                      (args.threads, cases, names, args.reps, args.warmup), timeout=3600)
    if len(per_rank) < args.world_size:
        raise SystemExit(f"the timing processes did not all finish: {sorted(per_rank)}")
    report = {"meta": meta, "cases": []}
    # fresh processes measure each contender's memory: the RSS high-water mark keeps every
    # earlier allocation; malloc returns large buffers to the OS so that RSS follows them
    os.environ.update(_measure.PROBE_ENV)
    for case in cases:
        memory = {}
        for name in ([] if args.no_memory else per_rank[0][case]["times_ms"]):
            print(f"peak memory: {case} {name}", file=sys.stderr, flush=True)
            memory[name] = _spawn(args.world_size, _memory_worker,
                                  (args.threads, case, name), timeout=1800)
        report["cases"].append(summarize(case, args.world_size, per_rank, memory))
    meta["load_after"] = _measure.load_average()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.tag + ".json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(os.path.join(args.out, args.tag + ".md"), "w") as f:
        f.write(table)
    print(table, end="")
    return report


if __name__ == "__main__":
    main()
