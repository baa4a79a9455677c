"""bench/run.py --distributed end to end on a tiny case: every contender runs, its gradient agrees
with the gather baseline, and the collectives it counts are the ones each method issues. No
timing is asserted."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, CLASSES = 128, 1000


@pytest.mark.slow
def test_distributed_bench_runs_and_counts_the_collectives(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--distributed", "--cases",
           f"{ROWS}x{CLASSES}-float32", "--reps", "2", "--warmup", "1", "--out", str(tmp_path),
           "--tag", "t"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "t.json") as f:
        case = json.load(f)["cases"][0]
    assert case["failed"] == {}
    res = case["results"]
    assert set(res) == {"fusedloss", "torch loss_parallel", "gather + F.cross_entropy"}
    for name, r in res.items():
        assert r["median_ms"] > 0 and r["peak_extra_bytes"] > 0, name
        assert r["grad_max_abs_diff_vs_gather"] < 1e-6, name
    # the gather: one all_gather of the rank's slice, CLASSES / 2 float32 a row
    gather = res["gather + F.cross_entropy"]
    assert sum(gather["collectives"].values()) == 1
    assert gather["sent_bytes_per_row"] == CLASSES // 2 * 4
    # loss_parallel: three all-reduces of one float32 a row (max, target logit, sum of exp)
    torch_lp = res["torch loss_parallel"]
    assert torch_lp["collectives"] == {"_c10d_functional.all_reduce": 3}
    assert torch_lp["sent_bytes_per_row"] == 12
    # fusedloss: the per-call header (int64s, a few bytes a row at 128 rows) and one all_gather
    # of three float32 a row
    fused = res["fusedloss"]
    assert sum(fused["collectives"].values()) == 2, fused["collectives"]
    assert 12 <= fused["sent_bytes_per_row"] <= 12 + 128 / ROWS, fused["sent_bytes_per_row"]
    with open(tmp_path / "t.md") as f:
        table = f.read()
    assert all(name in table for name in res)
