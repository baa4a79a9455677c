"""A pool of torch.distributed worker processes that pytest drives, for the vocab-parallel tests.

Starting a process that imports torch and joins a process group costs seconds (tens of seconds
for four on a busy 2-core machine), so a test module starts one pool per backend and runs every
case on it: `pool.run(case, group_size=..., **kw)` sends the case (a module-level function,
pickled by name) to the ranks of a process group of that size, each calls `case(ctx, **kw)` and
sends back its return value or its traceback. The groups are made once, at start: the whole
world, and subgroups of given global ranks (e.g. ranks 1 and 3 of 4: a group whose ranks are
not the global ones, as a tensor-parallel group inside a larger job is).

No test can hang: each run has a deadline; a rank that has not answered by then (stuck in a
collective its peers never join, or dead) makes the run fail with what every rank said, and the
pool is torn down (its processes killed) so the next run starts a fresh one. Collectives also
carry a process-group timeout, so a stuck rank raises by itself rather than waiting forever.

The rendezvous is a TCPStore that this process serves on 127.0.0.1 on a port the OS picks (no
race for a "free" port); gloo is bound to the loopback interface.
"""

import dataclasses
import datetime
import os
import pickle
import queue
import time
import traceback

import torch
import torch.multiprocessing as mp

# a collective that waits longer than this raises in the worker (the run's own deadline, which
# kills the workers, is the hard bound)
COLLECTIVE_TIMEOUT_S = 60
STARTUP_TIMEOUT_S = 120


@dataclasses.dataclass
class RankContext:
    """What a case receives on each rank of the group it runs on."""
    rank: int  # in the group
    world_size: int  # the group's size
    backend: str
    device: torch.device
    group: object  # torch.distributed.ProcessGroup


