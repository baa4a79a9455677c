"""The one-page summary of a bench/gpu_check.sh run: each stage's result and time, one line per
question the GPU paths raise (no host sync, the float16 autocast table, bit-for-bit runs, the
addmm dtype check, NaN padding, each kernel's bandwidth, the rows kernels' registers and
occupancy) with the tables behind them, the test counts (JUnit XML), the sanitizer verdicts,
and every benchmark time beside the time the byte model of bench/ROOFLINE.md predicts for it.
Also merges the per-case benchmark outputs into bench.json and bench.md beside the summary.

    python bench/gpu_summary.py build/gpu_check --out build/gpu_check/summary.md
"""

import argparse
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

DATASHEET_TBPS = 4.8  # H200 HBM3e, vendor's figure; the measured copy_ bandwidth is the other


def passes_per_element(loss, contender, cols):
    """HBM traffic of one forward+backward in units of the element size, per bench/ROOFLINE.md
    (mean reduction, grad_output 1): (low, high), or None where the page does not count it."""
    if loss == "bce":
        return {"fusedloss": (3, 3), "eager": (20, 20)}.get(contender)
    if contender in ("fusedloss", "fusedloss inplace"):
        # rows path: 2 (row held in registers). split path: 2 when stage 2 re-reads its chunk
        # from L2, 3 when it misses; the benchmark's rows longer than 32768 take the split path
        return (2, 3) if cols > 32768 else (2, 2)
    if contender == "liger":
        return (3, 3)
    if contender == "eager":
        return (9, 9) if cols > 32768 else (6, 6)
    return None


def read_stages(work):
    path = os.path.join(work, "stages.tsv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [r + [""] * (5 - len(r)) for r in rows]


def junit(path):
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                               "skipped")}
    tot["time"] = sum(float(s.get("time", 0)) for s in suites)
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return tot, failed


def sanitizer_verdict(path):
    if not os.path.exists(path):
        return "not run"
    with open(path, errors="replace") as f:
        text = f.read()
    summary = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: .*", text)
    cases = re.findall(r"\d+/\d+ kernel-path cases ok.*", text)
    return "; ".join(summary[-1:] + cases[-1:]) or (text.strip().splitlines() or ["empty log"])[-1]


def merge_bench(work):
    """All per-case reports under work/bench into one report (the first one's meta)."""
    reports = []
    for path in sorted(glob.glob(os.path.join(work, "bench", "*.json"))):
        with open(path) as f:
            reports.append(json.load(f))
    if not reports:
        return None
    merged = {"meta": reports[0]["meta"], "cases": [c for r in reports for c in r["cases"]]}
    merged["meta"]["noisy"] = any(r["meta"].get("noisy") for r in reports)
    merged["meta"]["floor_iqr_pct"] = max(r["meta"].get("floor_iqr_pct") or 0 for r in reports)
    return merged


