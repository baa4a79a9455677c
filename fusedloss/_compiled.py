"""softmax cross-entropy (mean/sum) under torch.compile: the gradient written into the logits
wherever the compiled graph shows they are dead after the loss, as inductor's own
cross-entropy does.

Why it works (read the AOT graphs with TORCH_LOGS=aot_graphs,post_grad_graphs):
  - the forward calls the mutating op softmax_ce_inplace on `logits.clone()`. AOTAutograd
    functionalizes the pair into `clone` + `auto_functionalized(softmax_ce_inplace, logits=
    clone)`, a functional program: the caller's logits are not changed, whatever the option.
  - inductor's post-grad passes then drop the clone (remove_noop_ops: a clone with the same
    metadata is a no-op in a functional graph) and re-inplace the auto_functionalized call
    onto the logits themselves when no later node reads them (reinplace.py: can_inplace). So
    a graph whose logits die at the loss (`h @ W.t()` then the loss) writes the gradient
    over them: one logits-sized buffer. Where the logits are still read (returned, used
    after the loss, saved by the op that produced them), the re-inplacing pass keeps a copy
    instead: more memory, never a wrong value. This is why the eager rules of
    inplace_backward (version counter, "saved by its producer") need no check here: the
    compiler enforces them.
  - leaf logits (a parameter, a user tensor: a graph input, as dynamo shows them while it
    traces) are never overwritten: the graph would have to write into its caller's tensor,
    and the re-inplacing pass refuses (no copy back to the input). For them the forward calls
    the out-of-place softmax_ce instead, which writes the gradient into a buffer of its own
    while it reads the logits: a clone first would move the logits' bytes twice more, into a
    buffer faulted in afresh on every call (small logits are copied all the same, where the
    copy costs less than the op's Python autograd dispatch: _route.py,
    _OUT_OF_PLACE_MIN_BYTES). Logits computed before the compiled function (a
    graph input, but not a leaf) look like the graph's own intermediates while dynamo traces,
    so they take the clone: a copy, never a wrong value.
  - the backward multiplies the saved gradient by grad_output in an inductor pointwise
    kernel (the traced form of the gradient hand-over, _handover.py). The saved gradient is
    a backward-graph input that nothing else holds (a donated buffer,
    torch._functorch.config.donated_buffer), so inductor writes the product into it: no
    second N x C buffer. The product is one pass even when grad_output
    is 1 (the value is known only when the graph runs). Calling the mutating scale_grad_ on
    the saved gradient instead (no pass at 1 in eager) does not save it: a graph may mutate
    an input only where it copies the result back to it (reinplace.py: can_inplace), which
    a saved tensor never has, so inductor copies the gradient first (a kernel that loads and
    stores every element, in the same donated buffer), a pass as well, plus the op's call.
"""

import warnings

import torch

_warned = set()


@torch.compiler.assume_constant_result
def warn_once(key, message):
    """One warning per reason and process (a training loop would repeat it every step).
    Called while dynamo traces: assume_constant_result runs it for real at trace time (dynamo
    would otherwise drop the warning from the graph)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=2)
    return True


INPUT_LOGITS = (
    "fusedloss: cross_entropy(inplace_backward=True) under torch.compile with logits that are "
    "a leaf tensor (a parameter or a tensor that does not come from a differentiable op): "
    "they are never overwritten, so the gradient takes a buffer of its own (as in eager).")


def make_function(lib):
    """The compiled path's autograd.Function over the ops of `lib` (one per namespace)."""
    class SoftmaxCECompiled(torch.autograd.Function):
        """cross_entropy (mean/sum) in a compiled graph, gradient of the logits only.
        Returns (loss, row_stats, extras, argmax) like softmax_ce, less the gradient."""

        @staticmethod
        def forward(ctx, logits, target, weight, mask, ignore_index, label_smoothing, z_loss,
                    softcap, reduction, mean_eps, want_accuracy, denominators, token_scaling,
                    want_argmax, out_of_place):
            if out_of_place:
                # Leaf logits, never overwritten (module docstring): the kernel writes the
                # gradient into a buffer of its own while it reads them, with no copy first.
                loss, row_stats, grad, extras, argmax = lib.softmax_ce(
                    logits, target, weight, mask, ignore_index, label_smoothing, z_loss,
                    softcap, reduction, mean_eps, True, want_accuracy, denominators,
                    token_scaling, want_argmax)
            else:
                # Functionally a new buffer; in place over the logits when they are dead
                # (module docstring).
                grad = logits.clone(memory_format=torch.contiguous_format)
                loss, row_stats, extras, argmax = lib.softmax_ce_inplace(
                    grad, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap,
                    reduction, mean_eps, want_accuracy, denominators, token_scaling,
                    want_argmax)
            ctx.save_for_backward(grad)
            ctx.mark_non_differentiable(row_stats, extras, argmax)
            ctx.set_materialize_grads(False)
            return loss, row_stats, extras, argmax

        @staticmethod
        def backward(ctx, grad_loss, *_grads_of_other_outputs):
            none_for_the_rest = (None,) * 14
            if grad_loss is None:
                return (None,) + none_for_the_rest
            (grad,) = ctx.saved_tensors
            return (grad * grad_loss,) + none_for_the_rest

    return SoftmaxCECompiled
