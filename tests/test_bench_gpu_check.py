"""The device check's scripts in their CPU modes (what bench/gpu_check.sh --dry-run runs), and
bench/gpu_summary.py's answers to the GPU paths' questions from their outputs: each script runs,
writes its JSON, and the summary has a line for every question. No number is judged."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
QUICK = ["--device", "cpu", "--quick"]


def run(*args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A gpu_check working folder with every item-8 stage's output, from the CPU modes."""
    w = tmp_path_factory.mktemp("gpu_check")
    runs = {
        "probes": [os.path.join(BENCH, "gpu_probes.py"), "--out", str(w / "probes"), *QUICK],
        "mixed": [os.path.join(BENCH, "mixed_precision.py"), "--out", str(w / "mixed"), *QUICK],
        "determinism 1": [os.path.join(BENCH, "determinism.py"), *QUICK,
                          "--out", str(w / "determinism" / "run1.json")],
        "determinism 2": [os.path.join(BENCH, "determinism.py"), *QUICK,
                          "--out", str(w / "determinism" / "run2.json"),
                          "--compare", str(w / "determinism" / "run1.json")],
        "bandwidth": [os.path.join(BENCH, "kernel_bandwidth.py"), "--out", str(w / "bandwidth"),
                      "--reps", "2", *QUICK],
        "resources": [os.path.join(BENCH, "kernel_resources.py"), "--out", str(w / "resources"),
                      "--allow-no-cuda"],
    }
    procs = {name: run(*args) for name, args in runs.items()}
    with open(w / "stages.tsv", "w") as f:
        f.write("stage\tstatus\tseconds\tbudget\tnote\n")
        for name, p in procs.items():
            f.write(f"{name}\t{'ok' if p.returncode == 0 else 'failed'}\t1\t10\t\n")
    return w, procs


@pytest.mark.slow
def test_scripts_run_on_the_cpu(work):
    _, procs = work
    for name, p in procs.items():
        assert p.returncode == 0, (name, p.stdout[-2000:], p.stderr[-2000:])


@pytest.mark.slow
def test_outputs(work):
    import json

    w, _ = work
    mixed = json.loads((w / "mixed" / "mixed_precision.json").read_text())
    assert {r["case"] for r in mixed["rows"]} >= {"ce", "bce", "linear ce"}
    assert all("error" not in r for r in mixed["rows"])
    det = json.loads((w / "determinism" / "run2.json").read_text())
    assert all(c.get("identical") and c.get("same_as_other_process") for c in det["cases"])
    assert any("vocab-parallel" in c["case"] for c in det["cases"])
    probes = json.loads((w / "probes" / "gpu_probes.json").read_text())
    assert any("linear_ce.cpp" in r["form"] for r in probes["addmm"])
    assert all(r["ok"] for r in probes["nan_padding"])  # the CPU skips padding rows


@pytest.mark.slow
def test_summary_answers_every_question(work):
    w, _ = work
    out = w / "summary.md"
    p = run(os.path.join(BENCH, "gpu_summary.py"), str(w), "--out", str(out), "--dry-run", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    text = out.read_text()
    for q in ("No host sync", "float16 autocast accuracy", "Bit for bit", "addmm with a float32",
              "NaN padding", "Achieved bandwidth", "Rows kernels' registers and occupancy"):
        line = next((ln for ln in text.splitlines() if ln.startswith(f"- {q}")), None)
        assert line is not None, q
        assert "Traceback" not in line
    assert "cases within 1.2x" in text and "identical run to run" in text


def test_gpu_sync_tests_are_selected():
    """The sync stage's selection (-k sync) names tests: the dry run fails on an empty one."""
    p = run("-m", "pytest", "-p", "no:cacheprovider", "-q", "--collect-only",
            "tests/test_gpu_sync.py", "-k", "sync", timeout=300)
    assert p.returncode == 0, p.stdout[-2000:]
    assert "150 tests collected" in p.stdout or " collected" in p.stdout


def test_resources_parser():
    sys.path.insert(0, BENCH)
    import kernel_resources as kr

    text = """arch = sm_90
 Function _ZN9fusedloss4cuda22softmax_ce_rows_kernelI13__nv_bfloat16Li8ELb0ELb0EEEvNS0_13SoftmaxCEArgsE:
  REG:116 STACK:0 SHARED:1664 LOCAL:0 CONSTANT[0]:656 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    ((arch, name, res),) = kr.parse(text)
    assert arch == "sm_90" and res["REG"] == 116 and res["SHARED"] == 1664
    threads, kind = kr.block_of(
        "void fusedloss::cuda::softmax_ce_rows_kernel<__nv_bfloat16, 8, false, false>("
        "fusedloss::cuda::SoftmaxCEArgs)")
    assert threads == 512 and kind.startswith("rows kernel, __nv_bfloat16, 8 packs")
    occ = kr.occupancy(116, 1664, 512, kr.NOMINAL_SM90)
    # the bf16 8-vector rows kernel, 116 registers on sm_90: one 512-thread block/SM
    assert occ["blocks_per_sm"] == 1 and occ["limited_by"] == "registers"
    assert occ["occupancy"] == 0.25
