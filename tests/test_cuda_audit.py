"""Static audit of the compiled CUDA kernels (no GPU needed): for every kernel and every
architecture the build targets, ptxas and cuobjdump report no stack frame, no spills and no
local memory, and the SASS of the softmax cross-entropy row loops loads 128 bits at a time
(LDG.E.128) for 16- and 32-bit logits. Registers per thread are printed (pytest -s).

The objects are those setup.py builds (build/fusedloss_objs/*.cu.o, with the ptxas report
beside each); objects older than their sources are rebuilt into a temporary folder with the
very command that built them (recorded in *.cmd by setup.py).
"""

import glob
import json
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJ_DIR = os.path.join(ROOT, "build", "fusedloss_objs")
CUDA_SRC = os.path.join(ROOT, "csrc", "cuda")

# Kernels allowed a stack frame, spills or local memory, with the reason. Empty: none is.
ALLOWED = {}


def _tool(name):
    import torch  # noqa: F401  (the triton wheel that ships cuobjdump comes with torch)

    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which(name)


def _sources():
    return sorted(glob.glob(os.path.join(CUDA_SRC, "*.cu")))


def _deps():
    return (glob.glob(os.path.join(CUDA_SRC, "*.cu*")) + glob.glob(os.path.join(CUDA_SRC, "*.h"))
            + glob.glob(os.path.join(ROOT, "csrc", "common", "*.h")))


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """{source name: (object path, ptxas report)} for every .cu file, current."""
    if not _tool("cuobjdump"):
        pytest.skip("cuobjdump not found (it ships with the triton wheel torch installs)")
    newest_dep = max(os.path.getmtime(p) for p in _deps())
    out, stale = {}, []
    for src in _sources():
        name = os.path.basename(src)
        obj = os.path.join(OBJ_DIR, name + ".o")
        if not (os.path.exists(obj + ".cmd") and os.path.exists(obj)):
            pytest.skip(f"{name} was not built: the CUDA kernels are built by setup.py when torch "
                        "is a CUDA build and nvcc is found (FUSEDLOSS_CUDA=1 to insist)")
        if os.path.getmtime(obj) < newest_dep:
            stale.append((name, obj))
        else:
            out[name] = (obj, _read(obj + ".ptxas.log"))
    if stale:  # rebuild with the recorded command, elsewhere (the build's objects stay as built)
        tmp = tmp_path_factory.mktemp("cuda_audit")
        for name, obj in stale:
            with open(obj + ".cmd") as f:
                cmd = json.load(f)
            new_obj = str(tmp / (name + ".o"))
            cmd[cmd.index("-o") + 1] = new_obj
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.returncode == 0, f"rebuilding {name} failed:\n{proc.stdout}"
            out[name] = (new_obj, proc.stdout)
    return out


def _read(path):
    with open(path) as f:
        return f.read()


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    proc = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, proc.stdout.splitlines()))


def _short(demangled):
    """fusedloss::cuda::softmax_ce_rows_kernel<float, 8, false, false>(...) -> the template."""
    s = demangled.replace("fusedloss::cuda::", "").replace("(anonymous namespace)::", "")
    s = s.replace("(fusedloss::SigmoidCEMode)", "mode ").replace("void ", "")
    return s[:s.rfind("(")] if s.endswith(")") else s  # drop the parameter list


def _ptxas_spills(report):
    """{(mangled, sm): (spill stores, spill loads, stack frame)} from a ptxas -v report."""
    spills, current = {}, None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            current = (m.group(1), m.group(2))
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m and current:
            spills[current] = (int(m.group(2)), int(m.group(3)), int(m.group(1)))
            current = None
    return spills


def _resource_usage(obj):
    """[(mangled, sm, regs, stack, local, shared)] from cuobjdump -res-usage."""
    out = subprocess.run([_tool("cuobjdump"), "-res-usage", obj], capture_output=True, text=True,
                         check=True).stdout
    rows, arch = [], None
    lines = out.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\w+):", line)
        if m and i + 1 < len(lines):
            usage = dict(re.findall(r"(\w+(?:\[\d\])?):(\d+)", lines[i + 1]))
            rows.append((m.group(1), arch, int(usage.get("REG", 0)), int(usage.get("STACK", 0)),
                         int(usage.get("LOCAL", 0)), int(usage.get("SHARED", 0))))
    return rows


