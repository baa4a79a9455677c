"""Vocab-parallel cross-entropy on torch.distributed (gloo on the CPU; NCCL with >= 2 GPUs).

Each rank holds a contiguous slice of the classes (uneven slices too); targets are global class
ids. The loss must be the same on every rank, bit for bit, and equal fusedloss.cross_entropy on
the gathered logits and the float64 PyTorch reference; each rank's gradient must be its slice of
the single-process gradient. The test starts its own processes (tests/distributed_harness.py):
one pool per world size for the whole module, every run bounded by a timeout that kills the
workers and fails the test, so nothing hangs.

The cases below run inside the workers; every rank builds the same full problem from the same
seed and keeps its slice, so each rank can check itself against the single-process results.
"""

import functools
import os
import sys
import types
import zlib

import pytest
import torch
import torch.nn.functional as F

import fusedloss as fl
import reference as ref
from conftest import HAVE_SIMT
from distributed_harness import (CopyToParallelRegion, SliceOfReplicated, WorkerPool,
                                 class_slices, gather_classes)
from helpers import assert_close

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
IGNORE = -1  # not torch's default, so that the argument is really passed on

# what each option set exercises (every one is also run with each reduction)
OPTIONS = {
    "plain": {},
    "ignore_index": {"ignore": True},
    "class_weight": {"weight": True, "ignore": True},
    "class_weight_only": {"weight": True},
    "label_smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 1e-2, "ignore": True},
    "softcap": {"softcap": 4.0},
    "float_mask": {"mask": "float", "ignore": True},
    "bool_mask": {"mask": "bool"},
    "everything": {"weight": True, "ignore": True, "label_smoothing": 0.1, "z_loss": 1e-2,
                   "softcap": 5.0, "mask": "float"},
    "probabilities": {"probs": True},
    "probabilities_all_options": {"probs": True, "weight": True, "label_smoothing": 0.1,
                                  "z_loss": 1e-2, "softcap": 5.0, "mask": "float"},
    "extra_outputs": {"ignore": True, "mask": "float", "z_loss": 1e-2, "return_z_loss": True,
                      "return_token_accuracy": True},
    "predicted_tokens": {"ignore": True, "mask": "float", "softcap": 5.0,
                         "return_predicted_tokens": True},
}
REDUCTIONS = ["mean", "sum", "none"]
WORLD_SIZES = [2, 4]


# --- the problems (built identically on every rank) -----------------------------------------

def _generator(seed):
    return torch.Generator().manual_seed(seed)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_problem(seed, rows, classes, dtype, option, targets="random", slices=None,
                 extra_dims=()):
    """Full logits (rows, classes, *extra_dims) rounded to dtype, the global target and the
    keyword arguments of fusedloss.cross_entropy (class weight in the accumulation dtype)."""
    g = _generator(seed)
    positions = (rows,) + tuple(extra_dims)
    x = (torch.randn((rows, classes) + tuple(extra_dims), generator=g, dtype=torch.float64)
         * 3).to(dtype)
    kw = {}
    if option.get("probs"):
        target = torch.softmax(torch.randn(x.shape, generator=g, dtype=torch.float64) * 2,
                               1).to(dtype)
    else:
        low, high = 0, classes
        if targets == "one_rank":  # every target in the last rank's slice
            low, high = slices[-1]
        target = torch.randint(low, high, positions, generator=g)
        if option.get("ignore") or targets == "all_ignored":
            kw["ignore_index"] = IGNORE
            ignored = torch.rand(positions, generator=g) < 0.3
            if targets == "all_ignored":
                ignored[...] = True
            target[ignored] = IGNORE
    if option.get("weight"):
        kw["weight"] = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.1).to(
            acc_dtype(dtype))
    if option.get("mask") == "float":
        m = torch.rand(positions, generator=g, dtype=torch.float64) * 2
        m[torch.rand(positions, generator=g) < 0.3] = 0
        kw["mask"] = m.to(acc_dtype(dtype))
    elif option.get("mask") == "bool":
        kw["mask"] = torch.rand(positions, generator=g) < 0.7
    for k in ("label_smoothing", "z_loss", "softcap", "return_z_loss", "return_token_accuracy",
              "return_predicted_tokens"):
        if k in option:
            kw[k] = option[k]
    return x, target, kw


def grad_output(seed, like):
    """The same random incoming gradient on every rank (never exactly 1)."""
    g = torch.rand(like.shape, generator=_generator(seed + 1), dtype=torch.float64) * 2 + 0.5
    return g.to(like.dtype).to(like.device)


def reference_kwargs(kw):
    """fusedloss keyword arguments -> tests/reference.py's (no return_* flags)."""
    return {k: v for k, v in kw.items() if not k.startswith("return_")}


def on_device(kw, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}


