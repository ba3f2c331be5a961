#!/usr/bin/env bash
# GPU check, offline: install steermoe without dependencies (building the CUDA fallback when nvcc exists), run the
# CUDA tests, then the full benchmark sweep. Needs torch, triton, transformers, pytest and pytest-benchmark
# already installed; soundfile and jiwer are not needed.
#
#   bash benchmarks/gpu_check.sh          # results in $OUT if set, else ./benchmark-results/
#
# Writes install.log, tests.log, benchmarks.log, summary.json (the summary rows) and pytest-benchmark.json.
# Exits non-zero when any step failed; the later steps still run.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-./benchmark-results}"
mkdir -p "$out"
failed=()

step() {  # step NAME LOG CMD...: run CMD, its output to the screen and LOG; exit 5 (nothing collected) is fine
  local name=$1 log=$2 rc
  shift 2
  "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || failed+=("$name (exit $rc)")
}

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device is visible'" || exit 1
python -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"

# 1. install; the CUDA fallback only for this GPU's architecture, and only when nvcc is found
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python -c \
  'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
if command -v nvcc >/dev/null 2>&1; then build_cuda=1; else build_cuda=0; echo "nvcc not found: Triton only"; fi
if ! STEERMOE_BUILD_CUDA=$build_cuda pip install --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1; then
  failed+=("install (STEERMOE_BUILD_CUDA=$build_cuda, see $out/install.log)")
  STEERMOE_BUILD_CUDA=0 pip install --no-build-isolation --no-deps -e . >>"$out/install.log" 2>&1 \
    || { echo "install failed: see $out/install.log"; exit 1; }
fi
python -c "import steermoe; print('backends:', steermoe.available_backends(explain=True))"

# 2. CUDA tests: everything marked gpu, and the op tests (their kernels run on the GPU here)
step "pytest tests -m gpu" "$out/tests.log" python -m pytest -q -p no:cacheprovider tests -m gpu
if [ -f tests/test_ops.py ]; then
  step "pytest tests/test_ops.py" "$out/tests.log" python -m pytest -q -p no:cacheprovider tests/test_ops.py -m "not gpu"
fi

# 3. the full benchmark sweep; the summary table ends the output
step "pytest benchmarks" "$out/benchmarks.log" python -m pytest -q -p no:cacheprovider benchmarks --bench-sweep full \
  --bench-out "$out" --benchmark-json "$out/pytest-benchmark.json" --benchmark-quiet

echo "results: $out"
if [ "${#failed[@]}" -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "GPU check passed"
