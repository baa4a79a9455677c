"""Bit-for-bit reproducibility: each case's loss and gradients, run twice, compared byte for byte,
and written as SHA-256 digests so that two processes can be compared as well (--compare).

Cases: cross_entropy (rows path bfloat16 with a mask and label smoothing; split path float32;
float16 with ignored targets), linear_cross_entropy (bfloat16 and float32, ignored targets),
and the vocab-parallel cross_entropy and linear_cross_entropy (process_group=) on a group of
one (nccl on a GPU, gloo on the CPU). Every case also runs under
torch.use_deterministic_algorithms(True): whether it runs there, and whether it gives the same
bits as without.

    python bench/determinism.py --out DIR/determinism-1.json
    python bench/determinism.py --out DIR/determinism-2.json --compare DIR/determinism-1.json
    python bench/determinism.py --quick --device cpu      # small sizes: the dry run
"""

import argparse
import datetime
import hashlib
import json
import os
import sys

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS under deterministic mode

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedloss as fl  # noqa: E402


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu().reshape(-1)
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def ce_case(n, c, dtype, **kw):
    def run(dev, group):
        g = gen(1)
        x = (torch.randn(n, c, generator=g) * 3).to(dev, dtype).requires_grad_()
        t = torch.randint(0, c, (n,), generator=g)
        t[torch.rand(n, generator=g) < 0.2] = -100
        extra = {}
        if kw.get("mask"):
            extra["mask"] = (torch.rand(n, generator=g) < 0.9).float().to(dev)
        loss = fl.cross_entropy(x, t.to(dev), label_smoothing=kw.get("smoothing", 0.0),
                                process_group=group, **extra)
        (loss * kw.get("go", 1.0)).backward()
        return [loss, x.grad]
    return run


def linear_case(n, h_dim, v, dtype, **kw):
    def run(dev, group):
        g = gen(2)
        h = torch.randn(n, h_dim, generator=g).to(dev, dtype).requires_grad_()
        w = (torch.randn(v, h_dim, generator=g) * h_dim ** -0.5).to(dev, dtype).requires_grad_()
        t = torch.randint(0, v, (n,), generator=g)
        t[torch.rand(n, generator=g) < 0.2] = -100
        loss = fl.linear_cross_entropy(h, w, t.to(dev), process_group=group,
                                       chunk_size=kw.get("chunk"))
        loss.backward()
        return [loss, h.grad, w.grad]
    return run


def cases(quick):
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    if quick:
        return [
            ("ce rows, bfloat16, mask, smoothing 0.1", ce_case(256, 4000, bf16, mask=True,
                                                               smoothing=0.1), False),
            ("ce long rows, float32", ce_case(3, 200000, f32), False),
            ("ce float16, grad_output 1024", ce_case(1024, 1000, f16, go=1024.0), False),
            ("linear ce, bfloat16", linear_case(512, 64, 2000, bf16, chunk=128), False),
            ("linear ce, float32", linear_case(512, 64, 2000, f32, chunk=128), False),
            ("vocab-parallel ce, group of one", ce_case(256, 4000, f32), True),
            ("vocab-parallel linear ce, group of one", linear_case(512, 64, 2000, f32, chunk=128),
             True),
        ]
    return [
        ("ce rows, bfloat16, mask, smoothing 0.1", ce_case(4096, 32000, bf16, mask=True,
                                                           smoothing=0.1), False),
        ("ce split path, float32", ce_case(4, 200000, f32), False),
        ("ce float16, grad_output 1024", ce_case(16384, 8000, f16, go=1024.0), False),
        ("linear ce, bfloat16", linear_case(8192, 1024, 32000, bf16), False),
        ("linear ce, float32", linear_case(4096, 1024, 32000, f32), False),
        ("vocab-parallel ce, group of one", ce_case(4096, 32000, bf16), True),
        ("vocab-parallel linear ce, group of one", linear_case(4096, 1024, 32000, bf16), True),
    ]


def make_group(dev, backend):
    import torch.distributed as dist

    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    return dist.group.WORLD, backend


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="small sizes (CPU dry run)")
    p.add_argument("--backend", default=None, help="process group backend (nccl / gloo)")
    p.add_argument("--out", help="JSON with each case's digests")
    p.add_argument("--compare", help="an earlier --out JSON: the digests must be the same")
    args = p.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(0)
    group, backend, group_error = None, None, None
    try:
        group, backend = make_group(dev, args.backend)
    except Exception as e:  # noqa: BLE001 -- the parallel cases report it
        group_error = f"{type(e).__name__}: {e}"[:300]
    results, bad = [], 0
    for label, run, parallel in cases(args.quick):
        r = {"case": label}
        if parallel and group is None:
            r["error"] = f"no process group: {group_error}"
        else:
            try:
                runs = []
                for _ in range(2):
                    runs.append(digest(run(dev, group if parallel else None)))
                    sync(dev)
                r["digests"] = runs
                r["identical"] = runs[0] == runs[1]
                torch.use_deterministic_algorithms(True)
                try:
                    r["deterministic_mode"] = digest(run(dev, group if parallel else None))
                    sync(dev)
                    r["deterministic_mode_same_bits"] = r["deterministic_mode"] == runs[0]
                except Exception as e:  # noqa: BLE001
                    r["deterministic_mode_error"] = f"{type(e).__name__}: {e}"[:300]
                finally:
                    torch.use_deterministic_algorithms(False)
            except Exception as e:  # noqa: BLE001
                r["error"] = f"{type(e).__name__}: {e}"[:300]
        bad += "error" in r or not r.get("identical", False)
        results.append(r)
        mode = ("runs" if "deterministic_mode" in r else
                "raises: " + r.get("deterministic_mode_error", "not run"))
        print(f"{'same' if r.get('identical') else 'DIFF'}  {label}: "
              f"{r.get('error') or r['digests'][0][:16]}; under use_deterministic_algorithms: "
              f"{mode}", flush=True)
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "quick": args.quick, "backend": backend,
            "group_error": group_error}
    out = {"meta": meta, "cases": results}
    if args.compare:
        with open(args.compare) as f:
            earlier = {c["case"]: c for c in json.load(f)["cases"]}
        for r in results:
            e = earlier.get(r["case"], {})
            if "digests" in r and "digests" in e:
                r["same_as_other_process"] = r["digests"][0] == e["digests"][0]
                bad += not r["same_as_other_process"]
                print(f"{'same' if r['same_as_other_process'] else 'DIFF'}  {r['case']}: "
                      "this process against the other", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    if group is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    print(f"{len(results) - bad}/{len(results)} cases bitwise identical"
          + (" (and across the two processes)" if args.compare else "")
          + f"; backend {backend or 'none: ' + str(group_error)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
