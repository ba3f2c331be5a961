"""Tests for the CUDA C++ fallback (``csrc/``, the ``cuda`` backend) beyond the shared cases in test_ops.py.

On a GPU with the extension built: the ``cuda`` backend against the Triton kernels on the op's case list, the
float64 oracle on the shapes that reach the extension's other code paths (16-byte vector and scalar paths,
misaligned rows, E = 64 at Whisper width, several row tiles per block of the persistent backward), bitwise
determinism there, and the ops called directly.

Without a GPU: the kernel sources themselves, compiled for the CPU against csrc/emulation/cuda_on_cpu.h (a
thread per CUDA thread), against the float64 oracle on the same code paths; and a missing extension is
reported with the command that builds it.
"""
import glob
import importlib
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch import Tensor

import steermoe._cuda
import steermoe.ops
from steermoe import available_backends, steer
from steermoe.testing import GRAD_NAMES, Case, assert_close, differentiable, make_inputs, reference_results
from steermoe.workspace import workspace_row
from test_ops import DTYPES, SIZES, VARIANTS

BUILD_HINT = "STEERMOE_BUILD_CUDA=1 pip install --no-build-isolation -e ."


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def cuda_backend():
    why = available_backends("cuda", explain=True)["cuda"]
    if why != "available":
        pytest.skip(why)


def _results(args, backend: str, dy: Tensor, dgating: Tensor = None) -> dict:
    """{name: tensor} for y, gating and the gradient of every differentiable argument."""
    y, gating = steer(*args, return_gating=True, backend=backend)
    outputs, upstream = ([y, gating], [dy, dgating]) if dgating is not None else ([y], [dy])
    grads = torch.autograd.grad(outputs, differentiable(args), upstream)
    names = ["y", "gating"] + [n for n, a in zip(GRAD_NAMES, args) if isinstance(a, Tensor) and a.requires_grad]
    return dict(zip(names, (y, gating, *grads)))


def _misaligned(t: Tensor) -> Tensor:
    """A contiguous copy of t that starts one element past a 16-byte boundary (the kernels' scalar path)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return flat[1:].view(t.shape).copy_(t.detach()).requires_grad_(t.requires_grad)


def _check_against_oracle(args, dtype: torch.dtype, dgating: Tensor = None, misaligned: bool = False) -> dict:
    """The cuda backend's results, each checked against the float64 oracle (x and dy misaligned if asked)."""
    dy = torch.randn(args[0].shape, dtype=args[0].dtype, device=args[0].device)
    if misaligned:
        args, dy = [_misaligned(args[0]), *args[1:]], _misaligned(dy)
        assert args[0].data_ptr() % 16 and dy.data_ptr() % 16
    results = _results(args, "cuda", dy, dgating)
    for what, (expected, scale) in reference_results(args, dy, dgating).items():
        assert_close(results[what], expected, scale, dtype, what)
    return results


# ------------------------------------------------------------------------------------- vs Triton
CASES = [Case(shape=shape, experts=e, dtype=dtype) for e, shape in SIZES for dtype in DTYPES] + VARIANTS


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_triton(cuda_backend, case):
    """Same inputs through both kernels: every result within twice the oracle's bound of the other's."""
    if "triton" not in available_backends("cuda"):
        pytest.skip(available_backends("cuda", explain=True)["triton"])
    args = make_inputs(case, "cuda")
    dy = torch.randn(args[0].shape, dtype=case.dtype, device="cuda")
    dgating = torch.randn(*args[0].shape[:-1], case.experts, device="cuda")
    cuda, triton = _results(args, "cuda", dy, dgating), _results(args, "triton", dy, dgating)
    for what, (_, scale) in reference_results(args, dy, dgating).items():
        assert cuda[what].dtype == triton[what].dtype, what
        assert_close(cuda[what], triton[what].double(), 2 * scale, case.dtype, f"{what} (cuda vs triton)")


