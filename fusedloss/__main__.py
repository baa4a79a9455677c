"""python -m fusedloss: what this build compiled, and a one-second self-check against torch."""

import sys
import time

import torch
import torch.nn.functional as F

import fusedloss as fl


def _check(name, ours, theirs, rtol=1e-5, atol=1e-6):
    ok = torch.allclose(ours.detach().double(), theirs.detach().double(), rtol=rtol, atol=atol)
    print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    return ok


def self_check(device):
    """cross_entropy and binary_cross_entropy_with_logits against PyTorch in float64 on
    `device` (loss and gradient); prints a line per check, returns whether all passed."""
    torch.manual_seed(0)
    x = torch.randn(64, 1000, device=device)
    t = torch.randint(0, 1000, (64,), device=device)
    y = torch.rand(64, 1000, device=device)
    results = []
    for name, ours_fn, theirs_fn in [
        ("cross_entropy", lambda a: fl.cross_entropy(a, t, label_smoothing=0.1),
         lambda a: F.cross_entropy(a, t, label_smoothing=0.1)),
        ("binary_cross_entropy_with_logits", lambda a: fl.binary_cross_entropy_with_logits(a, y),
         lambda a: F.binary_cross_entropy_with_logits(a, y)),
    ]:
        xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
        ours, theirs = ours_fn(xa), theirs_fn(xb)
        ours.backward()
        theirs.backward()
        results.append(_check(f"{name} loss", ours, theirs))
        results.append(_check(f"{name} gradient", xa.grad, xb.grad))
    return all(results)


def cuda_skip_reason(info):
    """Why the CUDA self-check cannot run here, or None when it can."""
    if not info["cuda"]:
        if torch.version.cuda is None:
            return "CUDA kernels not compiled: this torch is a CPU-only build"
        return ("CUDA kernels not compiled: built with FUSEDLOSS_CUDA=0 or without nvcc; "
                "rebuild with nvcc on PATH to get them")
    if not torch.cuda.is_available():
        return "CUDA kernels compiled, but torch sees no CUDA device on this machine"
    return None


def main():
    """Prints the build's versions and kernels, runs the self-check; the exit status."""
    info = fl.build_info()
    print(f"fusedloss {fl.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"CPU kernels: {', '.join(info['cpu_isas'])}; in use: {info['cpu_isa']}")
    if info["cuda"]:
        print(f"CUDA kernels: {'; '.join(info['cuda_archs'])}")
    else:
        print("CUDA kernels: not compiled")
    skip_cuda = cuda_skip_reason(info)
    devices = ["cpu"] + ([] if skip_cuda else ["cuda"])
    start = time.perf_counter()
    ok = True
    for device in devices:
        print(f"self-check on {device}:")
        ok &= self_check(device)
    if skip_cuda:
        print(f"self-check on cuda: skipped ({skip_cuda})")
    print(f"self-check {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.2f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
