"""Registers, shared memory and spills of every fusedloss CUDA kernel, read from the built
extension with `cuobjdump --dump-resource-usage`, and each kernel's theoretical occupancy at
its block size on this GPU (torch.cuda's device properties; without a GPU, a nominal sm_90:
H100/H200, 65536 registers, 2048 threads, 228 KB of shared memory an SM).

Block sizes (csrc/cuda/launch.h): the rows kernel's launch bound is row_max_threads(dtype,
probability targets, packs): 1024 or 512 threads; the plan launches max(threads per row, 128)
up to that bound, so the bound is the block of the longest rows it takes. The split, sigmoid,
scale and sum kernels use 256. Occupancy = resident warps / the SM's maximum, limited by
registers (allocated per warp in units of 256, per quarter SM), threads, shared memory (1 KB
reserved per block) and 32 blocks an SM.

cuobjdump comes with the CUDA toolkit and with the triton wheel
(triton/backends/nvidia/bin/cuobjdump); CUOBJDUMP names another.

    python bench/kernel_resources.py --out DIR     # DIR/kernel_resources.json and .md
"""

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NOMINAL_SM90 = {"name": "nominal sm_90 (no GPU here)", "major": 9, "minor": 0,
                "regs_per_multiprocessor": 65536, "max_threads_per_multi_processor": 2048,
                "shared_memory_per_multiprocessor": 233472, "multi_processor_count": 132}
ELEM_BYTES = {"__half": 2, "__nv_bfloat16": 2, "float": 4, "double": 8}


def find_tool(name):
    env = os.environ.get(name.upper())
    if env and os.path.exists(env):
        return env
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    spec = importlib.util.find_spec("triton")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(loc, "backends", "nvidia", "bin", name)
        if os.path.exists(path):
            return path
    return None


def extension_path():
    import fusedloss._C as c

    return c.__file__


def demangle(names):
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    return lines if len(lines) == len(names) else names


def parse(text):
    """[(arch, mangled name, {REG: .., SHARED: .., ...})] from cuobjdump's resource dump."""
    arch, fn, out = None, None, []
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        if fn and "REG:" in line:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            out.append((arch, fn, {k: int(v) for k, v in fields.items()}))
            fn = None
    return out


def row_max_threads(elem, prob, vecs):
    """csrc/cuda/launch.h's row_max_threads."""
    words = vecs * (8 if elem == 2 else 4) * (2 if prob else 1)
    if words <= 16:
        return 1024
    if words <= 32:
        return 1024 if elem == 4 else 512
    if words <= 64 and not prob:
        return 512
    return 0


def block_of(name):
    """(threads, what) of a kernel's launches, from its demangled name."""
    m = re.search(r"softmax_ce_rows_kernel<([\w:]+), (\d+), (true|false), (true|false)>", name)
    if m:
        t, vecs, prob, stats = m.groups()
        elem = ELEM_BYTES.get(t.split("::")[-1], 4)
        bound = row_max_threads(elem, prob == "true", int(vecs))
        return bound, (f"rows kernel, {t.split('::')[-1]}, {vecs} packs a thread"
                       f"{', probability targets' if prob == 'true' else ''}"
                       f"{', from saved statistics' if stats == 'true' else ''}")
    for key in ("split_stats", "split_finish", "sigmoid_ce", "scale_grad", "deterministic_sum"):
        if key in name:
            args = re.search(r"_kernel(<.*>)\(", name)
            args = (args.group(1) if args else "").replace("fusedloss::cuda::", "")
            return 256, key.replace("_", " ") + " " + args.replace("fusedloss::", "")
    return None, None


