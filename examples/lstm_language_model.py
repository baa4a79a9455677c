"""An LSTM language model trained with fusedloss, then trained again with PyTorch's loss.

Text: sentences from the docstrings of the Python standard library's modules (every machine
with Python has them); held-out sentences come from other modules than the training ones.
A Keras-style word tokenizer caps the vocabulary. Each batch is right-padded and carries a
binary padding mask (1 = a real token, 0 = padding). The model is embedding -> LSTM ->
dense layer, whose outputs are the logits (batch, time, vocab), and the loss is the masked
sum of sparse softmax cross-entropy: the padded time steps contribute nothing.

The second run starts from the same weights and sees the same batches; only the loss
function differs. Its loss curve must match fusedloss's within a tolerance, and both runs
report the time spent inside the loss.

    python examples/lstm_language_model.py --plot lm.png
"""

import copy
import math
import random
import re
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import fusedloss as fl
from text_data import (PAD, WordTokenizer, docstrings, final_loss, make_parser, pad_batch,
                       report, setup, split_files, stdlib_files)

BOS, EOS = 2, 3  # the tokenizer's special ids right after PAD and OOV
# Relative difference allowed between the two runs' per-token losses at any step. They
# differ only by float32 rounding inside the loss, which training amplifies slowly.
CURVE_RTOL = 1e-3


def sentences(files):
    """The sentences of the docstrings of `files`."""
    return [sentence for path in files for doc in docstrings(path)
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split()))
            if len(sentence.split()) >= 3]  # not headings and fragments


class LanguageModel(nn.Module):
    def __init__(self, vocab_size, embedding_dim, num_lstm_units, num_lstm_layers):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=PAD)
        self.lstm = nn.LSTM(embedding_dim, num_lstm_units, num_lstm_layers, batch_first=True)
        self.dense = nn.Linear(num_lstm_units, vocab_size)

    def forward(self, input_sequences):
        # Right padding: a padded step comes after every real one, so it cannot change the
        # LSTM's outputs at the real steps; the mask removes its loss.
        lstm_outputs, _ = self.lstm(self.embedding(input_sequences))
        return self.dense(lstm_outputs)  # logits: (batch, time, vocab)


def fusedloss_loss(logits, output_sequences, binary_sequences):
    """sum(sparse_softmax_cross_entropy(labels, logits) * padding_mask), as one fusedloss
    call: the mask and the sum are applied in the same pass that computes the gradient."""
    return fl.cross_entropy(logits.flatten(0, 1), output_sequences.flatten(),
                            mask=binary_sequences.flatten(), reduction="sum")


def pytorch_loss(logits, output_sequences, binary_sequences):
    """The same masked sum written with PyTorch's loss."""
    per_token = F.cross_entropy(logits.flatten(0, 1), output_sequences.flatten(), reduction="none")
    return (per_token * binary_sequences.flatten()).sum()


def make_batch(token_ids, device):
    """Next-token pairs: inputs <s> w1 .. wn, targets w1 .. wn </s>, and the padding mask."""
    input_sequences, _ = pad_batch([[BOS] + s for s in token_ids], device)
    output_sequences, _ = pad_batch([s + [EOS] for s in token_ids], device)
    binary_sequences = output_sequences != PAD
    return input_sequences, output_sequences, binary_sequences


class Run:
    """One training run: a model, Adam on its summed loss, and where its time went.

    Time in the loss = the loss call itself, plus its backward: from loss.backward() until
    autograd hands the logits their gradient (a hook on the logits), the moment the loss's
    own backward is done and the model's begins."""

    def __init__(self, label, model, loss_fn, lr, device):
        self.label, self.model, self.loss_fn, self.device = label, model, loss_fn, device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.losses = []         # per-token training loss of every step
        self.tokens = 0          # real (unpadded) target tokens of the timed steps
        self.step_seconds = 0.0  # forward, backward and optimizer of the timed steps
        self.loss_seconds = 0.0  # the part of step_seconds spent inside the loss
        self.held_out = None     # per-token loss on the held-out sentences, after training

    def now(self):
        if self.device.type == "cuda":  # kernels run asynchronously: wait for them
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step(self, input_sequences, output_sequences, binary_sequences, timed):
        start = self.now()
        logits = self.model(input_sequences)
        loss_start = self.now()
        loss = self.loss_fn(logits, output_sequences, binary_sequences)
        in_loss = self.now() - loss_start

        def loss_backward_done(grad):
            nonlocal in_loss
            in_loss += self.now() - backward_start

        logits.register_hook(loss_backward_done)
        self.optimizer.zero_grad()
        backward_start = self.now()
        loss.backward()
        self.optimizer.step()
        real_tokens = int(binary_sequences.sum())
        if timed:
            self.step_seconds += self.now() - start
            self.loss_seconds += in_loss
            self.tokens += real_tokens
        self.losses.append(loss.item() / real_tokens)

    @property
    def tokens_per_s(self):
        return self.tokens / self.step_seconds


