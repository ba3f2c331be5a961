"""Time launch configurations of the Triton kernels at one shape, to choose ``launch_config``'s.

    python -m benchmarks.tune [--rows 24000] [--dim 1280] [--experts 8] [--dtype bf16] [--kernel forward backward]
                               [--budget-s S]

Every candidate (BLOCK_M, BLOCK_D, num_warps, num_stages and programs per SM of the persistent grids) runs through
the real launcher; its outputs are checked against the shipped configuration's (the same math, so equal to
rounding) and timed with the benchmarks' timer. One line per candidate, fastest first: median µs, achieved
bandwidth (minimum bytes / time) and its share of the copy bandwidth measured in the same run. The fastest
``--compile-top`` of each kernel are also compiled ahead of time for this GPU to read registers, spills and
dynamic shared memory; a configuration enters ``launch_config`` only if ``tests/test_kernels_aot.py`` stays free
of spills. Candidates that fail to compile or launch (too much shared memory, say) are listed, not fatal.
``--out FILE`` writes JSON.
On CPU (Triton's interpreter) this only checks that the tool runs: keep the shape tiny.
"""
import argparse
import itertools
import json
import os
import time
from typing import Callable, Dict, List, Optional

import torch

from steermoe.kernels import steer as kernels

from .impls import OpCase, OpInputs, make_inputs
from .report import environment, format_table
from .roofline import min_bytes
from .timing import DEVICE, copy_bandwidth_gbps, median_ms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = {"forward": "fwd", "backward": "bwd"}
GRID = {  # candidate values; E, E_PAD and PRECISION always come from launch_config
    "forward": dict(BLOCK_M=(32, 64), BLOCK_D=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4),
                    programs_per_sm=(1, 2, 3)),
    "backward": dict(BLOCK_M=(32, 64), BLOCK_D=(16, 32, 64), num_warps=(4, 8), num_stages=(2, 3, 4, 5),
                     programs_per_sm=(1, 2)),
}


def candidates(kernel: str, dim: int, dtype: torch.dtype, experts: int, grid: Dict[str, tuple]) -> List[dict]:
    """The shipped configuration first, then every combination of ``grid``'s values, nearest the shipped first
    (fewest values changed), so that a time budget tries its neighbours before the far corners."""
    shipped = kernels.launch_config(kernel, dim, dtype, experts)
    out = [shipped]
    for values in itertools.product(*grid.values()):
        config = {**shipped, **dict(zip(grid, values))}
        if config not in out:
            out.append(config)
    return [shipped] + sorted(out[1:], key=lambda c: sum(c[k] != shipped[k] for k in grid))


def runner(kernel: str, inp: OpInputs) -> Callable[[dict], tuple]:
    """A call of ``kernel``'s launcher with a given config, returning its outputs; x is (N, D) rows."""
    x, dy = inp.x.detach().flatten(0, 1), inp.grad_y.flatten(0, 1)
    w, b, v, s = (t.detach() for t in (inp.weight, inp.bias, inp.vectors, inp.scale.reshape(1)))
    if kernel == "forward":
        return lambda config: kernels.steer_forward(x, w, b, v, s, save_gating=True, config=config)
    y, gating = kernels.steer_forward(x, w, b, v, s, save_gating=True)
    return lambda config: kernels.steer_backward(dy, y, gating, w, v, s, config=config)


def _close(outputs: tuple, expected: tuple) -> bool:
    """Each output within 1% (relative, in norm) of the shipped configuration's."""
    return all(torch.linalg.vector_norm((a.double() - b.double()).flatten())
               <= 1e-2 * torch.linalg.vector_norm(b.double().flatten()) + 1e-6 for a, b in zip(outputs, expected))


