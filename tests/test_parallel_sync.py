"""No hidden host synchronisation, sums in a fixed order, the header on the call's device.

- On a GPU (skipped without one): every path that claims no host synchronisation runs under
  torch.cuda.set_sync_debug_mode("error"), which raises at any synchronising CUDA call
  (a blocking copy, .item(), a stream or device synchronize): fl.cross_entropy,
  binary_cross_entropy_with_logits and linear_cross_entropy on one device (every reduction,
  mask, class weight, forward and backward), and the vocab-parallel cross_entropy and
  linear_cross_entropy on a one-rank NCCL group, where the header read (protocol.agree) is the
  one documented synchronisation: it runs with the debug mode off, everything after it
  with the mode on.
- On the CPU: the sync-free replacements give the very values the old constructions gave
  (torch.tensor of the slice sizes, their cumsum, cumsum's running sums); the fixed-order sum
  is the pairwise sum it claims to be, the same bits on CPU and CUDA; the vocab-parallel and
  chunked paths give the same bits run to run under torch.use_deterministic_algorithms(True)
  (on CUDA too, where there is one).
- The header's device (protocol._collective_device) for each kind of group.
"""

import contextlib
import types

import pytest
import torch

import fusedloss as fl
from distributed_harness import WorkerPool, class_slices
from fusedloss import _common
from fusedloss.parallel import combine as C
from fusedloss.parallel import protocol
from fusedloss.parallel.protocol import Layout

HAVE_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA device on this machine")
REDUCTIONS = ["mean", "sum", "none"]
IGNORE = -1


def _layout(sizes, rank=0):
    return Layout(rank, sum(sizes[:rank]), sum(sizes), tuple(sizes))


# --- the replacements give the old values (CPU) ---------------------------------------------

SIZES = [(7,), (3, 5), (1, 1, 1, 9), (4, 4, 4, 4), (1000, 24, 1, 3000)]


def _old_slice_weight_sums(weight, sizes, device):
    """combine._slice_weight_sums before it avoided torch.tensor and the per-slice cumsum."""
    if weight is None:
        return torch.tensor(sizes, dtype=torch.float64, device=device)
    w = weight.to(torch.float64)
    sums, start = [], 0
    for size in sizes:
        sums.append(torch.cumsum(w[start:start + size], 0)[-1])
        start += size
    return torch.stack(sums)


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_slice_tables_equal_the_old_construction(sizes, weighted):
    gen = torch.Generator().manual_seed(len(sizes) + sum(sizes))
    weight = (torch.rand(sum(sizes), generator=gen) * 3 + 0.1) if weighted else None
    tables = C.slice_tables(_layout(sizes), weight, torch.device("cpu"))
    old_ends = torch.tensor(sizes, device="cpu").cumsum(0)
    assert tables.ends.dtype == old_ends.dtype and torch.equal(tables.ends, old_ends)
    old_sums = _old_slice_weight_sums(weight, sizes, "cpu")
    assert tables.weight_sums.dtype == old_sums.dtype
    assert torch.equal(tables.weight_sums, old_sums)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.float32])
def test_device_values_equal_torch_tensor(dtype):
    values = [3, -2**62, 2**62, 0, 17] if dtype == torch.int64 else [0.1, -3.5, 1e300, 0.0]
    if dtype == torch.float32:
        values = values[:2]
    for device in ["cpu"] + (["cuda"] if HAVE_CUDA else []):
        got = _common.device_values(values, dtype, device)
        want = torch.tensor(values, dtype=dtype, device=device)
        assert got.device == want.device and got.dtype == want.dtype
        assert torch.equal(got, want)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 17, 4096, 4097, 100_003])
def test_fixed_order_sum_on_the_cpu_is_the_running_sum(n):
    """On the CPU the kernel adds its own denominators as a running float64 sum; the handed-in
    ones must be the same bits (the old sequential_sum: cumsum's last element)."""
    gen = torch.Generator().manual_seed(n)
    v = torch.randn(3, n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(
        -8, 8, (3, n), generator=gen).double()
    got = _common.fixed_order_sum(v)
    for row in range(3):
        old = (torch.cumsum(v[row], 0)[-1] if n else torch.zeros((), dtype=torch.float64))
        assert torch.equal(got[row], old)
        assert torch.equal(_common.fixed_order_sum(v[row]), old)


def _pairwise_reference(values):
    """The pairwise sum in Python floats: pad to a power of two, then add element i and
    element i + half, level by level."""
    size = 1
    while size < len(values):
        size *= 2
    v = list(values) + [0.0] * (size - len(values))
    while len(v) > 1:
        half = len(v) // 2
        v = [v[i] + v[i + half] for i in range(half)]
    return v[0]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 1000, 4097])
