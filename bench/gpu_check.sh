#!/usr/bin/env bash
# The device check: everything fusedloss can only learn on a GPU, in one command that finishes
# within 8 minutes on one H200 (16 cores, no network) and writes what it found into OUT_DIR.
#
#   bash bench/gpu_check.sh OUT_DIR             # on the GPU machine
#   bash bench/gpu_check.sh OUT_DIR --dry-run   # here: every stage that needs no GPU
#
# Stages, each under its own time budget (`timeout`; a stage cut short is reported, and the
# ones after it still run while time is left), in this order: the build, then the answers that
# take seconds, then the long suites, the benchmark last (it takes what time is left):
#   env          the machine, torch, nvcc, the tools found
#   wheels       Liger-Kernel from .whl/ (bench/fetch_gpu_wheels.sh fetches it beforehand)
#   build        fusedloss._C in place, sm_90 only, all cores, against the torch found there
#   resources    registers, shared memory, spills and theoretical occupancy of every kernel
#                (bench/kernel_resources.py: cuobjdump of the built .so, device properties)
#   sync         tests/test_gpu_sync.py and tests/test_parallel_*.py's tests named *sync*,
#                under torch.cuda.set_sync_debug_mode("error") (JUnit XML)
#   probes       the addmm dtype_out check and NaN padding (bench/gpu_probes.py)
#   mixed        the float16 autocast accuracy table, PyTorch and fusedloss
#                (bench/mixed_precision.py)
#   determinism  two processes, each running every case twice, compared bit for bit: CE,
#                linear CE, vocab-parallel on a group of one (nccl) (bench/determinism.py)
#   bandwidth    each kernel's achieved bandwidth against the GPU's peak
#                (bench/kernel_bandwidth.py: torch.profiler's kernel records)
#   tests        the native CUDA tests: the cuda backend of the parity suite, test_cuda_native.py,
#                test_cuda_paths.py's cuda cases (JUnit XML)
#   large        the > 2^31-element test on the GPU (JUnit XML)
#   memcheck     compute-sanitizer memcheck on bench/sanitizer_paths.py (every kernel path)
#   racecheck    compute-sanitizer racecheck on the same
#   bench        bench/run.py --device cuda: fusedloss, PyTorch eager, torch.compile, Liger-Kernel
#   summary      summary.md: each stage's result and time, one line per question of the GPU
#                paths, the tables, measured times beside the byte model's
# OUT_DIR then holds summary.md, stages.tsv, the bench table and JSON, and results.tar.gz with
# every log (the device tool returns at most 8 files).
#
# Idempotent: a rerun rebuilds only what changed and overwrites OUT_DIR's files. No network.
# The dry run works on a copy of the sources (build/gpu_check/src), so the checkout's own build
# is left alone; there it builds the CUDA kernels too when nvcc is found.
# cuobjdump: the CUDA toolkit's, else the one in the triton wheel (triton/backends/nvidia/bin).
# Environment: PYTHON (default python3: the image's own torch; no venv, no pip install of
# torch), GPU_CHECK_SECONDS (the whole run's budget: default 460, dry run 3600),
# GPU_CHECK_REUSE_BUILD=1 (dry run only: work in this tree and use the fusedloss already built
# in it, as CI does on its throwaway copy, instead of building a copy: minutes on 2 cores).
set -uo pipefail

OUT="${1:?usage: bash bench/gpu_check.sh OUT_DIR [--dry-run]}"
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="${PYTHON:-python3}"
# The device call allows 540 s; the rest is margin. The dry run's 2 cores build far slower.
if (( DRY )); then TOTAL="${GPU_CHECK_SECONDS:-3600}"; else TOTAL="${GPU_CHECK_SECONDS:-460}"; fi
START=$(date +%s)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK="$ROOT/build/gpu_check"  # every log; packed into OUT at the end
rm -rf "$WORK" && mkdir -p "$WORK"
STAGES="$WORK/stages.tsv"
printf 'stage\tstatus\tseconds\tbudget\tnote\n' >"$STAGES"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

elapsed() { echo $(( $(date +%s) - START )); }