def local_slice(t, slices, rank, dim=1):
    start, stop = slices[rank]
    return t.narrow(dim, start, stop - start).contiguous()


def split(out):
    """(loss, z_loss, token_accuracy) of a loss or a CrossEntropyOutput."""
    if isinstance(out, tuple):
        return out.loss, out.z_loss, out.token_accuracy
    return out, None, None


def assert_same_predicted_tokens(out, single):
    """The predicted tokens of a distributed call are the single-process call's, exactly."""
    got, want = (getattr(o, "predicted_tokens", None) for o in (out, single))
    assert (got is None) == (want is None)
    if want is not None:
        assert got.dtype == torch.int64 and torch.equal(got.cpu(), want)


def bits(t):
    """The bytes of a tensor, for bitwise comparisons across ranks and runs."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


# --- the cases (run on every rank) ----------------------------------------------------------

def case_cross_entropy(ctx, seed, rows, classes, dtype, option, reduction, uneven=False,
                       targets="random", extra_dims=(), kernels="cpu"):
    """The distributed loss and gradient of this rank's slice against single-process
    fusedloss and the float64 reference on the full logits; then the same call again, which
    must give the same bits. kernels="simt": every fusedloss call, distributed and single-
    process, runs the CUDA kernels in the SIMT emulator (tests/simt/)."""
    if kernels == "simt":
        from fusedloss import _ops
        from simt import load_simt_opset

        with _ops.use(load_simt_opset()):
            return case_cross_entropy(ctx, seed, rows, classes, dtype, option, reduction,
                                      uneven, targets, extra_dims)
    option = OPTIONS[option] if isinstance(option, str) else option
    slices = class_slices(classes, ctx.world_size, uneven)
    x_full, target, kw = make_problem(seed, rows, classes, dtype, option, targets, slices,
                                      extra_dims)
    # probability targets: each rank passes its slice of the probabilities
    t_local = local_slice(target, slices, ctx.rank) if target.is_floating_point() else target

    def distributed():
        x = local_slice(x_full, slices, ctx.rank).to(ctx.device).requires_grad_()
        out = fl.cross_entropy(x, t_local.to(ctx.device), reduction=reduction,
                               process_group=ctx.group, **on_device(kw, ctx.device))
        loss, z_part, accuracy = split(out)
        g = grad_output(seed, loss)
        loss.backward(g)
        return loss.detach().cpu(), z_part, accuracy, x.grad.cpu(), out

    loss, z_part, accuracy, grad, out = distributed()

    xs = x_full.clone().requires_grad_()
    single = fl.cross_entropy(xs, target, reduction=reduction, **kw)
    assert_same_predicted_tokens(out, single)
    s_loss, s_z, s_accuracy = split(single)
    s_loss.backward(grad_output(seed, s_loss))
    xr = x_full.detach().double().clone().requires_grad_()
    expected = ref.cross_entropy(xr, target, reduction=reduction, **reference_kwargs(kw))
    expected.backward(grad_output(seed, s_loss).double())

    assert loss.dtype == s_loss.dtype and loss.shape == s_loss.shape, (loss, s_loss)
    assert grad.dtype == dtype and grad.shape == local_slice(x_full, slices, ctx.rank).shape
    assert_close(loss, s_loss, dtype)
    assert_close(loss, expected, dtype)
    assert_close(grad, local_slice(xs.grad, slices, ctx.rank), dtype)
    assert_close(grad, local_slice(xr.grad, slices, ctx.rank), dtype)
    for got, want, name in ((z_part, s_z, "z_loss"), (accuracy, s_accuracy, "token_accuracy")):
        assert (got is None) == (want is None), name
        if want is not None:
            assert got.dtype == want.dtype and got.shape == want.shape, (name, got, want)
            assert_close(got.cpu(), want, dtype)

    again = distributed()
    assert torch.equal(bits(again[0]), bits(loss)), "a second call gave other loss bits"
    assert torch.equal(bits(again[3]), bits(grad)), "a second call gave other gradient bits"
    return dict(loss=bits(loss), z_loss=None if z_part is None else bits(z_part),
                accuracy=None if accuracy is None else bits(accuracy))


def case_predicted_tokens(ctx, seed, classes, dtype, reduction, kernels="cpu"):
    """return_predicted_tokens through the vocab-parallel path: each row's first argmax over
    the whole vocabulary, the same on every rank and equal to the single-process call's, with
    maxima tied across two ranks' slices (the lower rank's wins, as torch.argmax's first
    maximum), a NaN row, an ignored row and a masked one (-1); and token_scaling refused on
    every rank with a clear error."""
    if kernels == "simt":
        from fusedloss import _ops
        from simt import load_simt_opset

        with _ops.use(load_simt_opset()):
            return case_predicted_tokens(ctx, seed, classes, dtype, reduction)
    slices = class_slices(classes, ctx.world_size, uneven=True)
    g = _generator(seed)
    x = (torch.randn(7, classes, generator=g, dtype=torch.float64) * 3).to(dtype)
    x[0, 1] = x[0, classes - 1] = 50  # tied in the first and the last rank's slices
    x[1, classes - 1] = 50  # in the last slice only
    x[2] = 1  # every class tied: class 0
    x[3, slices[-1][0]] = float("nan")  # a NaN row: its first NaN
    target = torch.randint(0, classes, (7,), generator=g)
    target[4] = IGNORE
    mask = torch.ones(7)
    mask[5] = 0
    kw = dict(ignore_index=IGNORE, mask=mask, softcap=20.0, reduction=reduction,
              return_predicted_tokens=True)
    x_local = local_slice(x, slices, ctx.rank).to(ctx.device).requires_grad_()
    out = fl.cross_entropy(x_local, target.to(ctx.device), process_group=ctx.group,
                           **on_device(kw, ctx.device))
    out.loss.sum().backward()
    single = fl.cross_entropy(x, target, **kw)
    predicted = out.predicted_tokens.cpu()
    assert predicted.dtype == torch.int64 and predicted.shape == (7,)
    assert torch.equal(predicted, single.predicted_tokens)
    assert predicted[:6].tolist() == [1, classes - 1, 0, slices[-1][0], -1, -1]
    assert_close(out.loss.detach().cpu(), single.loss, dtype)
    with pytest.raises(NotImplementedError, match="token_scaling=True is not supported with "
                                                  "process_group"):
        fl.cross_entropy(x_local, target.to(ctx.device), process_group=ctx.group,
                         token_scaling=True)
    return bits(predicted)


def case_gradcheck(ctx, seed, rows, classes, option, reduction):
    """gradcheck (default settings, float64) of the distributed loss as a function of the full
    logits: each rank's loss reads its slice (SliceOfReplicated), so the finite differences
    go through the whole distributed forward and the analytic Jacobian is every rank's local
    backward, gathered."""
    option = OPTIONS[option]
    slices = class_slices(classes, ctx.world_size, uneven=True)
    x_full, target, kw = make_problem(seed, rows, classes, torch.float64, option, "random",
                                      slices)
    probs = target.is_floating_point()

    def f(x):
        local = SliceOfReplicated.apply(x, ctx.group, 1, slices, ctx.rank)
        t = local_slice(target, slices, ctx.rank) if probs else target
        return split(fl.cross_entropy(local, t, reduction=reduction, process_group=ctx.group,
                                      **kw))[0]

    assert torch.autograd.gradcheck(f, (x_full.requires_grad_(),))
    return True


def case_sequence_loss(ctx, seed, batch, time, classes, dtype, across_timesteps, across_batch,
                       label_smoothing):
    """fl.sequence_loss(process_group=) on (batch, time, classes slice) logits."""
    slices = class_slices(classes, ctx.world_size, uneven=True)
    g = _generator(seed)
    logits = (torch.randn(batch, time, classes, generator=g, dtype=torch.float64) * 3).to(dtype)
    targets = torch.randint(0, classes, (batch, time), generator=g)
    weights = torch.rand(batch, time, generator=g, dtype=torch.float64).to(dtype)
    weights[:, -2:] = 0  # padding
    kw = dict(average_across_timesteps=across_timesteps, average_across_batch=across_batch,
              label_smoothing=label_smoothing)
    x = local_slice(logits, slices, ctx.rank, dim=2).requires_grad_()
    loss = fl.sequence_loss(x, targets, weights, process_group=ctx.group, **kw)
    loss.backward(grad_output(seed, loss))
    xs = logits.clone().requires_grad_()
    single = fl.sequence_loss(xs, targets, weights, **kw)
    single.backward(grad_output(seed, single))
    assert loss.shape == single.shape and loss.dtype == single.dtype
    assert_close(loss, single, dtype)
    assert_close(x.grad, local_slice(xs.grad, slices, ctx.rank, dim=2), dtype)
    if not label_smoothing:  # TF r1.4's formula, transcribed
        expected = ref.sequence_loss(logits, targets, weights, across_timesteps, across_batch)
        assert_close(loss, expected, dtype)
    return bits(loss)


def case_module(ctx, seed, rows, classes, reduction):
    """fl.CrossEntropyLoss(process_group=...) against the single-process module."""
    option = OPTIONS["everything"]
    slices = class_slices(classes, ctx.world_size, uneven=True)
    x_full, target, kw = make_problem(seed, rows, classes, torch.float32, option, "random",
                                      slices)
    mask = kw.pop("mask")
    args = dict(weight=kw["weight"], ignore_index=kw["ignore_index"], reduction=reduction,
                label_smoothing=kw["label_smoothing"], z_loss=kw["z_loss"],
                softcap=kw["softcap"])
    module = fl.CrossEntropyLoss(**args, process_group=ctx.group)
    x = local_slice(x_full, slices, ctx.rank).requires_grad_()
    loss = module(x, target, mask=mask)
    loss.backward(grad_output(seed, loss))
    xs = x_full.clone().requires_grad_()
    single = fl.CrossEntropyLoss(**args)(xs, target, mask=mask)
    single.backward(grad_output(seed, single))
    assert_close(loss, single, torch.float32)
    assert_close(x.grad, local_slice(xs.grad, slices, ctx.rank), torch.float32)
    return bits(loss)


def case_linear_cross_entropy(ctx, seed, rows, hidden, classes, dtype, option, reduction, bias):
    """fl.linear_cross_entropy(process_group=) with the head weight split by classes (each rank
    (V_r, H)): loss, the (all-reduced) input gradient and this rank's weight and bias
    gradients against the single-process function on the full weight."""
    option = OPTIONS[option]
    slices = class_slices(classes, ctx.world_size, uneven=True)
    g = _generator(seed)
    x = torch.randn(rows, hidden, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(classes, hidden, generator=g, dtype=torch.float64) * 3 / hidden ** 0.5
         ).to(dtype)
    b = torch.randn(classes, generator=g, dtype=torch.float64).to(dtype) if bias else None
    _, target, kw = make_problem(seed + 7, rows, classes, dtype, option, "random", slices)
    t_local = local_slice(target, slices, ctx.rank) if target.is_floating_point() else target
    chunk = 5  # several row chunks, the last one short

    def leaf(t):
        return None if t is None else t.detach().clone().requires_grad_()

    xa, wa = leaf(x), leaf(local_slice(w, slices, ctx.rank, dim=0))
    ba = leaf(None if b is None else local_slice(b, slices, ctx.rank, dim=0))
    out = fl.linear_cross_entropy(xa, wa, t_local,
                                  linear_bias=ba, reduction=reduction, chunk_size=chunk,
                                  process_group=ctx.group, **kw)
    loss, z_part, accuracy = split(out)
    loss.backward(grad_output(seed, loss))

    xs, ws, bs = leaf(x), leaf(w), leaf(b)
    single = fl.linear_cross_entropy(xs, ws, target, linear_bias=bs, reduction=reduction,
                                     chunk_size=chunk, **kw)
    s_loss, s_z, s_accuracy = split(single)
    s_loss.backward(grad_output(seed, s_loss))

    assert loss.shape == s_loss.shape and loss.dtype == s_loss.dtype
    assert_close(loss, s_loss, dtype)
    assert_same_predicted_tokens(out, single)
    assert_close(xa.grad, xs.grad, dtype)  # every rank: the full input gradient
    assert_close(wa.grad, local_slice(ws.grad, slices, ctx.rank, dim=0), dtype)
    if bias:
        assert_close(ba.grad, local_slice(bs.grad, slices, ctx.rank, dim=0), dtype)
    for got, want in ((z_part, s_z), (accuracy, s_accuracy)):
        assert (got is None) == (want is None)
        if want is not None:
            assert_close(got, want, dtype)
    return dict(loss=bits(loss), grad_input=bits(xa.grad))


def case_dtensor_loss_parallel(ctx, seed, rows, classes, reduction, option, target_kind):
    """A DTensor sharded on the class dim: fusedloss returns what PyTorch's loss_parallel()
    returns (a DTensor of the same placements), with the same value and the same gradient
    (sharded as the input)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = DeviceMesh.from_group(ctx.group, ctx.device.type)
    x_full, target, kw = make_problem(seed, rows, classes, torch.float32, OPTIONS[option])
    if target_kind == "dtensor":  # as loss_parallel's own examples hold labels
        target = distribute_tensor(target, mesh, [Replicate()])
    ours = distribute_tensor(x_full, mesh, [Shard(1)]).requires_grad_()
    theirs = distribute_tensor(x_full, mesh, [Shard(1)]).requires_grad_()

    loss = fl.cross_entropy(ours, target, reduction=reduction, **kw)
    with loss_parallel():  # its backward must run inside the context too
        expected = F.cross_entropy(theirs, target, reduction=reduction, **kw)
        g = distribute_tensor(grad_output(seed, expected.to_local()), mesh, [Replicate()])
        (expected * g).sum().backward()
    assert type(loss) is type(expected), (type(loss), type(expected))
    assert loss.placements == expected.placements, (loss.placements, expected.placements)
    assert loss.shape == expected.shape and loss.dtype == expected.dtype
    (loss * g).sum().backward()
    assert_close(loss.full_tensor(), expected.full_tensor().double(), torch.float32)
    assert isinstance(ours.grad, DTensor) and ours.grad.placements == theirs.grad.placements
    assert_close(ours.grad.to_local(), theirs.grad.to_local().double(), torch.float32)
    # the predicted tokens come back as a DTensor of the positions, the single process's
    out = fl.cross_entropy(ours.detach(), target, reduction=reduction,
                           return_predicted_tokens=True, **kw)
    assert isinstance(out.predicted_tokens, DTensor)
    full_target = target.full_tensor() if isinstance(target, DTensor) else target
    single = fl.cross_entropy(x_full, full_target, reduction=reduction,
                              return_predicted_tokens=True, **kw)
    assert torch.equal(out.predicted_tokens.full_tensor(), single.predicted_tokens)
    return bits(loss.full_tensor())


