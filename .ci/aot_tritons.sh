#!/usr/bin/env bash
# CI: the Triton kernels compile ahead of time for sm_80 and sm_90, with no register spills, on older Tritons
# too (the installed one is checked by tests/test_kernels_aot.py). Each version is installed on its own into a
# scratch folder and put first on PYTHONPATH; no GPU needed. Run inside the environment steermoe is installed in.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS="${STEERMOE_CI_TRITONS:-3.0.0 3.2.0 3.3.1 3.6.0}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
for version in $VERSIONS; do
  pip install -q --no-deps --target "$WORK/triton-$version" "triton==$version"
  found=$(PYTHONPATH="$WORK/triton-$version" python -c "import triton; print(triton.__version__)")
  [ "$found" = "$version" ] || { echo "PYTHONPATH gave triton $found, not $version" >&2; exit 1; }
  env -u TRITON_INTERPRET PYTHONPATH="$WORK/triton-$version" python -m steermoe.kernels.aot --arch 80 90 \
    > "$WORK/aot-$version.jsonl"
  python - "$version" "$WORK/aot-$version.jsonl" <<'EOF'
import json
import sys

version, path = sys.argv[1:]
rows = [json.loads(line) for line in open(path)]
spilled = [r for r in rows if r["LOCAL"] or r["STACK"]]
print(f"triton {version}: {len(rows)} configurations, max {max(r['REG'] for r in rows)} registers, "
      f"{len(spilled)} spilling")
for r in spilled:
    print("  spills:", json.dumps(r))
sys.exit(1 if spilled or not rows else 0)
EOF
done
