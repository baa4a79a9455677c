"""The op layer: torch.library.opcheck on every op, torch.compile(fullgraph=True) against
eager, and bitwise reproducibility."""

import pytest
import torch

import fusedloss as fl
from fusedloss import _ops
from helpers import logits


def softmax_samples(device):
    """(args) for softmax_ce, covering index / probability targets, options, non-contiguous
    and empty inputs."""
    x = logits((6, 9), torch.float32, device)
    t = torch.randint(0, 9, (6,), device=device)
    w = torch.rand(9, device=device)
    m = torch.rand(6, device=device)
    probs = torch.softmax(torch.randn(6, 9, device=device), 1)
    wide = logits((6, 20), torch.float32, device)[:, 3:12]  # non-contiguous rows
    bf = logits((5, 33), torch.bfloat16, device)
    empty = logits((0, 9), torch.float32, device)
    samples = []
    for reduction in (0, 1, 2):
        samples += [
            (x, t, None, None, -100, 0.0, 0.0, 0.0, reduction, 0.0, reduction != 0),
            (x, t, w, m, 2, 0.1, 1e-3, 5.0, reduction, 0.0, reduction != 0),
            (x, probs, w, m, -100, 0.2, 0.0, 0.0, reduction, 0.0, reduction != 0),
            (wide, t, None, m, -100, 0.0, 0.0, 0.0, reduction, 1e-12, reduction != 0),
            (bf, torch.randint(0, 33, (5,), device=device), None, None, -100, 0.0, 0.0, 3.0,
             reduction, 0.0, reduction != 0),
            (empty, t[:0], None, None, -100, 0.0, 0.0, 0.0, reduction, 0.0, False),
            # the token accuracy, and the caller's mean denominators (a loss split over calls)
            (x, t, w, m, 2, 0.1, 1e-3, 5.0, reduction, 0.0, reduction != 0, True,
             torch.tensor([3.5, 2.0], device=device)),
            # token_scaling and each row's argmax (a fifth output, int64)
            (x, t, w, m, 2, 0.1, 1e-3, 5.0, reduction, 0.0, reduction != 0, True, None, True,
             True),
        ]
    return samples


def sigmoid_samples(device):
    x = logits((7, 5), torch.float32, device)
    y = torch.rand(7, 5, device=device)
    w = torch.rand(5, device=device).expand(7, 5)
    pw = torch.rand(5, device=device).expand(7, 5)
    m = torch.rand(7, 1, device=device).expand(7, 5)
    nc = logits((7, 12), torch.float32, device)[:, 2:7]
    samples = []
    for reduction in (0, 1, 2):
        samples += [
            (x, y, None, None, None, 0.0, reduction, reduction != 0),
            (x, y, w, pw, m, 0.1, reduction, reduction != 0),
            (nc, y, None, pw, None, 0.0, reduction, reduction != 0),
            (x[:0], y[:0], None, None, None, 0.0, reduction, False),
        ]
    return samples


def opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("index", range(24))
def test_opcheck_softmax_ce(backend, index):
    args = softmax_samples(backend.device)[index]
    x = args[0].detach().requires_grad_(args[10])  # compute_grad
    opcheck(_ops.current().softmax_ce, (x,) + args[1:])


@pytest.mark.parametrize("index", range(12))
def test_opcheck_sigmoid_ce(backend, index):
    args = sigmoid_samples(backend.device)[index]
    x = args[0].detach().requires_grad_(args[-1])
    opcheck(_ops.current().sigmoid_ce, (x,) + args[1:])


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_backward_ops(backend, reduction):
    ops = _ops.current()
    x, t, w, m = (logits((6, 9), torch.float64, backend.device),
                  torch.randint(0, 9, (6,), device=backend.device),
                  torch.rand(9, dtype=torch.float64, device=backend.device),
                  torch.rand(6, dtype=torch.float64, device=backend.device))
    _, stats, _, _, _ = ops.softmax_ce(x, t, w, m, -100, 0.1, 1e-3, 0.0, reduction, 0.0, False)
    go = torch.rand(6 if reduction == 0 else (), dtype=torch.float64, device=backend.device)
    opcheck(ops.softmax_ce_backward, (go, x, t, w, m, stats, -100, 0.1, 1e-3, 0.0, reduction, 0.0))
    y = torch.rand(6, 9, dtype=torch.float64, device=backend.device)
    go = torch.rand((6, 9) if reduction == 0 else (), dtype=torch.float64, device=backend.device)
    opcheck(ops.sigmoid_ce_backward, (go, x, y, None, w.expand(6, 9), None, 0.0, reduction))