def _char_lm_data(seed, steps, batch, context):
    sys.path.insert(0, EXAMPLES)
    from next_token import zen_of_python

    text = zen_of_python()
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text])
    g = _generator(seed)
    batches = []
    for _ in range(steps):
        starts = torch.randint(len(data) - context, (batch,), generator=g)
        windows = torch.stack([data[s:s + context + 1] for s in starts.tolist()])
        batches.append((windows[:, :-1], windows[:, 1:]))
    return vocab, batches


def case_train_char_lm(ctx, seed, steps, head):
    """examples/next_token.py's character LSTM trained for a few SGD steps with its LM head
    split over the ranks by vocabulary, against the same model trained in one process.
    head="colwise": parallelize_module(model, {"dense": ColwiseParallel(use_local_output=False)})
    and the DTensor logits go to fl.cross_entropy; "colwise_local": ColwiseParallel() (local
    output) and fl.cross_entropy(process_group=); "by_hand": each rank keeps a nn.Linear of its
    vocabulary slice, its input's gradient all-reduced by CopyToParallelRegion."""
    sys.path.insert(0, EXAMPLES)
    from next_token import CharLSTM

    vocab, batches = _char_lm_data(seed, steps, batch=8, context=24)
    slices = class_slices(len(vocab), ctx.world_size, uneven=False)
    torch.manual_seed(seed)
    single = CharLSTM(len(vocab), embedding_dim=16, num_lstm_units=32)
    state = {k: v.clone() for k, v in single.state_dict().items()}
    parallel = CharLSTM(len(vocab), embedding_dim=16, num_lstm_units=32)
    parallel.load_state_dict(state)
    lr = 1.0

    if head in ("colwise", "colwise_local"):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = DeviceMesh.from_group(ctx.group, "cpu")
        dtensor_out = head == "colwise"
        parallelize_module(parallel, mesh,
                           {"dense": ColwiseParallel(use_local_output=not dtensor_out)})

        def parallel_loss(x, y):
            # a DTensor (batch, time, vocab) sharded on the vocab, or this rank's slice of it
            logits, _ = parallel(x)
            if dtensor_out:
                return fl.cross_entropy(logits.flatten(0, 1), y.flatten()).full_tensor()
            return fl.cross_entropy(logits.flatten(0, 1), y.flatten(), process_group=ctx.group)
    else:
        start, stop = slices[ctx.rank]
        head_layer = torch.nn.Linear(32, stop - start)
        with torch.no_grad():
            head_layer.weight.copy_(state["dense.weight"][start:stop])
            head_layer.bias.copy_(state["dense.bias"][start:stop])
        parallel.dense = torch.nn.Identity()
        parallel.head = head_layer

        def parallel_loss(x, y):
            hidden, _ = parallel(x)
            # every rank's head reads the same hidden state: its gradient is the sum over ranks
            hidden = CopyToParallelRegion.apply(hidden, ctx.group)
            return fl.cross_entropy(head_layer(hidden).flatten(0, 1), y.flatten(),
                                    process_group=ctx.group)

    opt_single = torch.optim.SGD(single.parameters(), lr=lr)
    opt_parallel = torch.optim.SGD(parallel.parameters(), lr=lr)
    single_losses, parallel_losses = [], []
    for x, y in batches:
        logits, _ = single(x)
        loss = fl.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt_single.zero_grad()
        loss.backward()
        opt_single.step()
        single_losses.append(loss.item())

        loss = parallel_loss(x, y)
        opt_parallel.zero_grad()
        loss.backward()
        opt_parallel.step()
        parallel_losses.append(loss.item())

    # training is under way (SGD on a few batches lowers the loss) and both runs agree
    assert single_losses[-1] < single_losses[0] - 0.2, single_losses
    torch.testing.assert_close(torch.tensor(parallel_losses), torch.tensor(single_losses),
                               rtol=1e-4, atol=1e-5)
    if head != "by_hand":
        got_head = parallel.dense.weight.full_tensor()
    else:
        got_head = gather_classes(head_layer.weight.detach().t(), ctx.group, 1, slices).t()
    torch.testing.assert_close(got_head, single.dense.weight.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(parallel.lstm.weight_hh_l0.detach(),
                               single.lstm.weight_hh_l0.detach(), rtol=1e-4, atol=1e-5)
    return parallel_losses


def case_bad_input(ctx, seed, rows, classes, fault, faulty_rank):
    """One rank passes a bad argument; every rank must raise (the run fails if one hangs or
    returns). The error text comes back to the test."""
    slices = class_slices(classes, ctx.world_size, uneven=True)
    x_full, target, kw = make_problem(seed, rows, classes, torch.float32, OPTIONS["class_weight"])
    x = local_slice(x_full, slices, ctx.rank).requires_grad_()
    if ctx.rank == faulty_rank:
        if fault == "target_too_large":
            target = target.clone()
            target[3] = classes + 5
        elif fault == "target_negative":
            target = target.clone()
            target[2] = -7
        elif fault == "rows":
            x = torch.cat([x.detach(), x.detach()[:1]]).requires_grad_()
            target = torch.cat([target, target[:1]])
        elif fault == "target_shape":
            target = torch.cat([target, target[:1]])
        elif fault == "weight_length":
            kw["weight"] = torch.cat([kw["weight"], kw["weight"][:1]])
    loss = fl.cross_entropy(x, target, process_group=ctx.group, **kw)
    loss.backward()
    return float(loss)


# --- the tests ------------------------------------------------------------------------------

# gloo: one pool of 4 processes for the module; the 2-rank cases run on the subgroup of global
# ranks 1 and 3 (group ranks 0 and 1), so the implementation must use the group's own ranks
GLOO_SUBGROUP = (1, 3)


def case_distillation(ctx, seed, rows, classes, dtype, divergence, reduction, hard_weight,
                      teacher_trained):
    """fl.distillation_loss(process_group=) on both models' logits sliced by the same uneven
    class ranges: the loss (the same bits on every rank) and this rank's slices of the
    gradients against the single-process loss and the float64 reference on the whole logits."""
    slices = class_slices(classes, ctx.world_size, uneven=True)
    g = _generator(seed)
    s_full = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3).to(dtype)
    t_full = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=g)
    target[1] = -100
    mask = torch.rand(rows, generator=g)
    mask[2] = 0
    opts = dict(divergence=divergence, temperature=2.0, beta=0.3, hard_weight=hard_weight,
                mask=mask, reduction=reduction)
    s = local_slice(s_full, slices, ctx.rank).requires_grad_()
    t = local_slice(t_full, slices, ctx.rank).requires_grad_(teacher_trained)
    out = fl.distillation_loss(s, t, target, process_group=ctx.group, **opts)
    single_s = s_full.clone().requires_grad_()
    single_t = t_full.clone().requires_grad_(teacher_trained)
    single = fl.distillation_loss(single_s, single_t, target, **opts)
    ref_s = s_full.double().requires_grad_()
    ref_t = t_full.double().requires_grad_(teacher_trained)
    expected = ref.distillation(ref_s, ref_t, target, **opts)
    grad_out = torch.rand(out.shape, generator=g, dtype=torch.float64).to(out.dtype) + 0.5
    for o, leaves in ((out, (s, t)), (single, (single_s, single_t)), (expected, (ref_s, ref_t))):
        o.backward(grad_out.to(o.dtype))
    assert_close(out, expected, dtype)
    assert_close(out, single, dtype)
    for mine, whole, want in ((s, ref_s, True), (t, ref_t, teacher_trained)):
        if want:
            assert mine.grad.dtype == mine.dtype
            assert_close(mine.grad, local_slice(whole.grad, slices, ctx.rank), dtype)
        else:
            assert mine.grad is None
    again = fl.distillation_loss(s.detach(), t.detach(), target, process_group=ctx.group,
                                 **opts)
    assert torch.equal(again, out.detach())
    return out.detach()


