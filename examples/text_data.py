"""What the examples share: real text every machine has (the Python standard library's own
source files), a Keras-style word tokenizer, right-padded batches, the command-line flags
and how a run ends (loss-curve plot, summary line)."""

import argparse
import ast
import collections
import io
import os
import re
import sysconfig
import time
import tokenize

import torch

PAD = 0  # padding id: the mask is 0 exactly where a batch holds PAD
OOV = 1  # every word outside the vocabulary cap
# Keras' Tokenizer default filters: punctuation is dropped, so a word is letters and digits
_KERAS_FILTERS = re.compile(r"[!\"#$%&()*+,\-./:;<=>?@\[\\\]^_`{|}~\t\n]")


def make_parser(doc, steps, batch_size, lr):
    """The flags every example takes, with its own defaults."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--steps", type=int, default=steps,
                        help="training steps (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    parser.add_argument("--plot", metavar="PATH", help="write the loss curve to this PNG")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help="sequences per batch (default %(default)s)")
    parser.add_argument("--lr", type=float, default=lr,
                        help="Adam's learning rate (default %(default)s)")
    return parser


def setup(args):
    """Seeded, --threads CPU threads, and the device to train on."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def stdlib_files():
    """The standard library's top-level modules, sorted: the same list on every run of one
    Python version, and present on every machine that has Python."""
    root = sysconfig.get_paths()["stdlib"]
    return [os.path.join(root, name) for name in sorted(os.listdir(root)) if name.endswith(".py")]


def split_files(files, every=5):
    """Held-out = every `every`-th file. Splitting by file, not by line, keeps each module's
    repeated phrases and identifiers on one side only."""
    return ([f for i, f in enumerate(files) if i % every],
            [f for i, f in enumerate(files) if not i % every])


def read_source(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def docstrings(path):
    """The docstrings of a module and of its classes and functions."""
    try:
        tree = ast.parse(read_source(path))
    except SyntaxError:  # a module this Python cannot parse has no docstrings for us
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for node in ast.walk(tree) if isinstance(node, kinds)
            for d in [ast.get_docstring(node)] if d]


def code_and_comment_lines(path):
    """(code lines, comment lines) of a source file, found by Python's own tokenizer: a code
    line is a line with tokens outside strings and comments, its trailing comment cut off; a
    comment line is a line holding only a comment, its '#' removed."""
    code, comments = [], []
    lines = read_source(path).splitlines()
    code_rows, comment_cols = set(), {}
    try:
        # tokenize the very lines indexed below: splitlines() also breaks at form feeds,
        # which the tokenizer would not, and the row numbers would drift apart
        for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
            if tok.type == tokenize.COMMENT:
                comment_cols[tok.start[0]] = tok.start[1]
            elif tok.type in (tokenize.NAME, tokenize.OP, tokenize.NUMBER):
                code_rows.add(tok.start[0])
    except (tokenize.TokenError, SyntaxError):
        return [], []
    for row, text in enumerate(lines, start=1):
        cut = text[:comment_cols.get(row, len(text))]
        if row in code_rows:
            code.append(cut.strip())
        elif row in comment_cols:
            comments.append(text[comment_cols[row]:].lstrip("#").strip())
    return code, comments


def words(text):
    """Keras' text_to_word_sequence: lower case, punctuation dropped, split on whitespace."""
    return _KERAS_FILTERS.sub(" ", text.lower()).split()


class WordTokenizer:
    """Keras-style, `num_words` ids in all: 0 is padding, 1 is OOV, then the `specials`, then
    the most frequent words of the fitted texts (ties: first seen); any other word is OOV."""

    def __init__(self, num_words, specials=()):
        self.num_words = num_words
        self.specials = list(specials)  # reserved ids right after OOV, e.g. <s> and </s>

    def fit_on_texts(self, texts):
        counts = collections.Counter(w for t in texts for w in words(t))
        first = 2 + len(self.specials)
        kept = [w for w, _ in counts.most_common(self.num_words - first)]
        self.word_index = {w: i for i, w in enumerate(["<pad>", "<oov>"] + self.specials + kept)}
        return self

    def texts_to_sequences(self, texts):
        return [[self.word_index.get(w, OOV) for w in words(t)] for t in texts]


def pad_batch(sequences, device):
    """Right-padded (batch, longest) ids and the lengths."""
    lengths = torch.tensor([len(s) for s in sequences])
    batch = torch.full((len(sequences), int(lengths.max())), PAD, dtype=torch.long)
    for row, s in enumerate(sequences):
        batch[row, :len(s)] = torch.tensor(s)
    return batch.to(device), lengths.to(device)


def final_loss(losses, steps=10):
    """Mean loss of the last `steps` steps: one batch's loss alone is noisy."""
    tail = losses[-steps:]
    return sum(tail) / len(tail)


def save_loss_plot(path, curves, title, ylabel="training loss", bars=None):
    """One line per named curve, PNG; matplotlib's Agg backend needs no display. `bars`
    (title, {label: value}) adds a bar chart beside the curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if bars is None:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    else:
        fig, (ax, bar_ax) = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100,
                                         gridspec_kw={"width_ratios": [3, 2]})
        bar_title, values = bars
        bar_ax.barh(list(values)[::-1], list(values.values())[::-1], color="tab:gray")
        for y, value in enumerate(list(values.values())[::-1]):
            bar_ax.annotate(f" {value:.0f}", (value, y), va="center")
        bar_ax.set(title=bar_title)
        bar_ax.margins(x=0.2)
    for (label, values), style in zip(curves.items(), ["-", "--", ":", "-."]):
        ax.plot(range(1, len(values) + 1), values, style, label=label)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def report(args, name, curves, title, ylabel, started, bars=None, **results):
    """How every example ends: its loss curves (and `bars`, see save_loss_plot) as a PNG when
    --plot was given, then one summary line (the first curve's loss at step 1 and over its
    last steps, then `results`)."""
    if args.plot:
        save_loss_plot(args.plot, curves, title, ylabel, bars)
        print(f"plot: {args.plot}")
    losses = next(iter(curves.values()))
    fields = "".join(f" {key}={value}" for key, value in results.items())
    print(f"summary: {name} steps={args.steps} loss {losses[0]:.3f}->{final_loss(losses):.3f}"
          f"{fields} wall={time.perf_counter() - started:.0f}s")
