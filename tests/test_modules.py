"""The nn.Module drop-ins: same state_dict, buffers and behaviour as torch's modules."""

import torch

import fusedloss as fl
from helpers import assert_close, logits


def test_cross_entropy_module_matches_torch_module(backend):
    w = torch.rand(7) + 0.1
    ours = fl.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1).to(backend.device)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    assert [n for n, _ in ours.named_buffers()] == ["weight"]
    x = logits((9, 7), torch.float32, backend.device)
    t = torch.randint(0, 7, (9,), device=backend.device)
    assert_close(ours(x, t), theirs.double()(x.cpu().double(), t.cpu()).detach(), torch.float32)
    theirs.float()
    # a torch state_dict loads into the drop-in and back
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())


def test_cross_entropy_module_without_weight_has_no_state():
    assert list(fl.CrossEntropyLoss().state_dict()) == list(torch.nn.CrossEntropyLoss().state_dict())


def test_cross_entropy_module_mask_and_extras(backend):
    m = fl.CrossEntropyLoss(reduction="sum", z_loss=1e-3, softcap=10.0)
    x = logits((4, 5), torch.float32, backend.device)
    t = torch.randint(0, 5, (4,), device=backend.device)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], device=backend.device)
    out = m(x, t, mask)
    expected = fl.cross_entropy(x, t, reduction="sum", mask=mask, z_loss=1e-3, softcap=10.0)
    assert torch.equal(out, expected)
    assert "z_loss=0.001" in repr(m) and "softcap=10.0" in repr(m)


def test_bce_module_matches_torch_module(backend):
    w, pw = torch.rand(6), torch.rand(6) * 3
    ours = fl.BCEWithLogitsLoss(weight=w, pos_weight=pw).to(backend.device)
    theirs = torch.nn.BCEWithLogitsLoss(weight=w, pos_weight=pw)
    assert isinstance(ours, torch.nn.BCEWithLogitsLoss)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "pos_weight"]
    x = logits((5, 6), torch.float32, backend.device)
    y = torch.rand(5, 6, device=backend.device)
    assert_close(ours(x, y), theirs.double()(x.cpu().double(), y.cpu().double()), torch.float32)
    theirs.float()
    ours.load_state_dict(theirs.state_dict())


def test_modules_move_buffers_with_to():
    m = fl.BCEWithLogitsLoss(pos_weight=torch.ones(3)).double()
    assert m.pos_weight.dtype == torch.float64
