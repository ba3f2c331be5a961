"""Roofline of the steering op: the fewest HBM bytes and the FLOPs one call needs, and the time floor they set.
The one source of the op's cost model; the kernels, the CUDA sources and BENCHMARKS.md refer to it.

N rows of width D, E experts, ``elem`` bytes per element of x; the gating is float32 (N·E·4 bytes).

    mode      minimum bytes                  FLOPs
    fwd       2·N·D·elem + N·E·4             4·N·D·E     read x, write y and the gating
    bwd       3·N·D·elem + N·E·4             8·N·D·E     read dy, y and the gating, write dx
    fwd+bwd   5·N·D·elem + 2·N·E·4           12·N·D·E

FLOPs count the op's products, 2·N·D·E each (2 FLOPs per multiply-add): forward x·Wᵀ, g·V; backward dy·Vᵀ,
dlogits·W, dlogitsᵀ·x, gᵀ·dy. The fused backwards (Triton and CUDA) never save x: they take dlogitsᵀ·y and
correct it by s·(dlogitsᵀ·g)·V (x = y − s·gV), E×E-sized work, so their FLOPs are the op's. Parameter traffic (E·D; the backward's per-program partial sums) and the softmax
are left out of the minimum; benchmarks/traffic.py models the bytes each kernel really moves.
``python -m benchmarks.roofline`` prints both at Whisper-large shapes.
"""
import argparse

MODES = ("fwd", "bwd", "fwd+bwd")
_ROW_PASSES = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}      # N·D tensors that must cross HBM
_GATING_PASSES = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}
_MATMULS = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}          # N×D×E products, 2 FLOPs per multiply-add


def min_bytes(mode: str, rows: int, dim: int, experts: int, elem: int) -> int:
    """Fewest bytes one call must move to or from memory."""
    return _ROW_PASSES[mode] * rows * dim * elem + _GATING_PASSES[mode] * rows * experts * 4


def flops(mode: str, rows: int, dim: int, experts: int) -> int:
    """Matrix FLOPs of one call."""
    return _MATMULS[mode] * 2 * rows * dim * experts


def table(rows: int, dim: int, experts: int, elem: int, bandwidth_tbps: float):
    """[(mode, bytes, FLOPs, FLOP/byte, floor in µs at ``bandwidth_tbps``)] for each mode."""
    out = []
    for mode in MODES:
        nbytes, nflops = min_bytes(mode, rows, dim, experts, elem), flops(mode, rows, dim, experts)
        out.append((mode, nbytes, nflops, nflops / nbytes, nbytes / (bandwidth_tbps * 1e12) * 1e6))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24000, help="N = B·T (default: 16 × 1500 frames)")
    parser.add_argument("--dim", type=int, default=1280, help="D (default: whisper-large)")
    parser.add_argument("--experts", type=int, default=8, help="E")
    parser.add_argument("--elem", type=int, default=2, help="bytes per element of x (2 = bf16)")
    parser.add_argument("--bandwidth", type=float, default=3.0, help="copy bandwidth in TB/s (H100 ≈ 3.0)")
    parser.add_argument("--param-elem", type=int, default=4, help="bytes per element of W, b, V (4 = fp32)")
    args = parser.parse_args(argv)
    print(f"N={args.rows} D={args.dim} E={args.experts} elem={args.elem} B, floor at {args.bandwidth} TB/s")
    print(f"{'mode':8} {'bytes (MB)':>11} {'GFLOP':>7} {'FLOP/B':>7} {'floor (µs)':>11}")
    for mode, nbytes, nflops, intensity, floor_us in table(args.rows, args.dim, args.experts, args.elem,
                                                           args.bandwidth):
        print(f"{mode:8} {nbytes / 1e6:11.2f} {nflops / 1e9:7.3f} {intensity:7.2f} {floor_us:11.1f}")
    from . import traffic
    print()
    print("\n".join(traffic.lines(traffic.Shape(args.rows, args.dim, args.experts, args.elem, args.param_elem))))


if __name__ == "__main__":
    main()
