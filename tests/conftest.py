"""Shared fixtures. Every parity test takes the `backend` fixture and runs once per backend:

- cpu:  the CPU kernels;
- simt: the CUDA kernels compiled as host C++ and run by the SIMT harness (tests/simt/), on
        CPU tensors, through the same public API;
- cuda: the CUDA kernels on a GPU (skipped when there is none; never faked).

A test parameter named `shape` (a tuple) is the problem size; sizes too large for the SIMT
emulator are deselected for the simt backend (reported as deselected, not passed).
"""

import collections
import contextlib
import math
import os
import tempfile
import time

# A fresh torch.compile cache per session: a cache entry from an earlier build of the
# extension would otherwise be trusted even after an op's fake kernel changed.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fusedloss-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402

import fusedloss  # noqa: F401, E402
from fusedloss import _ops  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HAVE_SIMT = os.path.exists(os.path.join(HERE, "simt", "__init__.py"))
SIMT_MAX_NUMEL = 1 << 18  # elements per call the emulator runs in reasonable time


class Backend:
    def __init__(self, name):
        self.name = name
        self.device = torch.device("cuda" if name == "cuda" else "cpu")

    @contextlib.contextmanager
    def active(self):
        if self.name == "simt":
            from simt import load_simt_opset

            with _ops.use(load_simt_opset()):
                yield self
        else:
            yield self

    def __repr__(self):
        return self.name


BACKEND_NAMES = ["cpu"] + (["simt"] if HAVE_SIMT else []) + ["cuda"]


def pytest_configure(config):
    if HAVE_SIMT and HERE not in os.sys.path:
        os.sys.path.insert(0, HERE)


@pytest.fixture(params=BACKEND_NAMES)
def backend(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    b = Backend(request.param)
    with b.active():
        yield b


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        shape = params.get("shape")
        if (params.get("backend") == "simt" and isinstance(shape, tuple)
                and math.prod(shape) > SIMT_MAX_NUMEL):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# Fresh random data every run, reproducible: the seed is printed in the header and can be set
# with FUSEDLOSS_TEST_SEED.
RUN_SEED = int(os.environ.get("FUSEDLOSS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"fusedloss: FUSEDLOSS_TEST_SEED={RUN_SEED}, backends={BACKEND_NAMES}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(RUN_SEED ^ (hash(request.node.nodeid) & 0xFFFFFFFF))


# --- what the terminal shows ---------------------------------------------------------------
# Skips are summarised one line per reason (pyproject's addopts leaves out -rs, which prints one
# line per skipped test: 80 lines of "no CUDA device" on a machine without a GPU); the slow
# tests, each minutes long, say when they start and how long they took, so a long test does not
# look like a hang.


def pytest_terminal_summary(terminalreporter):
    by_reason = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        by_reason[reason.removeprefix("Skipped: ")] += 1
    if by_reason:
        terminalreporter.section("skipped, by reason", sep="-")
        for reason, count in by_reason.most_common():
            terminalreporter.write_line(f"SKIPPED {count:4d} x {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    reporter = item.config.pluginmanager.get_plugin("terminalreporter")
    slow = reporter is not None and item.get_closest_marker("slow") is not None
    if slow:
        reporter.write_line(f"\n[slow test] {item.nodeid}: running ...")
    start = time.monotonic()
    yield
    if slow:
        reporter.write_line(f"\n[slow test] {item.nodeid}: {time.monotonic() - start:.0f} s")
