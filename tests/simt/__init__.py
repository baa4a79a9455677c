"""The SIMT harness: fusedloss's CUDA kernels (csrc/cuda) compiled as host C++ and run on the
CPU by an emulator of the CUDA execution model (simt.h, simt_runtime.cpp), registered as the op
namespace ``fusedloss_simt`` with the same schemas and entry logic as the CUDA ops.

``load_simt_opset()`` builds the library once per session (cached under build/simt; rebuilt
when a source changes) and returns the OpSet that tests route the public API through.
``ctl`` holds the harness's control ops (device parameters the launch plans see, the seed of
the scheduler, the log of launched kernels).

Environment: FUSEDLOSS_SIMT_SEED fixes the scheduler's seed (else it is random per process and
printed in the pytest header); MAX_JOBS bounds the parallel compile jobs.
"""

import contextlib
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD_DIR = os.path.join(ROOT, "build", "simt")

_opset = None


def _sources():
    # csrc/linear_ce.cpp (the fused linear CE's chunk loop, GEMMs by ATen) calls the kernels
    # of the namespace it is compiled for: here the emulated ones
    return [os.path.join(HERE, f) for f in
            ("simt_runtime.cpp", "kernels_simt.cpp", "ops_simt.cpp", "schema_simt.cpp",
             "selftest_simt.cpp")] + [os.path.join(ROOT, "csrc", "linear_ce.cpp")]


def _load_library():
    """Compiles (ninja, header dependencies tracked) and loads the library. A fresh process
    always runs ninja, so an edited kernel header is rebuilt; one process loads it once."""
    from torch.utils import cpp_extension

    os.makedirs(BUILD_DIR, exist_ok=True)
    cpp_extension.load(
        name="fusedloss_simt",
        sources=_sources(),
        extra_include_paths=[os.path.join(ROOT, "csrc"), HERE],
        extra_cflags=["-O2", "-std=c++20", "-fno-strict-aliasing", "-fvisibility=hidden",
                      "-DFUSEDLOSS_LIBRARY=fusedloss_simt", "-DFUSEDLOSS_NO_PYINIT"],
        build_directory=BUILD_DIR,
        is_python_module=False,
        with_cuda=False,
        verbose=bool(os.environ.get("FUSEDLOSS_SIMT_VERBOSE")),
    )


def load_simt_opset():
    """Build (once) and load the emulated kernels; the OpSet of namespace fusedloss_simt."""
    global _opset
    if _opset is None:
        import fusedloss  # noqa: F401  (the product's ops and OpSet class)
        from fusedloss import _autograd

        _load_library()
        # The scheduler's seed: FUSEDLOSS_SIMT_SEED, else the test run's seed, else random.
        seed = os.environ.get("FUSEDLOSS_SIMT_SEED", os.environ.get("FUSEDLOSS_TEST_SEED"))
        if seed is not None:
            torch.ops.fusedloss_simt_ctl.set_seed(int(seed))
        _opset = _autograd.install("fusedloss_simt")
    return _opset


def seed():
    """The seed of the SIMT scheduler (the order of blocks and the interleaving of threads)."""
    load_simt_opset()
    return int(torch.ops.fusedloss_simt_ctl.get_config()[3])


class _Ctl:
    """The harness's control ops (torch.ops.fusedloss_simt_ctl), loaded on first use."""

    def __getattr__(self, name):
        load_simt_opset()
        return getattr(torch.ops.fusedloss_simt_ctl, name)

    def launches(self):
        """{kernel name: launches} since the last reset_launches()."""
        load_simt_opset()
        text = torch.ops.fusedloss_simt_ctl.launches()
        return {name: int(n) for name, n in (line.rsplit(" ", 1) for line in text.splitlines())}

    @contextlib.contextmanager
    def device(self, num_sms=None, l2_bytes=None, min_split_classes=None):
        """Temporarily change the device parameters the launch plans see."""
        load_simt_opset()
        ops = torch.ops.fusedloss_simt_ctl
        old = list(ops.get_config())[:3]
        new = [v if v is not None else o for v, o in zip((num_sms, l2_bytes, min_split_classes), old)]
        ops.configure(*new)
        try:
            yield
        finally:
            ops.configure(*old)


ctl = _Ctl()
