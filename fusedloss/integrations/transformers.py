"""One call to train a Hugging Face transformers ``*ForCausalLM`` model with fusedloss.

    from fusedloss.integrations.transformers import apply_fusedloss
    model = apply_fusedloss(model)                      # fused linear + cross-entropy
    model = apply_fusedloss(model, linear_cross_entropy=False)   # logits, then fusedloss

Only the given model instance is changed (never its class, never transformers'
``LOSS_MAPPING``), and ``revert_fusedloss(model)`` or the ``fusedloss_patched(model)`` context
manager undoes it. transformers is imported only by this module, not by ``import fusedloss``.

What changes, in both modes:

- ``model.loss_function`` becomes :func:`causal_lm_loss`: transformers' causal-LM loss
  (labels shifted by one, ``ignore_index``, ``shift_labels``, and, when ``num_items_in_batch``
  is given, the sum divided by it: the gradient-accumulation semantics of ``Trainer``)
  computed by ``fl.cross_entropy``. It is set on the instance because ``Trainer`` recognises a
  causal LM by ``LOSS_MAPPING[model.loss_type]`` being transformers' own loss: replacing the
  mapping's entry makes it count one extra label per row in ``num_items_in_batch``.
- With ``linear_cross_entropy=True``, a forward given ``labels`` while grad is enabled
  (training) computes the loss from the last hidden states and the LM head's weight with
  ``fl.linear_cross_entropy``: the N x V logits never exist, and **``outputs.logits`` is
  None**. Without labels, or under ``torch.no_grad()`` (evaluation, generation), the model's
  own forward runs and returns its logits (the loss, when labels are given, from
  :func:`causal_lm_loss`).
- A model with a final logit softcap (Gemma-2 and Gemma-3's ``final_logit_softcapping``)
  applies it in the loss (fusedloss's ``softcap=``), which saves the model's three N x V
  softcap tensors. With ``linear_cross_entropy=False`` its ``outputs.logits`` are still the
  softcapped logits the config promises, computed by the model's own code, but **detached**:
  the loss's gradient flows through the fused loss, not through ``outputs.logits``.

The logits handed to the user are never overwritten by a gradient: ``inplace_backward`` is
used only on the softcapped model's raw logits, which nobody else sees.

Differences from transformers' loss: a mean over no valid label is 0 (transformers: NaN). For
16-bit models the loss is float32 as transformers' is, accumulated in float32 from the 16-bit
logits read in place (transformers computes it from a float32 copy of the logits).
"""

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

import fusedloss as fl

__all__ = ["apply_fusedloss", "revert_fusedloss", "fusedloss_patched", "causal_lm_loss"]

_STATE = "_fusedloss_patch"  # the instance attribute holding what apply_fusedloss replaced