def test_pairwise_sum_is_its_order(n):
    gen = torch.Generator().manual_seed(100 + n)
    v = torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(
        -8, 8, (n,), generator=gen).double()
    got = _common.pairwise_sum(v)
    assert got.shape == () and float(got) == _pairwise_reference(v.tolist())
    batched = _common.pairwise_sum(torch.stack([v, -v, v * 3]))
    assert torch.equal(batched[0], got) and torch.equal(batched[1], -got)
    if HAVE_CUDA:  # elementwise IEEE adds: the same bits on the GPU, whatever its model
        assert torch.equal(_common.pairwise_sum(v.cuda()).cpu(), got)
        assert torch.equal(_common.fixed_order_sum(v.cuda()).cpu(), got)


# --- determinism under torch.use_deterministic_algorithms -----------------------------------

@contextlib.contextmanager
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _problem(seed, device, rows=37, hidden=16, classes=53, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(classes, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5).to(
        dtype)
    target = torch.randint(0, classes, (rows,), generator=gen)
    target[::5] = IGNORE
    mask = torch.rand(rows, generator=gen) * 2
    mask[::7] = 0
    weight = torch.rand(classes, generator=gen) + 0.25
    return [t.to(device) for t in (x, w, target, mask, weight)]


def _bits(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def _vocab_parallel_calls(group, rank, world, device, seed):
    """The loss and gradient bits of the vocab-parallel cross_entropy and
    linear_cross_entropy (class weight, mask, ignored rows, smoothing), every reduction."""
    x, w, target, mask, weight = _problem(seed, device)
    start, stop = class_slices(w.shape[0], world, uneven=True)[rank]
    kw = dict(weight=weight, ignore_index=IGNORE, mask=mask, label_smoothing=0.1,
              z_loss=1e-3, process_group=group)
    out = []
    for reduction in REDUCTIONS:
        logits = (x @ w[start:stop].T).detach().requires_grad_()
        loss = fl.cross_entropy(logits, target, reduction=reduction, **kw)
        loss.sum().backward()
        xa = x.detach().clone().requires_grad_()
        wa = w[start:stop].detach().clone().requires_grad_()
        lin = fl.linear_cross_entropy(xa, wa, target, reduction=reduction, chunk_size=8, **kw)
        lin.sum().backward()
        out += [_bits(t) for t in (loss, logits.grad, lin, xa.grad, wa.grad)]
    return out


def case_deterministic(ctx, seed, device):
    """Twice under torch.use_deterministic_algorithms(True) (nothing raises), the same bits;
    and the single-device linear_cross_entropy, whose denominators are
    _common.mean_denominators."""
    device = torch.device(device)
    with deterministic():
        runs = [_vocab_parallel_calls(ctx.group, ctx.rank, ctx.world_size, device, seed)
                for _ in range(2)]
        single = []
        for _ in range(2):
            x, w, target, mask, weight = _problem(seed, device)
            single.append([_bits(fl.linear_cross_entropy(
                x, w, target, weight=weight, mask=mask, ignore_index=IGNORE, reduction=r,
                chunk_size=8)) for r in REDUCTIONS])
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"vocab-parallel output {i}: two runs differ"
    for i, (a, b) in enumerate(zip(*single)):
        assert torch.equal(a, b), f"linear_cross_entropy {REDUCTIONS[i]}: two runs differ"
    return runs[0]


@pytest.fixture(scope="module")
def gloo_pool():
    made = WorkerPool(2, "gloo")
    yield types.SimpleNamespace(run=made.run)
    made.close()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAVE_CUDA else []))
def test_deterministic_algorithms(gloo_pool, device):
    """2 gloo ranks (CUDA tensors through gloo where there is a GPU): no op of the paths
    refuses deterministic mode, two runs give the same bits, and the ranks agree on the
    loss."""
    if device == "cuda" and torch.cuda.device_count() < 1:
        pytest.skip("no CUDA device")
    results = gloo_pool.run(case_deterministic, timeout=180, seed=5, device=device)
    for i in range(0, len(results[0]), 5):  # the losses (index 0 of each group of five)
        assert torch.equal(results[0][i], results[1][i]), f"output {i}: the ranks differ"


# --- the header's device ---------------------------------------------------------------------

@pytest.mark.parametrize("backend, device, want", [
    ("gloo", "cpu", "cpu"),
    ("gloo", "cuda:1", "cpu"),  # gloo: the header is read on the host
    ("nccl", "cuda:1", "cuda:1"),  # the tensors' device, not the current one
    ("cpu:gloo,cuda:nccl", "cuda:0", "cuda:0"),
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
    ("nccl", "cpu", ValueError),
    ("nccl", "meta", ValueError),
])
def test_header_device(monkeypatch, backend, device, want):
    monkeypatch.setattr(protocol.dist, "get_backend", lambda group: backend)
    if want is ValueError:
        with pytest.raises(ValueError, match=r"cross_entropy\(process_group=\.\.\.\).*"
                                             r"CUDA tensors.*input is on"):
            protocol._collective_device(object(), torch.device(device), "cross_entropy")
    else:
        got = protocol._collective_device(object(), torch.device(device), "cross_entropy")
        assert got == torch.device(want)


