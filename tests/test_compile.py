"""fusedloss under torch.compile: the gradient is written over logits the compiled graph shows
dead (one N x C buffer, as inductor's own cross-entropy), the backward allocates no second
one, compiled results equal eager ones bit for bit, dynamic shapes recompile no more than
PyTorch's loss, and (on a GPU) CUDA graphs capture the ops.

The memory tests read inductor's generated code (torch._inductor.utils.run_and_get_code): every
buffer the compiled forward and backward allocate is an `empty_strided_*` call with its shape.
"""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import fusedloss as fl
from fusedloss import _compiled

ROWS, HIDDEN, CLASSES = 24, 8, 37  # odd sizes; N x C differs from every other shape here


def linear_inputs(seed=0, rows=ROWS, classes=CLASSES):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, HIDDEN, generator=g, dtype=torch.float64).float().requires_grad_()
    W = torch.randn(classes, HIDDEN, generator=g).requires_grad_()
    t = torch.randint(0, classes, (rows,), generator=g)
    return h, W, t


def nxc_allocations(code, rows=ROWS, classes=CLASSES):
    """The N x C buffers a generated module allocates (also flat: a copy is allocated as
    (N * C,) and viewed)."""
    return re.findall(rf"empty_strided_\w+\(\(({rows}, {classes}|{rows * classes},?)\)", code)


def compiled_codes(fn, *args):
    """(forward code, backward code) of fn compiled with fullgraph, run forward+backward."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    _, codes = run_and_get_code(lambda: compiled(*args).backward())
    assert len(codes) == 2, f"expected a forward and a backward module, got {len(codes)}"
    return codes


def generated_kernel_calls(code):
    """The names of the inductor-generated kernels the module's call() runs (its C++ or
    Triton loops; extern kernels such as mm and the fusedloss ops are not among them)."""
    body = code[code.index("def call("):]
    return re.findall(r"^\s*((?:cpp|triton)_\w+?)(?:\.run)?\(", body, flags=re.M)


@pytest.mark.parametrize("inplace", [False, True])
def test_gradient_written_over_dead_logits_and_no_buffer_in_backward(inplace):
    h, W, t = linear_inputs()

    def step(h, W, t):
        return fl.cross_entropy(h @ W.t(), t, inplace_backward=inplace)

    forward, backward = compiled_codes(step, h, W, t)
    # The logits (the matmul's output) are the only N x C buffer: the loss writes its gradient
    # into them. A clone kept by the re-inplacing pass would be a second one.
    assert len(nxc_allocations(forward)) == 1, forward
    assert "softmax_ce_inplace" in forward
    # The backward scales the saved gradient where it lies, in one pass: a single generated
    # pointwise kernel over the saved (donated) buffer, no copy of it first. The mutating
    # scale_grad_ (no pass at all when grad_output is 1, in eager) would add a copy here:
    # the backward graph may not change its input, so inductor copies it (_compiled.py).
    assert nxc_allocations(backward) == [], backward
    assert len(generated_kernel_calls(backward)) == 1, backward
    assert not re.search(r"clone|copy", " ".join(generated_kernel_calls(backward))), backward


# (rows, classes): float32 logits of 0.5 MiB and more take the out-of-place kernel, smaller
# ones a copy (_route._OUT_OF_PLACE_MIN_BYTES); the sizes are odd either way.
LEAF_SHAPES = {"large": (129, 1031), "large, one row": (1, 131101), "small": (ROWS, CLASSES)}


@pytest.mark.parametrize("size", list(LEAF_SHAPES))
def test_leaf_logits_gradient_without_a_copy(size):
    """Leaf logits (a parameter, a user tensor) are never overwritten: the kernel reads them
    and writes the gradient into one buffer of its own, with no copy of the logits first (a
    copy, then the in-place kernel, moves the logits' bytes twice more); small ones are
    copied, the copy costing less than the out-of-place op's Python dispatch."""
    rows, classes = LEAF_SHAPES[size]
    g = torch.Generator().manual_seed(3)
    shape = (rows, classes) if rows > 1 else (classes,)
    x = torch.randn(shape, generator=g, requires_grad=True)
    t = torch.randint(0, classes, shape[:-1], generator=g)
    before = x.detach().clone()
    forward, backward = compiled_codes(lambda x, t: fl.cross_entropy(x, t), x, t)
    if size == "small":
        assert "softmax_ce_inplace" in forward
        assert len(generated_kernel_calls(forward)) == 1, forward  # the copy
    else:
        assert "fusedloss.softmax_ce.default" in forward and "softmax_ce_inplace" not in forward
        assert generated_kernel_calls(forward) == [], forward  # no copy of the logits
        assert nxc_allocations(forward, rows, classes) == [], forward
    assert nxc_allocations(backward, rows, classes) == [], backward
    assert len(generated_kernel_calls(backward)) == 1, backward
    assert torch.equal(x.detach(), before)
    grad = x.grad
    x.grad = None
    F.cross_entropy(x, t).backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-6, atol=1e-7)