def _worker(rank, world_size, backend, subgroups, store_port, tasks, results):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # 2 cores shared by up to 4 ranks: one thread each keeps them from oversubscribing
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        store = dist.TCPStore("127.0.0.1", store_port, world_size + 1, is_master=False,
                              timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        contexts = {world_size: RankContext(rank, world_size, backend, device, dist.group.WORLD)}
        for ranks in subgroups:  # new_group is collective: every rank makes every subgroup
            group = dist.new_group(list(ranks))
            if rank in ranks:
                contexts[len(ranks)] = RankContext(dist.get_group_rank(group, rank), len(ranks),
                                                   backend, device, group)
        results.put((rank, "ready", None))
    except BaseException:  # noqa: BLE001 - reported to pytest, which fails the test
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        run_id, group_size, case, kwargs = task
        try:
            value = case(contexts[group_size], **kwargs)
            # tensors pickle by value: nothing shared with a process that may be killed
            results.put((rank, "ok", (run_id, pickle.dumps(value))))
        except BaseException:  # noqa: BLE001
            results.put((rank, "error", (run_id, traceback.format_exc())))
    # Leave at once, once the answers are flushed: destroy_process_group() and the process
    # group's destructor at exit can wait for peers that were already told to stop.
    results.close()
    results.join_thread()
    os._exit(0)


class RankFailure(AssertionError):
    """A run in which a rank raised or did not answer; the message holds every rank's story."""


class CaseRaised(Exception):
    """What `run(..., expect_error=True)` returns per rank when the case raised."""

    def __init__(self, text):
        super().__init__(text)
        self.text = text


class WorkerPool:
    """world_size processes; subgroups: tuples of global ranks, one per other group size."""

    def __init__(self, world_size, backend="gloo", subgroups=()):
        self.world_size = world_size
        self.backend = backend
        self.subgroups = {len(r): tuple(r) for r in subgroups}
        self.groups = {world_size: tuple(range(world_size)), **self.subgroups}
        self._procs = None
        self._run_id = 0

    # --- lifetime --------------------------------------------------------------------------
    def _start(self):
        import torch.distributed as dist

        ctx = mp.get_context("spawn")
        # port 0: the OS picks a free port; the store lives as long as this pool
        self._store = dist.TCPStore("127.0.0.1", 0, self.world_size + 1, is_master=True,
                                    wait_for_workers=False)
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, self.world_size, self.backend,
                                         tuple(self.subgroups.values()), self._store.port,
                                         self._tasks[r], self._results))
                       for r in range(self.world_size)]
        for p in self._procs:
            p.start()
        ready, errors = set(), {}
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while len(ready) + len(errors) < self.world_size:
            item = self._next_result(deadline)
            if item is None:
                break
            rank, status, payload = item
            (ready.add(rank) if status == "ready" else errors.__setitem__(rank, payload))
        if len(ready) < self.world_size:
            self.close()
            lines = [f"rank {r}: {errors.get(r, 'did not start in time')}"
                     for r in range(self.world_size) if r not in ready]
            raise RankFailure(f"{self.backend} process group of {self.world_size} did not "
                              f"start:\n" + "\n".join(lines))

    def close(self):
        if self._procs is None:
            return
        for q in self._tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()  # our own child, by its handle
                p.join(timeout=5)
        for q in self._tasks + [self._results]:
            q.cancel_join_thread()
            q.close()
        self._procs = None
        self._store = None

    def _next_result(self, deadline):
        """The next (rank, status, payload), or None at the deadline or when a worker died."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                return self._results.get(timeout=min(left, 1.0))
            except queue.Empty:
                if any(not p.is_alive() for p in self._procs):
                    # a dead worker answers nothing; drain what the others already said
                    try:
                        return self._results.get(timeout=0.5)
                    except queue.Empty:
                        return None

    # --- running a case --------------------------------------------------------------------
    def run(self, case, group_size=None, timeout=60, expect_error=False, **kwargs):
        """case(ctx, **kwargs) on every rank of the group of group_size ranks (default: all);
        returns the list of their return values, in group rank order.

        If any rank raises, or one has not answered within `timeout` seconds, RankFailure is
        raised with every rank's traceback or "no answer"; with expect_error=True a raise on
        every rank is the expected outcome and the list of CaseRaised is returned instead (a
        rank that returned normally, or did not answer, still fails the run)."""
        __tracebackhide__ = True  # pytest shows the ranks' tracebacks, not this function
        group_size = group_size or self.world_size
        ranks = self.groups[group_size]
        if self._procs is None:
            self._start()
        self._run_id += 1
        run_id = self._run_id
        for r in ranks:
            self._tasks[r].put((run_id, group_size, case, kwargs))
        answers = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(ranks):
            item = self._next_result(deadline)
            if item is None:
                break
            rank, status, payload = item
            if status not in ("ok", "error") or payload[0] != run_id:
                continue  # a late answer from an earlier, failed run
            answers[rank] = (status, payload[1])
        complete = len(answers) == len(ranks)
        if not complete:
            self.close()  # a rank is stuck or dead: the next run starts a fresh pool
        ok = complete and all(s == ("error" if expect_error else "ok") for s, _ in answers.values())
        if not ok:
            lines = []
            for i, r in enumerate(ranks):
                name = f"rank {i} (global {r})"
                if r not in answers:
                    lines.append(f"--- {name}: no answer within {timeout} s (workers killed)")
                else:
                    status, payload = answers[r]
                    text = payload if status == "error" else f"returned {pickle.loads(payload)!r}"
                    lines.append(f"--- {name}: {text}")
            what = "did not raise on every rank" if expect_error else "failed"
            raise RankFailure(f"{case.__name__}({kwargs}) {what} ({self.backend}, group of "
                              f"global ranks {ranks}):\n" + "\n".join(lines))
        if expect_error:
            return [CaseRaised(answers[r][1]) for r in ranks]
        return [pickle.loads(answers[r][1]) for r in ranks]


# --- helpers for the cases (they run inside the workers) ------------------------------------

def class_slices(classes, world_size, uneven):
    """Contiguous [start, stop) class ranges, one per rank: equal-ish, or deliberately uneven
    (rank r gets a share growing with r, every rank at least one class)."""
    if uneven:
        shares = [r + 1 for r in range(world_size)]
        sizes = [max(1, classes * s // sum(shares)) for s in shares]
        sizes[-1] = classes - sum(sizes[:-1])
    else:
        base, extra = divmod(classes, world_size)
        sizes = [base + (r < extra) for r in range(world_size)]
    assert min(sizes) >= 1 and sum(sizes) == classes, sizes
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return [(bounds[r], bounds[r + 1]) for r in range(world_size)]


def gather_classes(local, group, classes_dim, slices):
    """The full tensor from each rank's class slice (uneven slices: padded to the widest, then
    cut), for checking a gradient or building a reference."""
    import torch.distributed as dist

    widest = max(stop - start for start, stop in slices)
    pad = list(local.shape)
    pad[classes_dim] = widest - local.shape[classes_dim]
    padded = torch.cat([local, local.new_zeros(pad)], classes_dim).contiguous()
    parts = [torch.empty_like(padded) for _ in slices]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(classes_dim, 0, stop - start)
                      for p, (start, stop) in zip(parts, slices)], classes_dim)


class SliceOfReplicated(torch.autograd.Function):
    """x (the same full tensor on every rank) -> this rank's class slice. Its backward gathers
    every rank's slice gradient into the full gradient, so that a function of the slice, taken
    as a function of the full x, has the full Jacobian on every rank: what gradcheck needs to
    check the distributed loss (whose own backward is local) against finite differences of the
    global function."""

    @staticmethod
    def forward(ctx, x, group, classes_dim, slices, rank):
        ctx.group, ctx.classes_dim, ctx.slices = group, classes_dim, slices
        start, stop = slices[rank]
        return x.narrow(classes_dim, start, stop - start).clone()

    @staticmethod
    def backward(ctx, grad):
        return (gather_classes(grad.contiguous(), ctx.group, ctx.classes_dim, ctx.slices),
                None, None, None, None)


class CopyToParallelRegion(torch.autograd.Function):
    """Identity forward, all-reduce (sum) backward: the input of a layer split over the ranks
    by output features gets, from each rank, the part of its gradient that flows through that
    rank's features (Megatron's copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