# ------------------------------------------------------------------------ the extension's code paths
PATHS = [  # (id, x shape, E, dtype, misaligned)
    ("vector-whisper-bf16", (3, 77, 1280), 8, torch.bfloat16, False),
    ("vector-fp32", (129, 64), 8, torch.float32, False),
    ("scalar-misaligned-bf16", (61, 1280), 8, torch.bfloat16, True),
    ("scalar-odd-D-fp16", (61, 1001), 16, torch.float16, False),
    ("E64-whisper-bf16", (45, 1280), 64, torch.bfloat16, False),
    ("E33-fp32", (45, 264), 33, torch.float32, False),
    ("E64-misaligned-fp32", (45, 96), 64, torch.float32, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, experts, dtype, misaligned", [p[1:] for p in PATHS], ids=[p[0] for p in PATHS])
def test_code_paths_match_reference(cuda_backend, shape, experts, dtype, misaligned):
    args = make_inputs(Case(shape=shape, experts=experts, dtype=dtype), "cuda")
    _check_against_oracle(args, dtype, torch.randn(*shape[:-1], experts, device="cuda"), misaligned)


@pytest.mark.gpu
@pytest.mark.parametrize("dim, dtype", [(64, torch.bfloat16), (40, torch.float32)], ids=["vector", "scalar"])
def test_many_tiles_per_block_match_reference_and_repeat_bitwise(cuda_backend, dim, dtype):
    """More rows than 64 per possible backward block (at most 8 per SM), so blocks add several row tiles into
    their partial sums; the result matches the oracle and two runs agree bit for bit."""
    rows = torch.cuda.get_device_properties(0).multi_processor_count * 8 * 64 + 37
    args = make_inputs(Case(shape=(rows, dim), dtype=dtype), "cuda")
    _check_against_oracle(args, dtype)
    dy = torch.randn(args[0].shape, dtype=dtype, device="cuda")
    once, again = _results(args, "cuda", dy), _results(args, "cuda", dy)
    for what in once:
        assert torch.equal(once[what], again[what]), what


@pytest.mark.gpu
def test_ops_called_directly(cuda_backend):
    """The registered ops: schema-level defaults, no gating stored unless asked, fp32 weight gradients."""
    x, w, b, v = (torch.randn(5, 33, device="cuda", dtype=torch.bfloat16), torch.randn(3, 33, device="cuda"),
                  torch.randn(3, device="cuda"), torch.randn(3, 33, device="cuda"))
    s = torch.full((1,), 0.5, device="cuda")
    y, gating = torch.ops.steermoe.cuda_forward(x, w, b, v, s, False)
    assert y.shape == x.shape and y.dtype == x.dtype and gating.shape == (0, 3)
    y, gating = torch.ops.steermoe.cuda_forward(x, w, None, v, s, True)
    assert gating.shape == (5, 3) and gating.dtype == torch.float32
    dx, dlogits, workspace = torch.ops.steermoe.cuda_backward(torch.randn_like(y), y, gating, w, v, s, None,
                                                              workspace_row(3, 33))
    assert [(tuple(t.shape), t.dtype) for t in (dx, dlogits)] == [((5, 33), torch.bfloat16), ((5, 3), torch.float32)]
    assert workspace.shape[1] == workspace_row(3, 33) and workspace.dtype == torch.float32
    with pytest.raises(RuntimeError, match=r"workspace_row must be at least 2·E·D \+ 1 = 199, got 198"):
        torch.ops.steermoe.cuda_backward(torch.randn_like(y), y, gating, w, v, s, None, 198)
    with pytest.raises(RuntimeError, match="1..64 experts, got E=65"):
        torch.ops.steermoe.cuda_forward(x, torch.randn(65, 33, device="cuda"), None,
                                        torch.randn(65, 33, device="cuda"), s, False)


# --------------------------------------------------------------------------- the kernels, emulated on CPU
CSRC = Path(__file__).resolve().parent.parent / "csrc"
EMULATED_LAUNCHES = 2  # forward, backward (the reduction: steermoe.workspace)
TILED_ROWS = 8 * 64 + 37  # over 64 rows for each of the ≤ 8 blocks of kEmulatedSmCount = 1: several tiles each
WARP_TILED_ROWS = 4 * 64 + 37  # the same for the ≤ 4 blocks of 2 warps (D = 256 bf16 at E = 8, D = 40 at E = 33)


def _cuda_include_dir():
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))]
    return next((f"{h}/include" for h in homes if h and os.path.exists(f"{h}/include/cuda_bf16.h")), None)


