"""Build fusedloss._C: the op schemas, the CPU kernels (compiled once per instruction set and
chosen at run time), and the CUDA kernels when torch is a CUDA build and nvcc is found.

Environment:
  FUSEDLOSS_CUDA=0|1       force the CUDA kernels off / on (default: on when possible)
  TORCH_CUDA_ARCH_LIST     CUDA architectures, e.g. "8.0;9.0+PTX" (default "8.0;9.0+PTX")
  CUDA_HOME                the CUDA toolkit root (default: found from the nvcc on PATH)
  MAX_JOBS                 parallel compile jobs (default: CPU count)
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
CXX_STD = "-std=c++20"  # what torch's own extension builds use

# (name, compiler flags) of each CPU instruction set the kernels are compiled for; at run time
# the op entries pick the one torch itself uses (at::get_cpu_capability).
CPU_ISAS = {
    "x86_64": [
        ("DEFAULT", []),
        ("AVX2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]),
        ("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                    "-DCPU_CAPABILITY_AVX512"]),
        # AVX512 plus the bfloat16 conversion instructions (Zen 4, Cooper Lake, Sapphire
        # Rapids): chosen at run time where the CPU has them.
        ("AVX512_BF16", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                         "-mavx512bf16", "-DCPU_CAPABILITY_AVX512", "-DFUSEDLOSS_AVX512_BF16"]),
    ],
}.get(os.uname().machine, [("DEFAULT", [])])


def log(msg):
    print(f"[fusedloss setup] {msg}", file=sys.stderr, flush=True)


def max_jobs():
    return max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))


def run(cmd):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}")
    return proc.stdout


def newer(target, deps):
    return os.path.exists(target) and all(
        os.path.getmtime(target) >= os.path.getmtime(d) for d in deps)


def same_command(obj, cmd):
    """Whether `obj` was built by exactly `cmd` (flags or architectures may have changed)."""
    try:
        with open(obj + ".cmd") as f:
            return json.loads(f.read()) == cmd
    except (OSError, ValueError):
        return False


def header_deps(folder_list):
    deps = []
    for folder in folder_list:
        deps += glob.glob(os.path.join(CSRC, folder, "*.h")) + glob.glob(
            os.path.join(CSRC, folder, "*.cuh"))
    return deps


def find_cuda_home():
    """The CUDA toolkit root: CUDA_HOME, else the folder the nvcc on PATH really runs from
    (the nvcc on PATH may be a wrapper script, so ask nvcc itself rather than guessing)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        # A dry-run compile prints the toolkit's root as "#$ TOP=..." (--version does not).
        out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
        if m:
            return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def cuda_arch_flags():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    flags, names = [], []
    for arch in re.split(r"[;\s]+", archs.strip()):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
        names.append(arch)
    return flags, ";".join(names)


def want_cuda():
    env = os.environ.get("FUSEDLOSS_CUDA")
    if env == "0":
        return None
    cuda_home = find_cuda_home()
    ok = torch.version.cuda is not None and cuda_home is not None and os.path.exists(
        os.path.join(cuda_home, "bin", "nvcc"))
    if env == "1" and not ok:
        raise RuntimeError("FUSEDLOSS_CUDA=1 but the CUDA kernels cannot be built: "
                           f"torch.version.cuda={torch.version.cuda}, toolkit={cuda_home}")
    return cuda_home if ok else None


def nvidia_wheel_include():
    """Headers the bare nvcc lacks (cusparse.h, cublas_v2.h) come with torch's nvidia wheels."""
    paths = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        paths += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        paths += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted(set(p for p in paths if os.path.isdir(p)))


