"""bench/run.py end to end on tiny shapes: it runs, writes valid JSON, markdown and a PNG with
every contender, ratios and a verdict. No timing is asserted."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ["ce-64x1000-float32", "bce-256x128-bfloat16"]
EXPECTED = {
    "ce-64x1000-float32": ["fusedloss", "fusedloss inplace", "eager", "torch.compile", "copy_",
                           "clone", "fusedloss compiled"],
    "bce-256x128-bfloat16": ["fusedloss", "eager", "torch.compile", "copy_", "clone",
                             "fusedloss compiled"],
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
            if name in ("copy_", "clone"):
                continue
            assert r["grad_ok"], (name, r["grad_error"])
            assert r["mem_grad_bufs"] is not None and r["mem_grad_bufs"] >= 0, name
        for name in results:
            has_verdict = "status" in results[name]
            assert has_verdict == name.startswith("fusedloss"), name
        fused = results["fusedloss"]
        assert fused["status"].startswith(("PASS", "FAIL"))
        assert {c["metric"] for c in fused["checks"]} >= {"vs_eager", "vs_compile"}
        if case["loss"] == "ce":
            assert results["fusedloss inplace"]["inplace_taken"]


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