def _emulated_sources(out: Path) -> list:
    """steer_kernels.cu and steer_ops.cpp rewritten to run on CPU tensors through cuda_on_cpu.h, with the ops
    registered as torch.ops.steermoe_emulated.cuda_forward / cuda_backward."""
    kernels = (CSRC / "steer_kernels.cu").read_text()
    rewrites = [
        ('#include "steer.h"', '#include "cuda_on_cpu.h"\n#include "steer.h"'),
        ("extern __shared__ float4 smem[];", "float4* smem = reinterpret_cast<float4*>(emulated_shared_memory);"),
        ('asm volatile("prefetch.global.L2 [%0];" ::"l"(p));', "(void)p;"),
        ("c10::cuda::getCurrentCUDAStream()", "cudaStream_t{}"),
        ("cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device())",
         "(count = kEmulatedSmCount, 0)"),
        ("    const Pack<T, C> pk = *reinterpret_cast<const Pack<T, C>*>(p + i);",
         "    check_aligned(p + i, sizeof(Pack<T, C>));\n"
         "    const Pack<T, C> pk = *reinterpret_cast<const Pack<T, C>*>(p + i);"),
        ("    *reinterpret_cast<Pack<T, C>*>(p + i) = pk;",
         "    check_aligned(p + i, sizeof(Pack<T, C>));\n    *reinterpret_cast<Pack<T, C>*>(p + i) = pk;"),
    ] + [(f"#include <{h}>", "") for h in ("cuda_bf16.h", "cuda_fp16.h", "cuda_runtime.h",
                                          "c10/cuda/CUDAException.h", "c10/cuda/CUDAStream.h")]
    for old, new in rewrites:
        assert old in kernels, f"steer_kernels.cu no longer contains {old!r}: update the emulation"
        kernels = kernels.replace(old, new)
    kernels, launches = re.subn(r"(\w+(?:<[^<>]*>)?)<<<(.*?)>>>\(", r"emulated_launch(\1, \2, ", kernels, flags=re.S)
    assert launches == EMULATED_LAUNCHES, f"expected {EMULATED_LAUNCHES} kernel launches, found {launches}"

    ops = (CSRC / "steer_ops.cpp").read_text()
    ops = ops[:ops.index("PyMODINIT_FUNC")]
    ops, guards = re.subn(r"  const c10::cuda::CUDAGuard guard\(\w+\.device\(\)\);\n", "", ops)
    rewrites = [("#include <Python.h>", ""), ("#include <c10/cuda/CUDAGuard.h>", ""),
                ("TORCH_CHECK(t.is_cuda(),", "TORCH_CHECK(t.is_cpu(),"),
                ("TORCH_LIBRARY_FRAGMENT(steermoe,", "TORCH_LIBRARY_FRAGMENT(steermoe_emulated,"),
                ("TORCH_LIBRARY_IMPL(steermoe, CUDA,", "TORCH_LIBRARY_IMPL(steermoe_emulated, CPU,")]
    assert guards == 2, "steer_ops.cpp: expected a CUDAGuard in each op"
    for old, new in rewrites:
        assert old in ops, f"steer_ops.cpp no longer contains {old!r}: update the emulation"
        ops = ops.replace(old, new)
    paths = [out / "steer_kernels_emulated.cpp", out / "steer_ops_emulated.cpp"]
    for path, text in zip(paths, (kernels, ops)):
        path.write_text(text)
    return [str(p) for p in paths]


