"""Ratios, targets (PASS/FAIL), and the outputs: JSON, a markdown table, a PNG plot."""

import json
import os

from _contenders import FLOORS, INPLACE, TARGET_CASES

# (metric, comparison, threshold) per (device, loss); the in-place row's memory target
# replaces the plain one. Speed ratios are only judged for the fusedloss rows. vs_copy and
# copy_fraction are against the case's floor (copy_, or add for distillation).
DISTILL_CPU = [("vs_eager", ">=", 8.0), ("vs_compile", ">=", 3.0), ("vs_copy", "<=", 1.6),
               ("mem_grad_bufs", "<=", 1.25)]
TARGETS = {
    ("cpu", "distill_fkl"): DISTILL_CPU,
    ("cpu", "distill_jsd"): DISTILL_CPU,
    ("cuda", "distill_fkl"): [("copy_fraction", ">=", 0.9), ("mem_grad_bufs", "<=", 1.25)],
    ("cuda", "distill_jsd"): [("copy_fraction", ">=", 0.9), ("mem_grad_bufs", "<=", 1.25)],
    ("cpu", "ce"): [("vs_eager", ">=", 8.0), ("vs_compile", ">=", 4.0), ("vs_copy", "<=", 1.5),
                    ("mem_grad_bufs", "<=", 1.25)],
    ("cpu", "bce"): [("vs_eager", ">=", 10.0), ("vs_compile", ">=", 5.0),
                     ("mem_grad_bufs", "<=", 1.25)],
    ("cuda", "ce"): [("copy_fraction", ">=", 0.9), ("mem_grad_bufs", "<=", 1.25)],
    ("cuda", "bce"): [("copy_fraction", ">=", 0.9), ("mem_grad_bufs", "<=", 1.25)],
}
INPLACE_MEM_TARGET = 0.1
# A run is flagged NOISY when the copy floor's repetitions spread (interquartile range) by more
# than this percentage of their median.
NOISY_IQR_PCT = 10.0
LABELS = {"vs_eager": "x eager", "vs_compile": "x compile", "vs_copy": "/floor",
          "copy_fraction": "of floor BW", "mem_grad_bufs": "mem", "grad_error": "grad err"}


def _targets_for(device, loss, name):
    targets = TARGETS[(device, loss)]
    if name in INPLACE:
        targets = [t if t[0] != "mem_grad_bufs" else (t[0], "<=", INPLACE_MEM_TARGET)
                   for t in targets]
    return targets


def analyze(case, res, device):
    """Adds the derived columns and the PASS/FAIL verdict to each contender's result."""
    rows = res["results"]

    def ms(name):
        return rows[name]["median_ms"] if name in rows else None

    copy_ms = ms(case.floor)
    copy_gbps = case.copy_bytes / (copy_ms * 1e-3) / 1e9 if copy_ms else None
    for name, r in rows.items():
        t = r["median_ms"]
        nbytes = case.copy_bytes if name in FLOORS else case.model_bytes
        r["bytes"] = nbytes
        r["gbps"] = nbytes / (t * 1e-3) / 1e9
        r["iqr_pct"] = 100.0 * (r["p75_ms"] - r["p25_ms"]) / t
        r["vs_eager"] = ms("eager") / t if ms("eager") else None
        r["vs_compile"] = ms("torch.compile") / t if ms("torch.compile") else None
        r["vs_copy"] = t / copy_ms if copy_ms else None
        r["copy_fraction"] = r["gbps"] / copy_gbps if copy_ms else None
        mem = res["memory"].get(name)
        r["mem_grad_bufs"] = mem["extra_bytes"] / case.grad_bytes if mem else None
        if name.startswith("fusedloss"):
            _judge(r, _targets_for(device, case.loss, name), judged=case in TARGET_CASES)