def tune(kernel: str, rows: int, dim: int, experts: int, dtype: torch.dtype, copy_gbps: float,
         grid: Dict[str, tuple], compile_top: int, budget_s: Optional[float] = None) -> List[dict]:
    """One row per candidate tried: config, ``us``, ``gbps``, ``copy_pct``, ``error``; sorted fastest first.
    With ``budget_s``, no candidate after the shipped one starts once that many seconds have passed."""
    run = runner(kernel, make_inputs(OpCase(1, rows, dim, experts, dtype)))
    configs = candidates(kernel, dim, dtype, experts, grid)
    expected = run(configs[0])
    nbytes = min_bytes(MODES[kernel], rows, dim, experts, torch.finfo(dtype).bits // 8)
    results = []
    start = time.perf_counter()
    for i, config in enumerate(configs):
        if i and budget_s is not None and time.perf_counter() - start > budget_s:
            print(f"{kernel}: time budget of {budget_s:g} s spent, {len(configs) - i} candidates not tried")
            break
        row = dict(kernel=kernel, shipped=i == 0, config=config, us=None, gbps=None, copy_pct=None, error=None)
        try:
            if not _close(run(config), expected):
                row["error"] = "outputs differ from the shipped configuration's"
            else:
                ms = median_ms(lambda _: run(config), min_reps=3, max_reps=50, budget_s=0.02)
                row.update(us=ms * 1e3, gbps=nbytes / ms / 1e6, copy_pct=100 * nbytes / ms / 1e6 / copy_gbps)
        except Exception as exc:  # a candidate that cannot compile or launch is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
        results.append(row)
    results.sort(key=lambda r: (r["us"] is None, r["us"] or 0.0))
    if DEVICE.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        _add_resource_usage(kernel, dtype, [r for r in results if r["us"] is not None][:compile_top], dim, rows)
    return results


def _add_resource_usage(kernel: str, dtype: torch.dtype, rows: List[dict], dim: int = 1280, n: int = 24000) -> None:
    """Registers, spills and shared memory of each row's config, compiled as the launcher calls it at (n, dim)."""
    from steermoe.kernels.aot import compile_config

    major, minor = torch.cuda.get_device_capability(DEVICE)
    for row in rows:
        usage = compile_config(kernel, dtype, row["config"], 10 * major + minor, dim=dim, rows=n)
        row.update(regs=usage["REG"], spill_bytes=usage["LOCAL"] + usage["STACK"], smem=usage["dynamic_shared"])


def lines(results: List[dict]) -> List[str]:
    keys = [k for k in ("BLOCK_M", "BLOCK_D", "num_warps", "num_stages", "programs_per_sm")
            if k in results[0]["config"]]
    table = [[r["kernel"] + (" (shipped)" if r["shipped"] else ""), *(r["config"][k] for k in keys), r["us"],
              r["copy_pct"], r.get("regs"), r.get("spill_bytes"), r.get("smem"), r["error"] or ""] for r in results]
    return format_table(["kernel", *keys, "µs", "%copy", "regs", "spill B", "smem B", "error"], table)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24000, help="N = B·T (default: whisper-large, B=16)")
    parser.add_argument("--dim", type=int, default=1280, help="D")
    parser.add_argument("--experts", type=int, default=8, help="E")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="x's dtype")
    parser.add_argument("--kernel", nargs="+", choices=sorted(GRID), default=["forward", "backward"])
    parser.add_argument("--compile-top", type=int, default=8, help="read registers of the fastest N candidates")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="per kernel: start no candidate after this many seconds (neighbours of the shipped first)")
    parser.add_argument("--grid", type=json.loads, default=None,
                        help='candidate values as JSON, replacing the default grid\'s keys, e.g. \'{"BLOCK_M": [32]}\'')
    parser.add_argument("--out", default=None, help="write the environment and all rows as JSON")
    args = parser.parse_args(argv)

    env = environment()
    env["copy_gbps"] = copy_bandwidth_gbps(2**30 if DEVICE.type == "cuda" else 2**24)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}")
    print(f"rows {args.rows}, D {args.dim}, E {args.experts}, {args.dtype}; "
          f"copy bandwidth {env['copy_gbps']:.0f} GB/s")
    rows = []
    for kernel in args.kernel:
        grid = {k: tuple(v) for k, v in {**GRID[kernel], **(args.grid or {})}.items() if k in GRID[kernel]}
        found = tune(kernel, args.rows, args.dim, args.experts, DTYPES[args.dtype], env["copy_gbps"], grid,
                     args.compile_top, args.budget_s)
        print("\n".join(lines(found)), flush=True)
        rows += found
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=env, shape=dict(rows=args.rows, dim=args.dim, experts=args.experts,
                                                       dtype=args.dtype), rows=rows), f, indent=1, default=str)


if __name__ == "__main__":
    main()
