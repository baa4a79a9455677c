"""The two kinds of CUDA kernels a test of csrc/cuda runs on, as the `kind` fixture:

- simt: the kernels on the SIMT harness (tests/simt), on CPU tensors, with the device
        parameters the launch plans see set so that small shapes take each path, and the
        launch log kept so that a test can check the path it meant was taken;
- cuda: the same cases on a GPU with its real parameters (skipped without one, never faked).
"""

import contextlib

import pytest
import torch

from fusedloss import _ops

# SIMT device parameters: 8 SMs, so few rows split; 64 KB of L2, so long rows go one per group
SPLIT_FEW = dict(num_sms=8, min_split_classes=512)
NO_SPLIT = dict(num_sms=1, min_split_classes=1 << 30)
SMALL_L2 = dict(l2_bytes=64 << 10)


class Kind:
    def __init__(self, name):
        self.name = name
        self.device = torch.device("cuda" if name == "cuda" else "cpu")
        self._log = None

    @contextlib.contextmanager
    def run(self, **device):
        """Routes the API through this kind's kernels; `device` sets the SIMT plan's view."""
        if self.name == "cuda":
            yield self
            return
        from simt import ctl, load_simt_opset

        with _ops.use(load_simt_opset()), ctl.device(**device):
            ctl.reset_launches()
            yield self
            self._log = ctl.launches()

    def expect(self, *kernels, count=None):
        """The SIMT launch log names these kernels (count: launches of the first)."""
        if self.name == "cuda":
            return
        for k in kernels:
            assert k in self._log, f"{k} did not run: {self._log}"
        if count is not None:
            assert self._log[kernels[0]] == count, self._log

    def ops(self):
        return _ops.current()


@pytest.fixture(params=["simt", "cuda"])
def kind(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    if request.param == "simt":
        pytest.importorskip("simt")
    return Kind(request.param)
