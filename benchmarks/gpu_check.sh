#!/usr/bin/env bash
# GPU check, offline: install steermoe without dependencies (building the CUDA fallback when nvcc exists), run the
# CUDA tests, then the full benchmark sweep. Needs torch, triton, transformers, pytest and pytest-benchmark
# already installed; soundfile and jiwer are not needed.
#
#   bash benchmarks/gpu_check.sh                 # every stage: install tests op models
#   bash benchmarks/gpu_check.sh install tests   # some stages, in the order given (later ones need install)
#   bash benchmarks/gpu_check.sh op:bf16         # the op sweep's cases whose ids match pytest's -k bf16
#   GPU_CHECK_ON_CPU=1 bash benchmarks/gpu_check.sh op:torch   # checks this script itself: CPU, small sweep
#
# Stages: install (pip install -e ., CUDA fallback for this GPU), tests (CUDA tests, op tests on the GPU),
# op or op:EXPR (the op sweep, benchmarks/test_op.py, all of it or pytest -k EXPR), models (memory, per-call
# overhead, encoder and train-step benchmarks); and, only when named, tune (python -m benchmarks.tune: Triton
# launch configurations timed at the headline shape, tune.json).
# Results go to $OUT if set, else ./benchmark-results/: install.log, tests.log, benchmarks.log, and per benchmark
# stage STAGE.json (the summary rows, rewritten every few seconds while it runs) and STAGE-pytest-benchmark.json,
# and summary.txt: the summary of every stage's rows, each op shape on its own line.
# Each stage prints its duration. Exits non-zero when any stage failed; the later stages still run.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-./benchmark-results}"
mkdir -p "$out"
stages=("$@")
[ "${#stages[@]}" -gt 0 ] || stages=(install tests op models)
failed=()
py="${PYTHON:-python3}"   # the interpreter that holds torch

step() {  # step NAME LOG CMD...: run CMD, its output to the screen and LOG; exit 5 (nothing collected) is fine
  local name=$1 log=$2 rc start=$SECONDS
  shift 2
  "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || failed+=("$name (exit $rc)")
  echo "== $name: exit $rc, $((SECONDS - start)) s"
}

install() {
  # the CUDA fallback only for this GPU's architecture, and only when nvcc is found
  local arch build_cuda=0
  arch=$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}"
  if command -v nvcc >/dev/null 2>&1; then build_cuda=1; else echo "nvcc not found: Triton only"; fi
  if ! STEERMOE_BUILD_CUDA=$build_cuda "$py" -m pip install --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1; then
    failed+=("install (STEERMOE_BUILD_CUDA=$build_cuda, see $out/install.log)")
    STEERMOE_BUILD_CUDA=0 "$py" -m pip install --no-build-isolation --no-deps -e . >>"$out/install.log" 2>&1 \
      || { echo "install failed: see $out/install.log"; return 1; }
  fi
}

bench() {  # bench NAME ARGS...: one pytest-benchmark run (files, pytest options) over the $sweep sweep
  local name=$1
  shift
  step "pytest $*" "$out/benchmarks.log" "$py" -m pytest -q -p no:cacheprovider "$@" --bench-sweep "$sweep" \
    --bench-out "$out" --bench-name "$name" --benchmark-json "$out/$name-pytest-benchmark.json" --benchmark-quiet
}

for stage in "${stages[@]}"; do  # a misspelt stage stops the run before anything is spent
  case $stage in install|tests|op|op:?*|models|tune) ;;
    *) echo "unknown stage '$stage': expected install, tests, op, op:EXPR, models or tune"; exit 2 ;;
  esac
done
sweep=full
if [ "${GPU_CHECK_ON_CPU:-0}" = 1 ]; then
  sweep=small
else
  "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device is visible'" || exit 1
fi
"$py" -c "import torch, triton; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
  '| torch', torch.__version__, '| triton', triton.__version__)"

for stage in "${stages[@]}"; do
  echo "== stage $stage"
  case $stage in
    install)
      start=$SECONDS
      install || exit 1
      echo "== install: $((SECONDS - start)) s"
      "$py" -c "import steermoe; print('backends:', steermoe.available_backends(explain=True))" ;;
    tests)
      step "pytest tests -m gpu" "$out/tests.log" "$py" -m pytest -q -p no:cacheprovider tests -m gpu
      step "pytest tests/test_ops.py" "$out/tests.log" "$py" -m pytest -q -p no:cacheprovider tests/test_ops.py \
        -m "not gpu" ;;
    op) bench op benchmarks/test_op.py ;;
    op:*) bench "op-$(printf %s "${stage#op:}" | tr -c 'A-Za-z0-9.\n' _)" benchmarks/test_op.py -k "${stage#op:}" ;;
    models) bench models benchmarks/test_memory.py benchmarks/test_overhead.py benchmarks/test_encoder.py \
      benchmarks/test_train_step.py ;;
    tune) step "python -m benchmarks.tune" "$out/tune.log" "$py" -m benchmarks.tune --out "$out/tune.json" ;;
  esac
done

saved=()
for f in "$out"/op*.json "$out"/models.json; do
  case $f in *-pytest-benchmark.json) ;; *) [ -f "$f" ] && saved+=("$f") ;; esac
done
if [ "${#saved[@]}" -gt 0 ]; then  # one summary of every stage's rows, each op shape on its own line
  "$py" -m benchmarks.report --all-shapes "${saved[@]}" | tee "$out/summary.txt"
fi
echo "results: $out"
if [ "${#failed[@]}" -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "GPU check passed"