@pytest.fixture(scope="module")
def pools():
    """pools(world_size, backend).run(case, **kw): the case on a process group of that size."""
    made = {}

    def get(world_size, backend="gloo"):
        if backend == "nccl" and torch.cuda.device_count() < world_size:
            pytest.skip(f"NCCL needs {world_size} CUDA devices, this machine has "
                        f"{torch.cuda.device_count()}")
        if backend not in made:
            made[backend] = (WorkerPool(4, "gloo", subgroups=[GLOO_SUBGROUP])
                             if backend == "gloo" else WorkerPool(world_size, backend))
        return types.SimpleNamespace(run=functools.partial(made[backend].run,
                                                           group_size=world_size))

    yield get
    for pool in made.values():
        pool.close()


def seed_for(request):
    """The run's seed (FUSEDLOSS_TEST_SEED repeats it) mixed with the test's id: crc32, not
    hash(), which Python salts per process."""
    from conftest import RUN_SEED

    return (RUN_SEED ^ zlib.crc32(request.node.nodeid.encode())) & 0x7FFFFFFF


def assert_same_on_every_rank(results):
    first = results[0]
    for rank, other in enumerate(results[1:], 1):
        if isinstance(first, dict):
            for k, v in first.items():
                assert (v is None) == (other[k] is None), (k, rank)
                assert v is None or torch.equal(v, other[k]), f"{k}: rank {rank} != rank 0"
        else:
            assert torch.equal(first, other), f"rank {rank}'s result differs from rank 0's"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_options_and_reductions(pools, request, world_size, option, reduction):
    # 13 rows, 37 classes: odd sizes, uneven slices on 2 and 4 ranks
    results = pools(world_size).run(case_cross_entropy, seed=seed_for(request), rows=13,
                                    classes=37, dtype=torch.float32, option=option,
                                    reduction=reduction, uneven=True)
    assert_same_on_every_rank(results)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("option", ["plain", "everything", "probabilities_all_options",
                                    "extra_outputs"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_dtypes(pools, request, world_size, option, dtype):
    for reduction in REDUCTIONS:
        results = pools(world_size).run(case_cross_entropy, seed=seed_for(request), rows=11,
                                        classes=50, dtype=dtype, option=option,
                                        reduction=reduction, uneven=True)
        assert_same_on_every_rank(results)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("layout", ["even", "uneven"])
def test_slices(pools, request, world_size, layout):
    # even: 4 x 64 classes; uneven: shares growing with the rank, one rank possibly 1 class
    classes = 256 if layout == "even" else 11
    for option in ("plain", "everything", "probabilities"):
        results = pools(world_size).run(case_cross_entropy, seed=seed_for(request), rows=9,
                                        classes=classes, dtype=torch.float32, option=option,
                                        reduction="mean", uneven=layout == "uneven")
        assert_same_on_every_rank(results)


@pytest.mark.skipif(not HAVE_SIMT, reason="no SIMT harness (tests/simt/) in this tree")
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_cuda_kernels_in_the_simt_emulator(pools, request, world_size):
    # the CUDA kernels' class-slice mode, emulated on the CPU, through the distributed path
    from simt import load_simt_opset

    load_simt_opset()  # built (once) here, so the workers only load it
    for option in ("everything", "probabilities_all_options", "extra_outputs"):
        for dtype in (torch.float32, torch.bfloat16):
            for reduction in REDUCTIONS:
                results = pools(world_size).run(
                    case_cross_entropy, seed=seed_for(request), rows=7, classes=45, dtype=dtype,
                    option=option, reduction=reduction, uneven=True, kernels="simt",
                    timeout=120)
                assert_same_on_every_rank(results)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_targets_all_in_one_ranks_slice(pools, request, world_size):
    for option in ("plain", "everything", "extra_outputs"):
        for reduction in REDUCTIONS:
            results = pools(world_size).run(case_cross_entropy, seed=seed_for(request),
                                            rows=10, classes=40, dtype=torch.float32,
                                            option=option, reduction=reduction, uneven=True,
                                            targets="one_rank")
            assert_same_on_every_rank(results)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_all_positions_ignored(pools, request, world_size):
    # mean over no valid position: 0 with zero gradient, as single-process fusedloss
    for option in ("plain", "everything", "extra_outputs"):
        for reduction in REDUCTIONS:
            results = pools(world_size).run(case_cross_entropy, seed=seed_for(request), rows=6,
                                            classes=21, dtype=torch.float32, option=option,
                                            reduction=reduction, targets="all_ignored")
            assert_same_on_every_rank(results)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_spatial_dims(pools, request, world_size):
    # (N, C, d): the class dim is dim 1, as in F.cross_entropy
    for option in ("everything", "probabilities"):
        results = pools(world_size).run(case_cross_entropy, seed=seed_for(request), rows=4,
                                        classes=19, dtype=torch.float32, option=option,
                                        reduction="none", uneven=True, extra_dims=(3,))
        assert_same_on_every_rank(results)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["everything", "probabilities_all_options"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_gradcheck(pools, request, world_size, option, reduction):
    pools(world_size).run(case_gradcheck, seed=seed_for(request), rows=5, classes=9,
                          option=option, reduction=reduction, timeout=120)


@pytest.mark.parametrize("kernels", ["cpu"] + (["simt"] if HAVE_SIMT else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_predicted_tokens(pools, request, world_size, dtype, kernels):
    for reduction in ("mean", "none"):
        results = pools(world_size).run(case_predicted_tokens, seed=seed_for(request),
                                        classes=37, dtype=dtype, reduction=reduction,
                                        kernels=kernels)
        assert_same_on_every_rank(results)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sequence_loss(pools, request, world_size):
    for across_t, across_b, smoothing in [(True, True, 0.0), (True, False, 0.0),
                                          (False, True, 0.0), (False, False, 0.0),
                                          (True, True, 0.1)]:
        results = pools(world_size).run(case_sequence_loss, seed=seed_for(request), batch=3,
                                        time=5, classes=23, dtype=torch.float32,
                                        across_timesteps=across_t, across_batch=across_b,
                                        label_smoothing=smoothing)
        assert_same_on_every_rank(results)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_cross_entropy_loss_module(pools, request, world_size):
    for reduction in REDUCTIONS:
        results = pools(world_size).run(case_module, seed=seed_for(request), rows=12,
                                        classes=30, reduction=reduction)
        assert_same_on_every_rank(results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("option", ["plain", "everything", "probabilities", "extra_outputs",
                                    "predicted_tokens"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_linear_cross_entropy(pools, request, world_size, option, dtype):
    for reduction in REDUCTIONS:
        results = pools(world_size).run(case_linear_cross_entropy, seed=seed_for(request),
                                        rows=17, hidden=8, classes=29, dtype=dtype,
                                        option=option, reduction=reduction,
                                        bias=option != "plain")
        assert_same_on_every_rank(results)


@pytest.mark.parametrize("target_kind", ["tensor", "dtensor"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_dtensor_loss_parallel(pools, request, world_size, target_kind):
    # what loss_parallel supports: class weight, ignore_index, every reduction (not both
    # together: with a class weight, its backward indexes the weight with the ignored targets
    # and raises, torch 2.14)
    for option in ("plain", "ignore_index", "class_weight_only"):
        for reduction in REDUCTIONS:
            results = pools(world_size).run(case_dtensor_loss_parallel, seed=seed_for(request),
                                            rows=10, classes=33, reduction=reduction,
                                            option=option, target_kind=target_kind)
            assert_same_on_every_rank(results)


@pytest.mark.parametrize("head", ["colwise", "colwise_local", "by_hand"])
def test_tensor_parallel_lm_training_matches_one_process(pools, request, head):
    results = pools(2).run(case_train_char_lm, seed=seed_for(request), steps=12, head=head,
                           timeout=120)
    assert results[0] == results[1]  # the same loss on both ranks, every step


# fault -> what every rank's error must mention ({bad}: the value or size at fault)
BAD_INPUTS = {
    "target_too_large": ("target", "{bad}"),
    "target_negative": ("target", "{bad}"),
    "rows": ("input", "{bad}"),
    "target_shape": ("target",),
    "weight_length": ("weight",),
}


@pytest.mark.parametrize("fault", list(BAD_INPUTS))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_bad_input_on_one_rank_raises_on_every_rank(pools, request, world_size, fault):
    rows, classes = 8, 26
    bad = {"target_too_large": classes + 5, "target_negative": -7, "rows": rows + 1}.get(fault)
    pool = pools(world_size)
    # 20 s: well below the collectives' own timeout, so a rank left waiting fails the test
    raised = pool.run(case_bad_input, seed=seed_for(request), rows=rows, classes=classes,
                      fault=fault, faulty_rank=world_size - 1, timeout=20, expect_error=True)
    for rank, error in enumerate(raised):
        last_line = error.text.strip().splitlines()[-1]
        for word in BAD_INPUTS[fault]:
            word = word.format(bad=bad)
            assert word in last_line, f"rank {rank}: {last_line!r} does not mention {word!r}"
    # the group is still usable: a good call right after succeeds on every rank
    results = pool.run(case_cross_entropy, seed=seed_for(request), rows=rows, classes=classes,
                       dtype=torch.float32, option="plain", reduction="mean")
    assert_same_on_every_rank(results)


@pytest.mark.cuda
@pytest.mark.parametrize("option", ["plain", "everything", "probabilities_all_options",
                                    "extra_outputs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nccl(pools, request, option, dtype):
    pool = pools(2, "nccl")
    for reduction in REDUCTIONS:
        results = pool.run(case_cross_entropy, seed=seed_for(request), rows=64, classes=1001,
                           dtype=dtype, option=option, reduction=reduction, uneven=True)
        assert_same_on_every_rank(results)


@pytest.mark.parametrize("divergence,hard_weight,teacher_trained",
                         [("forward_kl", 0.5, False), ("reverse_kl", 0.0, True),
                          ("jsd", 0.25, False)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_distillation(pools, request, world_size, reduction, divergence, hard_weight,
                      teacher_trained):
    for dtype in (torch.float32, torch.bfloat16):
        results = pools(world_size).run(case_distillation, seed=seed_for(request), rows=11,
                                        classes=41, dtype=dtype, divergence=divergence,
                                        reduction=reduction, hard_weight=hard_weight,
                                        teacher_trained=teacher_trained)
        assert_same_on_every_rank(results)
