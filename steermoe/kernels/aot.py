"""Ahead-of-time compile of every steering kernel for real GPU targets, specialised as the launchers' calls are.

Needs no GPU: ``python -m steermoe.kernels.aot [--arch 80 90] [--dim 1280] [--rows 24000]`` prints one JSON line
per (kernel, x dtype, parameter dtype, E, arch). Each launcher (``steer_forward`` / ``steer_backward``) runs on CPU
tensors of that shape with its Triton kernel call recorded instead of run; the recorded arguments give the
signature, the constexprs, the launch options and the specialisation Triton's JIT derives from the argument values
(``tt.divisibility`` 16 for pointers at 16-byte-aligned addresses, as torch allocations are, and for integers that
are multiples of 16; integers equal to 1 become constants). Each line holds the launch configuration, the
specialised arguments, the dynamic shared memory (bytes), cuobjdump's resource usage (REG registers per thread;
LOCAL or STACK above 0 means spills), the synchronous (``ld.global``) and asynchronous (``cp.async``) global loads
of each innermost loop (:mod:`.ptx`) and the resident programs per SM that registers, warps and shared memory
allow on sm_80 and sm_90. ``--markdown`` prints the register/occupancy table of BENCHMARKS.md instead.
Run it with TRITON_INTERPRET unset: under the interpreter the decorated kernels are not compilable objects.
"""
import argparse
import contextlib
import inspect
import json
import os
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime import JITFunction

from . import ptx
from . import steer as kernels

X_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARAM_DTYPES = ("float32", "x")  # steer() takes W, b and V in float32 or in x's dtype
EXPERTS = (1, 8, 20, 33, 64)   # every expert padding: 16, 32, 64
KERNELS = ("forward", "forward+residual", "backward")  # the forward with and without the fused residual add
ROWS = 24000                   # N = 16 × 1500 frames; N's value is part of the specialisation
POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
DIVISIBILITY = 16              # Triton's JIT: pointers and integers that are multiples of 16
# per SM, sm_80 and sm_90 alike, except shared memory (bytes usable by resident blocks; 1 KiB reserved per block)
SM_LIMITS = dict(registers=65536, warps=64, blocks=32, reserved_shared=1024)
SM_SHARED = {80: 167936, 90: 233472}


@dataclass
class Launch:
    """One recorded kernel call: the JIT function, every argument by name, the launch options."""
    fn: JITFunction
    args: Dict[str, object]
    options: Dict[str, object]


