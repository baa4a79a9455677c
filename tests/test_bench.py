"""bench/run.py end to end on tiny shapes: it runs, writes valid JSON, markdown and a PNG with
every contender, ratios and a verdict. No timing is asserted."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import _report  # noqa: E402
from _contenders import Case  # noqa: E402
CASES = ["ce-64x1000-float32", "bce-256x128-bfloat16", "distill_fkl-64x1000-float32",
         "distill_jsd-64x1000-bfloat16"]
DISTILL_ROWS = ["fusedloss", "fusedloss inplace", "eager", "torch.compile", "add",
                "fusedloss compiled"]
EXPECTED = {
    "ce-64x1000-float32": ["fusedloss", "fusedloss inplace", "eager", "torch.compile", "copy_",
                           "clone", "fusedloss compiled"],
    "bce-256x128-bfloat16": ["fusedloss", "eager", "torch.compile", "copy_", "clone",
                             "fusedloss compiled"],
    "distill_fkl-64x1000-float32": DISTILL_ROWS,
    "distill_jsd-64x1000-bfloat16": DISTILL_ROWS,
}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--cases",
           ",".join(CASES), "--reps", "3", "--warmup", "1", "--out", str(out), "--tag", "t",
           "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.mark.slow
def test_json_has_every_contender(bench_run):
    out, _ = bench_run
    with open(out / "t.json") as f:
        report = json.load(f)
    assert report["meta"]["reps"] == 3 and "timed" in report["meta"]
    assert [c["name"] for c in report["cases"]] == CASES
    for case in report["cases"]:
        results = case["results"]
        assert list(results) == EXPECTED[case["name"]]
        assert set(case["skipped"]) == ({"liger", "quack"} if case["loss"] == "ce" else set())
        for name, r in results.items():
            assert len(r["times_ms"]) == 3 and r["median_ms"] > 0, name
            assert math.isfinite(r["gbps"]) and r["vs_copy"] > 0, name
            if name in ("copy_", "clone", "add"):
                continue
            assert r["grad_ok"], (name, r["grad_error"])
            assert r["mem_grad_bufs"] is not None and r["mem_grad_bufs"] >= 0, name
        for name in results:
            has_verdict = "status" in results[name]
            assert has_verdict == name.startswith("fusedloss"), name
        fused = results["fusedloss"]
        # tiny shapes: the targets (set for the full-size cases) are compared, not judged
        assert fused["status"].startswith("no target"), fused["status"]
        assert {c["metric"] for c in fused["checks"]} >= {"vs_eager", "vs_compile"}
        if "fusedloss inplace" in results:
            assert results["fusedloss inplace"]["inplace_taken"], case["name"]


@pytest.mark.slow
def test_markdown_and_plot(bench_run):
    out, proc = bench_run
    md = (out / "t.md").read_text()
    assert md == proc.stdout  # the table printed is the table written
    for case, names in EXPECTED.items():
        for name in names:
            assert f"| {case} | {name} |" in md
    assert "liger skipped" in md and "quack skipped" in md
    with open(out / "t.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _synthetic_result(case, fused_ms, *, grad_ok=True):
    """A case's results as bench/run.py builds them, with made-up times (the floor 10 ms)."""
    def row(ms):
        return {"median_ms": ms, "p25_ms": ms * 0.98, "p75_ms": ms * 1.02, "grad_ok": True,
                "grad_error": 0.0}
    results = {"fusedloss": {**row(fused_ms), "grad_ok": grad_ok,
                             "grad_error": 0.0 if grad_ok else 1.0},
               "eager": row(200.0), "torch.compile": row(100.0), case.floor: row(10.0)}
    one_buffer = {"extra_bytes": case.grad_bytes}
    return {"results": results, "memory": {"fusedloss": one_buffer, "eager": one_buffer,
                                           "torch.compile": one_buffer}}


@pytest.mark.parametrize("fused_ms,expected", [(12.0, "PASS"), (30.0, "FAIL: x eager 6.67 < 8")])
def test_targets_judge_the_full_size_cases(fused_ms, expected):
    case = Case.parse("ce-4096x32000-float32")
    res = _synthetic_result(case, fused_ms)
    _report.analyze(case, res, "cpu")
    assert res["results"]["fusedloss"]["status"].startswith(expected)


