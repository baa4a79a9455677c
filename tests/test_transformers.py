"""fusedloss.integrations.transformers against transformers' own causal-LM loss.

Tiny randomly initialised models built from their config classes (nothing is downloaded), in
float32: Llama (the common layout; loss called by keyword), Qwen2 (bias in attention), Gemma2
(loss called positionally, final logit softcap, tied embeddings). transformers and accelerate
are an optional extra (requirements-extras.txt); without them this file is skipped.
"""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

from fusedloss.integrations.transformers import (  # noqa: E402
    apply_fusedloss,
    causal_lm_loss,
    fusedloss_patched,
    revert_fusedloss,
)
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

VOCAB = 1000  # ~1000 classes: large enough for softmax rows to be non-trivial, fast on 2 cores
REL = 1e-5  # the parity bound for loss and every parameter gradient (float32)
MODES = [pytest.param(True, id="linear_ce"), pytest.param(False, id="logits")]

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              initializer_range=0.2)  # wide init: logits of a few units, so the softcap bends


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small run fastest on one thread; on a busy 2-core machine two threads
    mostly wait for each other (as in test_examples.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def new_seed():
    """A seed from the test's own random stream (conftest seeds it from the run's seed: fresh
    data every run, FUSEDLOSS_TEST_SEED repeats one)."""
    return int(torch.randint(2**31, ()))


def tiny_model(name, seed=None):
    """Random weights; the same `seed` gives the same weights (two runs from one start)."""
    torch.manual_seed(new_seed() if seed is None else seed)
    if name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    elif name == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON))
    elif name == "gemma2":
        # softcap 3: the random logits reach it, so a softcap applied twice or not at all fails
        config = transformers.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=3.0)
        model = transformers.Gemma2ForCausalLM(config)
    else:
        raise ValueError(name)
    return model.float().train()


MODELS = ["llama", "qwen2", "gemma2"]


def batch(batch_size=3, length=13):
    """Token ids and labels with -100 on a prefix of each row (a prompt that is not trained
    on), of a different length per row, so that counting labels matters."""
    ids = torch.randint(VOCAB, (batch_size, length))
    labels = ids.clone()
    for row in range(batch_size):
        labels[row, :row * 2] = -100  # row 0 keeps its first label (a shift must drop it)
    return ids, labels


def rel_diff(actual, expected):
    """Largest difference relative to the largest reference value (one number per tensor)."""
    scale = expected.detach().abs().max().clamp_min(1e-30)
    return float((actual.detach() - expected.detach()).abs().max() / scale)


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    outputs = model(**inputs)
    outputs.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


def assert_parity(outputs, grads, ref_outputs, ref_grads):
    assert rel_diff(outputs.loss, ref_outputs.loss) <= REL, (outputs.loss, ref_outputs.loss)
    assert grads.keys() == ref_grads.keys()
    worst = max((rel_diff(grads[n], ref_grads[n]), n) for n in ref_grads)
    assert worst[0] <= REL, worst


def loss_keywords(kind, labels):
    """The keywords transformers and Trainer pass to a causal LM's forward."""
    if kind == "plain":
        return {}
    if kind == "num_items_in_batch":  # Trainer with gradient accumulation: sum / this
        return {"num_items_in_batch": torch.tensor(int((labels[:, 1:] != -100).sum()) + 7)}
    if kind == "shift_labels":  # collators that shift themselves (padding-free, context parallel)
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].clone()
        shifted[:, -3:] = -100
        return {"shift_labels": shifted}
    if kind == "ignore_index":
        return {"ignore_index": 7}
    raise ValueError(kind)


