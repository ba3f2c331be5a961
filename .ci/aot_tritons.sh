#!/usr/bin/env bash
# CI: the Triton kernels compile ahead of time for sm_80 and sm_90, with no register spills, on older Tritons
# too: tests/test_kernels_aot.py (which checks the installed Triton) runs once per version, that version
# installed on its own into a scratch folder and put first on PYTHONPATH. No GPU needed. Run inside the
# environment steermoe is installed in.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS="${STEERMOE_CI_TRITONS:-3.0.0 3.2.0 3.3.1 3.6.0 3.8.0}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
for version in $VERSIONS; do
  pip install -q --no-deps --target "$WORK/triton-$version" "triton==$version"
  export PYTHONPATH="$WORK/triton-$version"
  found=$(python -c "import triton; print(triton.__version__)")
  [ "$found" = "$version" ] || { echo "PYTHONPATH gave triton $found, not $version" >&2; exit 1; }
  echo "triton $version:"
  python -m pytest -q -p no:cacheprovider tests/test_kernels_aot.py
done