@pytest.mark.parametrize("fused_ms,expected", [
    (15.0, "PASS"), (20.0, "FAIL: /floor 2.00 > 1.6"), (40.0, "FAIL: x eager 5.00 < 8; x compile "
                                                      "2.50 < 3; /floor 4.00 > 1.6")])
def test_distillation_targets_are_against_the_add_floor(fused_ms, expected):
    case = Case.parse("distill_jsd-4096x32000-float32")
    assert case.floor == "add" and case.model_bytes == case.copy_bytes == 3 * 4 * 4096 * 32000
    res = _synthetic_result(case, fused_ms)
    _report.analyze(case, res, "cpu")
    assert res["results"]["fusedloss"]["status"] == expected


def test_distillation_cases_are_chosen_by_name_only():
    """`--cases distill` picks the four distillation presets; the default, --full and globs over
    the other presets leave them out."""
    import run

    chosen = run.select_cases(run.parse_args(["--cases", "distill"]))
    assert [c.name for c in chosen] == [f"distill_{d}-4096x32000-{t}" for d in ("fkl", "jsd")
                                        for t in ("float32", "bfloat16")]
    for argv in ([], ["--full"], ["--cases", "*bfloat16"]):
        assert not any(c.distill for c in run.select_cases(run.parse_args(argv))), argv
    assert run.select_cases(run.parse_args(["--cases", "distill_jsd-8x10-float32"])) == [
        Case("distill_jsd", 8, 10, "float32")]


def test_targets_do_not_judge_other_sizes():
    """Small shapes (--quick) are not held to the full-size targets; a wrong gradient still
    fails them."""
    case = Case.parse("ce-256x4000-float32")
    res = _synthetic_result(case, 30.0)  # would miss the x eager target at full size
    _report.analyze(case, res, "cpu")
    assert res["results"]["fusedloss"]["status"].startswith("no target")
    res = _synthetic_result(case, 30.0, grad_ok=False)
    _report.analyze(case, res, "cpu")
    assert res["results"]["fusedloss"]["status"].startswith("FAIL: wrong gradient")


@pytest.mark.parametrize("floor_iqr,noisy", [(4.0, False), (25.0, True)])
def test_noisy_comes_from_the_spread_of_the_repetitions(floor_iqr, noisy):
    """Not from the load average: only the copy floor's spread across repetitions counts."""
    import run

    meta = {"load_before": 100.0}
    report = {"cases": [{"results": {"copy_": {"iqr_pct": 1.0}}},
                        {"results": {"copy_": {"iqr_pct": floor_iqr}}}]}
    run.finish_meta(meta, report)
    assert meta["noisy"] is noisy and meta["floor_iqr_pct"] == floor_iqr


def test_per_call_runs_every_cell():
    """bench/per_call.py: one row per (size, dtype, mode, loss) with both contenders' times."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "per_call.py"), "--sizes", "4x3", "9x17",
           "--calls", "5", "--rounds", "2", "--dtypes", "float32", "bfloat16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 4x3") or
            line.startswith("| 9x17")]
    assert len(rows) == 2 * 2 * 2 * 2  # sizes x dtypes x modes x losses
    for line in rows:
        ratio = float(line.rstrip(" |").split("|")[-1])
        assert math.isfinite(ratio) and ratio > 0


@pytest.mark.slow
def test_linear_distill_runs_every_contender(tmp_path):
    """bench/run.py --linear-distill on a tiny case: every contender timed, its memory probed,
    and the gradients of the fused and materialised paths agree."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--linear-distill", "--cases",
           "64x8x16x300-float32", "--divergence", "jsd", "--reps", "2", "--warmup", "0",
           "--out", str(tmp_path), "--tag", "t", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "t.json") as f:
        (case,) = json.load(f)["cases"]
    names = ["logits + composite", "logits + fl.distillation_loss", "fl.linear_distillation_loss"]
    assert list(case["results"]) == names and case["divergence"] == "jsd"
    for name, r in case["results"].items():
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0, name
        # against the first contender, the composite on materialised logits
        assert r["max_abs_diff_dx"] < 1e-5 and r["max_abs_diff_dw"] < 1e-5, (name, r)
        assert case["memory"][name]["extra_bytes"] >= 0, name
    md = (tmp_path / "t.md").read_text()
    assert md == proc.stdout
    assert all(f"| 64x8x16x300-float32 | jsd | {name} |" in md for name in names)