def _sass_functions(obj):
    """{(mangled, sm): sass text}."""
    out = subprocess.run([_tool("cuobjdump"), "-sass", obj], capture_output=True, text=True,
                         check=True).stdout
    funcs, arch, name, body = {}, None, None, []
    for line in out.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function : (\w+)", line)
        if m:
            if name:
                funcs[(name, arch_of_name)] = "\n".join(body)
            name, arch_of_name, body = m.group(1), arch, []
            continue
        if name:
            body.append(line)
    if name:
        funcs[(name, arch_of_name)] = "\n".join(body)
    return funcs


def _target_archs():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    return sorted({"sm_" + a.replace("+PTX", "").replace(".", "") for a in re.split(r"[;\s]+", archs)
                   if a})


def test_no_stack_spill_or_local_memory(objects):
    """Every kernel, every architecture: 0 bytes of stack, spill and local memory."""
    table, bad = [], []
    for name, (obj, report) in sorted(objects.items()):
        spills = _ptxas_spills(report)
        rows = _resource_usage(obj)
        assert rows, f"{name}: cuobjdump found no kernels"
        names = _demangle(sorted({r[0] for r in rows}))
        for mangled, sm, regs, stack, local, shared in rows:
            st, ld, frame = spills.get((mangled, sm), (None, None, None))
            kernel = _short(names[mangled])
            table.append((kernel, sm, regs, stack, st, ld, local, shared))
            if (stack or local or st or ld or frame) and kernel not in ALLOWED:
                bad.append(f"{kernel} [{sm}]: stack {stack}, spill stores {st}, spill loads {ld}, "
                           f"local {local}")
            assert st is not None, f"{kernel} [{sm}]: no ptxas report (built without -Xptxas=-v?)"
    width = max(len(t[0]) for t in table)
    print(f"\n{'kernel':<{width}}  arch    regs  stack  spill_st  spill_ld  local  smem")
    for kernel, sm, regs, stack, st, ld, local, shared in sorted(table):
        print(f"{kernel:<{width}}  {sm:<6} {regs:>5} {stack:>6} {st:>9} {ld:>9} {local:>6} {shared:>5}")
    assert not bad, "kernels with stack, spills or local memory:\n" + "\n".join(bad)


def test_every_kernel_built_for_every_arch(objects):
    want = set(_target_archs())
    for name, (obj, _report) in objects.items():
        per_kernel = {}
        for mangled, sm, *_ in _resource_usage(obj):
            per_kernel.setdefault(mangled, set()).add(sm)
        for mangled, archs in per_kernel.items():
            assert archs == want, f"{name}: {mangled} built for {sorted(archs)}, want {sorted(want)}"
        listing = subprocess.run([_tool("cuobjdump"), "-lptx", obj], capture_output=True,
                                 text=True).stdout
        if "+PTX" in os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX"):
            assert ".ptx" in listing, f"{name}: no PTX embedded for forward compatibility"


# dtype -> its mangled template argument
_DTYPES = {"float32": "If", "float16": "I6__half", "bfloat16": "I13__nv_bfloat16"}


@pytest.mark.parametrize("dtype", list(_DTYPES))
def test_softmax_row_loops_load_128_bits(objects, dtype):
    """The row loops of every softmax CE kernel (rows path, split path, both stages) issue
    128-bit global loads for 16- and 32-bit logits, on every architecture."""
    src = {"float32": "softmax_ce_f32.cu", "float16": "softmax_ce_f16.cu",
           "bfloat16": "softmax_ce_bf16.cu"}[dtype]
    obj, _ = objects[src]
    funcs = _sass_functions(obj)
    checked = 0
    for (mangled, sm), sass in funcs.items():
        if "softmax_ce_" not in mangled or _DTYPES[dtype] not in mangled:
            continue
        checked += 1
        loads = re.findall(r"LDG\.E[\w.]*\.128", sass)
        assert loads, f"{_short(_demangle([mangled])[mangled])} [{sm}]: no 128-bit global load"
    assert checked >= 2 * len(_target_archs()), f"only {checked} softmax kernels found for {dtype}"


@pytest.mark.parametrize("dtype", list(_DTYPES))
def test_sigmoid_flat_path_loads_128_bits(objects, dtype):
    obj, _ = objects["sigmoid_ce.cu"]
    funcs = _sass_functions(obj)
    vec = {"float32": "Li4E", "float16": "Li8E", "bfloat16": "Li8E"}[dtype]
    flat = [(m, sm) for (m, sm) in funcs if "sigmoid_ce_kernel" in m and _DTYPES[dtype] in m
            and vec in m]
    assert flat
    for key in flat:
        assert re.search(r"LDG\.E[\w.]*\.128", funcs[key]), f"{key}: no 128-bit global load"
