"""`python -m fusedloss`, and every compiled CPU instruction set (forced with
FUSEDLOSS_CPU_ISA) passing the self-check and the CPU parity suite."""

import os
import subprocess
import sys

import pytest
import torch

import fusedloss as fl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(**env):
    return subprocess.run([sys.executable, "-m", "fusedloss"], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT, timeout=300)


def test_main_prints_build_and_passes_self_check():
    proc = run_main()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"fusedloss {fl.__version__}" in proc.stdout
    assert "CPU kernels:" in proc.stdout and "CUDA kernels:" in proc.stdout
    assert "self-check passed" in proc.stdout
    # the CUDA self-check either ran or says why not
    assert "self-check on cuda:" in proc.stdout
    if not torch.cuda.is_available():
        assert "self-check on cuda: skipped (" in proc.stdout


@pytest.mark.parametrize("isa", fl.build_info()["cpu_isas"])
def test_every_cpu_isa_passes_self_check(isa):
    proc = run_main(FUSEDLOSS_CPU_ISA=isa)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if isa != "DEFAULT" and f"in use: {isa}" not in proc.stdout:
        pytest.skip(f"this CPU cannot run {isa}")
    assert f"in use: {isa}" in proc.stdout
    assert "self-check passed" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("isa", [i for i in fl.build_info()["cpu_isas"]
                                 if i != fl.build_info()["cpu_isa"]])
def test_other_cpu_isas_pass_the_parity_suite(isa):
    """The tables this CPU does not pick by default, run through the whole CPU parity suite."""
    proc = run_main(FUSEDLOSS_CPU_ISA=isa)
    if f"in use: {isa}" not in proc.stdout:
        pytest.skip(f"this CPU cannot run {isa}")
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu",
         "tests/test_cross_entropy.py", "tests/test_bce.py", "tests/test_tf_api.py"],
        capture_output=True, text=True, cwd=ROOT, timeout=1800,
        env={**os.environ, "FUSEDLOSS_CPU_ISA": isa})
    assert suite.returncode == 0, suite.stdout[-3000:] + suite.stderr[-3000:]
