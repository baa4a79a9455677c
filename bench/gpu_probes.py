"""Two questions a GPU answers in seconds, written to one JSON:

addmm: does this torch accept a float32 output with 16-bit inputs, as csrc/linear_ce.cpp's
weight-gradient accumulation calls it (`at::addmm_out(acc, acc, g.t(), x, acc.scalar_type())`,
i.e. aten::addmm.dtype_out)? Each form is tried with bfloat16 and float16 inputs and its result
compared with the float32 product; and fl.linear_cross_entropy itself runs in each dtype, its
weight gradient compared with PyTorch's in float32 (on CUDA this is the call above).

NaN padding: a NaN or inf in the hidden state of a padding position (an ignored target or a
zero mask) into fl.linear_cross_entropy, and a NaN logit row into fl.cross_entropy: are the
loss and every gradient finite, the padding rows' gradient exactly 0, and the weight's
gradient the one computed without those rows? PyTorch's F.cross_entropy(F.linear(...)) (and
F.linear_cross_entropy where torch has it) on the same input is reported beside it.

    python bench/gpu_probes.py --out DIR            # cuda when available
    python bench/gpu_probes.py --device cpu --quick # the dry run
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedloss as fl  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def err(e):
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def addmm_forms(dev, dtype, n, v, h):
    """Each way to write acc += g.t() @ x with a float32 acc and 16-bit g, x."""
    g = torch.Generator(device="cpu").manual_seed(0)
    gk = torch.randn(n, v, generator=g).to(dev, dtype)
    xk = torch.randn(n, h, generator=g).to(dev, dtype)
    acc0 = torch.randn(v, h, generator=g).to(dev)
    expected = acc0.double() + gk.double().t() @ xk.double()
    forms = {
        "aten.addmm.dtype_out(acc, g.t(), x, float32, out=acc) (linear_ce.cpp's call)":
            lambda acc: torch.ops.aten.addmm.dtype_out(acc, gk.t(), xk, torch.float32, out=acc),
        "aten.addmm.dtype(acc, g.t(), x, float32)":
            lambda acc: torch.ops.aten.addmm.dtype(acc, gk.t(), xk, torch.float32),
        "torch.addmm(acc, g.t(), x, out=acc) (plain out, mixed dtypes)":
            lambda acc: torch.addmm(acc, gk.t(), xk, out=acc),
    }
    out = []
    for name, fn in forms.items():
        r = {"form": name, "dtype": str(dtype)[6:]}
        try:
            if name.startswith("aten.addmm.dtype_out") and not hasattr(torch.ops.aten.addmm,
                                                                        "dtype_out"):
                raise AttributeError("this torch has no aten::addmm.dtype_out")
            acc = acc0.clone()
            res = fn(acc)
            r["accepted"] = True
            r["result_dtype"] = str(res.dtype)[6:]
            r["rel_error_vs_float64"] = rel(res, expected)
        except Exception as e:  # noqa: BLE001 -- the answer is whether it raises
            r["accepted"] = False
            r["error"] = err(e)
        out.append(r)
    return out


def linear_ce_dtype(dev, dtype, n, v, h):
    """fl.linear_cross_entropy in dtype: its weight gradient against PyTorch in float32."""
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(n, h, generator=g).to(dev)
    w = (torch.randn(v, h, generator=g) * h ** -0.5).to(dev)
    t = torch.randint(0, v, (n,), generator=g).to(dev)
    wr = w.clone().requires_grad_()
    F.cross_entropy(F.linear(x, wr), t).backward()  # x, w stay leaves without grad
    r = {"form": "fl.linear_cross_entropy", "dtype": str(dtype)[6:]}
    try:
        wl = w.to(dtype).requires_grad_()
        fl.linear_cross_entropy(x.to(dtype), wl, t).backward()
        r["accepted"] = True
        r["weight_grad_rel_error_vs_float32"] = rel(wl.grad, wr.grad)
        r["weight_grad_dtype"] = str(wl.grad.dtype)[6:]
    except Exception as e:  # noqa: BLE001
        r["accepted"] = False
        r["error"] = err(e)
    return r


def finite(t):
    return t is not None and bool(torch.isfinite(t).all())


def nan_padding_linear(dev, dtype, n, v, h, how):
    """Padding rows' hidden states NaN (ignored targets) or inf (zero mask)."""
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * h ** -0.5
    t = torch.randint(0, v, (n,), generator=g)
    pad = torch.zeros(n, dtype=torch.bool)
    pad[1::4] = True
    mask = None
    if how == "ignored":
        t[pad] = -100
        x[pad] = float("nan")
    else:
        mask = (~pad).float().to(dev)
        x[pad] = float("inf")
        x[pad.nonzero()[::2, 0]] = float("nan")
    x, w, t, pad = x.to(dev, dtype), w.to(dev, dtype), t.to(dev), pad.to(dev)
    r = {"case": f"linear ce, padding {'NaN, ignored targets' if how == 'ignored' else 'NaN/inf, mask 0'}",
         "dtype": str(dtype)[6:]}
    # the reference: the same rows with the padding's hidden state 0 (they contribute nothing)
    xr = x.float().masked_fill(pad[:, None], 0).requires_grad_()
    wr = w.float().clone().requires_grad_()
    per = F.cross_entropy(F.linear(xr, wr), t, reduction="none")
    keep = (t != -100).float() * (mask if mask is not None else 1.0)
    (per * keep).sum().div(keep.sum()).backward()
    try:
        xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fl.linear_cross_entropy(xf, wf, t, mask=mask)
        loss.backward()
        r["fusedloss"] = {
            "loss_finite": finite(loss), "weight_grad_finite": finite(wf.grad),
            "input_grad_finite": finite(xf.grad),
            "padding_input_grad_zero": bool((xf.grad[pad] == 0).all()),
            "weight_grad_rel_error": rel(wf.grad, wr.grad) if finite(wf.grad) else None}
    except Exception as e:  # noqa: BLE001
        r["fusedloss"] = {"error": err(e)}
    # PyTorch's own on the same input (a mask as PyTorch users write it: the per-row loss times
    # the mask)
    try:
        xp, wp = x.clone().requires_grad_(), w.clone().requires_grad_()
        per = F.cross_entropy(F.linear(xp, wp).float(), t, reduction="none")
        loss = (per * keep).sum() / keep.sum() if mask is not None else per.sum() / keep.sum()
        loss.backward()
        r["pytorch"] = {"loss_finite": finite(loss), "weight_grad_finite": finite(wp.grad),
                        "input_grad_finite": finite(xp.grad)}
    except Exception as e:  # noqa: BLE001
        r["pytorch"] = {"error": err(e)}
    r["ok"] = all(r["fusedloss"].get(k) for k in ("loss_finite", "weight_grad_finite",
                                                  "input_grad_finite", "padding_input_grad_zero"))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    r["ok"] = r["ok"] and (r["fusedloss"]["weight_grad_rel_error"] or 0) <= tol
    return r


