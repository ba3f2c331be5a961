"""Correctness of a GPU backend at the headline shape against the float64 oracle; JSON of every error.

    python -m benchmarks.headline_check --backend triton [--batch 16] [--frames 1500] [--dim 1280] [--experts 8]
                                        [--dtype bf16 fp16 fp32] [--out FILE]

For each x dtype, two losses: one on y, one on y and the gating (as a load-balancing loss does). Each run
compares y, the gating and every gradient (dx, dW, db, dV, ds) with :mod:`steermoe.testing`'s oracle and
tolerances, the tests' own. At B=16, T=1500 every program of the persistent backward owns several row
blocks, so the accumulation of its partial sums across row blocks really runs (``row_blocks_per_program``
in the JSON). Without a GPU the Triton backend runs in Triton's interpreter (set TRITON_INTERPRET=1;
the GPU check does on CPU): keep the shape small there. Exits 1 when any error exceeds its bound.
"""
import argparse
import json
import sys
import time
from typing import List

import torch

from steermoe.testing import Case, errors_against_reference

from .impls import DTYPE_NAMES
from .report import environment, format_table

DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
LOSSES = {"y": False, "y+gating": True}  # loss name: whether the gating's gradient enters


def row_blocks_per_program(backend: str, rows: int, dim: int, experts: int, dtype: torch.dtype,
                           device: torch.device) -> float:
    """Row blocks each program of the Triton backward's persistent grid owns (on average); 0 for other backends."""
    if backend != "triton":
        return 0.0
    from steermoe.kernels import steer as kernels

    config = kernels.launch_config("backward", dim, dtype, experts)
    blocks = -(-rows // config["BLOCK_M"])
    probe = torch.empty(0, device=device)
    return round(blocks / kernels._num_programs(probe, blocks, config["programs_per_sm"]), 2)


def check(backend: str, batch: int, frames: int, dim: int, experts: int, dtypes: List[str],
          seed: int = 0) -> List[dict]:
    """One row per (dtype, loss, tensor): max error, bound, their ratio, ok; a run that raises gives one row
    with ``tensor`` "error" and the message, and the next run goes on."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for dtype_name in dtypes:
        for loss, gating_grad in LOSSES.items():
            torch.manual_seed(seed)
            case = Case(shape=(batch, frames, dim), experts=experts, dtype=DTYPES[dtype_name])
            start = time.perf_counter()
            try:
                errors = errors_against_reference(case, (backend, device), gating_grad=gating_grad)
            except Exception as exc:  # reported; the other dtypes and losses are still checked
                rows.append(dict(dtype=dtype_name, loss=loss, tensor="error", max_error=None, bound=None,
                                 ratio=None, ok=False, error=f"{type(exc).__name__}: {exc}"[:500]))
                continue
            seconds = time.perf_counter() - start
            for tensor, (err, bound) in errors.items():
                rows.append(dict(dtype=dtype_name, loss=loss, tensor=tensor, max_error=err, bound=bound,
                                 ratio=err / bound if bound else 0.0, ok=err <= bound, seconds=seconds))
    return rows


def lines(rows: List[dict]) -> List[str]:
    """A table of error / bound per tensor, one line per (dtype, loss); ok when every ratio is ≤ 1."""
    runs = {(r["dtype"], r["loss"]): [] for r in rows}
    for r in rows:
        runs[(r["dtype"], r["loss"])].append(r)
    tensors = next(([r["tensor"] for r in run] for run in runs.values() if run[0]["tensor"] != "error"), [])
    table = [[dtype, loss, *(r["ratio"] for r in run), "ok" if all(r["ok"] for r in run) else "FAIL"]
             if run[0]["tensor"] != "error" else [dtype, loss, *([None] * len(tensors)), run[0]["error"][:80]]
             for (dtype, loss), run in runs.items()]
    return format_table(["dtype", "loss", *tensors, ""], table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.headline_check", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("triton", "cuda", "torch"), required=True)
    parser.add_argument("--batch", type=int, default=16, help="B (default 16)")
    parser.add_argument("--frames", type=int, default=1500, help="T (default 1500: a 30 s window)")
    parser.add_argument("--dim", type=int, default=1280, help="D (default 1280: whisper-large)")
    parser.add_argument("--experts", type=int, default=8, help="E (default 8)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16", "fp32"])
    parser.add_argument("--out", default=None, help="write the environment and every row as JSON")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows_n = args.batch * args.frames
    shape = dict(batch=args.batch, frames=args.frames, rows=rows_n, dim=args.dim, experts=args.experts,
                 row_blocks_per_program={d: row_blocks_per_program(args.backend, rows_n, args.dim, args.experts,
                                                                   DTYPES[d], device) for d in args.dtype})
    print(f"{args.backend} at {rows_n}x{args.dim}, E={args.experts}: max error / bound per tensor (row blocks "
          f"per backward program: {shape['row_blocks_per_program']})", flush=True)
    found = check(args.backend, args.batch, args.frames, args.dim, args.experts, args.dtype)
    print("\n".join(lines(found)))
    passed = all(r["ok"] for r in found)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=environment(), backend=args.backend, shape=shape, passed=passed, rows=found),
                      f, indent=1)
    print(f"headline check {args.backend}: {'passed' if passed else 'FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
