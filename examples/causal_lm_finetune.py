"""Fine-tuning a Hugging Face transformers causal LM with fusedloss: one call, less memory.

A tiny Llama-style model, built from transformers' LlamaConfig with random weights (nothing
is downloaded), learns the sentences of the standard library's docstrings (as
lstm_language_model.py does), word-tokenized, right-padded, labels -100 on the padding: the
usual supervised fine-tuning batch. Three runs start from the same weights and see the same
batches:

- transformers: the model's own loss (logits, a float32 cross-entropy on them);
- fusedloss logits: `apply_fusedloss(model, linear_cross_entropy=False)`, the model's logits,
  then fusedloss's one-pass cross-entropy;
- fusedloss linear CE: `apply_fusedloss(model)`, the loss from the hidden states and the LM
  head, chunk by chunk: the N x V logits never exist (`outputs.logits` is None).

Their loss curves must agree (the first step's loss within 1e-5, the last steps' mean within
1e-2: training amplifies float32 roundings; see FIRST_STEP_RTOL). Then the peak memory of one training step (forward + backward)
of each is measured in a fresh process at the largest batch shape (batch x --max-words
tokens): the growth of the process's resident memory (peak RSS, on CUDA the allocator's peak)
over what the model, its gradients and the batch already hold. That growth is the step's
activations, and, for a large vocabulary, mostly the logits and what the loss keeps of them.

Needs the optional transformers extra: pip install -r requirements-extras.txt

    python examples/causal_lm_finetune.py --plot causal_lm.png
"""

import argparse
import copy
import json
import os
import random
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from fusedloss.integrations.transformers import apply_fusedloss
from lstm_language_model import sentences
from text_data import (PAD, WordTokenizer, final_loss, make_parser, pad_batch, report, setup,
                       split_files, stdlib_files)

BOS = 2  # WordTokenizer's first special id (after <pad> = 0 and <oov> = 1)
# How close a fusedloss run must stay to transformers' loss. Step 1 (same weights, same batch)
# compares the losses themselves: float32 roundings, ~1e-7. Later steps see weights that have
# drifted apart by those roundings, amplified by training: here a run whose logits' gradient
# was perturbed by random relative noise of 1e-7 is up to 2e-5 off by step 55 and 4e-4 by step
# 80, as far as the fusedloss runs. So the end of training is compared on the mean loss of the
# last 10 steps, with room for that drift; a wrong loss is off by far more from step 1 on.
FIRST_STEP_RTOL = 1e-5
FINAL_RTOL = 1e-2
# run name: apply_fusedloss's linear_cross_entropy (None: not applied)
MODES = {"transformers": None, "fusedloss logits": False, "fusedloss linear CE": True}
SHORT = {"transformers": "transformers", "fusedloss logits": "logits",
         "fusedloss linear CE": "linear_ce"}  # in the summary line
# Each allocation of 64 KiB or more is its own mmap, returned to the OS when freed, so the
# resident memory follows the live tensors (glibc otherwise keeps freed ones for reuse).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def tiny_llama(vocab_size, seed, device):
    # the optional extra, imported only here: without it this module still imports (and
    # tests/test_examples.py skips this example)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         pad_token_id=PAD, bos_token_id=BOS)
    return LlamaForCausalLM(config).to(device).train()


def prepared(model, mode):
    linear = MODES[mode]
    return model if linear is None else apply_fusedloss(model, linear_cross_entropy=linear)


def make_batch(token_ids, device):
    """<s> w1 .. wn right-padded; transformers shifts the labels itself, and -100 marks the
    positions that are not trained on (here the padding)."""
    input_ids, lengths = pad_batch([[BOS] + s for s in token_ids], device)
    attention_mask = torch.arange(input_ids.shape[1], device=device) < lengths[:, None]
    labels = input_ids.masked_fill(~attention_mask, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask.long(), labels=labels)