@contextlib.contextmanager
def _recorded(calls: List[Launch]):
    """Within, every Triton kernel of ``kernels`` appends its call to ``calls`` instead of running."""
    jitted = {name: fn for name, fn in vars(kernels).items() if isinstance(fn, JITFunction)}

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                names = set(self.fn.arg_names)
                bound = inspect.signature(self.fn.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
                bound.apply_defaults()
                calls.append(Launch(self.fn, dict(bound.arguments), {k: v for k, v in kwargs.items() if k not in names}))
            return record

    try:
        for name, fn in jitted.items():
            setattr(kernels, name, Recorder(fn))
        yield
    finally:
        for name, fn in jitted.items():
            setattr(kernels, name, fn)


def launches(kernel: str, x_dtype: torch.dtype, param_dtype: torch.dtype, num_experts: int, dim: int,
             rows: int = ROWS, config: Optional[dict] = None) -> List[Launch]:
    """The Triton calls ``kernel``'s launcher makes for x (rows, dim) in ``x_dtype``, W, b, V (E, dim) / (E,) in
    ``param_dtype``, with the bias, the stored gating and the gating's gradient (the fullest variant), and for
    "forward+residual" a residual input; ``config`` replaces :func:`launch_config`'s. The tensors are CPU
    allocations, aligned as CUDA ones are."""
    rows_x = torch.empty((rows, dim), dtype=x_dtype)
    w, v = (torch.empty((num_experts, dim), dtype=param_dtype) for _ in range(2))
    b, s = torch.empty((num_experts,), dtype=param_dtype), torch.empty((1,), dtype=torch.float32)
    calls: List[Launch] = []
    with _recorded(calls):
        if kernel.startswith("forward"):
            residual = torch.empty_like(rows_x) if kernel == "forward+residual" else None
            kernels.steer_forward(rows_x, w, b, v, s, save_gating=True, config=config, residual=residual)
        else:
            gating, grad_gating = (torch.empty((rows, num_experts), dtype=torch.float32) for _ in range(2))
            kernels.steer_backward(rows_x, torch.empty_like(rows_x), gating, w, v, s, grad_gating, config=config)
    return calls


@dataclass
class Specialisation:
    """A call as Triton's JIT sees it: ``signature`` type of each runtime argument, ``constexprs`` by name,
    ``ones`` integer arguments equal to 1 (compiled as constants), ``divisible`` arguments with tt.divisibility 16."""
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    ones: List[str]
    divisible: List[str]


def specialisation(launch: Launch, specialise: bool = True) -> Specialisation:
    """What Triton's JIT specialises ``launch`` on, derived from its argument values; ``specialise=False`` gives
    the unspecialised compile (for comparison)."""
    signature, constexprs, ones, divisible = {}, {}, [], []
    for param in launch.fn.params:
        name, value = param.name, launch.args[param.name]
        if param.is_constexpr:
            constexprs[name] = value
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER[value.dtype]
            multiple = value.data_ptr() % DIVISIBILITY == 0
        elif isinstance(value, int) and not isinstance(value, bool):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            multiple = value % DIVISIBILITY == 0
            if value == 1 and specialise and not param.do_not_specialize:
                ones.append(name)
        else:
            raise TypeError(f"kernel argument {name}: no AOT type for {type(value).__name__}")
        if multiple and specialise and not param.do_not_specialize and \
                not getattr(param, "do_not_specialize_on_alignment", False):
            divisible.append(name)
    return Specialisation(signature, constexprs, ones, divisible)


def ast_source(fn: JITFunction, spec: Specialisation) -> ASTSource:
    """``ASTSource`` of ``fn`` specialised as ``spec``, in the form this Triton takes: signature, constexprs and
    ``attrs`` by argument position (3.3+); an ``AttrsDescriptor`` from hints (3.2) or from index sets (3.0, 3.1),
    with the ones among the constants."""
    index = fn.arg_names.index
    constants = {**spec.constexprs, **{name: 1 for name in spec.ones}}
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        signature = {name: "constexpr" if name in constants else spec.signature.get(name, "constexpr")
                     for name in fn.arg_names}
        attrs = {(index(name),): [["tt.divisibility", DIVISIBILITY]] for name in spec.divisible}
        return ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    try:
        from triton.backends.compiler import AttrsDescriptor
        hints = {**{index(name): DIVISIBILITY for name in spec.divisible}, **{index(name): 1 for name in spec.ones}}
        attrs = AttrsDescriptor.from_hints(hints)
    except ImportError:
        from triton.compiler.compiler import AttrsDescriptor
        attrs = AttrsDescriptor(divisible_by_16={index(n) for n in spec.divisible},
                                equal_to_1={index(n) for n in spec.ones})
    return ASTSource(fn=fn, signature=spec.signature, constants=constants, attrs=attrs)


def cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """cuobjdump --dump-resource-usage of one cubin as {"REG": .., "STACK": .., "LOCAL": .., "SHARED": ..}."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    pairs = (field.split(":") for field in line.split() if ":" in field)
    return {k: int(v) for k, v in pairs if v.isdigit()}


def programs_per_sm(registers: int, num_warps: int, shared: int, arch: int) -> int:
    """Resident programs of ``num_warps`` warps per SM of ``sm_{arch}`` (80 or 90), given registers per thread
    (allocated in multiples of 8) and shared memory per program (bytes)."""
    by_registers = SM_LIMITS["registers"] // (-(-registers // 8) * 8 * 32 * num_warps)
    by_shared = SM_SHARED[arch] // (shared + SM_LIMITS["reserved_shared"])
    return min(by_registers, by_shared, SM_LIMITS["warps"] // num_warps, SM_LIMITS["blocks"])


def compile_launch(launch: Launch, arch: int, specialise: bool = True):
    """The ``CompiledKernel`` of ``launch`` for ``sm_{arch}``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return triton.compile(ast_source(launch.fn, specialisation(launch, specialise)),
                              target=GPUTarget("cuda", arch, 32), options=launch.options)


def usage(compiled, num_warps: int) -> dict:
    """PTX size, dynamic shared memory, the arguments its TTIR marks ``tt.divisibility = 16``, the global loads,
    stores and barriers of each innermost loop (:mod:`.ptx`), cuobjdump's resource usage and programs per SM of a
    compiled kernel."""
    res = resource_usage(compiled.asm["cubin"])
    occupancy = {f"programs_per_sm_{a}": programs_per_sm(res["REG"], num_warps, compiled.metadata.shared, a)
                 for a in SM_SHARED}
    loops = [{k: v for k, v in vars(loop).items() if k not in ("label", "first", "last")}
             for loop in ptx.innermost(compiled.asm["ptx"])]
    return dict(ptx_bytes=len(compiled.asm["ptx"]), dynamic_shared=compiled.metadata.shared,
                divisibility_attrs=compiled.asm["ttir"].count("tt.divisibility = 16"), loops=loops, **res,
                **occupancy)


def compile_config(kernel: str, x_dtype: torch.dtype, config: dict, arch: int, dim: int = 1280, rows: int = ROWS,
                   param_dtype: torch.dtype = torch.float32) -> dict:
    """Compile ``kernel`` with a launch ``config`` (as :func:`launch_config` returns) for ``sm_{arch}``, as the
    launcher calls it at (rows, dim); returns the usage of its (single) kernel."""
    (launch,) = launches(kernel, x_dtype, param_dtype, config["E"], dim, rows, config)
    return usage(compile_launch(launch, arch), launch.options["num_warps"])


def compile_kernel(kernel: str, x_dtype: torch.dtype, param_dtype: str, num_experts: int, arch: int, dim: int,
                   rows: int = ROWS) -> Iterator[dict]:
    """One row per Triton call of the launcher's configuration: the config, specialisation and usage."""
    p_dtype = x_dtype if param_dtype == "x" else X_DTYPES[param_dtype]
    for launch in launches(kernel, x_dtype, p_dtype, num_experts, dim, rows):
        spec = specialisation(launch)
        shown = {k: (v if isinstance(v, (int, str)) else str(v)) for k, v in spec.constexprs.items()}
        yield dict(kernel=kernel, fn=launch.fn.__name__, dtype=str(x_dtype).replace("torch.", ""),
                   params=str(p_dtype).replace("torch.", ""), experts=num_experts, arch=arch, dim=dim, rows=rows,
                   config=shown, **launch.options, divisible=spec.divisible, ones=spec.ones,
                   **usage(compile_launch(launch, arch), launch.options["num_warps"]))


def cases(x_dtypes=tuple(X_DTYPES)) -> Iterator[tuple]:
    """(kernel, x dtype name, parameter dtype) of every compile; fp32 x has one parameter dtype."""
    for kernel in KERNELS:
        for x in x_dtypes:
            for p in PARAM_DTYPES if x != "float32" else ("float32",):
                yield kernel, x, p


def compile_all(archs=(80, 90), dim: int = 1280, rows: int = ROWS) -> Iterator[dict]:
    for kernel, x, p in cases():
        for num_experts in EXPERTS:
            for arch in archs:
                yield from compile_kernel(kernel, X_DTYPES[x], p, num_experts, arch, dim, rows)


SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def markdown(rows: List[dict]) -> List[str]:
    """BENCHMARKS.md's table: per kernel, x dtype and parameter dtype, each cell for E = EXPERTS in turn: BLOCK_M,
    BLOCK_D, pipeline stages, then per arch registers, spilled bytes, dynamic shared memory (KiB) and the programs
    per SM that registers, warps and shared memory allow."""
    archs = sorted({r["arch"] for r in rows})
    head = ["kernel", "x", "params", "BLOCK_M", "BLOCK_D", "warps", "stages"]
    for a in archs:
        head += [f"sm_{a} registers", f"sm_{a} spills (B)", f"sm_{a} smem (KiB)", f"sm_{a} programs/SM"]
    out = [f"Each cell lists E = {' / '.join(str(e) for e in EXPERTS)}.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: Dict[tuple, Dict[tuple, dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["dtype"], r["params"]), {})[(r["experts"], r["arch"])] = r
    for (_, x, p), by in groups.items():
        def col(get, arch):
            return " / ".join(str(get(by[(e, arch)])) if (e, arch) in by else "–" for e in EXPERTS)
        cells = [by[next(iter(by))]["kernel"], SHORT[x], SHORT[p]]
        cells += [col(lambda r, key=key: r["config"].get(key, "–"), archs[0]) for key in ("BLOCK_M", "BLOCK_D")]
        cells += [col(lambda r: r["num_warps"], archs[0]), col(lambda r: r["num_stages"], archs[0])]
        for a in archs:
            cells += [col(lambda r: r["REG"], a), col(lambda r: r["LOCAL"] + r["STACK"], a),
                      col(lambda r: f"{r['dynamic_shared'] / 1024:.0f}", a),
                      col(lambda r: r[f"programs_per_sm_{a}"], a)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--dim", type=int, default=1280, help="hidden size D (row width)")
    parser.add_argument("--rows", type=int, default=ROWS, help="rows N of the calls (its value is specialised)")
    parser.add_argument("--markdown", action="store_true", help="print BENCHMARKS.md's register table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    rows = []
    for row in compile_all(tuple(args.arch), args.dim, args.rows):
        rows.append(row)
        if not args.markdown:
            print(json.dumps(row), flush=True)
    if args.markdown:
        print(f"triton {triton.__version__}, D = {args.dim}, N = {args.rows}, specialised as the launchers' calls")
        print("\n".join(markdown(rows)))


if __name__ == "__main__":
    main()