def _build_emulation(out: Path, sanitize: bool = False):
    """torch.ops.steermoe_emulated, built from the kernel sources for the CPU (about a minute on 2 cores) and
    loaded into this process; with ThreadSanitizer if `sanitize` (the process must have libtsan preloaded)."""
    from torch.utils import cpp_extension
    include = _cuda_include_dir()
    if include is None or not cpp_extension.is_ninja_available():
        pytest.skip("building the emulation needs the CUDA headers (cuda_bf16.h) and ninja")
    tsan = ["-fsanitize=thread", "-g"] if sanitize else []
    cpp_extension.load(name="steermoe_emulated", sources=_emulated_sources(out), build_directory=str(out),
                       extra_include_paths=[str(CSRC), str(CSRC / "emulation"), include],
                       extra_cflags=["-O1", "-std=c++20", "-pthread", *tsan], extra_ldflags=["-pthread", *tsan],
                       is_python_module=False)
    return torch.ops.steermoe_emulated


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return _build_emulation(tmp_path_factory.mktemp("emulated"))


EMULATED = [  # (id, x shape, E, x dtype, params, misaligned, loss on the gating)
    ("E8-vector-stash-bf16", (37, 256), 8, torch.bfloat16, "fp32", False, False),
    ("E3-odd-D-fp32", (19, 33), 3, torch.float32, "fp32", False, True),
    ("E64-misaligned-fp16", (21, 96), 64, torch.float16, "fp32", True, False),
    ("E33-split-dV-fp32", (29, 40), 33, torch.float32, "fp32", False, True),
    ("E16-bf16-params", (23, 72), 16, torch.bfloat16, "x", False, False),
    ("E3-tiles-per-block-bf16", (TILED_ROWS, 64), 3, torch.bfloat16, "fp32", False, False),
    ("E3-tiles-per-block-scalar-fp32", (TILED_ROWS, 20), 3, torch.float32, "fp32", False, True),
    ("E8-warps-tiles-per-block-bf16", (WARP_TILED_ROWS, 256), 8, torch.bfloat16, "fp32", False, True),
    ("E33-warps-tiles-per-block-fp32", (WARP_TILED_ROWS, 40), 33, torch.float32, "fp32", False, False),
    ("E8-no-rows", (0, 16), 8, torch.float32, "fp32", False, False),
    ("E8-vector-no-stash-fp32", (9, 1600), 8, torch.float32, "fp32", False, False),
]
# cases also run with a residual input (the forward's stash, re-read, vector, scalar and misaligned paths)
EMULATED_RESIDUAL = ("E8-vector-stash-bf16", "E3-odd-D-fp32", "E64-misaligned-fp16", "E33-split-dV-fp32",
                     "E8-vector-no-stash-fp32", "E8-no-rows")


def _check_emulated(ops, shape, experts, dtype, params, misaligned, gating_loss, residual=False):
    """The ops on CPU tensors vs the float64 oracle; the backward repeats bit for bit. With ``residual`` the forward
    takes x as a residual block's branch and a random residual, and equals the unfused forward of their sum bit for
    bit; the oracle is taken at that sum."""
    args = make_inputs(Case(shape=shape, experts=experts, dtype=dtype, params=params, scale="1el"), "cpu")
    dy = torch.randn(shape, dtype=dtype)
    dgating = torch.randn(shape[0], experts) if gating_loss else None
    x, w, b, v, s = (a.detach() for a in args)
    if misaligned:  # with a residual, the residual alone: x's alignment no longer hides it
        x, dy = (x, dy) if residual else (_misaligned(x), _misaligned(dy))
    inputs = (x,)
    if residual:
        r = torch.randn(shape, dtype=dtype)
        inputs = (x, _misaligned(r) if misaligned else r)
        x = r + x
        args[0] = x.clone().requires_grad_()
    y, gating = ops.cuda_forward(inputs[0], w, b, v, s, True, *inputs[1:])
    if residual:
        unfused = ops.cuda_forward(_misaligned(x) if misaligned else x, w, b, v, s, True)  # the same code path
        assert torch.equal(y, unfused[0]) and torch.equal(gating, unfused[1])
    y_alone, no_gating = ops.cuda_forward(inputs[0], w, b, v, s, False, *inputs[1:])
    assert torch.equal(y_alone, y) and no_gating.shape == (0, experts)
    grads = steermoe._cuda.steer_backward(dy, y, gating, w, v, s, dgating, op=ops.cuda_backward)
    results = dict(zip(("y", "gating", *GRAD_NAMES), (y, gating, *grads)))
    for what, (expected, scale) in reference_results(args, dy, dgating).items():
        assert_close(results[what], expected, scale, dtype, what)
    for first, again in zip(grads, steermoe._cuda.steer_backward(dy, y, gating, w, v, s, dgating,
                                                                op=ops.cuda_backward)):
        assert torch.equal(first, again)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c[1:] for c in EMULATED], ids=[c[0] for c in EMULATED])