def _shifted_targets(labels, shift_labels, ignore_index, device):
    """transformers' causal-LM targets: position i predicts labels[i + 1] (the last position
    predicts nothing), unless the caller passes the shifted labels itself."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1).to(device)


def _reduction(num_items_in_batch):
    return "mean" if num_items_in_batch is None else "sum"


def _per_item(loss, num_items_in_batch):
    """The sum over this micro-batch divided by the labels of the whole accumulated batch, as
    transformers' fixed_cross_entropy does: the accumulated gradient is then the full batch's
    mean."""
    loss = loss.float()
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, *, softcap=None, inplace_backward=False, **kwargs):
    """transformers' ``ForCausalLMLoss`` (same arguments, positional or by keyword; other
    keywords the model passes along are ignored, as there) computed by ``fl.cross_entropy``
    on the logits in their own dtype, without a float32 copy."""
    targets = _shifted_targets(labels, shift_labels, ignore_index, logits.device)
    with fl.functional.loss_in_accumulation_dtype():
        loss = fl.cross_entropy(logits.reshape(-1, vocab_size), targets,
                                ignore_index=ignore_index,
                                reduction=_reduction(num_items_in_batch), softcap=softcap,
                                inplace_backward=inplace_backward)
    return _per_item(loss, num_items_in_batch)


def _linear_causal_lm_loss(hidden, head, labels, num_items_in_batch=None, ignore_index=-100,
                           shift_labels=None, *, softcap=None, **kwargs):
    """:func:`causal_lm_loss` of ``head(hidden)``, without the logits."""
    targets = _shifted_targets(labels, shift_labels, ignore_index, hidden.device)
    with fl.functional.loss_in_accumulation_dtype():
        loss = fl.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                                       targets, linear_bias=head.bias,
                                       ignore_index=ignore_index,
                                       reduction=_reduction(num_items_in_batch),
                                       softcap=softcap)
    return _per_item(loss, num_items_in_batch)


@contextlib.contextmanager
def _forward_replaced(module, replacement):
    """module(x) calls `replacement` for the duration; an instance-level forward that was
    there before (another library's hook) is put back afterwards."""
    previous = module.__dict__.get("forward")
    module.forward = replacement
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def _final_logit_softcap(model):
    cap = getattr(model.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


class _Forward:
    """The model's forward with the loss moved out of it, for one instance.

    The model's own forward runs with ``labels=None`` while its LM head is replaced for that
    call: with linear cross-entropy the head only keeps its input (the hidden states the
    model has already sliced) and returns an empty placeholder, so no logits are computed;
    for a softcapped model it returns the raw logits detached, so the model's softcap code
    produces the returned logits without autograd. Then the loss is computed here. This works
    for any causal LM whose forward ends in ``self.lm_head(hidden_states)``, whatever its
    arguments (they are passed on untouched)."""

    def __init__(self, model, original, linear_cross_entropy, softcap):
        self.model = model
        self.original = original
        self.linear_cross_entropy = linear_cross_entropy
        self.softcap = softcap
        self.signature = inspect.signature(original)
        params = self.signature.parameters
        self.extra = next((n for n, p in params.items() if p.kind is p.VAR_KEYWORD), None)
        self.explicit_return_dict = "return_dict" in params
        functools.update_wrapper(self, original)

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        labels = bound.arguments.get("labels")
        if labels is None or not torch.is_grad_enabled():
            return self.original(*args, **kwargs)  # logits wanted: the model's own forward
        bound.arguments["labels"] = None  # the model computes no loss of its own
        loss_kwargs = bound.arguments.setdefault(self.extra, {}) if self.extra else {}
        return_dict = self._take_return_dict(bound, loss_kwargs)
        head = self.model.get_output_embeddings()
        kept = {}
        if self.linear_cross_entropy:
            def head_forward(hidden):
                kept["hidden"] = hidden
                placeholder = hidden.new_empty((*hidden.shape[:-1], 0), dtype=torch.float32)
                kept["placeholder"] = placeholder
                return placeholder
        else:
            def head_forward(hidden):
                kept["logits"] = logits = F.linear(hidden, head.weight, head.bias)
                return logits.detach()
        ask_dict = {"return_dict": True} if self.explicit_return_dict or self.extra else {}
        with _forward_replaced(head, head_forward):
            outputs = self.original(*bound.args, **bound.kwargs, **ask_dict)
        if not kept:
            raise RuntimeError(f"{type(self.model).__name__}.forward did not call its LM head "
                               f"(get_output_embeddings()); apply_fusedloss cannot patch it")

        if self.linear_cross_entropy:
            if self.softcap is None and outputs.logits is not kept["placeholder"]:
                raise RuntimeError(
                    f"{type(self.model).__name__} transforms its logits after the LM head in a "
                    f"way fusedloss's linear cross-entropy does not reproduce; use "
                    f"apply_fusedloss(model, linear_cross_entropy=False)")
            loss = _linear_causal_lm_loss(kept["hidden"], head, labels, softcap=self.softcap,
                                          **loss_kwargs)
            fields = {k: v for k, v in outputs.items() if k != "logits"}  # logits: None
        else:
            # the raw logits are ours alone (the model returns its softcapped copy): the
            # gradient may overwrite them
            loss = causal_lm_loss(kept["logits"], labels, kept["logits"].shape[-1],
                                  softcap=self.softcap, inplace_backward=True, **loss_kwargs)
            fields = dict(outputs.items())
        fields["loss"] = loss
        outputs = type(outputs)(**fields)
        return outputs if return_dict else outputs.to_tuple()

    def _take_return_dict(self, bound, loss_kwargs):
        """The caller's return_dict (default: the config's), removed from the call: the
        patched call always asks for a ModelOutput and converts at the end."""
        if self.explicit_return_dict:
            wanted = bound.arguments.pop("return_dict", None)
        else:
            wanted = loss_kwargs.pop("return_dict", None)
        if wanted is None:
            wanted = getattr(self.model.config, "return_dict", True)
        return wanted


def _check_causal_lm(model):
    try:
        from transformers import PreTrainedModel
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError as e:
        raise ImportError("apply_fusedloss needs the optional transformers extra: "
                          "pip install 'fusedloss[transformers]' (or -r requirements-extras.txt)"
                          ) from e

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel (a *ForCausalLM), "
                        f"got {name}")
    if LOSS_MAPPING.get(getattr(model, "loss_type", None)) is not ForCausalLMLoss:
        raise ValueError(f"model must be a causal language model (loss_type 'ForCausalLM'), "
                         f"got {name} with loss_type {getattr(model, 'loss_type', None)!r}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"model must be a decoder-only causal LM, got encoder-decoder {name}")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"model's LM head (get_output_embeddings()) must be a torch.nn.Linear, "
                         f"got {type(head).__name__} in {name}")


def apply_fusedloss(model, *, linear_cross_entropy=True):
    """Make this ``*ForCausalLM`` instance train with fusedloss; returns the model.

    ``linear_cross_entropy=True``: training forwards (labels given, grad enabled) compute the
    loss from the hidden states and the LM head without logits (``outputs.logits`` is None).
    ``linear_cross_entropy=False``: the model computes its logits and returns them, and the
    loss is ``fl.cross_entropy`` on them. Applying again replaces the earlier settings.
    See the module's documentation for the details and the differences from transformers."""
    if not isinstance(linear_cross_entropy, bool):
        raise TypeError(f"linear_cross_entropy must be True or False, got {linear_cross_entropy!r}")
    _check_causal_lm(model)
    revert_fusedloss(model)
    softcap = _final_logit_softcap(model)
    saved = {name: model.__dict__[name] for name in ("forward", "_loss_function")
             if name in model.__dict__}
    object.__setattr__(model, _STATE, saved)  # a plain attribute: not a module or parameter
    model.loss_function = causal_lm_loss
    if linear_cross_entropy or softcap is not None:
        model.forward = _Forward(model, model.forward, linear_cross_entropy, softcap)
    return model


def revert_fusedloss(model):
    """Undo :func:`apply_fusedloss` on this instance (no-op if it was not applied); returns
    the model."""
    saved = model.__dict__.pop(_STATE, None)
    if saved is None:
        return model
    for name in ("forward", "_loss_function"):
        if name in saved:
            object.__setattr__(model, name, saved[name])
        else:
            model.__dict__.pop(name, None)
    return model


@contextlib.contextmanager
def fusedloss_patched(model, *, linear_cross_entropy=True):
    """``with fusedloss_patched(model): ...`` trains with fusedloss inside the block and
    restores the model's own behaviour after it, even on an error."""
    apply_fusedloss(model, linear_cross_entropy=linear_cross_entropy)
    try:
        yield model
    finally:
        revert_fusedloss(model)