def peak_step_memory(args, modes):
    """{mode: bytes one forward + backward adds at its peak} (see the module's docstring),
    each measured by this script in a fresh process (--probe-memory), so that no run's
    leftovers count. The processes run at once: each measures only itself."""
    def command(mode):
        return [sys.executable, os.path.abspath(__file__), "--probe-memory", mode,
                "--vocab-size", str(args.vocab_size), "--max-words", str(args.max_words),
                "--batch-size", str(args.batch_size), "--seed", str(args.seed),
                "--device", args.device, "--threads", str(args.threads)]
    probes = {mode: subprocess.Popen(command(mode), env={**os.environ, **MALLOC_ENV},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for mode in modes}
    extra = {}
    for mode, probe in probes.items():
        out, err = probe.communicate(timeout=600)
        if probe.returncode != 0:
            raise RuntimeError(f"memory probe of {mode!r} failed:\n{err}")
        extra[mode] = json.loads(out.strip().splitlines()[-1])["extra_bytes"]
    return extra


def resident_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def probe_memory(args, device):
    """In the fresh process: a full batch of random tokens, every parameter's gradient
    already allocated, then one training step; prints its peak extra bytes."""
    model = prepared(tiny_llama(args.vocab_size, args.seed, device), args.probe_memory)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    generator = torch.Generator().manual_seed(args.seed)
    # max_words - 1 words and <s>: the longest training row
    tokens = torch.randint(3, args.vocab_size, (args.batch_size, args.max_words - 1),
                           generator=generator).tolist()
    batch = make_batch(tokens, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # Linux: writing 5 to clear_refs resets the peak resident size (VmHWM) to the current
        # one, so imports and start-up do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = resident_bytes("VmHWM")
    model(**batch).loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resident_bytes("VmHWM")
    print(json.dumps({"extra_bytes": peak - base}))


def main(argv=None):
    parser = make_parser(__doc__, steps=100, batch_size=16, lr=3e-3)
    parser.add_argument("--vocab-size", type=int, default=16000, help="tokenizer's num_words")
    parser.add_argument("--max-words", type=int, default=64, help="longest sentence, in words")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--probe-memory", choices=list(MODES), help=argparse.SUPPRESS)  # internal: the probe's process
    args = parser.parse_args(argv)
    device = setup(args)
    if args.probe_memory:
        return probe_memory(args, device)
    started = time.perf_counter()

    train_files, _ = split_files(stdlib_files())
    text = sentences(train_files)
    tokenizer = WordTokenizer(args.vocab_size, specials=["<s>"]).fit_on_texts(text)
    token_ids = [s[:args.max_words - 1] for s in tokenizer.texts_to_sequences(text)]
    rng = random.Random(args.seed)
    batches = [rng.sample(token_ids, args.batch_size) for _ in range(args.steps)]
    modes = list(MODES)
    print(f"{len(token_ids)} training sentences, vocabulary {args.vocab_size}, batches of "
          f"{args.batch_size} sentences of at most {args.max_words} tokens; runs: "
          f"{', '.join(modes)}")

    base = tiny_llama(args.vocab_size, args.seed, device)
    runs = {mode: prepared(copy.deepcopy(base), mode) for mode in modes}
    optimizers = {mode: torch.optim.AdamW(model.parameters(), lr=args.lr)
                  for mode, model in runs.items()}
    losses = {mode: [] for mode in modes}
    progress = tqdm(batches, desc="fine-tuning", disable=args.quiet, file=sys.stdout)
    for token_batch in progress:  # the runs advance in lockstep on the same batches
        batch = make_batch(token_batch, device)
        for mode, model in runs.items():
            loss = model(**batch).loss
            optimizers[mode].zero_grad()
            loss.backward()
            optimizers[mode].step()
            losses[mode].append(loss.item())
        progress.set_postfix(loss=f"{losses[modes[-1]][-1]:.3f}")

    reference = losses["transformers"]
    first_diff = max(abs(losses[mode][0] - reference[0]) / reference[0] for mode in modes)
    final_diff = max(abs(final_loss(losses[mode]) - final_loss(reference)) / final_loss(reference)
                     for mode in modes)
    agree = first_diff <= FIRST_STEP_RTOL and final_diff <= FINAL_RTOL
    for mode in modes:
        print(f"{mode:>20}: loss {losses[mode][0]:.3f} -> {final_loss(losses[mode]):.3f} "
              f"nats/token (last 10 steps)")
    print(f"loss curves {'agree' if agree else 'DIFFER'} with transformers' loss: relative "
          f"difference {first_diff:.1e} at step 1 (tolerance {FIRST_STEP_RTOL:.0e}), "
          f"{final_diff:.1e} over the last 10 steps (tolerance {FINAL_RTOL:.0e})")

    memory = {}
    if not args.no_memory:
        tokens = args.batch_size * args.max_words
        logits_mb = tokens * args.vocab_size * 4 / 2**20
        print(f"peak memory of one training step, {tokens} tokens x {args.vocab_size} classes "
              f"(float32 logits: {logits_mb:.0f} MB), each in a fresh process:")
        memory = {mode: extra / 2**20 for mode, extra in peak_step_memory(args, modes).items()}
        for mode in modes:
            saved = (f"  ({memory['transformers'] / memory[mode]:.1f}x less than transformers)"
                     if mode != "transformers" and memory[mode] > 0 else "")
            print(f"{mode:>20}: {memory[mode]:7.1f} MB{saved}")

    report(args, "causal_lm_finetune", {mode: losses[mode] for mode in modes},
           "Tiny Llama fine-tuned on stdlib docstrings", "training loss (nats/token)", started,
           bars=("peak memory of one step (MB)", memory) if memory else None,
           curves_agree=agree,
           **{f"peak_mb_{SHORT[mode]}": f"{mb:.0f}" for mode, mb in memory.items()})
    return dict(losses=losses, curves_agree=agree, first_diff=first_diff, final_diff=final_diff,
                memory_mb=memory, modes=modes)


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result is None or result["curves_agree"] else 1)
