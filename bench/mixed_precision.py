"""float16 mixed precision: the weight gradient's error under torch.autocast(float16) with a loss
scale, PyTorch and fusedloss side by side.

Each case is a linear head `hidden @ W.T` into the loss, run as a float16 mixed-precision step
is (autocast float16, `(loss * 65536).backward()`, the weight's gradient divided by 65536) and
once in float32 without autocast (TF32 off): the reference. The error is the relative norm
`|g - g_ref| / |g_ref|` of the weight's gradient; PyTorch's own float32 run is the reference of
both. Cases (the sizes at which float16 gradients pre-scaled by 1/N were measured to lose
digits):

- ce: F.cross_entropy / fl.cross_entropy on the head's logits, 20% of the targets ignored;
- bce: F.binary_cross_entropy_with_logits / fl.binary_cross_entropy_with_logits, 5% positive
  labels (a multi-label head);
- linear ce: F.cross_entropy(F.linear(...)) / fl.linear_cross_entropy (20% ignored);
- ce float16 logits, no autocast: float16 logits (a leaf) and a float16 loss, scaled by 2^10
  (2^16 is past float16's largest value), the error of the logits' own gradient (the head is
  left out): a grad_output != 1 on float16 logits.

    python bench/mixed_precision.py                   # the full sizes (a GPU: seconds)
    python bench/mixed_precision.py --quick --device cpu   # small sizes: a dry run, numbers indicative
    python bench/mixed_precision.py --out DIR         # also DIR/mixed_precision.json and .md

"within 1.2x": fusedloss's error at most 1.2 times PyTorch's (tests/test_mixed_precision.py holds
that bar at smaller sizes).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedloss as fl  # noqa: E402

SCALE = 65536.0
SCALE_F16 = 1024.0  # the float16 loss's scale (its grad_output must be a finite float16)
IGNORED = 0.2  # share of CE targets ignored
POSITIVE = 0.05  # share of BCE labels that are 1
BAR = 1.2  # fusedloss's error at most this times PyTorch's

# (kind, tokens, classes): the full sizes, then --quick's
FULL = [("ce", 4096, 32000), ("ce", 16384, 8000), ("bce", 16384, 512),
        ("linear ce", 16384, 32000), ("ce float16 logits, no autocast", 16384, 8000)]
QUICK = [("ce", 1024, 4000), ("ce", 4096, 1000), ("bce", 4096, 128),
         ("linear ce", 2048, 2000), ("ce float16 logits, no autocast", 4096, 1000)]


def make_data(kind, n, c, hidden, dev, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(dev)
    w = (torch.randn(c, hidden, generator=g) * (2.0 / hidden ** 0.5)).to(dev)  # logits ~ N(0, 4)
    if kind == "bce":
        target = (torch.rand(n, c, generator=g) < POSITIVE).float().to(dev)
    else:
        target = torch.randint(0, c, (n,), generator=g)
        target[torch.rand(n, generator=g) < IGNORED] = -100
        target = target.to(dev)
    return h, w, target


def loss_of(kind, impl, logits_or_hidden, w, target):
    """The loss of one implementation; for linear ce the head is part of the call."""
    if kind == "bce":
        fn = fl.binary_cross_entropy_with_logits if impl == "fusedloss" else \
            F.binary_cross_entropy_with_logits
        return fn(logits_or_hidden, target)
    if kind == "linear ce":
        if impl == "fusedloss":
            return fl.linear_cross_entropy(logits_or_hidden, w, target)
        return F.cross_entropy(F.linear(logits_or_hidden, w), target)
    fn = fl.cross_entropy if impl == "fusedloss" else F.cross_entropy
    return fn(logits_or_hidden, target)


def weight_grad(kind, impl, h, w0, target, dev, amp):
    """The weight's gradient of one step (amp: autocast float16, loss scale 65536)."""
    w = w0.clone().requires_grad_()
    with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
        if kind == "linear ce":
            loss = loss_of(kind, impl, h, w, target)
        else:
            loss = loss_of(kind, impl, h @ w.T, w, target)
    if amp:
        (loss.float() * SCALE).backward()
        return w.grad / SCALE
    loss.backward()
    return w.grad


