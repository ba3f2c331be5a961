#!/usr/bin/env bash
# CI: build the CUDA fallback (csrc/ -> steermoe._C) for real, without a GPU.
#
# A fresh environment gets the CUDA build of torch; the extension is compiled and linked for sm_80 and sm_90
# in a scratch copy of the repository (an editable build leaves steermoe/_C*.so in the source tree, which a
# CPU-only torch elsewhere must never import); then steermoe is imported there, the ops must be registered
# with CUDA kernels, the cuda backend must be held back only by the lack of CUDA tensors, and the binary must
# hold code for both architectures with no register spills. Any failure exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
step() { printf '[build_cuda %4ds] %s\n' "$((SECONDS - START))" "$*"; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# torch's CUDA build with its nvidia packages is about 5.5 GB installed, plus the downloaded wheels while pip runs.
# STEERMOE_CI_REQUIRE_CUDA=1 makes too little disk a failure instead of a skip.
NEED_GIB=9
FREE_GIB=$(( $(df -k --output=avail "$WORK" | tail -n 1) / 1048576 ))
if [ "$FREE_GIB" -lt "$NEED_GIB" ]; then
  echo "=== CUDA BUILD SKIPPED: ${FREE_GIB} GiB free under $WORK, about ${NEED_GIB} GiB needed ==="
  [ "${STEERMOE_CI_REQUIRE_CUDA:-0}" = 1 ] && exit 1
  exit 0
fi
step "environment: torch==2.14.1 (CUDA 13) + build tools (${FREE_GIB} GiB free)"
python3 -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
python -m pip install -q -U pip
pip install -q torch==2.14.1 numpy ninja "setuptools>=64" wheel
python -c "import torch; assert torch.version.cuda, 'CPU-only torch'; print('torch', torch.__version__, torch.version.cuda)"

step "CUDA toolkit"
if [ -z "${CUDA_HOME:-}" ]; then
  # The nvcc on PATH may be a wrapper script outside the toolkit; nvcc itself reports the root as TOP=.
  command -v nvcc > /dev/null || { echo "nvcc is not on PATH and CUDA_HOME is not set" >&2; exit 1; }
  TOP="$(nvcc --dryrun -c probe.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
  [ -n "$TOP" ] || { echo "could not read the toolkit root from nvcc --dryrun" >&2; exit 1; }
  CUDA_HOME="$(cd "$TOP" && pwd -P)"
fi
export CUDA_HOME
"$CUDA_HOME/bin/nvcc" --version | tail -n 1
echo "CUDA_HOME=$CUDA_HOME"

step "build steermoe._C for sm_80 and sm_90 in a scratch copy"
SRC="$WORK/src"
mkdir -p "$SRC"
git ls-files -z --cached --others --exclude-standard | tar --null --files-from=- --ignore-failed-read -cf - \
  | tar -xf - -C "$SRC"
BUILD_START=$SECONDS
if ! (cd "$SRC" && TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS="$(nproc)" STEERMOE_BUILD_CUDA=1 \
      pip install -v --no-build-isolation --no-deps -e . > "$WORK/build.log" 2>&1); then
  grep -n -i -E "error|killed|fatal" "$WORK/build.log" | grep -v -E "^[0-9]+: +(File|raise|subprocess)" | head -n 40 || true
  tail -n 30 "$WORK/build.log"
  echo "building the CUDA extension failed (compiler messages above)" >&2
  exit 1
fi
step "built in $((SECONDS - BUILD_START)) s"

step "import and registration checks"
cd "$WORK"  # import the scratch copy's editable install, not this checkout
python - <<'EOF'
import glob
import os
import re
import subprocess

import torch
import triton

import steermoe
import steermoe.ops  # the package imports lazily; the op's module loads steermoe._C, which registers the ops

pkg = os.path.dirname(steermoe.__file__)
libs = glob.glob(os.path.join(pkg, "_C*.so"))
assert len(libs) == 1, f"expected one steermoe/_C*.so in {pkg}, found {libs}"
for op in ("cuda_forward", "cuda_backward"):
    assert hasattr(torch.ops.steermoe, op), f"torch.ops.steermoe.{op} is not registered"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"steermoe::{op}", "CUDA"), f"{op} has no CUDA kernel"
    print(getattr(torch.ops.steermoe, op).default._schema)
why = steermoe.available_backends("cpu", explain=True)["cuda"]
assert why.startswith("the cuda backend needs CUDA tensors"), f"the extension did not load: {why}"

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
usage = subprocess.run([cuobjdump, "--dump-resource-usage", libs[0]], capture_output=True, text=True, check=True)
arch, name, archs, spills = None, None, set(), []
for line in usage.stdout.splitlines():
    if m := re.search(r"arch = (sm_\d+)", line):
        arch = m.group(1)
        archs.add(arch)
    elif m := re.search(r"Function (\S+):", line):
        name = m.group(1)
    elif m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", line):
        kernel = re.search(r"(steer_fwd_kernel|steer_bwd_kernel)I(\w+?)Li(\d+)E(?:Lb([01])E)?", name)
        dtype = {"f": "fp32", "13__nv_bfloat16": "bf16", "6__half": "fp16"}[kernel.group(2)]
        residual = "+residual" if kernel.group(4) == "1" else ""
        label = " ".join(filter(None, (arch, kernel.group(1), dtype, f"E<={kernel.group(3)}", residual)))
        print(f"  {label:40s} registers {m.group(1):>3s}  stack {m.group(2)}  local {m.group(3)}")
        if int(m.group(2)) or int(m.group(3)):
            spills.append(label)
assert archs == {"sm_80", "sm_90"}, f"expected code for sm_80 and sm_90, found {sorted(archs)}"
assert not spills, f"register spills (stack/local memory) in: {spills}"
print("steermoe._C: ops registered, sm_80 + sm_90, no spills")
EOF
step "done"
