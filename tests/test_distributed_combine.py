"""fusedloss.parallel's combine in one process: the slices of a row are reduced one by one
(as the ranks would), their payloads stacked (as the all_gather would), combined, and the
result compared with fusedloss.cross_entropy on the whole logits; each slice's gradient, put
back together, with the whole gradient. The multi-process path itself is tested in
tests/test_distributed.py."""

import pytest
import torch

import fusedloss as fl
from fusedloss import _ops
from fusedloss._common import REDUCTIONS, acc_dtype
from fusedloss.parallel import combine as C
from fusedloss.parallel.protocol import Layout
from helpers import assert_close
from shard_ops_reference import reference_opset

from conftest import HAVE_SIMT


@pytest.fixture(params=["reference", "cpu"] + (["simt"] if HAVE_SIMT else []))
def lib(request):
    """The ops the ranks would call: the plain-PyTorch reference of their definitions, the CPU
    kernels, or the CUDA kernels run by the SIMT harness."""
    if request.param == "reference":
        yield reference_opset().lib
    elif request.param == "cpu":
        yield torch.ops.fusedloss
    else:
        from simt import load_simt_opset
        with _ops.use(load_simt_opset()) as opset:
            yield opset.lib


def _slices(sizes):
    start = 0
    for rank, size in enumerate(sizes):
        yield rank, slice(start, start + size)
        start += size


def _simulated(lib, logits, target, weight, mask, sizes, ignore_index=-100, smoothing=0.0,
               z_loss=0.0, softcap=0.0, reduction="mean", want_accuracy=False):
    """(loss, extras, global row stats, gradient of the whole logits) as the ranks would
    compute them."""
    classes = logits.shape[1]
    red = REDUCTIONS[reduction]
    acc = acc_dtype(logits.dtype)
    prob = target.is_floating_point()
    layouts, payloads = [], []
    for rank, cols in _slices(sizes):
        layout = Layout(rank, cols.start, classes, tuple(sizes))
        t = target[:, cols] if prob else target
        payload, _ = C.shard_payload(lib, logits[:, cols], t, weight, mask, ignore_index,
                                     smoothing, softcap, layout, want_accuracy)
        layouts.append(layout)
        payloads.append(payload)
    gathered = torch.stack(payloads)
    c = C.combine(gathered, layouts[0], target, weight, mask, ignore_index, smoothing, z_loss,
                  want_accuracy)
    dens = (None if red == 0 else
            C.mean_denominators(target, weight, mask, ignore_index, logits.shape[0], 0.0,
                                logits.device))
    loss, extras = C.reduce_rows(c, red, dens, acc)
    stats = c.stats.to(acc)
    mass = c.target_mass.to(acc) if c.target_mass is not None else None
    options = C.Options(ignore_index, smoothing, z_loss, softcap, red, 0.0)
    grad_loss = (torch.linspace(0.5, 1.5, logits.shape[0], dtype=acc) if red == 0
                 else torch.ones((), dtype=acc))
    grads = []
    for (rank, cols), layout in zip(_slices(sizes), layouts):
        t = target[:, cols] if prob else target
        grads.append(C.slice_grad(lib, grad_loss, logits[:, cols], t, weight, mask, stats, mass,
                                  dens, options, layout))
    return loss, extras, stats, torch.cat(grads, 1), grad_loss


CASES = {
    # name: (rows, classes, slice sizes, options)
    "plain, even": (37, 40, (20, 20), {}),
    "uneven, 4 slices": (33, 61, (1, 30, 7, 23), {}),
    "smoothing, weights, ignore": (29, 50, (17, 33), dict(smoothing=0.1, weights=True,
                                                          ignore=True)),
    "mask, z_loss, softcap": (31, 45, (15, 15, 15), dict(mask=True, z_loss=1e-3, softcap=5.0)),
    "everything": (40, 57, (10, 20, 27), dict(smoothing=0.2, weights=True, ignore=True,
                                              mask=True, z_loss=1e-2, softcap=8.0)),
}