def logits_grad_f16(impl, h, w, target, dev):
    """float16 logits without autocast: the logits' gradient of (loss * 1024) / 1024."""
    with torch.no_grad():
        base = h @ w.T
    x = base.half().requires_grad_()
    loss = loss_of("ce", impl, x, None, target)
    (loss * SCALE_F16).backward()
    return x.grad.float() / SCALE_F16, base


def rel_err(g, ref):
    g, ref = g.double(), ref.double()
    return float((g - ref).norm() / ref.norm())


def run_case(kind, n, c, hidden, dev, seed):
    h, w, target = make_data(kind, n, c, hidden, dev, seed)
    row = {"case": kind, "tokens": n, "classes": c, "hidden": hidden}
    t0 = time.perf_counter()
    if kind.startswith("ce float16 logits"):
        got = {}
        for impl in ("pytorch", "fusedloss"):
            got[impl], base = logits_grad_f16(impl, h, w, target, dev)
        x = base.clone().requires_grad_()
        F.cross_entropy(x, target).backward()
        ref = x.grad
        row["gradient"] = "logits"
    else:
        ref = weight_grad(kind, "pytorch", h, w, target, dev, amp=False)
        got = {impl: weight_grad(kind, impl, h, w, target, dev, amp=True)
               for impl in ("pytorch", "fusedloss")}
        # fusedloss in float32, as a check of the harness: must be close to the reference
        row["fusedloss_float32_err"] = rel_err(
            weight_grad(kind, "fusedloss", h, w, target, dev, amp=False), ref)
        row["gradient"] = "weight"
    row["pytorch_err"] = rel_err(got["pytorch"], ref)
    row["fusedloss_err"] = rel_err(got["fusedloss"], ref)
    row["fusedloss_finite"] = bool(torch.isfinite(got["fusedloss"]).all())
    row["ratio"] = row["fusedloss_err"] / max(row["pytorch_err"], 1e-300)
    row["within_bar"] = row["fusedloss_finite"] and row["ratio"] <= BAR
    # far below float16's resolution: the loss did not compute in float16 under autocast
    row["wider_than_float16"] = row["fusedloss_err"] < 1e-5
    if dev.type == "cuda":
        torch.cuda.synchronize()
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def markdown(rows, meta):
    lines = [f"float16 autocast, loss scale 2^16, relative error (norm) of the gradient against "
             f"PyTorch float32 — {meta['device']}, torch {meta['torch']}"
             + (" (--quick: small sizes)" if meta["quick"] else ""), "",
             "| case | tokens x classes (hidden) | gradient | PyTorch rel. error "
             "| fusedloss rel. error | ratio | within 1.2x |", "|---|---|---|--:|--:|--:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['tokens']} x {r['classes']} | | | | | "
                         f"ERROR: {r['error']} |")
            continue
        lines.append(f"| {r['case']} | {r['tokens']} x {r['classes']} ({r['hidden']}) | "
                     f"{r['gradient']} | {r['pytorch_err']:.2e} | {r['fusedloss_err']:.2e} | "
                     f"{r['ratio']:.2f}x | {'yes' if r['within_bar'] else 'NO'}"
                     f"{' (computed wider than float16)' if r['wider_than_float16'] else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="small sizes (CPU dry run)")
    p.add_argument("--hidden", type=int, default=None, help="head's input size (1024; quick 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for mixed_precision.json and mixed_precision.md")
    args = p.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference is float32
    torch.backends.cudnn.allow_tf32 = False
    hidden = args.hidden or (64 if args.quick else 1024)
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "quick": args.quick, "scale": SCALE, "bar": BAR,
            "ignored": IGNORED, "positive": POSITIVE}
    rows, failed = [], 0
    for kind, n, c in (QUICK if args.quick else FULL):
        try:
            row = run_case(kind, n, c, hidden, dev, args.seed)
        except Exception as e:  # noqa: BLE001 -- report every case, then fail
            row = {"case": kind, "tokens": n, "classes": c, "hidden": hidden,
                   "error": f"{type(e).__name__}: {e}"[:300]}
        failed += "error" in row
        rows.append(row)
        print(json.dumps(row), flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    md = markdown(rows, meta)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "mixed_precision.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "mixed_precision.md"), "w") as f:
            f.write(md)
    within = sum(bool(r.get("within_bar")) for r in rows)
    print(f"{within}/{len(rows)} cases within {BAR}x of PyTorch's error; {failed} failed to run")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