# run_stage NAME BUDGET_S COMMAND...: runs COMMAND with its output in $WORK/NAME.log, under
# the smaller of its budget and what is left of the whole run (20 s kept for summary + pack).
run_stage() {
  local name=$1 budget=$2
  shift 2
  local left=$(( TOTAL - $(elapsed) - 20 ))
  (( left < budget )) && budget=$left
  if (( budget < 5 )); then
    printf '%s\tnot run\t0\t0\tout of time\n' "$name" >>"$STAGES"
    echo "[gpu_check] $name: not run (out of time)"
    return 0
  fi
  echo "[gpu_check] $name (budget ${budget} s, $(elapsed) s elapsed)"
  local t0=$(date +%s) rc status
  timeout --kill-after=5 "$budget" bash -c '"$@"' _ "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out" ;;
    *) status="failed ($rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$budget" \
    "$(tail -n 1 "$WORK/$name.log" | tr '\t' ' ' | cut -c1-160)" >>"$STAGES"
  echo "[gpu_check] $name: $status in $(( $(date +%s) - t0 )) s"
  return 0
}

skip_stage() {
  printf '%s\tskipped\t0\t0\t%s\n' "$1" "$2" >>"$STAGES"
  echo "[gpu_check] $1: skipped ($2)"
}

env_report() {
  date -u
  uname -a
  nproc
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nvcc --version 2>&1 | tail -n 2 || echo "nvcc: not found"
  for tool in compute-sanitizer ncu cuobjdump; do
    echo "$tool: $(command -v $tool || echo 'not found')"
  done
  "$PY" bench/kernel_resources.py --find-tool cuobjdump
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  git -C "$ROOT" log -1 --format='commit %h %s' 2>/dev/null || true
}