def _judge(r, targets, judged=True):
    """PASS/FAIL against the targets. For shapes the targets were not set for (small ones,
    whose fixed costs dominate) the values are still compared in `checks`, but only a wrong
    result fails the row."""
    checks, misses, missing, wrong = [], [], [], []
    for metric, op, limit in targets:
        value = r.get(metric)
        ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
        checks.append({"metric": metric, "op": op, "target": limit, "value": value, "ok": ok})
        if ok is None:
            missing.append(LABELS[metric])
        elif not ok:
            misses.append(f"{LABELS[metric]} {value:.2f} {'<' if op == '>=' else '>'} {limit:g}")
    if not r.get("grad_ok", True):
        wrong.append(f"wrong gradient (err {r['grad_error']:.1e})")
    if r.get("inplace_taken") is False:
        wrong.append("in-place path not taken")
    r["checks"] = checks
    fails = (misses if judged else []) + wrong
    if fails:
        r["status"] = "FAIL: " + "; ".join(fails)
    elif not judged:
        r["status"] = "no target (targets are set for the full-size cases)"
    else:
        r["status"] = "PASS" + (f" (not measured: {', '.join(missing)})" if missing else "")


def _fmt(v, spec, none="—"):
    return none if v is None else format(v, spec)


def markdown(report):
    m = report["meta"]
    lines = [
        f"fusedloss benchmark, {m['device']} ({m['device_name']}, {m['torch_threads']} threads), "
        f"torch {m['torch']}, commit {m['commit']}{' (dirty)' if m['dirty'] else ''}, "
        f"{m['date']}",
        "",
        f"`{m['command']}`: median of {m['reps']} interleaved repetitions after {m['warmup']} "
        f"warm-up; load average {_fmt(m['load_before'], '.2f')} before, "
        f"{_fmt(m['load_after'], '.2f')} after; copy floor spread (IQR) up to "
        f"{_fmt(m.get('floor_iqr_pct'), '.0f')}%"
        + (f" — **NOISY: the repetitions spread by more than {NOISY_IQR_PCT:g}%, do not quote "
           "these numbers**" if m["noisy"] else "") + ".",
        "",
        "| case | contender | ms | IQR | GB/s | of floor BW | x eager | x compile | / floor "
        "| mem (grad bufs) | targets |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    notes = []
    for c in report["cases"]:
        for name, r in c["results"].items():
            lines.append(
                f"| {c['name']} | {name} | {r['median_ms']:.2f} | {r['iqr_pct']:.0f}% "
                f"| {r['gbps']:.1f} | {_fmt(r['copy_fraction'], '.0%')} "
                f"| {_fmt(r['vs_eager'], '.2f')} | {_fmt(r['vs_compile'], '.2f')} "
                f"| {_fmt(r['vs_copy'], '.2f')} | {_fmt(r['mem_grad_bufs'], '.2f')} "
                f"| {r.get('status', '')} |")
        notes += [f"- {c['name']}: {name} skipped, {why}" for name, why in c["skipped"].items()]
    lines += ["", "Targets (fusedloss rows): " + "; ".join(
        f"{dev} {loss}: " + ", ".join(f"{LABELS[k]} {op} {v:g}" for k, op, v in ts)
        for (dev, loss), ts in TARGETS.items() if dev == m["device"])
        + f"; in-place mem <= {INPLACE_MEM_TARGET:g}."]
    lines += ["", "Floor: copy_ (read the logits, write a buffer of their size) for ce and bce; "
              "add (`torch.add(student, teacher, out=g)`: read both logits, write one buffer) "
              "for distillation."]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = report["cases"]
    names = []
    for c in cases:
        names += [n for n in c["results"] if n not in names]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.8 * len(cases)), 8))
    width = 0.8 / max(1, len(names))
    for ax, key, title in ((axes[0], "vs_copy", "forward+backward time / floor time (log)"),
                           (axes[1], "gbps", "effective GB/s (byte model)")):
        for i, name in enumerate(names):
            xs = [j + i * width for j, c in enumerate(cases) if name in c["results"]]
            ys = [c["results"][name][key] or 0 for c in cases if name in c["results"]]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([c["name"] for c in cases], rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].set_yscale("log")
    axes[0].axhline(1.5, color="k", ls="--", lw=0.8, label="1.5x floor (CPU target)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    m = report["meta"]
    fig.suptitle(f"fusedloss vs eager / torch.compile, {m['device']} ({m['device_name']})"
                 + (" — NOISY" if m["noisy"] else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report, out_dir, tag, json_only=False):
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{tag}.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"] + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(paths["json"] + ".tmp", paths["json"])  # never a half-written file
    if json_only:
        return {"json": paths["json"]}
    with open(paths["md"], "w") as f:
        f.write(markdown(report))
    plot(report, paths["png"])
    return paths

