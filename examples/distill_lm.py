"""Distilling a language model into a smaller one with fusedloss's fused linear distillation loss.

1. The language: synthetic, so that the best possible model is known. Each token is drawn from
   a distribution that depends on the two tokens before it (a random order-2 Markov chain over
   --vocab-size tokens, its next-token logits the sum of a random low-rank score for each of the
   two previous tokens); its entropy rate, printed, is the lowest cross-entropy any model can
   reach.
2. The teacher: an LSTM language model (embedding -> LSTM -> LM head), trained first for
   --teacher-steps steps on a fixed training set of sequences with `fl.linear_cross_entropy`.
3. Two students, smaller LSTMs from the same initial weights, trained on the same batches for
   --steps steps:
   - distilled: `fl.linear_distillation_loss` from the student's hidden states and LM head and
     the frozen teacher's (its hidden states computed under `torch.no_grad()`, its weights
     without gradients), half hard-label cross-entropy, half forward KL at temperature 2;
   - hard labels: `fl.linear_cross_entropy` on the same tokens.
   After every step both are evaluated on held-out sequences (cross-entropy against the real
   next tokens). Neither loss ever holds the (tokens x vocabulary) logits whole.

    python examples/distill_lm.py --plot distill_lm.png
"""

import copy
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import fusedloss as fl
from text_data import make_parser, report, setup

TEMPERATURE = 2.0
HARD_WEIGHT = 0.5


class MarkovLanguage:
    """Next-token logits given the previous two tokens a, b: sharpness * (P[a] + Q[b]) @ R.T,
    with P, Q, R random (vocab x rank) token embeddings. Sequences start from two uniform
    tokens."""

    def __init__(self, vocab_size, rank, sharpness, generator):
        self.vocab_size = vocab_size
        p, q, r = (torch.randn(vocab_size, rank, generator=generator) / rank ** 0.25
                   for _ in range(3))
        self.a, self.b = sharpness * p @ r.T, sharpness * q @ r.T  # (vocab, vocab) each

    def log_probs(self, prev2, prev1):
        return F.log_softmax(self.a[prev2] + self.b[prev1], dim=-1)

    def sample(self, count, length, generator):
        """(count, length) token ids, and the mean entropy (nats) of the distributions their
        tokens after the first two were drawn from: the entropy rate, estimated."""
        seq = torch.empty(count, length, dtype=torch.long)
        seq[:, :2] = torch.randint(self.vocab_size, (count, 2), generator=generator)
        entropy = 0.0
        for i in range(2, length):
            log_p = self.log_probs(seq[:, i - 2], seq[:, i - 1])
            entropy += float(-(log_p.exp() * log_p).sum(-1).mean())
            seq[:, i] = torch.multinomial(log_p.exp(), 1, generator=generator).squeeze(1)
        return seq, entropy / (length - 2)


class LanguageModel(nn.Module):
    """Embedding -> LSTM -> LM head (no bias, as in LLMs). hidden() is everything but the head:
    the fused losses take its output and the head's weight."""

    def __init__(self, vocab_size, embedding_dim, hidden_size):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size, bias=False)

    def hidden(self, tokens):
        return self.lstm(self.embedding(tokens))[0].flatten(0, 1)  # (batch * time, hidden)


def next_token_pairs(sequences):
    """Inputs x[:, :-1] and the flattened targets x[:, 1:]."""
    return sequences[:, :-1], sequences[:, 1:].flatten()


@torch.no_grad()
def held_out_ce(model, sequences):
    """Mean cross-entropy (nats/token) of the model's next-token predictions."""
    inputs, targets = next_token_pairs(sequences)
    return float(fl.linear_cross_entropy(model.hidden(inputs), model.head.weight, targets))


def train_teacher(teacher, train_set, args, generator):
    optimizer = torch.optim.Adam(teacher.parameters(), lr=args.lr)
    progress = tqdm(range(args.teacher_steps), desc="teacher", disable=args.quiet,
                    file=sys.stdout)
    for _ in progress:
        rows = torch.randint(len(train_set), (args.batch_size,), generator=generator)
        inputs, targets = next_token_pairs(train_set[rows])
        loss = fl.linear_cross_entropy(teacher.hidden(inputs), teacher.head.weight, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    teacher.requires_grad_(False)  # frozen: the distillation loss computes no gradient for it
    return teacher.eval()


def distilled_loss(student, teacher, inputs, targets):
    with torch.no_grad():
        teacher_hidden = teacher.hidden(inputs)
    return fl.linear_distillation_loss(student.hidden(inputs), student.head.weight,
                                       teacher_hidden, teacher.head.weight, targets,
                                       divergence="forward_kl", temperature=TEMPERATURE,
                                       hard_weight=HARD_WEIGHT)


def hard_label_loss(student, inputs, targets):
    return fl.linear_cross_entropy(student.hidden(inputs), student.head.weight, targets)


def train_students(students, teacher, train_set, held_out, args, generator):
    """The students step in lockstep on the same batches; each is evaluated after every step.
    Returns {name: [held-out CE after step 1, 2, ...]}."""
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=args.lr)
                  for name, m in students.items()}
    curves = {name: [] for name in students}
    progress = tqdm(range(args.steps), desc="students", disable=args.quiet, file=sys.stdout)
    for _ in progress:
        rows = torch.randint(len(train_set), (args.batch_size,), generator=generator)
        inputs, targets = next_token_pairs(train_set[rows])
        for name, student in students.items():
            if name == "distilled":
                loss = distilled_loss(student, teacher, inputs, targets)
            else:
                loss = hard_label_loss(student, inputs, targets)
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            curves[name].append(held_out_ce(student, held_out))
        progress.set_postfix({name: f"{c[-1]:.3f}" for name, c in curves.items()})
    return curves