# --- no host synchronisation on a GPU ----------------------------------------------------------

@contextlib.contextmanager
def no_sync():
    """Raise at any synchronising CUDA call; target validation (documented as one
    synchronisation per call) off."""
    from fusedloss import _args

    before = _args.targets_validated()
    fl.set_target_validation(False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
        fl.set_target_validation(before)


def _single_device_calls(reduction, seed=3):
    x, w, target, mask, weight = _problem(seed, "cuda", rows=64, hidden=32, classes=300,
                                          dtype=torch.bfloat16)
    grads = []
    logits = (x @ w.T).detach().float().requires_grad_()
    loss = fl.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE, mask=mask,
                            reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                            return_z_loss=True, return_token_accuracy=True)
    loss.loss.sum().backward()
    grads.append(logits.grad)
    bce_logits = torch.randn(64, 300, device="cuda", requires_grad=True)
    labels = (torch.rand(64, 300, device="cuda") < 0.1).float()
    bce = fl.binary_cross_entropy_with_logits(bce_logits, labels, weight=mask[:, None],
                                              pos_weight=weight, reduction=reduction)
    bce.sum().backward()
    grads.append(bce_logits.grad)
    xa, wa = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    lin = fl.linear_cross_entropy(xa, wa, target, weight=weight, ignore_index=IGNORE, mask=mask,
                                  reduction=reduction, chunk_size=16, z_loss=1e-3,
                                  return_z_loss=True, return_token_accuracy=True)
    lin.loss.sum().backward()
    grads += [xa.grad, wa.grad]
    return grads


@cuda_only
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_single_device_paths_do_not_synchronise(reduction):
    _single_device_calls(reduction)  # a first call (lazy initialisation) outside the check
    with no_sync():
        grads = _single_device_calls(reduction)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def case_vocab_parallel_no_sync(ctx, reduction):
    """On a one-rank NCCL group: the header agreed (its read, the documented synchronisation,
    with the debug mode off) by a first call; then agree() is replaced by one that returns
    the same layout, and the whole call, forward and backward, runs with the mode on."""
    import fusedloss.parallel.cross_entropy as vp_ce
    import fusedloss.parallel.linear as vp_linear

    x, w, target, mask, weight = _problem(9, ctx.device, rows=64, hidden=32, classes=300,
                                          dtype=torch.bfloat16)
    kw = dict(weight=weight, ignore_index=IGNORE, mask=mask, label_smoothing=0.1, z_loss=1e-3,
              reduction=reduction, process_group=ctx.group)

    def calls():
        logits = (x @ w.T).detach().requires_grad_()
        fl.cross_entropy(logits, target, **kw).sum().backward()
        xa, wa = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        fl.linear_cross_entropy(xa, wa, target, chunk_size=16, **kw).sum().backward()
        return logits.grad, xa.grad, wa.grad

    calls()  # the header read and lazy initialisation, outside the check
    agreed = {}

    def agree_once(group, prepare, who, device=None):
        """protocol.agree with the header already exchanged: prepare() (the checks) and the
        layout the real agree() gave for this call."""
        if who not in agreed:
            agreed[who] = real_agree(group, prepare, who, device)[1]
        return prepare()[0], agreed[who]

    real_agree = protocol.agree
    vp_ce.agree, vp_linear.agree = agree_once, agree_once
    try:
        calls()  # records the layouts (with the real agree, the mode off)
        with no_sync():
            grads = calls()
            torch.cuda.set_sync_debug_mode("default")
        assert all(torch.isfinite(g).all() for g in grads)
        # the known synchronisation is the header read: with the mode on, the real agree
        # raises there, and nowhere earlier
        with pytest.raises(RuntimeError, match="synchroniz"):
            with no_sync():
                real_agree(ctx.group, lambda: (None, protocol.Local(
                    x @ w.T, target, weight, IGNORE, False)), "cross_entropy")
    finally:
        vp_ce.agree, vp_linear.agree = real_agree, real_agree
    return True


@cuda_only
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vocab_parallel_paths_do_not_synchronise_after_the_header(reduction):
    pool = WorkerPool(1, "nccl")
    try:
        assert pool.run(case_vocab_parallel_no_sync, timeout=180, reduction=reduction) == [True]
    finally:
        pool.close()