install_wheels() {
  ls "$ROOT"/.whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/ (run bench/fetch_gpu_wheels.sh where there is network)"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$ROOT"/.whl/*.whl
  PYTHONPATH="$WORK/site" "$PY" -c "import liger_kernel, liger_kernel.transformers.functional as f; print('liger_kernel importable:', f.liger_cross_entropy.__module__)"
}

build() {
  # In place, so that the tests and the benchmark import this build.
  TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS="$(nproc)" FUSEDLOSS_CUDA="$CUDA_BUILD" \
    "$PY" setup.py build_ext --inplace && \
    "$PY" -c "import fusedloss as fl; print(fl.build_info())"
}

pytest_stage() {  # pytest_stage NAME ARGS...: JUnit XML beside the log
  local name=$1
  shift
  "$PY" -m pytest -p no:cacheprovider -q -rfE --junitxml="$WORK/$name.xml" "$@"
}

# determinism_stage ARGS...: two processes, the second compared with the first
determinism_stage() {
  local rc=0
  "$PY" bench/determinism.py "$@" --out "$WORK/determinism/run1.json" || rc=1
  "$PY" bench/determinism.py "$@" --out "$WORK/determinism/run2.json" \
    --compare "$WORK/determinism/run1.json" || rc=1
  return $rc
}

# the sync-debug tests: this file's, and those of tests/test_parallel_*.py named *sync*
sync_tests() {
  ls tests/test_gpu_sync.py tests/test_parallel_*.py 2>/dev/null
}

echo "[gpu_check] output: $OUT; logs: $WORK; budget ${TOTAL} s; dry run: $DRY"
CUDA_BUILD=1
if (( DRY )); then
  command -v nvcc >/dev/null 2>&1 || CUDA_BUILD=0  # a CPU-only machine still checks the rest
fi
SRC="$ROOT"
REUSE=0
(( DRY )) && [ "${GPU_CHECK_REUSE_BUILD:-0}" = 1 ] && REUSE=1
if (( DRY && ! REUSE )); then
  SRC="$WORK/src"
  mkdir -p "$SRC"
  git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC"
fi
cd "$SRC"
# `timeout` runs programs, not shell functions: the stages' functions run in a child bash.
export ROOT PY WORK DRY CUDA_BUILD
export -f env_report install_wheels build pytest_stage determinism_stage
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for bench/*.py

run_stage env 30 env_report
if (( DRY )) && ! ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  skip_stage wheels "dry run without .whl/ (bench/fetch_gpu_wheels.sh fetches it)"
else
  run_stage wheels 30 install_wheels
fi
[ -d "$WORK/site" ] && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
if (( REUSE )); then
  run_stage build 60 "$PY" -c "import fusedloss as fl; print('reused:', fl.build_info())"
else
  run_stage build $(( DRY ? 1200 : 150 )) build
fi

# The GPU paths' questions, each a short stage. Without a GPU the scripts run on the
# CPU at small sizes (--quick), so that each is exercised; their numbers then say nothing about
# a GPU.
if (( DRY )); then
  QUICK=(--device cpu --quick)
  RES=(--allow-no-cuda)  # a CPU-only build has no kernels to read
else
  QUICK=()
  RES=()
fi
run_stage resources 15 "$PY" bench/kernel_resources.py --out "$WORK/resources" "${RES[@]}"
if (( DRY )); then
  run_stage sync 60 pytest_stage sync --collect-only $(sync_tests) -k sync
else
  run_stage sync 60 pytest_stage sync $(sync_tests) -k sync
fi
run_stage probes 25 "$PY" bench/gpu_probes.py --out "$WORK/probes" "${QUICK[@]}"
run_stage mixed 40 "$PY" bench/mixed_precision.py --out "$WORK/mixed" "${QUICK[@]}"
run_stage determinism 45 determinism_stage "${QUICK[@]}"
run_stage bandwidth 35 "$PY" bench/kernel_bandwidth.py --out "$WORK/bandwidth" "${QUICK[@]}"

if (( DRY )); then
  # No GPU: the test stages only collect (the selection must name tests), the sanitizer's
  # script runs its cases on the CPU kernels, the benchmark runs two tiny cases on the CPU.
  run_stage tests 900 pytest_stage tests --collect-only -m "not slow" -k "cuda and not simt"
  run_stage large 60 pytest_stage large --collect-only tests/test_large.py -k cuda
  run_stage memcheck 200 "$PY" bench/sanitizer_paths.py --device cpu
  skip_stage racecheck "dry run: needs a GPU"
  run_stage bench 240 "$PY" bench/run.py --device cpu --quick --reps 3 --warmup 1 \
    --cases ce-256x4000-bfloat16,bce-4096x128-float32 --no-progress --no-memory \
    --contenders "fusedloss,fusedloss inplace,eager,torch.compile,liger" \
    --out "$WORK/bench" --tag quick
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "[gpu_check] torch sees no CUDA device: use --dry-run on a machine without one"
  fi
  # The cuda backend of the whole fast suite (parity, options, autograd, compile), the native
  # tests and the forced-path tests' cuda cases; never the SIMT harness (CPU-only, minutes).
  # ~3200 tests: spread over 8 processes when pytest-xdist is there (the image has it).
  XDIST=()
  "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
  run_stage tests 90 pytest_stage tests "${XDIST[@]}" -m "not slow" -k "cuda and not simt"
  run_stage large 25 pytest_stage large tests/test_large.py -k cuda
  if command -v compute-sanitizer >/dev/null 2>&1; then
    # Only fusedloss's kernels are checked (torch's own run uninstrumented, at full speed),
    # and torch's caching allocator is off, so that an access past a tensor's end lands
    # outside any allocation instead of inside a cached block.
    SAN=(compute-sanitizer --error-exitcode 1)
    compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name" && SAN+=(--kernel-name kns=fusedloss)
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    run_stage memcheck 45 "${SAN[@]}" --tool memcheck --leak-check no \
      "$PY" bench/sanitizer_paths.py
    run_stage racecheck 35 "${SAN[@]}" --tool racecheck "$PY" bench/sanitizer_paths.py
    unset PYTORCH_NO_CUDA_MEMORY_CACHING
  else
    skip_stage memcheck "compute-sanitizer not found"
    skip_stage racecheck "compute-sanitizer not found"
  fi
  # Last: it takes what is left. Every LLM-shaped case in one process (bench/run.py rewrites
  # its JSON after each case, so a stage cut short keeps the cases before it), 10 repetitions.
  # Liger-Kernel is the liger contender (from .whl/); QuACK is not carried.
  run_stage bench 150 "$PY" bench/run.py --device cuda --full --reps 10 --no-progress \
    --contenders "fusedloss,fusedloss inplace,eager,torch.compile,liger" \
    --out "$WORK/bench" --tag cuda
fi

run_stage summary 15 "$PY" bench/gpu_summary.py "$WORK" --out "$WORK/summary.md" \
  --dry-run "$DRY"

# Pack: the device tool returns at most 8 files, 16 MiB each.
cp "$WORK/summary.md" "$OUT/summary.md" 2>/dev/null || echo "summary missing" >"$OUT/summary.md"
cp "$STAGES" "$OUT/stages.tsv"
for f in "$WORK"/bench.json "$WORK"/bench.md; do
  [ -f "$f" ] && cp "$f" "$OUT/"
done
tar -czf "$OUT/results.tar.gz" -C "$WORK" --exclude=src --exclude=site .
echo "[gpu_check] done in $(elapsed) s; wrote $(ls "$OUT" | tr '\n' ' ')"
column -t -s $'\t' "$STAGES" 2>/dev/null || cat "$STAGES"
# Exit status: 1 when a stage failed or ran out of time (the outputs are written either way).
! cut -f2 "$STAGES" | tail -n +2 | grep -qv -e '^ok$' -e '^skipped$'