def _case(name, dtype, prob=False, seed=0):
    rows, classes, sizes, o = CASES[name]
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3).to(dtype)
    if prob:
        target = torch.softmax(torch.randn(rows, classes, generator=g, dtype=torch.float64),
                               1).to(acc_dtype(dtype))
    else:
        target = torch.randint(0, classes, (rows,), generator=g)
        if o.get("ignore"):
            target[::5] = -100
    acc = acc_dtype(dtype)
    weight = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.5).to(acc) \
        if o.get("weights") else None
    mask = (torch.rand(rows, generator=g, dtype=torch.float64) > 0.3).to(acc) \
        if o.get("mask") else None
    kwargs = dict(smoothing=o.get("smoothing", 0.0), z_loss=o.get("z_loss", 0.0),
                  softcap=o.get("softcap", 0.0))
    return logits, target, weight, mask, sizes, kwargs


def _whole(logits, target, weight, mask, kwargs, reduction, want_accuracy):
    x = logits.clone().requires_grad_(True)
    out = fl.cross_entropy(x, target, weight, -100, reduction, kwargs["smoothing"], mask=mask,
                           z_loss=kwargs["z_loss"], softcap=kwargs["softcap"] or None,
                           return_z_loss=True, return_token_accuracy=want_accuracy,
                           return_lse=True)
    return x, out


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_combine_equals_whole_index_targets(lib, name, reduction, dtype):
    logits, target, weight, mask, sizes, kwargs = _case(name, dtype)
    loss, extras, stats, grad, grad_loss = _simulated(lib, logits, target, weight, mask, sizes,
                                                      reduction=reduction, want_accuracy=True,
                                                      **kwargs)
    x, out = _whole(logits, target, weight, mask, kwargs, reduction, True)
    tol = acc_dtype(dtype)  # the extra outputs are in the accumulation dtype on both sides
    assert_close(loss, out.loss.to(loss.dtype), dtype)  # bfloat16: the whole loss is rounded
    assert_close(extras[0], out.z_loss, tol)
    assert torch.equal(extras[1].double(), out.token_accuracy.double()), "token accuracy"
    assert_close(stats.sum(1), out.lse.reshape(-1), tol)
    out.loss.backward(grad_loss.to(out.loss.dtype) if reduction == "none" else None)
    assert_close(grad, x.grad, dtype)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("name", ["uneven, 4 slices", "everything"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_combine_equals_whole_probability_targets(lib, name, reduction, dtype):
    logits, target, weight, mask, sizes, kwargs = _case(name, dtype, prob=True)
    loss, extras, stats, grad, grad_loss = _simulated(lib, logits, target, weight, mask, sizes,
                                                      reduction=reduction, **kwargs)
    x, out = _whole(logits, target, weight, mask, kwargs, reduction, False)
    assert_close(loss, out.loss.to(loss.dtype), dtype)
    assert_close(extras[0], out.z_loss, dtype)
    out.loss.backward(grad_loss.to(out.loss.dtype) if reduction == "none" else None)
    assert_close(grad, x.grad, dtype)


def test_accuracy_ties_across_slices_take_the_first_max(lib):
    """A row whose maximum appears in two slices: torch.argmax takes the first, so a target
    in the second slice is not correct, one in the first is."""
    logits = torch.zeros(2, 6)
    logits[:, 1] = 5.0  # slice 0 holds classes 0..2
    logits[:, 4] = 5.0  # slice 1 holds classes 3..5
    target = torch.tensor([1, 4])
    loss, extras, *_ = _simulated(lib, logits, target, None, None, (3, 3), reduction="none",
                                  want_accuracy=True)
    assert extras[1].tolist() == [1.0, 0.0]


def test_all_ignored_rows_give_zero(lib):
    logits = torch.randn(5, 9)
    target = torch.full((5,), -100)
    for reduction in ("none", "mean", "sum"):
        loss, extras, stats, grad, _ = _simulated(lib, logits, target, None, None, (4, 5),
                                                  reduction=reduction, z_loss=1e-2)
        assert not loss.any() and not grad.any() and not stats.any()


def test_empty_batch(lib):
    logits = torch.randn(0, 7)
    target = torch.zeros(0, dtype=torch.int64)
    for reduction in ("none", "mean", "sum"):
        loss, extras, stats, grad, _ = _simulated(lib, logits, target, None, None, (3, 4),
                                                  reduction=reduction, want_accuracy=True)
        assert grad.shape == (0, 7) and stats.shape == (0, 2)
        assert loss.shape == ((0,) if reduction == "none" else ()) and not loss.any()