@torch.no_grad()
def held_out_loss(model, sequences, batch_size, device):
    """Per-token cross-entropy over held-out sentences (mean over real tokens)."""
    total, tokens = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        batch = sequences[i:i + batch_size]
        input_sequences, output_sequences, binary_sequences = make_batch(batch, device)
        total += fusedloss_loss(model(input_sequences), output_sequences, binary_sequences).item()
        tokens += int(binary_sequences.sum())
    return total / tokens


def main(argv=None):
    parser = make_parser(__doc__, steps=300, batch_size=32, lr=3e-3)
    parser.add_argument("--vocab-size", type=int, default=2000, help="tokenizer's num_words")
    parser.add_argument("--max-words", type=int, default=32, help="longest sentence, in words")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    device = setup(args)
    started = time.perf_counter()

    train_files, held_out_files = split_files(stdlib_files())
    train_text = sentences(train_files)
    tokenizer = WordTokenizer(args.vocab_size, specials=["<s>", "</s>"]).fit_on_texts(train_text)
    train_ids = [s[:args.max_words] for s in tokenizer.texts_to_sequences(train_text)]
    held_out_text = sentences(held_out_files)
    held_out_ids = [s[:args.max_words] for s in tokenizer.texts_to_sequences(held_out_text)]
    rng = random.Random(args.seed)
    # a fixed sample of the held-out sentences (about 14,000 tokens) keeps evaluation quick
    held_out_ids = rng.sample(held_out_ids, min(1024, len(held_out_ids)))
    batches = [rng.sample(train_ids, args.batch_size) for _ in range(args.steps)]
    print(f"{len(train_ids)} training sentences from {len(train_files)} modules; held out: "
          f"{len(held_out_ids)} sentences sampled from {len(held_out_files)} other modules; "
          f"vocabulary {args.vocab_size}")

    model = LanguageModel(args.vocab_size, 64, 128, 1).to(device)
    fused = Run("fusedloss", model, fusedloss_loss, args.lr, device)
    # the same initial weights
    torch_run = Run("pytorch", copy.deepcopy(model), pytorch_loss, args.lr, device)
    # The runs advance in lockstep on the same batches, so a busy machine slows both alike.
    # Step 1 is not timed: it pays the libraries' one-time start-up.
    progress = tqdm(batches, desc="training", disable=args.quiet, file=sys.stdout)
    for step, token_ids in enumerate(progress):
        batch = make_batch(token_ids, device)
        for run in (fused, torch_run):
            run.step(*batch, timed=step > 0)
        if step > 0:
            tokens_per_s = f"{fused.tokens_per_s:,.0f} vs {torch_run.tokens_per_s:,.0f}"
            progress.set_postfix(loss=f"{fused.losses[-1]:.3f}", tok_s=tokens_per_s)
    for run in (fused, torch_run):
        run.held_out = held_out_loss(run.model, held_out_ids, 256, device)
        print(f"{run.label:>9}: loss {run.losses[0]:.3f} -> {final_loss(run.losses):.3f} "
              f"nats/token (last 10 steps), {run.tokens_per_s:,.0f} tokens/s, "
              f"{run.loss_seconds:.2f} s in the loss, held-out {run.held_out:.3f} "
              f"(perplexity {math.exp(run.held_out):.0f})")

    max_rel_diff = max(abs(a - b) / b for a, b in zip(fused.losses, torch_run.losses))
    agree = max_rel_diff <= CURVE_RTOL
    print(f"loss curves {'agree' if agree else 'DIFFER'}: largest relative difference "
          f"{max_rel_diff:.1e} over {args.steps} steps (tolerance {CURVE_RTOL:.0e})")
    print(f"time in the loss, steps 2..{args.steps}: fusedloss {fused.loss_seconds:.2f} s, PyTorch "
          f"{torch_run.loss_seconds:.2f} s ({torch_run.loss_seconds / fused.loss_seconds:.1f}x); "
          "each is the loss call plus its backward until the logits' gradient is ready (a tensor "
          "hook on the logits), the LSTM and Adam not included")
    report(args, "lstm_language_model",
           {"fusedloss": fused.losses, "PyTorch F.cross_entropy": torch_run.losses},
           "LSTM language model, stdlib docstrings", "training loss (nats/token)", started,
           held_out=f"{fused.held_out:.3f}", curves_agree=agree,
           loss_seconds_fusedloss=f"{fused.loss_seconds:.2f}",
           loss_seconds_pytorch=f"{torch_run.loss_seconds:.2f}")
    return dict(fusedloss=fused, pytorch=torch_run, curves_agree=agree, max_rel_diff=max_rel_diff)


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["curves_agree"] else 1)
