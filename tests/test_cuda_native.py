"""The CUDA kernels on a GPU: CUDA-graph capture and replay, torch.compile on the device, no
host synchronisation, bitwise reproducibility, and row offsets beyond 2^31 elements. Skipped
(never faked) on machines without a GPU; the parity suite runs on the GPU through the
`backend` fixture's cuda parameter."""

import pytest
import torch

import fusedloss as fl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

DEV = "cuda"


def _softmax_step(x, t, w):
    loss = fl.cross_entropy(x, t, weight=w, label_smoothing=0.1, z_loss=1e-4)
    loss.backward()
    return loss


def _bce_step(x, y, m):
    loss = fl.binary_cross_entropy_with_logits(x, y, mask=m)
    loss.backward()
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(64, 1000), (4, 100000)], ids=["rows", "split"])
def test_cuda_graph_capture_and_replay(dtype, shape):
    """Forward and backward captured once, replayed on new data: the same results as eager
    (nothing in the op path synchronises with the host or allocates outside the graph pool)."""
    rows, classes = shape
    static_x = torch.randn(rows, classes, device=DEV, dtype=dtype, requires_grad=True)
    static_t = torch.randint(0, classes, (rows,), device=DEV)
    w = torch.rand(classes, device=DEV) + 0.5
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as graph capture requires
        for _ in range(2):
            static_x.grad = None
            _softmax_step(static_x, static_t, w)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_loss = _softmax_step(static_x, static_t, w)
    for _ in range(3):
        x = torch.randn(rows, classes, device=DEV, dtype=dtype)
        t = torch.randint(0, classes, (rows,), device=DEV)
        with torch.no_grad():
            static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        xe = x.clone().requires_grad_()
        eager = _softmax_step(xe, t, w)
        torch.testing.assert_close(static_loss, eager)
        torch.testing.assert_close(static_x.grad, xe.grad)


def test_cuda_graph_capture_bce():
    x = torch.randn(4096, 128, device=DEV, requires_grad=True)
    y = torch.rand(4096, 128, device=DEV)
    m = (torch.rand(4096, 1, device=DEV) < 0.8).float()
    _bce_step(x, y, m)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _bce_step(x, y, m)
    torch.cuda.current_stream().wait_stream(s)
    x.grad = None
    with torch.cuda.graph(graph):
        loss = _bce_step(x, y, m)
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    graph.replay()
    xe = x.detach().clone().requires_grad_()
    torch.testing.assert_close(loss, _bce_step(xe, y, m))
    torch.testing.assert_close(x.grad, xe.grad)


def test_no_host_synchronisation():
    """Every op of a training step (mean over a mask: the denominator is computed on the
    device; backward with grad_output 1: the scaling pass is skipped on the device)."""
    x = torch.randn(512, 32000, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 32000, (512,), device=DEV)
    m = (torch.rand(512, device=DEV) < 0.9).float()
    y = torch.randn(1024, 128, device=DEV, requires_grad=True)
    z = torch.rand(1024, 128, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fl.cross_entropy(x, t, mask=m).backward()
        out = fl.cross_entropy(x, t, mask=m, z_loss=1e-4, return_z_loss=True,
                               return_token_accuracy=True, return_lse=True)
        (out.loss + out.z_loss + out.token_accuracy + out.lse.sum()).backward()
        fl.cross_entropy(x, t, reduction="none").sum().backward()
        fl.binary_cross_entropy_with_logits(y, z, mask=z > 0.5).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_on_device(reduction):
    x = torch.randn(256, 5000, device=DEV, requires_grad=True)
    t = torch.randint(0, 5000, (256,), device=DEV)

    def f(x, t):
        out = fl.cross_entropy(x * 2.0, t, reduction=reduction, label_smoothing=0.1)
        return out if reduction == "mean" else out.square().mean()

    compiled = torch.compile(f, fullgraph=True)
    (ga,) = torch.autograd.grad(compiled(x, t), x)
    (gb,) = torch.autograd.grad(f(x, t), x)
    torch.testing.assert_close(ga, gb)


def test_bitwise_reproducible():
    x = torch.randn(3, 200000, device=DEV, requires_grad=True)  # split rows: two stages
    t = torch.randint(0, 200000, (3,), device=DEV)
    outs = []
    for _ in range(2):
        x.grad = None
        loss = fl.cross_entropy(x, t, label_smoothing=0.1)
        loss.backward()
        outs.append((loss.detach().clone(), x.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_row_offsets_beyond_2_to_the_31():
    """N x C > 2^31 elements: rows past the 2^31st element are addressed with 64-bit offsets."""
    rows, classes = 16500, 131072  # 2.16e9 elements, 4.3 GB in bfloat16
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * rows * classes * 2 + (1 << 30):
        pytest.skip("not enough GPU memory for a 2^31-element input and its gradient")
    x = torch.empty(rows, classes, device=DEV, dtype=torch.bfloat16).normal_()
    t = torch.randint(0, classes, (rows,), device=DEV)
    loss = fl.cross_entropy(x, t, reduction="none")
    tail = x[-4:].float()
    expected = torch.nn.functional.cross_entropy(tail, t[-4:], reduction="none")
    torch.testing.assert_close(loss[-4:].float(), expected, rtol=2e-2, atol=1e-2)