def nan_padding_ce(dev, dtype, n, c):
    """A NaN logit row at an ignored target into fl.cross_entropy."""
    g = torch.Generator(device="cpu").manual_seed(3)
    x = torch.randn(n, c, generator=g)
    t = torch.randint(0, c, (n,), generator=g)
    t[1::4] = -100
    x[1::4] = float("nan")
    x, t = x.to(dev, dtype), t.to(dev)
    r = {"case": "ce, NaN logits at ignored targets", "dtype": str(dtype)[6:]}
    try:
        xf = x.clone().requires_grad_()
        loss = fl.cross_entropy(xf, t)
        loss.backward()
        r["fusedloss"] = {"loss_finite": finite(loss), "input_grad_finite": finite(xf.grad),
                          "padding_input_grad_zero": bool((xf.grad[1::4] == 0).all())}
    except Exception as e:  # noqa: BLE001
        r["fusedloss"] = {"error": err(e)}
    xp = x.clone().requires_grad_()
    loss = F.cross_entropy(xp.float(), t)
    loss.backward()
    r["pytorch"] = {"loss_finite": finite(loss), "input_grad_finite": finite(xp.grad)}
    r["ok"] = all(r["fusedloss"].get(k) for k in ("loss_finite", "input_grad_finite",
                                                  "padding_input_grad_zero"))
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="small sizes (CPU dry run)")
    p.add_argument("--out", help="folder for gpu_probes.json")
    args = p.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = False
    n, v, h = (256, 1000, 64) if args.quick else (4096, 32000, 1024)
    addmm = []
    for dtype in DTYPES.values():
        addmm += addmm_forms(dev, dtype, n, min(v, 4096), h)
        addmm.append(linear_ce_dtype(dev, dtype, n, v, h))
    for r in addmm:
        print(("ok    " if r["accepted"] else "raises") + f"  {r['dtype']}: {r['form']}: "
              + (r.get("error") or json.dumps({k: v for k, v in r.items()
                                              if k not in ("form", "dtype", "accepted")})),
              flush=True)
    padding = []
    for dtype in (torch.float32, torch.bfloat16):
        for how in ("ignored", "mask"):
            padding.append(nan_padding_linear(dev, dtype, n, v, h, how))
        padding.append(nan_padding_ce(dev, dtype, n, v))
    for r in padding:
        print(f"{'ok  ' if r['ok'] else 'FAIL'}  {r['case']}, {r['dtype']}: fusedloss "
              f"{json.dumps(r['fusedloss'])}; PyTorch {json.dumps(r['pytorch'])}", flush=True)
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "quick": args.quick}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_probes.json"), "w") as f:
            json.dump({"meta": meta, "addmm": addmm, "nan_padding": padding}, f, indent=1)
    call = [r for r in addmm if "linear_ce.cpp" in r["form"]]
    ok_pad = sum(r["ok"] for r in padding)
    print(f"addmm dtype_out (linear_ce.cpp's call) accepted for "
          f"{', '.join(r['dtype'] for r in call if r['accepted']) or 'no dtype'}; "
          f"NaN padding {ok_pad}/{len(padding)} cases finite and exact")
    # the answers are the JSON's; a failure is a padding case that is not finite/exact, or a
    # linear_cross_entropy dtype that does not run
    lce_ok = all(r["accepted"] for r in addmm if r["form"] == "fl.linear_cross_entropy")
    return 0 if ok_pad == len(padding) and lce_ok else 1


if __name__ == "__main__":
    sys.exit(main())