def test_opcheck_inplace_and_scale(backend):
    ops = _ops.current()
    x = logits((6, 9), torch.float32, backend.device)
    t = torch.randint(0, 9, (6,), device=backend.device)
    opcheck(ops.softmax_ce_inplace, (x.clone(), t, None, None, -100, 0.0, 0.0, 0.0, 1, 0.0))
    opcheck(ops.softmax_ce_inplace, (x.clone(), t, None, None, -100, 0.1, 1e-2, 0.0, 1, 0.0, True,
                                     torch.tensor([4.0, 5.0], device=backend.device)))
    opcheck(ops.scale_grad_, (x.clone(), torch.tensor(0.5, device=backend.device)))
    opcheck(ops.scale_grad_, (x.clone(), torch.tensor(1.0, device=backend.device)))


# --- torch.compile ---------------------------------------------------------------------------

COMPILE_CASES = {
    "ce_mean": lambda x, t, y: fl.cross_entropy(x, t, label_smoothing=0.1),
    "ce_none": lambda x, t, y: fl.cross_entropy(x, t, reduction="none").sum(),
    "ce_probs_sum": lambda x, t, y: fl.cross_entropy(x, y, reduction="sum", z_loss=1e-3),
    "ce_inplace_falls_back": lambda x, t, y: fl.cross_entropy(x * 1, t, inplace_backward=True),
    "bce_mean": lambda x, t, y: fl.binary_cross_entropy_with_logits(x, y),
    "bce_none": lambda x, t, y: fl.binary_cross_entropy_with_logits(x, y, reduction="none").sum(),
    "sequence_loss": lambda x, t, y: fl.sequence_loss(x.reshape(2, 4, 11), t.reshape(2, 4),
                                                      torch.ones(2, 4, device=x.device)),
}


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_fullgraph_matches_eager(backend, case):
    fn = COMPILE_CASES[case]
    x = logits((8, 11), torch.float32, backend.device)
    t = torch.randint(0, 11, (8,), device=backend.device)
    y = torch.softmax(torch.randn(8, 11, device=backend.device), 1)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    results = []
    for f in (fn, compiled):
        xa = x.clone().requires_grad_()
        loss = f(xa, t, y)
        loss.backward(torch.tensor(0.75, device=backend.device))
        results.append((loss.detach(), xa.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-7)


# --- determinism -----------------------------------------------------------------------------


def run_once(x, t, y, w, m):
    xa = x.clone().requires_grad_()
    ce = fl.cross_entropy(xa, t, weight=w, mask=m, label_smoothing=0.1)
    ce.backward()
    xb = x.clone().requires_grad_()
    bce = fl.binary_cross_entropy_with_logits(xb, y, mask=m[:, None])
    bce.backward()
    return ce, xa.grad, bce, xb.grad


def test_bitwise_identical_across_runs_and_thread_counts(backend):
    x = logits((3000, 257), torch.float32, backend.device)
    t = torch.randint(0, 257, (3000,), device=backend.device)
    y = torch.rand(3000, 257, device=backend.device)
    w = torch.rand(257, device=backend.device)
    m = torch.rand(3000, device=backend.device)
    first = run_once(x, t, y, w, m)
    threads = torch.get_num_threads()
    try:
        for n in (1, threads, max(2, threads)):
            torch.set_num_threads(n)
            again = run_once(x, t, y, w, m)
            for a, b in zip(first, again):
                assert torch.equal(a, b), f"not bitwise identical with {n} threads"
    finally:
        torch.set_num_threads(threads)