def test_live_logits_are_not_overwritten():
    """Logits still read after the loss: the compiled graph keeps them (a copy takes the
    gradient), whatever inplace_backward says."""
    h, W, t = linear_inputs()

    def step(h, W, t):
        logits = h @ W.t()
        loss = fl.cross_entropy(logits, t, inplace_backward=True)
        return loss, logits.argmax(1), logits * 2

    torch._dynamo.reset()
    loss, argmax, doubled = torch.compile(step, fullgraph=True)(h, W, t)
    logits = (h @ W.t()).detach()
    assert torch.equal(argmax, logits.argmax(1))
    assert torch.equal(doubled, logits * 2)
    loss.backward()
    hg, Wg = h.grad, W.grad
    h.grad = W.grad = None
    F.cross_entropy(h.double() @ W.double().t(), t).backward()
    torch.testing.assert_close(hg, h.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(Wg, W.grad.float(), rtol=1e-5, atol=1e-6)


def test_leaf_logits_with_inplace_warn_once_and_stay():
    x = torch.randn(ROWS, CLASSES, requires_grad=True)
    t = torch.randint(0, CLASSES, (ROWS,))
    before = x.detach().clone()
    _compiled._warned.discard("leaf")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, t: fl.cross_entropy(x, t, inplace_backward=True),
                             fullgraph=True)
    with pytest.warns(UserWarning, match="leaf tensor"):
        compiled(x, t).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(x, t)  # once only
    assert torch.equal(x.detach(), before)
    ref = x.detach().clone().requires_grad_()
    F.cross_entropy(ref, t).backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-6, atol=1e-7)


OPTIONS = {
    "mean": dict(),
    "sum_smoothing_zloss": dict(reduction="sum", label_smoothing=0.1, z_loss=1e-3),
    "weight_ignore_softcap": dict(weight="w", ignore_index=3, softcap=5.0),
    "mask": dict(mask="m"),
    "none": dict(reduction="none"),
    "extras": dict(return_z_loss=True, return_token_accuracy=True, return_lse=True, z_loss=1e-4),
    "token_scaling_predicted": dict(token_scaling=True, return_predicted_tokens=True,
                                    label_smoothing=0.1, z_loss=1e-4, return_z_loss=True),
}


# Logits from a layer (and small leaf logits) take the compiled path's in-place kernel, leaf
# logits its out-of-place one (here at a small size: the threshold set to 0); eager without
# inplace_backward runs the out-of-place one: their gradients are the same bits (a row's
# result does not depend on its alignment).
SOURCES = ("layer", "small leaf", "leaf")
BITWISE = [(o, i, s) for o in OPTIONS for i in (False, True) for s in SOURCES]


@pytest.mark.parametrize("option,inplace,source", BITWISE)
def test_compiled_equals_eager_bitwise(option, inplace, source, monkeypatch):
    from fusedloss import _route
    if source == "leaf":
        monkeypatch.setattr(_route, "_OUT_OF_PLACE_MIN_BYTES", 0)
    h, W, t = linear_inputs(seed=1)
    x = (h @ W.t()).detach().requires_grad_()  # the leaf logits
    t[::5] = 3  # some positions at ignore_index where the option sets it
    w = torch.rand(CLASSES) + 0.5
    m = (torch.rand(ROWS) > 0.3).float()
    kwargs = {k: {"w": w, "m": m}.get(v, v) if isinstance(v, str) else v
              for k, v in OPTIONS[option].items()}
    kwargs["inplace_backward"] = inplace

    def step(h, W, x, t):
        out = fl.cross_entropy(h @ W.t() if source == "layer" else x, t, **kwargs)
        loss = out.loss if isinstance(out, fl.CrossEntropyOutput) else out
        extras = [v for v in (out[1:] if isinstance(out, tuple) else ()) if v is not None]
        return loss, extras

    results = []
    torch._dynamo.reset()
    for fn in (step, torch.compile(step, fullgraph=True)):
        h.grad = W.grad = x.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # inplace_backward with leaf logits warns
            loss, extras = fn(h, W, x, t)
        loss.backward(torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape))
        results.append([loss.detach(), *extras, h.grad, W.grad, x.grad])
    for eager, compiled in zip(*results):
        assert (eager is None) == (compiled is None)
        assert eager is None or torch.equal(eager, compiled), (eager, compiled)


def count_compiles(loss, shapes):
    """Distinct graphs dynamo compiled over the shapes (a recompile adds one)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss, dynamic=True, fullgraph=True)
    for batch, seq in shapes:
        x = torch.randn(batch, seq, CLASSES, requires_grad=True)
        t = torch.randint(0, CLASSES, (batch, seq))
        compiled(x.view(-1, CLASSES) * 1, t.view(-1)).backward()
    return counters["stats"]["unique_graphs"]


def test_dynamic_shapes_recompile_no_more_than_torch():
    shapes = [(2, 5), (3, 7), (4, 9), (3, 11)]
    torch_count = count_compiles(lambda x, t: F.cross_entropy(x, t), shapes)
    fused_count = count_compiles(lambda x, t: fl.cross_entropy(x, t), shapes)
    assert fused_count <= torch_count, (fused_count, torch_count)


@pytest.mark.skipif(not torch.cuda.is_available() or not fl.build_info()["cuda"],
                    reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_graphs_capture_the_ops(inplace):
    from torch._dynamo.utils import counters
    h, W, t = (a.detach().cuda().requires_grad_(a.requires_grad) for a in linear_inputs(2))

    def step(h, W, t):
        return fl.cross_entropy(h @ W.t(), t, inplace_backward=inplace)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        h.grad = W.grad = None
        loss = compiled(h, W, t)
        loss.backward()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    hg, Wg = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    step(h, W, t).backward()
    assert torch.equal(hg, h.grad) and torch.equal(Wg, W.grad)
