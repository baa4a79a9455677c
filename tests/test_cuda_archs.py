"""Which GPUs a build's CUDA kernels run on (csrc/common/cuda_archs.h, read from the build's
architecture list): a device the build did not compile for gets a clear error naming its
compute capability and the build option (csrc/cuda/ops_cuda.cpp), not a launch failure. The
header is compiled here with the host compiler alone."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    # (archs, major, minor, covered)
    ("8.0;9.0+PTX", 8, 0, True),
    ("8.0;9.0+PTX", 8, 6, True),    # sm_80 cubins run on 8.6 and 8.9
    ("8.0;9.0+PTX", 8, 9, True),
    ("8.0;9.0+PTX", 9, 0, True),
    ("8.0;9.0+PTX", 10, 0, True),   # PTX of 9.0, compiled by the driver
    ("8.0;9.0+PTX", 12, 0, True),
    ("8.0;9.0+PTX", 7, 0, False),   # V100: older than every architecture built
    ("8.0;9.0+PTX", 7, 5, False),   # T4
    ("8.0;9.0", 10, 0, False),      # no PTX: nothing for a newer major version
    ("8.6", 8, 0, False),           # an 8.6 cubin does not run on 8.0
    ("7.5;8.0", 7, 5, True),
    ("", 8, 0, False),
]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cuda_archs_cover(tmp_path):
    lines = [f'  report("{a}", {ma}, {mi}, {str(c).lower()});' for a, ma, mi, c in CASES]
    src = tmp_path / "archs.cpp"
    src.write_text(
        '#include <cstdio>\n#include "common/cuda_archs.h"\n'
        "static int bad = 0;\n"
        "static void report(const char* a, int ma, int mi, bool want) {\n"
        "  if (fusedloss::cuda_archs_cover(a, ma, mi) != want) {\n"
        '    std::printf("%s covers %d.%d: expected %d\\n", a, ma, mi, want); ++bad; }\n'
        "}\nint main() {\n" + "\n".join(lines) + "\n  return bad;\n}\n")
    exe = tmp_path / "archs"
    subprocess.run(["g++", "-std=c++17", "-I", os.path.join(ROOT, "csrc"), str(src), "-o",
                    str(exe)], check=True, capture_output=True, timeout=120)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout
