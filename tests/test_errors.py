"""Bad input: a clear error naming the argument and the value, never a crash or a silent
wrong answer."""

import pytest
import torch

import fusedloss as fl
from fusedloss import functional


def x_and_t(backend, rows=4, classes=5):
    x = torch.randn(rows, classes, device=backend.device)
    t = torch.randint(0, classes, (rows,), device=backend.device)
    return x, t


@pytest.mark.parametrize("bad", [5, 7, -1, -101])
def test_out_of_range_target_names_the_value(bad):
    x = torch.randn(4, 5)
    t = torch.tensor([0, 1, bad, 2])
    with pytest.raises(IndexError, match=rf"target {bad} at position 2 is out of bounds for 5"):
        fl.cross_entropy(x, t)


def test_out_of_range_target_with_validation_switch(backend):
    """The opt-in switch raises eagerly on every device (the CPU always does)."""
    x = torch.randn(3, 4, device=backend.device)
    functional.set_target_validation(True)
    try:
        with pytest.raises(IndexError, match="target 9 at position 1"):
            fl.cross_entropy(x, torch.tensor([0, 9, 1], device=backend.device))
    finally:
        functional.set_target_validation(False)


def test_out_of_range_probability_free_path_is_never_read():
    """ignore_index outside [0, C) is not an error."""
    x = torch.randn(3, 4)
    out = fl.cross_entropy(x, torch.tensor([0, -7, 1]), ignore_index=-7)
    assert torch.isfinite(out)


@pytest.mark.parametrize("target_shape", [(3,), (4, 1), ()])
def test_target_shape_mismatch_names_both_shapes(backend, target_shape):
    x, _ = x_and_t(backend)
    t = torch.zeros(target_shape, dtype=torch.long, device=backend.device)
    with pytest.raises(ValueError, match=r"target must have shape \(4,\).*got " + 
                       __import__("re").escape(str(tuple(target_shape)))):
        fl.cross_entropy(x, t)


def test_probability_target_shape_mismatch(backend):
    x, _ = x_and_t(backend)
    with pytest.raises(ValueError, match=r"probability target must have the input's shape "
                                         r"\(4, 5\), got \(4, 4\)"):
        fl.cross_entropy(x, torch.rand(4, 4, device=backend.device))


def test_mask_shape_mismatch(backend):
    x, t = x_and_t(backend)
    with pytest.raises(ValueError, match=r"mask must have the target's shape \(4,\), got \(5,\)"):
        fl.cross_entropy(x, t, mask=torch.ones(5, device=backend.device))


def test_weight_shape_mismatch(backend):
    x, t = x_and_t(backend)
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\).*got \(4,\)"):
        fl.cross_entropy(x, t, weight=torch.ones(4, device=backend.device))


def test_bce_shape_errors(backend):
    x = torch.randn(4, 5, device=backend.device)
    y = torch.rand(4, 5, device=backend.device)
    with pytest.raises(ValueError, match=r"^Target size \(4, 4\) must be the same as input size \(4, 5\)$"):
        fl.binary_cross_entropy_with_logits(x, y[:, :4])
    with pytest.raises(ValueError, match=r"pos_weight of shape \(3,\) does not broadcast to the "
                                         r"input's shape \(4, 5\)"):
        fl.binary_cross_entropy_with_logits(x, y, pos_weight=torch.ones(3, device=backend.device))
    with pytest.raises(ValueError, match=r"weight of shape \(2, 4, 5\) does not broadcast"):
        fl.binary_cross_entropy_with_logits(x, y, weight=torch.ones(2, 4, 5, device=backend.device))
    with pytest.raises(ValueError, match=r"mask of shape \(4, 2\) does not broadcast"):
        fl.binary_cross_entropy_with_logits(x, y, mask=torch.ones(4, 2, device=backend.device))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_unsupported_input_dtype(dtype):
    x = torch.zeros(3, 4, dtype=dtype)
    with pytest.raises(TypeError, match=rf"input must be float16, bfloat16, float32 or float64, "
                                        rf"got {dtype}"):
        fl.cross_entropy(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="input must be float16"):
        fl.binary_cross_entropy_with_logits(x, torch.zeros(3, 4))


