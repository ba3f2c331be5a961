"""Roofline of the steering op: the fewest HBM bytes and the FLOPs one call needs, and the time floor they set.

N rows of width D, E experts, ``elem`` bytes per element of x; the gating is float32 (N·E·4 bytes).

    mode      minimum bytes                  FLOPs
    fwd       2·N·D·elem + N·E·4             4·N·D·E     read x, write y and the gating
    bwd       3·N·D·elem + N·E·4             8·N·D·E     read dy, y and the gating, write dx
    fwd+bwd   5·N·D·elem + 2·N·E·4           12·N·D·E

Backward FLOPs: dy·Vᵀ, dlogits·W, dlogitsᵀ·x, gᵀ·dy, 2·N·D·E each; recomputing x = y − s·gV adds 2·N·D·E more.
Parameter traffic (E·D) and the softmax are negligible. ``python -m benchmarks.roofline`` prints the table
at Whisper-large shapes.
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
    """Matrix FLOPs of one call (the recomputation of x in the fused backward not counted)."""
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
    args = parser.parse_args(argv)
    print(f"N={args.rows} D={args.dim} E={args.experts} elem={args.elem} B, floor at {args.bandwidth} TB/s")
    print(f"{'mode':8} {'bytes (MB)':>11} {'GFLOP':>7} {'FLOP/B':>7} {'floor (µs)':>11}")
    for mode, nbytes, nflops, intensity, floor_us in table(args.rows, args.dim, args.experts, args.elem,
                                                           args.bandwidth):
        print(f"{mode:8} {nbytes / 1e6:11.2f} {nflops / 1e9:7.3f} {intensity:7.2f} {floor_us:11.1f}")


if __name__ == "__main__":
    main()