def test_emulated_kernels_match_reference(emulated, case):
    _check_emulated(emulated, *case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c[1:] for c in EMULATED if c[0] in EMULATED_RESIDUAL],
                         ids=[c[0] for c in EMULATED if c[0] in EMULATED_RESIDUAL])
def test_emulated_residual_matches_reference(emulated, case):
    _check_emulated(emulated, *case, residual=True)


@pytest.mark.slow
def test_emulated_residual_checked(emulated):
    x, w, v, s = torch.randn(4, 8), torch.randn(3, 8), torch.randn(3, 8), torch.ones(1)
    for bad in (torch.randn(4, 7), x.double(), x[:, None]):
        with pytest.raises(RuntimeError, match=r"cuda_forward: residual must match x: Float \[4, 8\]"):
            emulated.cuda_forward(x, w, None, v, s, False, bad)


RACE_CASES = ("E8-vector-stash-bf16", "E8-warps-tiles-per-block-bf16")  # shared memory of both kernels, 4 blocks


@pytest.mark.slow
def test_emulated_kernels_race_free(tmp_path):
    """Emulated cases that use shared memory from several warps and run blocks side by side, built with
    ThreadSanitizer in a process that preloads its runtime (about a minute): no data race between the threads of a
    block (a missing __syncthreads) or between concurrent blocks, and the same results."""
    libtsan = subprocess.run([os.environ.get("CXX", "c++"), "-print-file-name=libtsan.so"],
                             capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libtsan):
        pytest.skip("ThreadSanitizer's runtime (libtsan.so) is not installed")
    script = f"""
import os, sys
from pathlib import Path
del os.environ["LD_PRELOAD"]  # the compiler and the linker run without the sanitizer
sys.path[:0] = [{str(Path(__file__).parent)!r}]
import torch, test_cuda
torch.manual_seed(0)
ops = test_cuda._build_emulation(Path({str(tmp_path)!r}), sanitize=True)
for case in test_cuda.EMULATED:
    if case[0] in test_cuda.RACE_CASES:
        test_cuda._check_emulated(ops, *case[1:])
        print(case[0], "ok", flush=True)
"""
    env = {**os.environ, "LD_PRELOAD": libtsan, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66 report_signal_unsafe=0"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-6000:]
    assert run.stdout.split() == [word for name in RACE_CASES for word in (name, "ok")]


# ------------------------------------------------------------------------------- without the extension
def test_missing_extension_says_how_to_build_it(monkeypatch):
    """With steermoe._C unimportable, the cuda backend is unavailable and an explicit request raises, both
    naming the build command."""
    monkeypatch.setitem(sys.modules, "steermoe._C", None)  # makes `import steermoe._C` fail
    monkeypatch.setattr(steermoe._cuda, "UNAVAILABLE_REASON", steermoe._cuda.UNAVAILABLE_REASON)  # restored after
    importlib.reload(steermoe._cuda)
    monkeypatch.setattr(steermoe.ops, "_IMPORT_REASONS", {})
    why = available_backends("cpu", explain=True)["cuda"]
    assert "steermoe._C is not available" in why and BUILD_HINT in why
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run here: .*" + re.escape(BUILD_HINT)):
        steer(*make_inputs(Case(shape=(4, 5), experts=3), "cpu"), backend="cuda")
