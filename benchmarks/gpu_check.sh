#!/usr/bin/env bash
# The GPU check in one call of at most 9 minutes: the stages, their predicted times, timeouts and start deadlines
# are in benchmarks/gpu_check.py's docstring (python -m benchmarks.gpu_check --help-stages prints it).
#
#   bash benchmarks/gpu_check.sh                     # every default stage, most important evidence first
#   bash benchmarks/gpu_check.sh bench memory        # some stages, in the order given
#   bash benchmarks/gpu_check.sh op                  # the full op sweep (longer leases); op:EXPR, models
#   GPU_CHECK_ON_CPU=1 bash benchmarks/gpu_check.sh  # checks this script on CPU: every stage at small shapes
#
# Needs torch, triton, transformers, pytest and pytest-benchmark installed (not soundfile or jiwer), and steermoe
# installed from this checkout (pip install --no-build-isolation --no-deps -e .). Results go to $OUT if set, else
# ./benchmark-results/. PYTHON names the interpreter that holds torch (default python3).
cd "$(dirname "$0")/.." || exit 1
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
