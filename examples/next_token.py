"""Next-token prediction, and the identities its loss rests on, checked against fusedloss.

1. The data: from a batch of token windows x, the inputs are x[:, :-1] and the targets
   x[:, 1:], so every position of every window is one prediction of the token after it.
2. The identities: log_softmax is log(softmax); the negative log-likelihood of log_softmax
   is cross-entropy; its gradient is softmax - one_hot; a padding mask's masked sum and
   mean; sigmoid cross-entropy's formula. Each is checked in float64 against fusedloss.
3. Training: a character-level LSTM learns the Zen of Python (the text `import this`
   prints), with fusedloss's cross-entropy as its loss, and then continues a prompt.

    python examples/next_token.py --plot next_token.png
"""

import codecs
import contextlib
import io
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import fusedloss as fl
from text_data import final_loss, make_parser, report, setup


def zen_of_python():
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the text
        import this
    return codecs.decode(this.s, "rot13")


class Checks:
    """Prints each identity with its largest difference; remembers whether all held."""

    def __init__(self):
        self.failed = []
        self.count = 0

    def __call__(self, name, actual, expected, atol=1e-10):
        diff = (actual.detach() - expected.detach()).abs().max().item()
        ok = diff <= atol
        self.count += 1
        if not ok:
            self.failed.append(name)
        print(f"  [{'ok' if ok else 'FAILED'}] {name}  (largest difference {diff:.1e})")


def show_next_token_pairs(text, vocab, context_size):
    """Step 1: how one window of text becomes context_size predictions."""
    window = torch.tensor([vocab.index(c) for c in text[:context_size + 1]]).unsqueeze(0)
    x, y = window[:, :-1], window[:, 1:]  # inputs, and the targets: the inputs shifted by one
    print(f"1. Next-token pairs: a window of {context_size + 1} characters gives {context_size} "
          f"(context -> target) predictions")
    for t in range(context_size):
        context = "".join(vocab[i] for i in x[0, :t + 1])
        print(f"  {context!r:>{context_size + 3}} -> {vocab[y[0, t]]!r}")


def check_identities(check, generator, device):
    """Step 2: each identity on random float64 logits, against fusedloss on `device`."""
    batch_size, context_size, n_vocab = 3, 4, 8
    logits = torch.randn(batch_size, context_size, n_vocab, dtype=torch.float64,
                         generator=generator).to(device).requires_grad_()
    targets = torch.randint(n_vocab, (batch_size, context_size), generator=generator).to(device)
    # the (N, C) layout losses take: one row per prediction
    rows, row_targets = logits.view(-1, n_vocab), targets.view(-1)
    n_rows = rows.shape[0]

    print("2. Identities (float64, checked against fusedloss)")
    log_probs = F.log_softmax(rows, dim=-1)
    check("log_softmax(z) == log(softmax(z))", log_probs, torch.log(F.softmax(rows, dim=-1)))

    nll_by_hand = torch.stack([-log_probs[i, row_targets[i]] for i in range(n_rows)]).mean()
    nll = F.nll_loss(log_probs, row_targets)
    check("NLL of log_softmax == mean of -log p[target]", nll, nll_by_hand)
    fused_ce = fl.cross_entropy(rows, row_targets)
    check("fusedloss cross_entropy == NLL of log_softmax", fused_ce, nll)
    check("fusedloss cross_entropy == torch cross_entropy", fused_ce,
          F.cross_entropy(rows, row_targets))

    # d(mean CE)/dz = (softmax(z) - one_hot(target)) / N, which fusedloss computes in its forward
    (fused_grad,) = torch.autograd.grad(fused_ce, logits)
    expected_grad = (F.softmax(rows, dim=-1) - F.one_hot(row_targets, n_vocab)) / n_rows
    check("fusedloss gradient == (softmax - one_hot) / N", fused_grad.view(-1, n_vocab),
          expected_grad)

    per_position = fl.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
    check("TF-named sparse CE == -log p[target] per position", per_position,
          -log_probs.gather(1, row_targets[:, None]).view(batch_size, context_size))

    # a padding mask: the last positions of rows 1 and 2 are padding (0)
    mask = torch.ones(batch_size, context_size, dtype=torch.float64, device=device)
    mask[1, -1:] = 0
    mask[2, -2:] = 0
    masked_sum = (per_position * mask).sum()  # the LSTM language model's loss
    check("masked sum == fusedloss cross_entropy(mask=, reduction='sum')", masked_sum,
          fl.cross_entropy(rows, row_targets, mask=mask.view(-1), reduction="sum"))
    check("masked sum == torch cross_entropy(ignore_index=, reduction='sum')", masked_sum,
          F.cross_entropy(rows, row_targets.masked_fill(mask.view(-1) == 0, -100), reduction="sum"))
    check("masked mean == fusedloss sequence_loss (TF)", masked_sum / mask.sum(),
          fl.sequence_loss(logits, targets, mask))  # TF divides by sum(mask) + 1e-12

    # sigmoid cross-entropy, TF's documented stable form: max(x, 0) - x*z + log(1 + exp(-|x|))
    x = torch.randn(batch_size, context_size, dtype=torch.float64, generator=generator).to(device)
    z = torch.randint(2, x.shape, generator=generator).double().to(device)
    stable_form = x.clamp(min=0) - x * z + torch.log1p(torch.exp(-x.abs()))
    check("fusedloss sigmoid CE == max(x,0) - x*z + log(1+exp(-|x|))",
          fl.sigmoid_cross_entropy_with_logits(labels=z, logits=x), stable_form)
    check("sigmoid CE == -(z log sigmoid(x) + (1-z) log(1-sigmoid(x)))", stable_form,
          -(z * torch.log(torch.sigmoid(x)) + (1 - z) * torch.log(1 - torch.sigmoid(x))))


