"""N x C beyond 2^31 elements: 64-bit offsets everywhere, checked on sample rows."""

import pytest
import torch

import fusedloss as fl
from helpers import assert_close

ROWS, CLASSES = 16400, 131072  # 2,149,580,800 elements > 2^31; row 16384 starts at 2^31


@pytest.mark.slow
def test_more_than_2_to_the_31_elements(backend):
    if backend.name == "simt":
        pytest.skip("the SIMT emulator covers 64-bit offsets with its own sized-down test")
    assert ROWS * CLASSES > 2**31
    x = torch.empty(ROWS, CLASSES, dtype=torch.bfloat16, device=backend.device)
    x.uniform_(-4, 4)
    samples = [0, 1, 16383, 16384, 16385, ROWS - 1]
    t = torch.randint(0, CLASSES, (ROWS,), device=backend.device)
    t[samples[-1]] = CLASSES - 1
    x.requires_grad_()
    loss = fl.cross_entropy(x, t, reduction="sum")
    loss.backward()
    rows = x.detach()[samples].double().cpu()
    tr = t[samples].cpu()
    ref_rows = rows.clone().requires_grad_()
    ref_loss = torch.nn.functional.cross_entropy(ref_rows, tr, reduction="none")
    ref_loss.sum().backward()
    assert_close(x.grad[samples], ref_rows.grad, torch.bfloat16)
    per_row = fl.cross_entropy(x.detach(), t, reduction="none")
    assert_close(per_row[samples], ref_loss, torch.bfloat16)
    # the sum of all rows, against the per-row losses summed in float64
    assert_close(loss, per_row.double().sum(), torch.bfloat16)
