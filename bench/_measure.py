"""Timing (interleaved, median of reps), peak-memory probes, and what machine this ran on."""

import gc
import os
import platform
import statistics
import subprocess
import time

import torch

import fusedloss


def cpu_timer(step):
    t0 = time.perf_counter()
    out = step()
    t1 = time.perf_counter()
    del out  # freed after the clock stopped
    return (t1 - t0) * 1e3


def cuda_timer():
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timer(step):
        start.record()
        out = step()
        end.record()
        end.synchronize()
        del out
        return start.elapsed_time(end)

    return timer


def interleaved(runners, reps, warmup, timer, progress=None):
    """Times every runner once per repetition, in rotation (repetition r starts with runner
    r mod n, so none is always first or always after the same neighbour). Returns
    {name: [ms per timed repetition]}; the first `warmup` repetitions are not kept.
    `progress`: a label for a progress bar over the repetitions (on stderr), or None."""
    names = list(runners)
    times = {n: [] for n in names}
    rounds = range(warmup + reps)
    if progress:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc=progress, unit="rep", leave=False, dynamic_ncols=True)
    for r in rounds:
        k = r % len(names)
        for name in names[k:] + names[:k]:
            run = runners[name]
            run.prepare()
            ms = timer(run.step)
            if r >= warmup:
                times[name].append(ms)
    return times


def summarize(ms):
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "p25_ms": q[0],
            "p75_ms": q[2], "reps": len(ms), "times_ms": [round(v, 4) for v in ms]}


# --- peak memory -------------------------------------------------------------------------

def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm():
    """Resets VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe_memory(run, device):
    """Peak extra memory of one forward+backward, in this (fresh) process.

    One warm-up step first (torch.compile compiles here), then the peak is reset, so the
    baseline is: inputs allocated, warm-up's outputs freed. CPU: VmHWM from /proc/self/status
    (what the process really touched); CUDA: torch.cuda.max_memory_allocated."""
    run.prepare()
    out = run.step()
    del out
    run.prepare()
    gc.collect()
    # fusedloss keeps a freed CPU gradient buffer for the next call; without this the
    # measured step would reuse the warm-up's buffer, already counted in the baseline.
    fusedloss.empty_cache()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, reset = torch.cuda.memory_allocated(), True
        out = run.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        reset = _reset_hwm()
        base = _status_kib("VmHWM") if reset else _status_kib("VmRSS")
        out = run.step()
        peak = _status_kib("VmHWM")
    del out
    return {"extra_bytes": peak - base, "baseline_bytes": base, "peak_bytes": peak,
            "peak_was_reset": reset}


# Every allocation of 64 KiB or more is its own mmap, returned to the OS when freed, so RSS
# follows the live buffers (glibc otherwise raises this threshold after the first large free
# and keeps later buffers of up to 32 MiB in its heap).
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


# --- machine -----------------------------------------------------------------------------

def cache_bytes(device):
    """Last-level cache size: the GPU's L2, or the CPU's L3 (L2 when there is none)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    for idx in (os.listdir(base) if os.path.isdir(base) else []):
        try:
            with open(os.path.join(base, idx, "size")) as f:
                size = f.read().strip()
        except OSError:
            continue
        mult = {"K": 1024, "M": 1024 ** 2}.get(size[-1:], 1)
        best = max(best, int(size.rstrip("KM")) * mult)
    return best or 32 * 1024 ** 2


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _git(*args):
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(device):
    import fusedloss as fl

    info = {
        "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else _cpu_model()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fusedloss": fl.__version__,
        "fusedloss_build": fl.build_info(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "last_level_cache_bytes": cache_bytes(device),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