def occupancy(regs, smem, threads, props):
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    quarter = props["regs_per_multiprocessor"] // 4
    by_regs = 4 * (quarter // per_warp) // warps
    by_threads = props["max_threads_per_multi_processor"] // (warps * 32)
    by_smem = props["shared_memory_per_multiprocessor"] // (smem + 1024) if smem else 10 ** 9
    limits = {"registers": by_regs, "threads": by_threads, "shared memory": by_smem,
              "blocks": 32}
    blocks = min(limits.values())
    limiter = min(limits, key=limits.get)
    max_warps = props["max_threads_per_multi_processor"] // 32
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy": blocks * warps / max_warps, "limited_by": limiter}


def device_props():
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            props = {"name": p.name, "major": p.major, "minor": p.minor,
                     "multi_processor_count": p.multi_processor_count}
            for key, default in (("regs_per_multiprocessor", 65536),
                                 ("max_threads_per_multi_processor", 2048),
                                 ("shared_memory_per_multiprocessor", 233472)):
                props[key] = getattr(p, key, default)
            return props, True
    except Exception:  # noqa: BLE001 -- no CUDA runtime: the nominal sm_90
        pass
    return dict(NOMINAL_SM90), False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--so", help="the extension (default: fusedloss._C's file)")
    p.add_argument("--out", help="folder for kernel_resources.json and kernel_resources.md")
    p.add_argument("--find-tool", help="print where this tool is found (cuobjdump), then exit")
    p.add_argument("--allow-no-cuda", action="store_true",
                   help="exit 0 when the build has no CUDA kernels (a CPU-only dry run)")
    args = p.parse_args(argv)
    if args.find_tool:
        print(f"{args.find_tool} (resources stage): {find_tool(args.find_tool) or 'not found'}")
        return 0
    so = args.so or extension_path()
    tool = find_tool("cuobjdump")
    props, real = device_props()
    arch = f"sm_{props['major']}{props['minor']}"
    result = {"so": so, "cuobjdump": tool, "device": props, "device_is_real": real,
              "arch": arch, "kernels": []}
    if tool is None:
        print("cuobjdump not found (CUOBJDUMP, PATH, CUDA_HOME/bin, triton's "
              "backends/nvidia/bin)")
        return 0 if args.allow_no_cuda else 1
    proc = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True)
    rows = [r for r in parse(proc.stdout) if "fusedloss" in r[1]]
    archs = sorted({r[0] for r in rows})
    result["archs_in_build"] = archs
    if not rows:
        print(f"no fusedloss CUDA kernels in {so} ({proc.stderr.strip()[:200] or 'no fatbin'})")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "kernel_resources.json"), "w") as f:
                json.dump(result, f, indent=1)
        return 0 if args.allow_no_cuda else 1
    if arch not in archs:  # the build's newest arch stands in (e.g. sm_90 code on sm_90a)
        arch = archs[-1]
    rows = [r for r in rows if r[0] == arch]
    names = demangle([r[1] for r in rows])
    for (a, mangled, res), name in zip(rows, names):
        threads, what = block_of(name)
        k = {"arch": a, "name": name, "kind": what, "registers": res.get("REG"),
             "shared": res.get("SHARED", 0), "local": res.get("LOCAL", 0),
             "stack": res.get("STACK", 0), "block": threads}
        if threads:
            k.update(occupancy(k["registers"], k["shared"], threads, props))
        result["kernels"].append(k)
    result["kernels"].sort(key=lambda k: (k["kind"] is None, k["name"]))
    lines = [f"fusedloss kernels' resources ({arch}, {os.path.basename(so)}); occupancy on "
             f"{props['name']} ({props['regs_per_multiprocessor']} registers, "
             f"{props['max_threads_per_multi_processor']} threads an SM)", "",
             "| kernel | registers | shared B | spill (local B) | block | blocks/SM | "
             "occupancy | limited by |", "|---|--:|--:|--:|--:|--:|--:|---|"]
    for k in result["kernels"]:
        if not k["kind"]:
            continue
        lines.append(f"| {k['kind']} | {k['registers']} | {k['shared']} | {k['local']} | "
                     f"{k['block']} | {k.get('blocks_per_sm', '')} | "
                     f"{k.get('occupancy', 0):.0%} | {k.get('limited_by', '')} |")
    md = "\n".join(lines) + "\n"
    print(md)
    spills = [k["kind"] or k["name"] for k in result["kernels"] if k["local"]]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernel_resources.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "kernel_resources.md"), "w") as f:
            f.write(md)
    rows_k = [k for k in result["kernels"] if (k["kind"] or "").startswith("rows")]
    print(f"{len(result['kernels'])} kernels on {arch}, {len(rows_k)} rows kernels "
          f"(registers {min((k['registers'] for k in rows_k), default=0)}-"
          f"{max((k['registers'] for k in rows_k), default=0)}); spills: {len(spills)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