def bench_table(report):
    lines = ["| case | contender | measured ms | GB/s | of copy BW | predicted ms (copy_ BW) "
             f"| predicted ms ({DATASHEET_TBPS:g} TB/s) | measured / predicted | targets |",
             "|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for c in report["cases"]:
        res = c["results"]
        copy = res.get("copy_")
        copy_bps = copy["bytes"] / (copy["median_ms"] * 1e-3) if copy else None  # bytes/s
        elem = c["grad_bytes"] / (c["rows"] * c["cols"])
        for name, r in res.items():
            passes = passes_per_element(c["loss"], name, c["cols"])
            if passes and copy_bps:
                lo, hi = (p * c["rows"] * c["cols"] * elem for p in passes)
                pred = f"{lo / copy_bps * 1e3:.3f}" + (f"-{hi / copy_bps * 1e3:.3f}" if hi != lo
                                                       else "")
                sheet = f"{lo / (DATASHEET_TBPS * 1e12) * 1e3:.3f}"
                ratio = f"{r['median_ms'] / (lo / copy_bps * 1e3):.2f}"
            else:
                pred = sheet = ratio = "—"
            frac = r.get("copy_fraction")
            lines.append(f"| {c['name']} | {name} | {r['median_ms']:.3f} | {r['gbps']:.0f} | "
                         f"{'—' if frac is None else format(frac, '.0%')} | {pred} | {sheet} | "
                         f"{ratio} | {r.get('status', '')} |")
        for name, why in c.get("skipped", {}).items():
            lines.append(f"| {c['name']} | {name} | — | | | | | | skipped: {why} |")
    return lines


def load(work, *parts):
    path = os.path.join(work, *parts)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stage_status(work, name):
    for row in read_stages(work):
        if row[0] == name:
            return row[1]
    return "not run"


def answer_sync(work):
    path = os.path.join(work, "sync.xml")
    if not os.path.exists(path):
        return f"no result (stage {stage_status(work, 'sync')})"
    try:
        tot, failed = junit(path)
    except ET.ParseError as e:
        return f"unreadable JUnit XML: {e}"
    ran = tot["tests"] - tot["skipped"]
    if ran == 0:
        note = next((r[4] for r in read_stages(work) if r[0] == "sync"), "")
        if tot["tests"]:
            return f"{tot['tests']} tests, all skipped (no GPU)"
        return (f"collected only (dry run): {note}" if "collected" in note else
                "no test selected")
    bad = tot["failures"] + tot["errors"]
    verdict = ("no host synchronisation in any" if bad == 0 else
               f"{bad} synchronise or fail: " + ", ".join(f"`{n.split('::')[-1]}`"
                                                          for n in failed[:6]))
    return f"{ran} paths run under set_sync_debug_mode(\"error\"): {verdict}"


def answer_mixed(work):
    rep = load(work, "mixed", "mixed_precision.json")
    if not rep:
        return f"no result (stage {stage_status(work, 'mixed')})", []
    rows = rep["rows"]
    parts = []
    for r in rows:
        if "error" in r:
            parts.append(f"{r['case']} {r['tokens']}x{r['classes']}: error")
        else:
            parts.append(f"{r['case']} {r['tokens']}x{r['classes']}: PyTorch "
                         f"{r['pytorch_err']:.1e}, fusedloss {r['fusedloss_err']:.1e} "
                         f"({r['ratio']:.2f}x)")
    within = sum(bool(r.get("within_bar")) for r in rows)
    line = (f"{within}/{len(rows)} cases within {rep['meta']['bar']}x of PyTorch's error"
            + (" (--quick sizes)" if rep["meta"].get("quick") else "") + "; " + "; ".join(parts))
    md = os.path.join(work, "mixed", "mixed_precision.md")
    table = open(md).read().splitlines() if os.path.exists(md) else []
    return line, table


def answer_determinism(work):
    one, two = load(work, "determinism", "run1.json"), load(work, "determinism", "run2.json")
    if not one:
        return f"no result (stage {stage_status(work, 'determinism')})"
    cases = (two or one)["cases"]
    same = [c for c in cases if c.get("identical")]
    across = [c for c in cases if c.get("same_as_other_process")]
    errors = [f"{c['case']}: {c['error']}" for c in cases if "error" in c]
    det_raise = [c["case"] for c in cases if "deterministic_mode_error" in c]
    det_diff = [c["case"] for c in cases if c.get("deterministic_mode_same_bits") is False]
    diff = [c["case"] for c in cases if "digests" in c and not c.get("identical")]
    line = (f"{len(same)}/{len(cases)} cases identical run to run"
            + (f", {len(across)}/{len(cases)} across two processes" if two else "")
            + f" (backend {(two or one)['meta'].get('backend')})")
    if diff:
        line += "; DIFFER: " + ", ".join(diff)
    if errors:
        line += "; errors: " + "; ".join(errors)[:400]
    line += ("; under torch.use_deterministic_algorithms(True): "
             + ("every case runs" if not det_raise else "raises in " + ", ".join(det_raise))
             + ("" if not det_diff else "; other bits there in " + ", ".join(det_diff)))
    return line


def answer_probes(work):
    rep = load(work, "probes", "gpu_probes.json")
    if not rep:
        na = f"no result (stage {stage_status(work, 'probes')})"
        return na, na, []
    parts = []
    for r in rep["addmm"]:
        if "linear_ce.cpp" in r["form"] or r["form"] == "fl.linear_cross_entropy":
            what = "dtype_out" if "linear_ce.cpp" in r["form"] else "fl.linear_cross_entropy"
            if r["accepted"]:
                err = r.get("rel_error_vs_float64", r.get("weight_grad_rel_error_vs_float32"))
                parts.append(f"{what} {r['dtype']}: accepted (rel. error {err:.1e})")
            else:
                parts.append(f"{what} {r['dtype']}: REJECTED ({r['error'][:70]})")
    addmm = (f"on {rep['meta']['device']}, torch {rep['meta']['torch']}: " + "; ".join(parts))
    pads = rep["nan_padding"]
    ok = sum(r["ok"] for r in pads)
    torch_finite = sum(bool(r.get("pytorch", {}).get("weight_grad_finite",
                                                      r.get("pytorch", {}).get(
                                                          "input_grad_finite")))
                       for r in pads)
    bad = [f"{r['case']} {r['dtype']}: {json.dumps(r['fusedloss'])}" for r in pads if not r["ok"]]
    nan = (f"fusedloss finite, padding gradient 0 and the weight gradient of the rows without "
           f"padding in {ok}/{len(pads)} cases (PyTorch's own gradient finite in "
           f"{torch_finite}/{len(pads)})" + ("; FAILED: " + "; ".join(bad) if bad else ""))
    table = ["| probe | dtype | fusedloss | PyTorch |", "|---|---|---|---|"]
    for r in rep["addmm"]:
        table.append(f"| {r['form']} | {r['dtype']} | "
                     + ("accepted" if r["accepted"] else "rejected: " + r["error"][:100])
                     .replace("|", "/") + " | |")
    for r in pads:
        table.append(f"| {r['case']} | {r['dtype']} | {json.dumps(r['fusedloss'])} | "
                     f"{json.dumps(r.get('pytorch'))} |")
    return addmm, nan, table


def answer_bandwidth(work):
    rep = load(work, "bandwidth", "kernel_bandwidth.json")
    if not rep:
        return f"no result (stage {stage_status(work, 'bandwidth')})", []
    parts = []
    for c in rep["cases"]:
        ks = [k for k in c.get("kernels", []) if k.get("bytes_per_s")]
        if ks:
            main_k = max(ks, key=lambda k: k["us"])
            frac = main_k.get("of_peak", main_k.get("of_copy"))
            parts.append(f"{c['case']}: {main_k['bytes_per_s'] / 1e12:.2f} TB/s"
                         + (f" ({frac:.0%} of peak)" if frac is not None else ""))
        elif "error" in c:
            parts.append(f"{c['case']}: error")
    m = rep["meta"]
    if not parts:
        line = (f"no kernel timed on {m['device']} (whole steps only"
                + (", a dry run" if m.get("quick") else "") + ")")
    else:
        peak = m.get("peak_bytes_per_s")
        line = (f"peak {peak / 1e12:.2f} TB/s, " if peak else "") + (
            f"copy_ {m['copy_bytes_per_s'] / 1e12:.2f} TB/s; " if m.get("copy_bytes_per_s")
            else "") + "the main kernel of each case: " + "; ".join(parts)
    md = os.path.join(work, "bandwidth", "kernel_bandwidth.md")
    return line, open(md).read().splitlines() if os.path.exists(md) else []


def answer_resources(work):
    rep = load(work, "resources", "kernel_resources.json")
    if not rep:
        return f"no result (stage {stage_status(work, 'resources')})", []
    rows = [k for k in rep["kernels"] if (k.get("kind") or "").startswith("rows")]
    if not rows:
        return f"no CUDA kernels in the build ({os.path.basename(rep.get('so') or '?')})", []
    spills = [k for k in rep["kernels"] if k.get("local")]
    dev = rep["device"]["name"]
    short = {"__half": "float16", "__nv_bfloat16": "bfloat16", "float": "float32",
             "double": "float64"}
    parts = []
    for k in rows:
        if "from saved" in k["kind"] or "probability" in k["kind"]:
            continue
        dtype, packs = k["kind"][len("rows kernel, "):].split(", ")[:2]
        parts.append(f"{short.get(dtype, dtype)} x{packs.split()[0]}: {k['registers']} reg, "
                     f"{k['blocks_per_sm']} x {k['block']} threads ({k['occupancy']:.0%})")
    line = (f"{rep['arch']}, occupancy on {dev}, loss+gradient rows kernel by dtype and "
            "16-byte packs a thread (registers, blocks/SM x block, occupancy): "
            + "; ".join(parts)
            + f"; spills in {len(spills)} of {len(rep['kernels'])} kernels")
    table = ["| rows kernel | registers | shared B | spill B | block | blocks/SM | occupancy "
             "| limited by |", "|---|--:|--:|--:|--:|--:|--:|---|"]
    for k in rows:
        table.append(f"| {k['kind'][len('rows kernel, '):]} | {k['registers']} | {k['shared']} | "
                     f"{k['local']} | {k['block']} | {k['blocks_per_sm']} | "
                     f"{k['occupancy']:.0%} | {k['limited_by']} |")
    return line, table


def item8(work):
    """The GPU paths' questions: one line per question, then the tables behind the lines."""
    mixed, mixed_table = answer_mixed(work)
    addmm, nan, probe_table = answer_probes(work)
    bw, bw_table = answer_bandwidth(work)
    res, res_table = answer_resources(work)
    lines = ["## The GPU paths' questions, answered", "",
             f"- No host sync (sync-debug tests): {answer_sync(work)}",
             f"- float16 autocast accuracy: {mixed}",
             f"- Bit for bit: {answer_determinism(work)}",
             f"- addmm with a float32 output and 16-bit inputs: {addmm}",
             f"- NaN padding: {nan}",
             f"- Achieved bandwidth: {bw}",
             f"- Rows kernels' registers and occupancy: {res}", ""]
    for title, table in (("float16 autocast accuracy", mixed_table),
                         ("addmm and NaN padding", probe_table),
                         ("Kernel bandwidth", bw_table),
                         ("Rows kernels' resources (every kernel: "
                          "resources/kernel_resources.md)", res_table)):
        if table:
            lines += [f"### {title}", ""] + table + [""]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", help="the gpu_check.sh working folder (logs, XML, bench outputs)")
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", type=int, default=0)
    args = p.parse_args(argv)
    work = args.work
    lines = [f"# fusedloss device check{' (dry run: no GPU)' if args.dry_run else ''}", ""]
    env = os.path.join(work, "env.log")
    if os.path.exists(env):
        with open(env, errors="replace") as f:
            text = f.read()
        keep = [ln for ln in text.splitlines() if re.match(
            r"(python|torch|commit|compute-sanitizer|ncu|cuobjdump|Cuda compilation|Build)", ln)]
        gpu = re.findall(r"NVIDIA [A-Z]\w+[\w ]*?(?=\s{2}|\|)", text)
        lines += [f"- machine: {gpu[0].strip() if gpu else 'no GPU seen by nvidia-smi'}, "
                  f"{text.splitlines()[2] if len(text.splitlines()) > 2 else '?'} cores"]
        lines += [f"- {ln.strip()}" for ln in keep]
        lines.append("")
    lines += ["## Stages", "", "| stage | status | seconds | budget | last line |",
              "|---|---|--:|--:|---|"]
    total = 0
    for name, status, secs, budget, note in read_stages(work):
        total += int(secs or 0)
        lines.append(f"| {name} | {status} | {secs} | {budget} | {note.replace('|', '/')} |")
    lines += ["", f"Stages took {total} s in all.", ""]
    lines += item8(work)

    xmls = sorted(glob.glob(os.path.join(work, "*.xml")))
    if xmls:
        lines += ["## Tests", "", "| suite | tests | failures | errors | skipped | seconds |",
                  "|---|--:|--:|--:|--:|--:|"]
        failed_all = []
        for path in xmls:
            try:
                tot, failed = junit(path)
            except ET.ParseError as e:
                lines.append(f"| {os.path.basename(path)} | unreadable: {e} | | | | |")
                continue
            failed_all += failed
            lines.append(f"| {os.path.basename(path)[:-4]} | {tot['tests']} | {tot['failures']} "
                         f"| {tot['errors']} | {tot['skipped']} | {tot['time']:.0f} |")
        if failed_all:
            lines += ["", "Failed:"] + [f"- `{n}`" for n in failed_all[:30]]
            if len(failed_all) > 30:
                lines.append(f"- ... and {len(failed_all) - 30} more (see the XML)")
        lines.append("")

    lines += ["## compute-sanitizer", ""]
    for tool in ("memcheck", "racecheck"):
        lines.append(f"- {tool}: {sanitizer_verdict(os.path.join(work, tool + '.log'))}")
    lines.append("")

    report = merge_bench(work)
    if report:
        import _report

        with open(os.path.join(work, "bench.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(work, "bench.md"), "w") as f:
            f.write(_report.markdown(report))
        m = report["meta"]
        lines += ["## Benchmark against the byte model", "",
                  f"{m['device_name']}, torch {m['torch']}, {m['reps']} interleaved repetitions "
                  f"per case (median), copy floor spread up to {m.get('floor_iqr_pct', 0):.0f}%"
                  + (" — NOISY" if m.get("noisy") else "") + ". Predicted = bytes of "
                  "bench/ROOFLINE.md's model / bandwidth, at the copy_ bandwidth measured in "
                  f"the same run and at the datasheet's {DATASHEET_TBPS:g} TB/s; a range is "
                  "the split path's second read from L2 (low) or HBM (high). The full table "
                  "(memory, ratios to eager and torch.compile) is bench.md.", ""]
        lines += bench_table(report)
        lines.append("")
    else:
        lines += ["## Benchmark", "", "no benchmark output", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