def main(argv=None):
    parser = make_parser(__doc__, steps=200, batch_size=32, lr=1e-2)
    parser.add_argument("--teacher-steps", type=int, default=300,
                        help="the teacher's training steps (default %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=256,
                        help="tokens of the language (default %(default)s)")
    parser.add_argument("--sequence-length", type=int, default=33,
                        help="tokens per sequence (default %(default)s)")
    parser.add_argument("--train-sequences", type=int, default=4096,
                        help="size of the fixed training set (default %(default)s)")
    parser.add_argument("--teacher-hidden", type=int, default=256,
                        help="the teacher's LSTM units (default %(default)s)")
    parser.add_argument("--student-hidden", type=int, default=32,
                        help="the students' LSTM units (default %(default)s)")
    parser.add_argument("--rank", type=int, default=16,
                        help="rank of the language's token scores (default %(default)s)")
    parser.add_argument("--sharpness", type=float, default=2.0,
                        help="scale of the language's logits: higher, lower entropy "
                        "(default %(default)s)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.teacher_steps < 1:
        parser.error("--steps and --teacher-steps must be at least 1")
    setup(args)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)

    language = MarkovLanguage(args.vocab_size, args.rank, args.sharpness, generator)
    train_set, entropy = language.sample(args.train_sequences, args.sequence_length, generator)
    held_out, _ = language.sample(256, args.sequence_length, generator)
    print(f"1. A random order-2 Markov language over {args.vocab_size} tokens: entropy rate "
          f"{entropy:.3f} nats/token (the lowest cross-entropy any model can reach; uniform "
          f"guessing is {math.log(args.vocab_size):.3f}); {args.train_sequences} training and "
          f"{len(held_out)} held-out sequences of {args.sequence_length} tokens")

    teacher = LanguageModel(args.vocab_size, 64, args.teacher_hidden)
    teacher = train_teacher(teacher, train_set, args, generator)
    teacher_ce = held_out_ce(teacher, held_out)
    print(f"2. Teacher ({args.teacher_hidden} LSTM units, {args.teacher_steps} steps of "
          f"fl.linear_cross_entropy): held-out cross-entropy {teacher_ce:.3f} nats/token")

    student = LanguageModel(args.vocab_size, 32, args.student_hidden)
    start_ce = held_out_ce(student, held_out)
    students = {"distilled": student, "hard labels": copy.deepcopy(student)}  # same weights
    curves = train_students(students, teacher, train_set, held_out, args, generator)
    final = {name: curve[-1] for name, curve in curves.items()}
    print(f"3. Students ({args.student_hidden} LSTM units, {args.steps} steps, the same batches), "
          f"held-out cross-entropy from {start_ce:.3f}:")
    print(f"  distilled (fl.linear_distillation_loss, forward KL, T={TEMPERATURE:g}, "
          f"hard_weight={HARD_WEIGHT:g}): {final['distilled']:.3f} nats/token")
    print(f"  hard labels (fl.linear_cross_entropy): {final['hard labels']:.3f} nats/token")
    gain = final["hard labels"] - final["distilled"]
    print(f"  distillation {'gains' if gain > 0 else 'LOSES'} {abs(gain):.3f} nats/token at "
          f"equal steps")
    report(args, "distill_lm",
           {"distilled (fl.linear_distillation_loss)": curves["distilled"],
            "hard labels (fl.linear_cross_entropy)": curves["hard labels"],
            "teacher": [teacher_ce] * args.steps,
            "entropy rate (the best possible)": [entropy] * args.steps},
           "Distilling an LSTM language model", "held-out cross-entropy (nats/token)", started,
           teacher=f"{teacher_ce:.3f}", distilled=f"{final['distilled']:.3f}",
           hard_labels=f"{final['hard labels']:.3f}", entropy_rate=f"{entropy:.3f}")
    return dict(curves=curves, start=start_ce, teacher=teacher_ce, entropy=entropy,
                final=final)


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["final"]["distilled"] < result["final"]["hard labels"] else 1)
