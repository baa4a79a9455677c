"""Where a training step's time goes: the fusedloss ops, inductor's generated kernels, matrix
products, other ATen ops, and the rest (Python: dynamo's guards, AOTAutograd's runtime
wrappers, the autograd engine, inductor's wrapper code, the optimizer's Python).

Reads torch.profiler's self CPU time of every event over a few steps, with inductor's C++
kernels profiled one by one (torch._inductor.config.cpp.enable_kernel_profile, set before the
step is compiled). One thread: the self times then add up to the step's CPU time.
"""

import torch

CATEGORIES = ("fusedloss ops", "inductor kernels", "matmul", "other aten ops", "python and rest")
_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
           "aten::linear", "aten::_scaled_dot_product")


def enable_kernel_profile():
    """Call before the first (compiling) step."""
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True


def category(name):
    if name.startswith("fusedloss::") or "_fusedloss_" in name:
        return "fusedloss ops"
    if name.startswith("graph_") and "cpp_" in name:
        return "inductor kernels"
    if name.startswith(_MATMUL):
        return "matmul"
    if name.startswith("aten::"):
        return "other aten ops"
    return "python and rest"


def breakdown(step, steps=3):
    """{category: ms per step, ..., "total": ms per step, "top": [(ms, count, name)]} of
    `steps` calls of step(), already warmed up (compiled)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    out = dict.fromkeys(CATEGORIES, 0.0)
    top = []
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / steps
        out[category(event.key)] += ms
        top.append((ms, event.count // steps, event.key))
    out["total"] = sum(out[c] for c in CATEGORIES)
    out["top"] = sorted(top, reverse=True)[:12]
    return out


def format_breakdown(label, b):
    lines = [f"{label}: {b['total']:.2f} ms CPU per step (profiled)"]
    lines += [f"  {c:18s} {b[c]:9.2f} ms  {100 * b[c] / max(b['total'], 1e-9):5.1f}%"
              for c in CATEGORIES]
    lines.append("  largest events (self ms per step, calls per step):")
    lines += [f"    {ms:9.3f} ms {count:4d}x  {name[:70]}" for ms, count, name in b["top"]]
    return "\n".join(lines)