def test_bool_class_index_target_is_refused():
    with pytest.raises(TypeError, match="target must be class indices"):
        fl.cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize("kw, match", [
    ({"reduction": "avg"}, "reduction must be 'none', 'mean' or 'sum', got 'avg'"),
    ({"label_smoothing": 1.5}, "label_smoothing must be between 0.0 and 1.0, got 1.5"),
    ({"label_smoothing": -0.1}, "label_smoothing must be between 0.0 and 1.0, got -0.1"),
    ({"softcap": 0.0}, "softcap must be None or a finite number > 0, got 0.0"),
    ({"softcap": -3}, "softcap must be None or a finite number > 0, got -3.0"),
    ({"z_loss": -1e-4}, "z_loss must be a finite number >= 0, got -0.0001"),
    ({"z_loss": float("nan")}, "z_loss must be a finite number >= 0, got nan"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=__import__("re").escape(match)):
        fl.cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), **kw)


def test_zero_classes_and_zero_dim_input():
    with pytest.raises(ValueError, match=r"at least one class, got shape \(3, 0\)"):
        fl.cross_entropy(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        fl.cross_entropy(torch.tensor(1.0), torch.tensor(0))


def test_non_tensor_arguments():
    with pytest.raises(TypeError, match="input must be a Tensor, got list"):
        fl.cross_entropy([1.0, 2.0], torch.tensor(0))
    with pytest.raises(TypeError, match="target must be a Tensor, got int"):
        fl.binary_cross_entropy_with_logits(torch.randn(2), 1)


def test_sequence_loss_shape_errors():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"logits must be a 3-D tensor .* got shape \(6, 4\)"):
        fl.sequence_loss(x.reshape(6, 4), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3\).*got \(3, 2\)"):
        fl.sequence_loss(x, torch.zeros(3, 2, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"weights must have shape \(2, 3\).*got \(2, 4\)"):
        fl.sequence_loss(x, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        fl.sequence_loss(x, torch.zeros(2, 3), torch.ones(2, 3))


def test_op_level_checks_name_the_argument():
    """The ops check their own arguments too (called directly, or from another front end)."""
    ops = torch.ops.fusedloss
    with pytest.raises(ValueError, match=r"logits must be 2-D \(rows, classes\), got shape"):
        ops.softmax_ce(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long), None, None,
                       -100, 0.0, 0.0, 0.0, 1, 0.0, False)
    with pytest.raises(TypeError, match="class-index targets must be int64, got Int"):
        ops.softmax_ce(torch.randn(2, 3), torch.zeros(2, dtype=torch.int32), None, None,
                       -100, 0.0, 0.0, 0.0, 1, 0.0, False)
    with pytest.raises(ValueError, match=r"reduction must be 0 \(none\), 1 \(mean\) or 2 \(sum\), got 5"):
        ops.softmax_ce(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), None, None,
                       -100, 0.0, 0.0, 0.0, 5, 0.0, False)
    with pytest.raises(ValueError, match=r"target must have the input's shape \[2, 3\], got \[3, 2\]"):
        ops.sigmoid_ce(torch.randn(2, 3), torch.randn(3, 2), None, None, None, 0.0, 1, False)


# --- values that must propagate or stay exact ------------------------------------------------


def test_nan_logits_propagate(backend):
    x = torch.randn(4, 6, device=backend.device)
    x[2, 3] = float("nan")
    t = torch.tensor([0, 1, 2, 3], device=backend.device)
    assert torch.isnan(fl.cross_entropy(x, t))
    per_row = fl.cross_entropy(x, t, reduction="none")
    assert torch.isnan(per_row[2]) and torch.isfinite(per_row[[0, 1, 3]]).all()
    assert torch.isnan(fl.binary_cross_entropy_with_logits(x, torch.rand_like(x)))


def test_nan_in_padding_is_not_read(backend):
    """A masked or ignored position is skipped, not multiplied by 0: NaN there stays out."""
    x = torch.randn(3, 6, device=backend.device)
    x[1] = float("nan")
    t = torch.tensor([0, 1, 2], device=backend.device)
    assert torch.isfinite(fl.cross_entropy(x, t, mask=torch.tensor([1.0, 0.0, 1.0],
                                                                   device=backend.device)))
    assert torch.isfinite(fl.cross_entropy(x, torch.tensor([0, -100, 2], device=backend.device)))