class BuildExt(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus the objects it cannot express: the per-ISA copies of the
    CPU kernels and the torch-free .cu files, compiled in parallel before the extension."""

    def build_extensions(self):
        ext = self.extensions[0]
        # Kept in the repository's build/ folder, not in build_temp (which `pip install -e`
        # deletes): an install recompiles only the objects whose sources or flags changed, and
        # tests/test_cuda_audit.py finds the CUDA objects and their ptxas reports here.
        obj_dir = os.path.join(ROOT, "build", "fusedloss_objs")
        os.makedirs(obj_dir, exist_ok=True)
        jobs = []
        torch_includes = [f"-I{p}" for p in cpp_extension.include_paths()]
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
        isa_src = os.path.join(CSRC, "cpu", "isa_kernels.cpp")
        isa_deps = [isa_src] + header_deps(["cpu", "common"])
        for isa, flags in CPU_ISAS:
            obj = os.path.join(obj_dir, f"isa_kernels_{isa}.o")
            # -ffp-contract=off: the compiler may not fuse a multiply and an add into an FMA
            # on its own. Where it did, a row's full vector steps and its short head/tail step
            # (inlined apart) rounded differently, so a row's gradient depended on its
            # alignment (in place vs out of place differed in the last bit). The kernels'
            # explicit fmadd calls are FMAs still.
            cmd = ["c++", CXX_STD, "-O3", "-fPIC", "-fvisibility=hidden", "-fopenmp",
                   "-ffp-contract=off", abi, "-c",
                   isa_src, "-o", obj, f"-DCPU_CAPABILITY={isa}"] + flags + torch_includes
            jobs.append((obj, isa_deps, cmd))
        cuda = getattr(self, "cuda_home", None)
        if cuda:
            arch_flags, _ = cuda_arch_flags()
            nvcc = os.path.join(cuda, "bin", "nvcc")
            cu_deps = header_deps(["cuda", "common"])
            for src in sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))):
                obj = os.path.join(obj_dir, os.path.basename(src) + ".o")
                # -Xptxas=-v: registers, stack and spills of every kernel, kept beside the
                # object (tests/test_cuda_audit.py reads them); compressed fatbins (5x smaller).
                cmd = [nvcc, CXX_STD, "-O3", "-c", src, "-o", obj, "-Xcompiler", "-fPIC",
                       "-Xcompiler", "-fvisibility=hidden", "--expt-relaxed-constexpr",
                       "-lineinfo", "-Xptxas=-v", "-Xfatbin=-compress-all",
                       f"-I{CSRC}"] + arch_flags
                jobs.append((obj, [src] + cu_deps, cmd))
        todo = [(o, c) for o, d, c in jobs if not (newer(o, d) and same_command(o, c))]
        log(f"compiling {len(todo)} kernel objects ({len(jobs) - len(todo)} up to date)")

        def compile_one(obj_cmd):
            obj, cmd = obj_cmd
            start = time.monotonic()
            out = run(cmd)
            with open(obj + ".cmd", "w") as f:  # what built it (same_command)
                f.write(json.dumps(cmd))
            if "ptxas" in out:
                with open(obj + ".ptxas.log", "w") as f:
                    f.write(out)
            log(f"  {os.path.basename(obj)}: {time.monotonic() - start:.1f} s")

        start = time.monotonic()
        with ThreadPoolExecutor(max_jobs()) as pool:
            list(pool.map(compile_one, todo))
        if todo:
            log(f"kernel objects: {time.monotonic() - start:.1f} s with {max_jobs()} jobs")
        # ptxas.log: the reports of every CUDA object of this build, current ones only.
        logs = sorted(glob.glob(os.path.join(obj_dir, "*.cu.o.ptxas.log")))
        if logs:
            with open(os.path.join(obj_dir, "ptxas.log"), "w") as f:
                for path in logs:
                    with open(path) as part:
                        f.write(part.read())
        ext.extra_objects = [o for o, _, _ in jobs]
        super().build_extensions()


def torch_requirement():
    """The torch this build compiled against, exactly (local label such as +cu130 dropped, which
    `==` then matches). The compiled library calls torch's C++ symbols, which change between
    releases (a 2.11 build under 2.14 fails to load: undefined symbol ...Library4_def...), so
    pip must never swap the torch it was built against for another. The range the code supports
    (stated in the README, the floor tested in CI) is the set of torch versions it builds
    against: torch 2.11 to 2.14."""
    version = torch.__version__.split("+")[0]
    major_minor = tuple(int(v) for v in version.split(".")[:2])
    if major_minor < (2, 11):
        raise RuntimeError(f"fusedloss needs torch >= 2.11 to build, found {torch.__version__}")
    return f"torch=={version}"


def make_extension():
    cuda_home = want_cuda()
    sources = [os.path.join("csrc", "fusedloss.cpp"), os.path.join("csrc", "build_info.cpp"),
               os.path.join("csrc", "linear_ce.cpp"),
               os.path.join("csrc", "cpu", "ops_cpu.cpp"),
               os.path.join("csrc", "cpu", "output_buffer.cpp")]
    isas = [name for name, _ in CPU_ISAS]
    macros = [("FUSEDLOSS_CPU_ISAS", f'"{",".join(isas)}"')]
    macros += [(f"FUSEDLOSS_HAVE_{isa}", "1") for isa in isas]
    include_dirs = [CSRC]
    library_dirs, libraries, link_args = [], [], []
    if cuda_home and glob.glob(os.path.join(CSRC, "cuda", "*.cu")):
        _, arch_names = cuda_arch_flags()
        sources += sorted(os.path.relpath(p, ROOT)
                          for p in glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
        macros += [("FUSEDLOSS_WITH_CUDA", "1"), ("FUSEDLOSS_CUDA_ARCHS", f'"{arch_names}"')]
        include_dirs += [os.path.join(cuda_home, "include")] + nvidia_wheel_include()
        library_dirs += [os.path.join(cuda_home, "lib64")]
        libraries += ["cudart", "c10_cuda"]
        log(f"CUDA kernels: on (toolkit {cuda_home}, archs {arch_names})")
    else:
        cuda_home = None
        log("CUDA kernels: off")
    ext = cpp_extension.CppExtension(
        "fusedloss._C",
        sources,
        include_dirs=include_dirs,
        define_macros=macros,
        library_dirs=library_dirs,
        libraries=libraries,
        # at::parallel_for is an inline OpenMP template: without -fopenmp it compiles to a
        # serial loop. The libgomp linked here is the one torch already loaded.
        extra_compile_args={"cxx": ["-O3", "-fvisibility=hidden", "-fopenmp"]},
        extra_link_args=link_args + ["-fopenmp"],
    )
    return ext, cuda_home


_ext, _cuda_home = make_extension()


class _BuildExtWithCuda(BuildExt):
    cuda_home = _cuda_home


setup(
    install_requires=[torch_requirement()],
    ext_modules=[_ext],
    cmdclass={"build_ext": _BuildExtWithCuda.with_options(use_ninja=True)},
)
