"""The one-page summary of a bench/gpu_check.sh run: each stage's result and time, the test
counts (JUnit XML), the sanitizer verdicts, and every benchmark time beside the time the byte
model of bench/ROOFLINE.md predicts for it. Also merges the per-case benchmark outputs into
bench.json and bench.md beside the summary.

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
