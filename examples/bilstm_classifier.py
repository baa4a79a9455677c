"""A bidirectional LSTM that tells Python code from English prose, trained with fusedloss's
sigmoid cross-entropy.

Data: the lines of the Python standard library's modules. A line holding only a comment is
English prose (label 1, its '#' removed); a line of code is Python (label 0, its trailing
comment removed). The Keras-style tokenizer drops punctuation, so the model must tell them
apart by their words ("self", "return", "if", "none" against English), not by symbols.
Held-out lines come from other modules than the training lines, and any held-out line whose
words also occur as a training line is dropped, so accuracy is measured on unseen text.
Both splits are balanced: guessing scores 50%.

The model gathers each sequence's output at its last valid time step (from the sequence
lengths), turns it into one logit with a dense layer, and the loss is the sum over the
batch of sigmoid cross-entropy.

    python examples/bilstm_classifier.py --plot classifier.png
"""

import random
import sys
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from tqdm import tqdm

import fusedloss as fl
from text_data import (PAD, WordTokenizer, code_and_comment_lines, final_loss, make_parser,
                       pad_batch, report, setup, split_files, stdlib_files, words)

CODE, PROSE = 0, 1


def labelled_lines(files, min_words):
    """{word tuple: (line, label)} for the code and comment lines of `files` with at least
    `min_words` words, one entry per word sequence; label None where the same words were
    seen both as code and as prose (kept, so that a held-out line can be checked against it,
    but never used as an example)."""
    lines = {}
    for path in files:
        code, comments = code_and_comment_lines(path)
        for label, texts in [(CODE, code), (PROSE, comments)]:
            for text in texts:
                key = tuple(words(text))
                if len(key) < min_words:
                    continue
                seen = lines.get(key)
                if seen is None:
                    lines[key] = (text, label)
                elif seen[1] != label:
                    lines[key] = (seen[0], None)
    return lines


def balanced(lines, rng):
    """As many code lines as prose lines (code lines far outnumber comments), shuffled;
    ambiguous lines (label None) are left out."""
    by_label = {label: sorted(text for text, lab in lines.values() if lab == label)
                for label in (CODE, PROSE)}
    n = min(len(texts) for texts in by_label.values())
    examples = [(text, label) for label, texts in by_label.items() for text in rng.sample(texts, n)]
    rng.shuffle(examples)
    return examples


class ClassificationModel(nn.Module):
    def __init__(self, vocab_size, embedding_dim, num_lstm_units):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=PAD)
        self.lstm = nn.LSTM(embedding_dim, num_lstm_units, batch_first=True, bidirectional=True)
        self.dense = nn.Linear(2 * num_lstm_units, 1)

    def forward(self, sequences, sequence_lengths):
        # Packing makes the backward direction start at each sequence's own last token rather
        # than at the padding, as a bidirectional dynamic RNN given sequence lengths does.
        packed = pack_padded_sequence(self.embedding(sequences), sequence_lengths.cpu(),
                                      batch_first=True, enforce_sorted=False)
        lstm_outputs, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)
        # lstm_outputs: (batch, time, 2 * units), forward and backward outputs side by side;
        # gather each row's last valid time step.
        rows = torch.arange(len(sequences), device=sequences.device)
        final_outputs = lstm_outputs[rows, sequence_lengths - 1]
        return self.dense(final_outputs).squeeze(-1)  # one logit per sequence


def calculate_loss(logits, labels):
    """Sigmoid cross-entropy of each sequence, summed over the batch."""
    return fl.sigmoid_cross_entropy_with_logits(labels=labels.float(), logits=logits).sum()


def encode(tokenizer, examples, max_words, device):
    texts = [text for text, _ in examples]
    sequences = [s[:max_words] for s in tokenizer.texts_to_sequences(texts)]
    batch, lengths = pad_batch(sequences, device)
    return batch, lengths, torch.tensor([label for _, label in examples], device=device)


@torch.no_grad()
def accuracy(model, tokenizer, examples, max_words, device, batch_size=512):
    correct = 0
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        sequences, lengths, labels = encode(tokenizer, batch, max_words, device)
        correct += int(((model(sequences, lengths) > 0).long() == labels).sum())
    return correct / len(examples)


def main(argv=None):
    parser = make_parser(__doc__, steps=400, batch_size=64, lr=3e-3)
    parser.add_argument("--vocab-size", type=int, default=4000, help="tokenizer's num_words")
    parser.add_argument("--max-words", type=int, default=24, help="longest line, in words")
    args = parser.parse_args(argv)
    device = setup(args)
    started = time.perf_counter()

    rng = random.Random(args.seed)
    train_files, held_out_files = split_files(stdlib_files())
    train_lines = labelled_lines(train_files, min_words=3)
    held_out_lines = {k: v for k, v in labelled_lines(held_out_files, min_words=3).items()
                      if k not in train_lines}  # no line the model could have memorised
    train_examples, held_out_examples = balanced(train_lines, rng), balanced(held_out_lines, rng)
    tokenizer = WordTokenizer(args.vocab_size).fit_on_texts(text for text, _ in train_examples)
    print(f"{len(train_examples)} training lines from {len(train_files)} modules, "
          f"{len(held_out_examples)} held-out lines from {len(held_out_files)} others; "
          "half code, half prose")

    model = ClassificationModel(args.vocab_size, 32, 64).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    progress = tqdm(range(args.steps), desc="bilstm", disable=args.quiet, file=sys.stdout)
    for _ in progress:
        batch = rng.sample(train_examples, args.batch_size)
        sequences, lengths, labels = encode(tokenizer, batch, args.max_words, device)
        loss = calculate_loss(model(sequences, lengths), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item() / args.batch_size)
        progress.set_postfix(loss=f"{losses[-1]:.3f}")

    held_out_accuracy = accuracy(model, tokenizer, held_out_examples, args.max_words, device)
    print(f"loss {losses[0]:.3f} -> {final_loss(losses):.3f} per line (last 10 steps); "
          f"held-out accuracy {held_out_accuracy:.1%} on {len(held_out_examples)} lines "
          "(chance 50%)")
    report(args, "bilstm_classifier", {"fusedloss sigmoid CE": losses},
           "BiLSTM code-vs-prose classifier", "training loss (per line)", started,
           held_out_accuracy=f"{held_out_accuracy:.3f}")
    return dict(losses=losses, held_out_accuracy=held_out_accuracy)


if __name__ == "__main__":
    main()
