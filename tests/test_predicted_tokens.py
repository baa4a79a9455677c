"""return_predicted_tokens=True: each position's argmax over the classes of the (softcapped)
logits, int64, the target's shape, -1 where the row is not read (ignored target, mask 0);
torch.argmax's pick (the first maximum; a NaN row's first NaN). On every backend and float
dtype, with ties, through cross_entropy, linear_cross_entropy, sequence_loss, the modules, the
in-place, compiled and composed paths, and each CUDA path (rows, split) forced on the SIMT
harness."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss as fl
from cuda_kinds import NO_SPLIT, SPLIT_FEW, kind  # noqa: F401  (the fixture)
from helpers import logits
from test_cross_entropy import DTYPES, OPTIONS, make_case

# (rows, classes), each with the code path it covers
SHAPES = [
    (1, 1),  # one class: every row's argmax is 0
    (3, 7),  # classes below one vector: the scalar tail only
    (4, 17),  # one float vector and a one-element tail
    (4, 33),  # one past two float vectors
    (9, 100),  # several vectors, a ragged tail
    (37, 1000),  # many rows over threads / blocks
    (0, 5),  # empty batch
    (2, 128256),  # Llama-3 vocabulary: long rows
]

PREDICTED_OPTIONS = ["plain", "ignore_index", "ignore_index_in_range", "float_mask",
                     "bool_mask", "softcap", "everything"]


def first_argmax(z):
    """torch.argmax's pick per row of float64 z: the first maximum, the first NaN of a NaN
    row (written out, so that the reference does not lean on argmax's NaN rule)."""
    nan = z.isnan()
    is_max = torch.where(nan.any(1, keepdim=True), nan, z == z.amax(1, keepdim=True))
    return is_max.int().argmax(1)


def expected_tokens(x, target, kw):
    """The reference: the argmax of the float64 (softcapped) logits, -1 where not read."""
    z = x.detach().cpu().double()
    if kw.get("softcap") is not None:
        z = kw["softcap"] * torch.tanh(z / kw["softcap"])
    rows = z.shape[0]
    read = torch.ones(rows, dtype=torch.bool)
    if not target.is_floating_point():
        read &= target.cpu() != kw.get("ignore_index", -100)
    if kw.get("mask") is not None:
        read &= kw["mask"].cpu() != 0
    if z.shape[1] == 0 or rows == 0:
        return torch.full((rows,), -1, dtype=torch.int64)
    return torch.where(read, first_argmax(z), -1)


def on(kw, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}


@pytest.mark.parametrize("reduction", ["none", "mean"])  # loss only / loss and gradient
@pytest.mark.parametrize("option", PREDICTED_OPTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_with_minus_one_where_not_read(backend, dtype, shape, option, reduction):
    x, target, kw = make_case(*shape, dtype, backend.device, OPTIONS[option])
    kw = on(kw, backend.device)
    if "weight" in kw and dtype != torch.float64:
        kw["weight"] = kw["weight"].float()
    xa = x.clone().requires_grad_()
    out = fl.cross_entropy(xa, target, reduction=reduction, return_predicted_tokens=True, **kw)
    assert isinstance(out, fl.CrossEntropyOutput)
    assert out.predicted_tokens.dtype == torch.int64
    assert out.predicted_tokens.shape == target.shape
    assert out.predicted_tokens.device == x.device
    assert not out.predicted_tokens.requires_grad
    assert torch.equal(out.predicted_tokens.cpu(), expected_tokens(x, target, kw))
    # the loss is the one without the flag
    plain = fl.cross_entropy(x, target, reduction=reduction, **kw)
    assert torch.equal(out.loss.detach(), plain)
    assert (out.z_loss, out.token_accuracy, out.lse) == (None, None, None)


def tie_rows(dtype, classes):
    """Six rows of small integers (ties everywhere; few enough rows that a long row takes the
    split path) with planted maxima: tied near both ends, in the last element (a vector tail),
    every class equal, a NaN row; a tied row ignored, one masked."""
    x = torch.randint(-3, 3, (6, classes)).double()
    x[0, 1] = x[0, classes - 1] = 5.0
    x[1, classes - 1] = 5.0
    x[2] = 1.0
    x[3, 2] = x[3, classes - 2] = float("nan")
    x[4, 0] = x[4, classes // 2] = 7.0
    x[5, classes // 2] = x[5, classes // 2 + 1] = 6.0
    t = torch.tensor([1, 0, 3, 2, -100, 4])
    m = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0, 0.0])
    return x.to(dtype), t, m


@pytest.mark.parametrize("classes", [17, 33, 1000])  # vector tails; several vectors
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_and_nan_rows(backend, dtype, classes):
    x, t, m = tie_rows(dtype, classes)
    out = fl.cross_entropy(x.to(backend.device), t.to(backend.device), mask=m.to(backend.device),
                           reduction="none", return_predicted_tokens=True)
    expected = expected_tokens(x, t, dict(mask=m))
    assert expected.tolist() == [1, classes - 1, 0, 2, -1, -1]  # the cases as planted
    assert torch.equal(out.predicted_tokens.cpu(), expected)
    assert torch.equal(out.predicted_tokens.cpu()[x.isnan().any(1) == False],  # noqa: E712
                       torch.where((t != -100) & (m != 0), x.double().argmax(1), -1)[
                           x.isnan().any(1) == False])  # noqa: E712


CUDA_PATHS = {"rows": (NO_SPLIT, "softmax_ce_rows"),
              "split": (SPLIT_FEW, "softmax_ce_split_finish")}


@pytest.mark.parametrize("path", list(CUDA_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_every_cuda_path(kind, path, dtype, reduction):
    """Each CUDA path forced (SIMT: the launch log checked), with ties across the chunks of a
    split row (3001 classes: 2 or 3 chunks) and a NaN row."""
    cfg, kernel = CUDA_PATHS[path]
    x, t, m = tie_rows(dtype, 3001)
    with kind.run(**cfg):
        out = fl.cross_entropy(x.to(kind.device).requires_grad_(), t.to(kind.device),
                               mask=m.to(kind.device), reduction=reduction, softcap=30.0,
                               return_predicted_tokens=True, return_token_accuracy=True)
    kind.expect(kernel)
    assert torch.equal(out.predicted_tokens.cpu(), expected_tokens(x, t, dict(mask=m,
                                                                              softcap=30.0)))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_probability_targets(backend, reduction):
    """Soft labels have an argmax too; -1 where the mask is 0."""
    x, target, kw = make_case(9, 100, torch.float32, backend.device, OPTIONS["float_mask"],
                              probs=True)
    kw = on(kw, backend.device)
    out = fl.cross_entropy(x, target, reduction=reduction, return_predicted_tokens=True, **kw)
    assert torch.equal(out.predicted_tokens.cpu(), expected_tokens(x, target, kw))


@pytest.mark.parametrize("shape", [(2, 5, 3), (3, 17, 2, 4), (5,)], ids=str)
def test_nd_and_one_dimensional_input(backend, shape):
    """(N, C, d1, ...) logits: tokens of the target's shape (N, d1, ...); (C) logits: ()."""
    x = logits(shape, torch.float32, backend.device)
    target = torch.randint(0, shape[1] if len(shape) > 1 else shape[0],
                           shape[:1] + shape[2:] if len(shape) > 1 else ())
    out = fl.cross_entropy(x, target.to(backend.device), return_predicted_tokens=True)
    assert out.predicted_tokens.shape == target.shape
    assert torch.equal(out.predicted_tokens.cpu(), x.cpu().argmax(1 if len(shape) > 1 else 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_inplace_backward(backend, dtype):
    x = logits((9, 100), dtype, backend.device)
    t = torch.randint(0, 100, (9,), device=backend.device)
    t[2] = -100
    w = torch.randn(100, 100, dtype=torch.float64).to(dtype).to(backend.device) / 10
    xa = x.clone().requires_grad_()
    layer = xa @ w
    expected = expected_tokens(layer, t, {})
    out = fl.cross_entropy(layer, t, inplace_backward=True, return_predicted_tokens=True)
    out.loss.backward()
    assert torch.equal(out.predicted_tokens.cpu(), expected)


@pytest.mark.parametrize("chunk_loop", ["host", "device"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("option", ["plain", "everything"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_linear_cross_entropy(backend, dtype, option, reduction, chunk_loop, monkeypatch):
    """From the chunks of the fused linear cross-entropy (several, a short last one; in the CPU's
    chunk loop the skipped rows are in no chunk, in the GPU's, FUSEDLOSS_TEST_DEVICE_CHUNKS,
    every row is): the argmax of the logits x W^T + b, as cross_entropy gives it on the
    materialised logits. Row 0's logits tie at three classes."""
    monkeypatch.setenv("FUSEDLOSS_TEST_DEVICE_CHUNKS", "1" if chunk_loop == "device" else "0")
    from test_linear_cross_entropy import make_case as make_linear_case
    x, w, b, target, kw = make_linear_case(37, 16, 50, dtype, backend.device, OPTIONS[option])
    kw = on(kw, backend.device)
    if "weight" in kw and dtype != torch.float64:
        kw["weight"] = kw["weight"].float()
    x[0] = 0
    x[0, 0] = 1
    x[1:, 0] = 0  # the other rows do not see the planted column
    w[3, 0] = w[7, 0] = w[10, 0] = 100  # row 0: classes 3, 7, 10 tie at the max
    b[[3, 7, 10]] = 0
    target[0] = 2
    if "mask" in kw:
        kw["mask"][0] = 1
    out = fl.linear_cross_entropy(x.requires_grad_(), w, target, linear_bias=b,
                                  reduction=reduction, chunk_size=8,
                                  return_predicted_tokens=True, **kw)
    materialised = fl.cross_entropy(F.linear(x.detach(), w, b), target, reduction=reduction,
                                    return_predicted_tokens=True, **kw)
    assert out.predicted_tokens.dtype == torch.int64 and out.predicted_tokens.shape == (37,)
    assert out.predicted_tokens[0] == 3
    logits64 = F.linear(x.detach().double(), w.double(), b.double())
    expected = expected_tokens(logits64, target, kw)
    got = out.predicted_tokens.cpu()
    if chunk_loop == "device" and dtype == torch.bfloat16:
        # the GPU's chunks hold bfloat16 logits: a row's argmax is one of its classes within
        # the rounding of the logits (2^-8 relative) of the float64 maximum
        read = expected != -1
        assert torch.equal(got == -1, ~read)
        z = logits64[read]
        top = z.amax(1)
        picked = z.gather(1, got[read][:, None])[:, 0]
        assert (top - picked <= 2 ** -7 * top.abs().clamp(min=1)).all()
        return
    assert torch.equal(got, expected)
    if dtype != torch.bfloat16:  # (materialised bfloat16 logits are rounded: other near-ties)
        assert torch.equal(out.predicted_tokens, materialised.predicted_tokens)


def test_linear_cross_entropy_nd_positions_and_module():
    torch.manual_seed(0)
    module = fl.LinearCrossEntropyLoss(8, 20, bias=True, reduction="none", return_z_loss=True,
                                       return_token_accuracy=True, return_predicted_tokens=True,
                                       z_loss=1e-3)
    x = torch.randn(2, 3, 8)
    t = torch.randint(0, 20, (2, 3))
    t[0, 1] = -100
    out = module(x, t)
    expected = fl.linear_cross_entropy(x, module.linear.weight, t,
                                       linear_bias=module.linear.bias, reduction="none",
                                       z_loss=1e-3, return_z_loss=True,
                                       return_token_accuracy=True,
                                       return_predicted_tokens=True)
    for a, e in zip(out, expected):
        assert (a is None) == (e is None)
        assert a is None or torch.equal(a, e)
    assert out.predicted_tokens.shape == (2, 3) and out.predicted_tokens[0, 1] == -1
    logits_ = module.linear(x).detach()
    assert torch.equal(out.predicted_tokens, torch.where(t != -100, logits_.argmax(-1), -1))
    assert out.z_loss.shape == (2, 3) and out.token_accuracy.shape == (2, 3)
    # without the flags the module returns the loss alone
    plain = fl.LinearCrossEntropyLoss(8, 20)
    assert isinstance(plain(x, t), torch.Tensor)


def test_cross_entropy_module_and_positional_unpacking():
    """CrossEntropyLoss's flag; the new field is the last, so that code unpacking the first
    four fields by position keeps working."""
    x = torch.randn(6, 20)
    t = torch.randint(0, 20, (6,))
    out = fl.CrossEntropyLoss(return_lse=True, return_predicted_tokens=True)(x, t)
    loss, z_loss, accuracy, lse, predicted = out
    assert z_loss is None and accuracy is None and lse.shape == (6,)
    assert torch.equal(predicted, x.argmax(1))
    assert fl.CrossEntropyOutput._fields[-1] == "predicted_tokens"
    assert fl.CrossEntropyOutput(loss).predicted_tokens is None
    loss4, _z, _a, _l = fl.cross_entropy(x, t, return_lse=True)[:4]
    assert torch.equal(loss4, loss)


@pytest.mark.parametrize("averages", [(True, True), (True, False), (False, True),
                                      (False, False)], ids=str)
def test_sequence_loss(backend, averages):
    """(batch, time) tokens whatever the averaging; -1 where the weight is 0."""
    x = logits((3, 5, 11), torch.float32, backend.device)
    t = torch.randint(0, 11, (3, 5), device=backend.device)
    w = torch.rand(3, 5, device=backend.device)
    w[1, 2] = 0
    out = fl.sequence_loss(x, t, w, *averages, return_predicted_tokens=True)
    expected = torch.where(w.cpu() != 0, x.cpu().argmax(-1), -1)
    assert out.predicted_tokens.shape == (3, 5)
    assert torch.equal(out.predicted_tokens.cpu(), expected)
    assert torch.equal(out.loss, fl.sequence_loss(x, t, w, *averages))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_func_compositions(reduction):
    """Under torch.func (the compositions) and forward-mode AD the tokens are the kernels'."""
    x, t, m = tie_rows(torch.float64, 33)
    x[3] = torch.randn(33, dtype=torch.float64)  # no NaN: its gradient would be NaN everywhere
    kw = dict(reduction=reduction, mask=m, softcap=4.0, return_predicted_tokens=True)
    kernel = fl.cross_entropy(x, t, **kw).predicted_tokens

    def f(x):
        out = fl.cross_entropy(x, t, **kw)
        return out.loss.sum(), out.predicted_tokens

    _grad, composed = torch.func.grad(f, has_aux=True)(x)
    assert torch.equal(composed, kernel)
    assert torch.equal(torch.func.vmap(lambda x: fl.cross_entropy(x, t, **kw).predicted_tokens)(
        x[None])[0], kernel)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.randn_like(x))
        assert torch.equal(fl.cross_entropy(dual, t, **kw).predicted_tokens, kernel)
    assert torch.equal(kernel, expected_tokens(x, t, dict(mask=m, softcap=4.0)))


def test_linear_composition():
    """linear_cross_entropy under a torch.func transform: the definition, same tokens."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    w = torch.randn(13, 8, dtype=torch.float64)
    t = torch.randint(0, 13, (2, 5))
    t[1, 1] = -100
    kernel = fl.linear_cross_entropy(x, w, t, return_predicted_tokens=True)

    def f(x):
        out = fl.linear_cross_entropy(x, w, t, return_predicted_tokens=True,
                                      token_scaling=True)
        return out.loss, out.predicted_tokens

    _grad, composed = torch.func.grad(f, has_aux=True)(x)
    assert composed.shape == (2, 5)
    assert torch.equal(composed, kernel.predicted_tokens)
    assert torch.equal(composed, torch.where(t != -100, (x @ w.T).argmax(-1), -1))


def test_compiled_equals_eager():
    torch.manual_seed(0)
    t = torch.randint(0, 40, (16,))
    t[3] = -100
    h = torch.randn(16, 16)
    w = torch.randn(40, 16, requires_grad=True)

    def step(h, w):
        out = fl.cross_entropy(h @ w.t(), t, return_predicted_tokens=True,
                               return_token_accuracy=True)
        return out.loss, out.predicted_tokens, out.token_accuracy

    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        w.grad = None
        loss, predicted, accuracy = fn(h, w)
        loss.backward()
        results.append((loss.detach(), predicted, accuracy, w.grad.clone()))
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled)
    assert torch.equal(results[0][1], torch.where(t != -100, (h @ w.t()).argmax(1), -1))


def test_errors():
    x = torch.randn(3, 5)
    t = torch.randint(0, 5, (3,))
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match=r"return_predicted_tokens must be True or False, "
                                            rf"got {bad!r}"):
            fl.cross_entropy(x, t, return_predicted_tokens=bad)
        with pytest.raises(TypeError, match=r"return_predicted_tokens must be True or False"):
            fl.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), t,
                                    return_predicted_tokens=bad)
        with pytest.raises(TypeError, match=r"return_predicted_tokens must be True or False"):
            fl.sequence_loss(x[None], t[None], torch.ones(1, 3), return_predicted_tokens=bad)


FLAGS = ["return_z_loss", "return_token_accuracy", "return_predicted_tokens"]
FLAG_SETS = [dict(zip(FLAGS, bits)) for bits in
             [(False, False, False), (True, False, False), (False, True, False),
              (False, False, True), (True, True, True)]]


@pytest.mark.parametrize("flags", FLAG_SETS,
                         ids=["+".join(k[7:] for k, v in f.items() if v) or "none"
                              for f in FLAG_SETS])
@pytest.mark.parametrize("entry", ["cross_entropy", "linear_cross_entropy", "module"])
def test_structured_output(entry, flags):
    """The loss alone without a flag; with flags a CrossEntropyOutput whose fields are None
    exactly where not asked for, carry no gradient, and leave the loss as it is."""
    torch.manual_seed(0)
    x = torch.randn(7, 8, requires_grad=True)
    w = torch.randn(13, 8)
    t = torch.randint(0, 13, (7,))
    t[2] = -100
    kw = dict(z_loss=1e-3)
    if entry == "cross_entropy":
        def call(**f):
            return fl.cross_entropy(x @ w.t(), t, **kw, **f)
    elif entry == "linear_cross_entropy":
        def call(**f):
            return fl.linear_cross_entropy(x, w, t, **kw, **f)
    else:
        def call(**f):
            module = fl.LinearCrossEntropyLoss(8, 13, **kw, **f)
            module.linear.weight.data.copy_(w)
            return module(x, t)
    plain = call()
    out = call(**flags)
    if not any(flags.values()):
        assert isinstance(out, torch.Tensor)
        assert torch.equal(out, plain)
        return
    assert isinstance(out, fl.CrossEntropyOutput)
    assert torch.equal(out.loss, plain)
    assert out.lse is None
    for field, flag in zip(("z_loss", "token_accuracy", "predicted_tokens"), FLAGS):
        value = getattr(out, field)
        assert (value is None) == (not flags[flag]), field
        assert value is None or not value.requires_grad
    out.loss.backward()
    assert x.grad is not None
    if flags["return_predicted_tokens"]:
        logits_ = (x @ w.t()).detach()
        assert torch.equal(out.predicted_tokens, torch.where(t != -100, logits_.argmax(1), -1))
