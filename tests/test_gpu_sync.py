"""No host synchronisation on the single-device CUDA paths: fl.cross_entropy,
fl.binary_cross_entropy_with_logits and fl.linear_cross_entropy, forward and backward, every
reduction, every floating dtype the kernels take, with and without a mask and a weight, and with
grad_output 1 and != 1, run under torch.cuda.set_sync_debug_mode("error") (a synchronising CUDA
call raises). Each step runs once before, outside the check (one-time set-up such as a cuBLAS
handle is not what the check is about), then once under it. Skipped without a GPU; bench/
gpu_check.sh runs this file in its `sync` stage."""

import contextlib

import pytest
import torch

import fusedloss as fl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

DEV = "cuda"
REDUCTIONS = ["mean", "sum", "none"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTIONS = ["plain", "mask and weight"]


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def backward(loss, go):
    """grad_output go for a reduced loss; a ones-weighted sum (times go) for reduction none."""
    total = loss.sum() if loss.dim() else loss
    (total if go == 1.0 else total * go).backward()


def checked(step):
    step()  # warm-up
    with no_sync():
        step()
    torch.cuda.synchronize()


@pytest.mark.parametrize("go", [1.0, 2.5], ids=["go1", "go2.5"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(256, 32000), (4, 100000)], ids=["rows", "split"])
def test_cross_entropy_no_sync(shape, reduction, dtype, options, go):
    rows, classes = shape
    x = torch.randn(rows, classes, device=DEV, dtype=dtype, requires_grad=True)
    t = torch.randint(0, classes, (rows,), device=DEV)
    t[::5] = -100
    kw = {}
    if options != "plain":
        kw = dict(weight=torch.rand(classes, device=DEV) + 0.5,
                  mask=(torch.rand(rows, device=DEV) < 0.8).float(), label_smoothing=0.1)

    def step():
        x.grad = None
        backward(fl.cross_entropy(x, t, reduction=reduction, **kw), go)

    checked(step)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_extras_and_inplace_no_sync(reduction):
    x0 = torch.randn(512, 32000, device=DEV, dtype=torch.bfloat16)
    t = torch.randint(0, 32000, (512,), device=DEV)
    m = (torch.rand(512, device=DEV) < 0.9).float()
    one = torch.ones((), device=DEV, requires_grad=True)

    def step():
        x = x0 * one  # a non-leaf the in-place backward may overwrite
        out = fl.cross_entropy(x, t, mask=m, reduction=reduction, z_loss=1e-4,
                               return_z_loss=True, return_token_accuracy=True,
                               inplace_backward=True)
        (out.loss.sum() + out.z_loss.sum() + out.token_accuracy.sum()).backward()

    checked(step)


@pytest.mark.parametrize("go", [1.0, 2.5], ids=["go1", "go2.5"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_no_sync(reduction, dtype, options, go):
    x = torch.randn(1024, 512, device=DEV, dtype=dtype, requires_grad=True)
    y = (torch.rand(1024, 512, device=DEV) < 0.05).to(dtype)
    kw = {}
    if options != "plain":
        kw = dict(weight=torch.rand(512, device=DEV) + 0.5,
                  pos_weight=torch.rand(512, device=DEV) + 0.5,
                  mask=torch.rand(1024, 1, device=DEV) < 0.8)

    def step():
        x.grad = None
        backward(fl.binary_cross_entropy_with_logits(x, y, reduction=reduction, **kw), go)

    checked(step)


@pytest.mark.parametrize("go", [1.0, 2.5], ids=["go1", "go2.5"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_no_sync(reduction, dtype, options, go):
    n, h, v = 1024, 256, 8000
    x = torch.randn(n, h, device=DEV, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, h, device=DEV) * h ** -0.5).to(dtype).requires_grad_()
    b = torch.zeros(v, device=DEV, dtype=dtype, requires_grad=True)
    t = torch.randint(0, v, (n,), device=DEV)
    t[::5] = -100
    kw = {}
    if options != "plain":
        kw = dict(weight=torch.rand(v, device=DEV) + 0.5,
                  mask=(torch.rand(n, device=DEV) < 0.8).float(), label_smoothing=0.1)

    def step():
        x.grad = w.grad = b.grad = None
        backward(fl.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                         chunk_size=256, **kw), go)

    checked(step)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_frozen_weight_and_autocast_no_sync(reduction):
    """A frozen head (no weight GEMM) and an autocast float16 step with a loss scale."""
    n, h, v = 1024, 256, 8000
    x = torch.randn(n, h, device=DEV, requires_grad=True)
    w = torch.randn(v, h, device=DEV) * h ** -0.5
    w2 = w.clone().requires_grad_()
    t = torch.randint(0, v, (n,), device=DEV)
    t[::5] = -100

    def step():
        x.grad = w2.grad = None
        backward(fl.linear_cross_entropy(x, w, t, reduction=reduction), 1.0)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = fl.linear_cross_entropy(x, w2, t, reduction=reduction)
        backward(loss.float(), 65536.0)

    checked(step)