@pytest.mark.parametrize("linear_ce", MODES)
@pytest.mark.parametrize("kind", ["plain", "num_items_in_batch", "shift_labels", "ignore_index"])
@pytest.mark.parametrize("name", MODELS)
def test_loss_and_every_gradient_equal_transformers(name, kind, linear_ce):
    model = tiny_model(name)
    ids, labels = batch()
    if kind == "ignore_index":
        labels = labels.masked_fill(labels == -100, 7)
    inputs = dict(input_ids=ids, labels=labels, **loss_keywords(kind, labels))
    ref_outputs, ref_grads = loss_and_grads(model, **inputs)
    apply_fusedloss(model, linear_cross_entropy=linear_ce)
    outputs, grads = loss_and_grads(model, **inputs)
    assert_parity(outputs, grads, ref_outputs, ref_grads)
    if linear_ce:
        assert outputs.logits is None  # documented: the logits never exist
    else:
        torch.testing.assert_close(outputs.logits, ref_outputs.logits, rtol=0, atol=0)


@pytest.mark.parametrize("linear_ce", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_model(name, linear_ce):
    """A 16-bit model: the loss comes back in float32, as transformers' does, accumulated in
    float32 from the bfloat16 logits (transformers': from a float32 copy of the same logits, so
    the logits mode agrees to float32 rounding; the linear CE mode computes its own logits,
    whose roundings differ from the model's bfloat16 GEMM by up to 2^-9); the gradients differ
    from transformers' by bfloat16 roundings of the logits' gradient carried through two layers
    (measured: at most 1.5e-2 of each tensor's largest value)."""
    model = tiny_model(name).to(torch.bfloat16)
    ids, labels = batch()
    ref_outputs, ref_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    apply_fusedloss(model, linear_cross_entropy=linear_ce)
    outputs, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert outputs.loss.dtype == ref_outputs.loss.dtype == torch.float32
    # Gemma-2: transformers applies the final softcap in bfloat16 arithmetic, fusedloss in
    # float32 on the raw logits: the two differ by bfloat16 roundings of the logits
    rounded_logits = linear_ce or name == "gemma2"
    assert rel_diff(outputs.loss, ref_outputs.loss) <= (2 ** -8 if rounded_logits else 1e-5)
    worst = max((rel_diff(grads[n].float(), ref_grads[n].float()), n) for n in ref_grads)
    assert worst[0] <= 3e-2, worst


def test_loss_function_called_positionally_or_by_keyword():
    """Gemma-2 calls loss_function(logits, labels, vocab_size, **kwargs), Llama and Qwen2
    loss_function(logits=..., labels=..., vocab_size=..., **kwargs); both pass extra keywords
    of their own (output_attentions, position_ids, ...), which the loss ignores."""
    ids, labels = batch()
    logits = torch.randn(*ids.shape, VOCAB, dtype=torch.float64) * 3
    extra = dict(num_items_in_batch=torch.tensor(17), output_attentions=False, position_ids=None)
    expected = ForCausalLMLoss(logits, labels, VOCAB, **extra)
    torch.testing.assert_close(causal_lm_loss(logits, labels, VOCAB, **extra), expected)
    torch.testing.assert_close(causal_lm_loss(logits=logits, labels=labels, vocab_size=VOCAB,
                                              **extra), expected)


@pytest.mark.parametrize("name", MODELS)
def test_logits_returned_are_never_gradients(name):
    """The logits-level loss must not write its gradient into the logits the model returns."""
    model = tiny_model(name)
    ids, labels = batch()
    expected = model(input_ids=ids).logits.detach()
    apply_fusedloss(model, linear_cross_entropy=False)
    outputs = model(input_ids=ids, labels=labels)
    outputs.loss.backward()
    torch.testing.assert_close(outputs.logits, expected, rtol=0, atol=0)
    if name == "gemma2":  # softcapped by the model's own code, detached (documented)
        assert not outputs.logits.requires_grad
        assert outputs.logits.abs().max() <= 3.0


@pytest.mark.parametrize("linear_ce", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_without_labels_or_grad_the_model_keeps_its_logits(name, linear_ce):
    model = tiny_model(name)
    ids, labels = batch()
    ref_logits = model(input_ids=ids).logits.detach()
    with torch.no_grad():
        ref_loss = model(input_ids=ids, labels=labels).loss
    apply_fusedloss(model, linear_cross_entropy=linear_ce)
    outputs = model(input_ids=ids)
    assert outputs.loss is None
    torch.testing.assert_close(outputs.logits, ref_logits, rtol=0, atol=0)
    assert outputs.logits.requires_grad  # no labels: the user's own loss may backpropagate
    with torch.no_grad():  # evaluation: logits and the loss (fusedloss on the logits)
        outputs = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(outputs.logits, ref_logits, rtol=0, atol=0)
    assert rel_diff(outputs.loss, ref_loss) <= REL


@pytest.mark.parametrize("linear_ce", MODES)
def test_generate_is_unchanged(linear_ce):
    model = tiny_model("gemma2").eval()
    prompt = batch()[0][:2, :4]
    expected = model.generate(prompt, max_new_tokens=4, do_sample=False)
    apply_fusedloss(model, linear_cross_entropy=linear_ce)
    torch.testing.assert_close(model.generate(prompt, max_new_tokens=4, do_sample=False),
                               expected, rtol=0, atol=0)


@pytest.mark.parametrize("linear_ce", MODES)
def test_positional_arguments_and_tuple_outputs(linear_ce):
    model = tiny_model("llama")
    ids, labels = batch()
    mask = torch.ones_like(ids)
    # LlamaForCausalLM.forward(input_ids, attention_mask, position_ids, past_key_values,
    # inputs_embeds, labels, ...)
    ref = model(ids, mask, None, None, None, labels, return_dict=False)
    apply_fusedloss(model, linear_cross_entropy=linear_ce)
    out = model(ids, mask, None, None, None, labels, return_dict=False)
    assert isinstance(out, tuple)
    assert rel_diff(out[0], ref[0]) <= REL
    if not linear_ce:
        torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)


@pytest.mark.parametrize("linear_ce", MODES)
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_adamw_loss_curve_matches_transformers(name, linear_ce):
    """30 AdamW steps from the same weights on the same batches: the two curves agree."""
    steps = 30
    seed = new_seed()
    # two batches in turn: random tokens are learnable only by heart
    batches = [batch(batch_size=4, length=16) for _ in range(2)]
    curves = []
    for patched in (False, True):
        model = tiny_model(name, seed)
        if patched:
            apply_fusedloss(model, linear_cross_entropy=linear_ce)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curve = []
        for step in range(steps):
            ids, labels = batches[step % 2]
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves.append(curve)
    reference, fused = curves
    assert reference[-1] < reference[0] - 0.5  # it trains
    # float32 roundings of two different (equally exact) loss computations compound over
    # 30 steps of Adam: measured at most 2e-5 over 32 random starts (most ~3e-7); 5e-4 leaves
    # room for a start where Adam amplifies more. A wrong loss (a softcap twice too large) is
    # off by more than 1e-2.
    worst = max(abs(a - b) / abs(b) for a, b in zip(fused, reference))
    assert worst <= 5e-4, (worst, fused, reference)


def test_revert_and_context_manager_restore_the_model():
    model = tiny_model("gemma2")
    ids, labels = batch()
    class_forward = type(model).forward
    ref = model(input_ids=ids, labels=labels)

    def assert_original():
        assert "forward" not in model.__dict__ and model.forward.__func__ is class_forward
        assert model.loss_function is ForCausalLMLoss
        out = model(input_ids=ids, labels=labels)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
        assert out.loss.item() == ref.loss.item()

    for linear_ce in (True, False):
        assert apply_fusedloss(model, linear_cross_entropy=linear_ce) is model
        assert "forward" in model.__dict__  # Gemma-2's softcap moves into the loss either way
        assert model.loss_function is not ForCausalLMLoss
        assert revert_fusedloss(model) is model
        assert_original()
        revert_fusedloss(model)  # a second revert is a no-op
        assert_original()

        with fusedloss_patched(model, linear_cross_entropy=linear_ce) as patched:
            assert patched is model and model.loss_function is not ForCausalLMLoss
        assert_original()
        with pytest.raises(ZeroDivisionError):
            with fusedloss_patched(model, linear_cross_entropy=linear_ce):
                1 / 0
        assert_original()

    # applying twice replaces the first application; one revert restores the original
    apply_fusedloss(model, linear_cross_entropy=False)
    apply_fusedloss(model, linear_cross_entropy=False)
    revert_fusedloss(model)
    assert_original()


def test_only_the_instance_changes():
    model, other = tiny_model("llama"), tiny_model("llama")
    apply_fusedloss(model, linear_cross_entropy=False)
    assert other.loss_function is ForCausalLMLoss
    assert "forward" not in other.__dict__
    from transformers.loss.loss_utils import LOSS_MAPPING
    assert LOSS_MAPPING["ForCausalLM"] is ForCausalLMLoss  # Trainer's causal-LM test reads it


def test_trainer_with_gradient_accumulation_logs_transformers_loss(tmp_path):
    """Trainer counts the labels of both micro-batches (num_items_in_batch) and the model
    divides each micro-batch's sum by it. If the patched model looked like anything but a
    causal LM to Trainer, it would count each row's first label too and log another loss."""
    rows = []
    for i in range(8):
        ids, labels = batch(batch_size=1, length=12)
        labels[0, :i % 4] = -100  # prompts of 0-3 tokens: rows with a trained first label
        rows.append({"input_ids": ids[0], "labels": labels[0]})

    seed = new_seed()

    def train(patched):
        model = tiny_model("llama", seed)
        if patched:
            apply_fusedloss(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / ("fused" if patched else "reference")),
            per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
            learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no",
            use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
            # plain SGD: the weights after the steps are then as close as the gradients are.
            # AdamW's first step is lr * g / |g| per element, so a gradient element near 0
            # whose last bit differs moves its weight by up to 2 lr either way (measured
            # 3.4e-4 relative on one seed): a weight check after AdamW tests rounding luck.
            optim="sgd")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, model

    ref_losses, ref_model = train(False)
    losses, model = train(True)
    assert len(losses) == len(ref_losses) == 2
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= REL * abs(b), (losses, ref_losses)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_diff(p, q) <= 1e-4, name  # after two optimizer steps


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        apply_fusedloss(torch.nn.Linear(2, 2))
    classifier = transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(**COMMON, num_labels=3))
    with pytest.raises(ValueError, match="causal language model"):
        apply_fusedloss(classifier)
    with pytest.raises(TypeError, match="linear_cross_entropy"):
        apply_fusedloss(tiny_model("llama"), linear_cross_entropy="yes")


def granite():
    """Granite divides its logits by config.logits_scaling after the LM head."""
    torch.manual_seed(new_seed())
    config = transformers.GraniteConfig(**COMMON, logits_scaling=4.0)
    return transformers.GraniteForCausalLM(config).float().train()


def test_a_logit_transform_is_kept_with_logits_and_refused_without():
    model = granite()
    ids, labels = batch()
    ref_outputs, ref_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    apply_fusedloss(model, linear_cross_entropy=False)  # the loss sees the model's logits
    assert_parity(*loss_and_grads(model, input_ids=ids, labels=labels), ref_outputs, ref_grads)
    apply_fusedloss(model, linear_cross_entropy=True)  # the hidden states alone: refused
    with pytest.raises(RuntimeError, match="linear_cross_entropy=False"):
        model(input_ids=ids, labels=labels)


def test_importing_fusedloss_does_not_import_transformers():
    code = ("import sys, fusedloss, fusedloss.integrations.transformers; "
            "assert 'transformers' not in sys.modules, 'imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_without_transformers_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ImportError, match="fusedloss\\[transformers\\]"):
        apply_fusedloss(torch.nn.Linear(2, 2))