class CharLSTM(nn.Module):
    def __init__(self, n_vocab, embedding_dim=32, num_lstm_units=128):
        super().__init__()
        self.embedding = nn.Embedding(n_vocab, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, num_lstm_units, batch_first=True)
        self.dense = nn.Linear(num_lstm_units, n_vocab)

    def forward(self, x, state=None):
        outputs, state = self.lstm(self.embedding(x), state)
        return self.dense(outputs), state  # logits: (batch, time, vocab)


@torch.no_grad()
def continue_text(model, vocab, prompt, length, device):
    """Greedy decoding: feed the prompt, then each most likely next character."""
    x = torch.tensor([[vocab.index(c) for c in prompt]], device=device)
    logits, state = model(x)
    out = []
    for _ in range(length):
        next_id = logits[0, -1].argmax()
        out.append(vocab[next_id])
        logits, state = model(next_id.view(1, 1), state)
    return prompt + "".join(out)


def train(text, vocab, args, device, generator):
    """Step 3: random windows of the text, inputs x[:, :-1], targets x[:, 1:]."""
    data = torch.tensor([vocab.index(c) for c in text], device=device)
    model = CharLSTM(len(vocab)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    progress = tqdm(range(args.steps), desc="char-lstm", disable=args.quiet, file=sys.stdout)
    for _ in progress:
        starts = torch.randint(len(data) - args.context_size, (args.batch_size,),
                               generator=generator)
        windows = torch.stack([data[s:s + args.context_size + 1] for s in starts.tolist()])
        x, y = windows[:, :-1], windows[:, 1:]
        logits, _ = model(x)
        loss = fl.cross_entropy(logits.flatten(0, 1), y.flatten())  # mean over every position
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    return model, losses


def main(argv=None):
    parser = make_parser(__doc__, steps=150, batch_size=32, lr=1e-2)
    parser.add_argument("--context-size", type=int, default=64)
    args = parser.parse_args(argv)
    device = setup(args)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)

    text = zen_of_python()
    vocab = sorted(set(text))
    show_next_token_pairs(text[text.index("Beautiful"):], vocab, context_size=8)
    check = Checks()
    check_identities(check, generator, device)

    print(f"3. Training a character LSTM on the Zen of Python ({len(text)} characters, "
          f"{len(vocab)} symbols) with fusedloss cross_entropy")
    model, losses = train(text, vocab, args, device, generator)
    print(f"  loss {losses[0]:.3f} -> {final_loss(losses):.3f} nats/character (last 10 steps; "
          f"uniform guessing is {math.log(len(vocab)):.3f})")
    print("  continuing a prompt:", repr(continue_text(model, vocab, "Beautiful is ", 60, device)))
    report(args, "next_token", {"fusedloss cross_entropy": losses},
           "Next-character prediction, Zen of Python", "training loss (nats/char)", started,
           checks_passed=f"{check.count - len(check.failed)}/{check.count}")
    return dict(losses=losses, checks=check.count, failed_checks=check.failed)


if __name__ == "__main__":
    sys.exit(1 if main()["failed_checks"] else 0)
