"""Ahead-of-time compile of every steering kernel for real GPU targets, with register and spill counts.

Needs no GPU: ``python -m steermoe.kernels.aot [--arch 80 90] [--dim 1280]`` prints one JSON line per
(kernel, x dtype, E, arch) with the launch configuration the launchers use, its dynamic shared memory (bytes;
it grows with num_stages as loads are pipelined) and cuobjdump's resource usage (REG registers per thread;
LOCAL or STACK above 0 means spills). Run it with TRITON_INTERPRET unset: under the interpreter the decorated
kernels are not compilable objects.
"""
import argparse
import inspect
import json
import os
import subprocess
import tempfile
import warnings
from typing import Dict, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import steer as kernels

X_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
EXPERTS = (1, 8, 20, 33, 64)   # every expert padding: 16, 32, 64


def _signature(kernel: str, x_dtype: torch.dtype) -> Dict[str, str]:
    x, f32 = POINTER[x_dtype], "*fp32"
    if kernel == "forward":
        return dict(X=x, W=f32, B=f32, V=f32, S=f32, Y=x, G=f32, N="i32", D="i32")
    return dict(DY=x, Y=x, G=f32, DG=f32, W=f32, V=f32, S=f32, DX=x, DW_PART=f32, DV_PART=f32, DB_PART=f32,
                DS_PART=f32, N="i32", D="i32")


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


def ast_source(fn, signature: Dict[str, str], constexprs: Dict[str, object]) -> ASTSource:
    """``ASTSource`` for ``fn`` with ``signature`` (pointer and integer arguments by name) and ``constexprs``, in
    the form this Triton takes: ``constexprs=`` (3.3+), constants by name (3.2), by argument index (3.0, 3.1)."""
    params = inspect.signature(ASTSource.__init__).parameters
    full = {**signature, **{name: "constexpr" for name in constexprs}}
    if "constexprs" in params:
        return ASTSource(fn=fn, signature=full, constexprs=constexprs)
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 2):
        return ASTSource(fn=fn, signature=full, constants=constexprs)
    index = fn.arg_names.index
    return ASTSource(fn=fn, signature={index(k): v for k, v in signature.items()},
                     constants={index(k): v for k, v in constexprs.items()})


def compile_config(kernel: str, x_dtype: torch.dtype, config: dict, arch: int) -> dict:
    """Compile ``kernel`` with a launch ``config`` (as :func:`launch_config` returns) for ``sm_{arch}``; returns
    the PTX size and cuobjdump's resource usage."""
    meta, options = kernels.split_config(kernel, config)
    fn = kernels._steer_fwd_kernel if kernel == "forward" else kernels._steer_bwd_kernel
    meta.update(dict(HAS_BIAS=True, STORE_GATING=True) if kernel == "forward" else dict(HAS_GATING_GRAD=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = triton.compile(ast_source(fn, _signature(kernel, x_dtype), meta),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    return dict(ptx_bytes=len(compiled.asm["ptx"]), dynamic_shared=compiled.metadata.shared,
                **resource_usage(compiled.asm["cubin"]))


def compile_kernel(kernel: str, x_dtype: torch.dtype, num_experts: int, arch: int, dim: int) -> dict:
    """Compile the launchers' configuration for ``sm_{arch}``; returns the config and its resource usage."""
    config = kernels.launch_config(kernel, dim, x_dtype, num_experts)
    usage = compile_config(kernel, x_dtype, config, arch)
    _, options = kernels.split_config(kernel, config)
    shown = {k: (str(v) if not isinstance(v, (int, str)) else v) for k, v in config.items() if k not in options}
    return dict(kernel=kernel, dtype=str(x_dtype).replace("torch.", ""), experts=num_experts, arch=arch, dim=dim,
                config=shown, **options, **usage)


def compile_all(archs=(80, 90), dim: int = 1280) -> Iterator[dict]:
    for kernel in ("forward", "backward"):
        for x_dtype in X_DTYPES.values():
            for num_experts in EXPERTS:
                for arch in archs:
                    yield compile_kernel(kernel, x_dtype, num_experts, arch, dim)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--dim", type=int, default=1280, help="hidden size D (row width)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    for row in compile_all(tuple(args.arch), args.dim):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
