"""Triton kernels for the fused steering op and their launchers.

Rows x (N, D) contiguous; W, V (E, D) and b (E,) in fp32 or x's dtype; s a (1,) fp32 tensor read on device.
Both kernels run a persistent grid (``programs_per_sm`` × SMs programs, all resident: no tail wave), each program
looping over row blocks of BLOCK_M rows in increasing order, two sweeps over D in BLOCK_D columns per block. Every
D loop asks for ``num_stages`` explicitly (``tl.range``), which makes Triton pipeline all of its loads with
``cp.async`` (read off the PTX by tests/test_kernels_aot.py; triton 3.3 pipelines only the ``tl.dot`` operands).

Forward (input h = x, or residual + x rounded to x's dtype, never stored):
  1. logits += h_blk · W_blkᵀ (tensor-core dot; E padded to E_PAD ≥ 16 with masked experts), fp32 softmax → g,
     stored when asked;
  2. y_blk = h_blk + s · g · V_blk, stored in x's dtype; the block's rows are re-read from L2 (the grid is sized
     so that the resident programs' rows stay within L2_BYTES_PER_SM per SM).

Backward (x is never saved):
  1. u = dy · Vᵀ; dg = s·u (+ the gating's own gradient, when a loss uses it); dlogits = g ⊙ (dg − Σ_e g·dg),
     stored (N, E); ds accumulates in registers;
  2. per D block: dx = dy + dlogits · W (stored), and the program's fp32 partials in its workspace row,
     P_w += dlogitsᵀ · y and P_v += gᵀ · dy (read-modify-write of a private (E, D) slice that stays in L2). A
     barrier after each row block orders its partial stores before the next block's loads in every thread.
  :func:`steermoe.workspace.reduce_workspace` sums the P rows in one fixed-order reduction and applies
  dW = Σ P_w − s·(dlogitsᵀ·g)·V (x = y − s·g·V, so dlogitsᵀ·x needs no recomputed x: an E×E correction),
  db = Σ dlogits, dV = s·Σ P_v:
  gradients are bitwise deterministic for a given device and grid (no float atomics).

Cost per call (FLOPs, minimum bytes): benchmarks/roofline.py, the one cost model; the bytes these kernels move
between SMs, L2 and HBM: its traffic model (benchmarks/traffic.py, design "pipelined").

Products run on tensor cores with fp32 operands and accumulation: exact ("ieee") for fp32 x, tf32 for bf16 and
fp16 x (their values are exact in tf32, so only W, V, g and dlogits are rounded, to 10 mantissa bits, finer
than the 8 bits a bf16 y keeps). Softmax, its gradient and every sum are fp32.
"""
import re
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from steermoe.workspace import reduce_workspace, workspace_row

INTERPRETER_PROGRAMS = 3  # persistent backward grid under TRITON_INTERPRET (CPU)


@triton.jit
def _load_rows(X, R, offsets, mask, HAS_RESIDUAL: tl.constexpr):
    """The op's input rows h: x, or residual + x rounded to x's dtype (as the unfused add in that dtype)."""
    x = tl.load(X + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (tl.load(R + offsets, mask=mask, other=0.0).to(tl.float32) + x.to(tl.float32)).to(X.dtype.element_ty)
    return x


@triton.jit
def _steer_fwd_kernel(X, R, W, B, V, S, Y, G, N, D,
                      E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      STAGES: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                      STORE_GATING: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    experts = tl.arange(0, E_PAD)
    expert_ok = experts < E
    s = tl.load(S).to(tl.float32)
    bias = tl.zeros((E_PAD,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(B + experts, mask=expert_ok, other=0.0).to(tl.float32)

    for block in range(pid, tl.cdiv(N, BLOCK_M), num_programs):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        row_off = rows.to(tl.int64)[:, None] * D
        logits = tl.zeros((BLOCK_M, E_PAD), dtype=tl.float32)
        for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            x = _load_rows(X, R, row_off + cols[None, :], row_ok[:, None] & col_ok[None, :], HAS_RESIDUAL)
            w_t = tl.load(W + experts[None, :] * D + cols[:, None], mask=col_ok[:, None] & expert_ok[None, :],
                          other=0.0)
            logits += tl.dot(x.to(tl.float32), w_t.to(tl.float32), input_precision=PRECISION)
        logits = tl.where(expert_ok[None, :], logits + bias[None, :], float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        g = p / tl.sum(p, axis=1)[:, None]
        if STORE_GATING:
            tl.store(G + rows.to(tl.int64)[:, None] * E + experts[None, :], g,
                     mask=row_ok[:, None] & expert_ok[None, :])

        for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):  # the row block again, from L2
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            mask = row_ok[:, None] & col_ok[None, :]
            x = _load_rows(X, R, row_off + cols[None, :], mask, HAS_RESIDUAL).to(tl.float32)
            v = tl.load(V + experts[:, None] * D + cols[None, :], mask=expert_ok[:, None] & col_ok[None, :],
                        other=0.0).to(tl.float32)
            y = x + s * tl.dot(g, v, input_precision=PRECISION)
            tl.store(Y + row_off + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _steer_bwd_kernel(DY, Y, G, DG, W, V, S, DX, DL, WS, WS_ROW, N, D,
                      E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      STAGES: tl.constexpr, HAS_GATING_GRAD: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    experts = tl.arange(0, E_PAD)
    expert_ok = experts < E
    s = tl.load(S).to(tl.float32)
    ws = WS + pid.to(tl.int64) * WS_ROW  # this program's row of the workspace
    ds_acc = tl.zeros((E_PAD,), dtype=tl.float32)

    for block in range(pid, tl.cdiv(N, BLOCK_M), num_programs):  # row blocks in increasing order
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        row_off = rows.to(tl.int64)[:, None] * D
        gate_off = rows.to(tl.int64)[:, None] * E + experts[None, :]
        gate_ok = row_ok[:, None] & expert_ok[None, :]
        g = tl.load(G + gate_off, mask=gate_ok, other=0.0)

        u = tl.zeros((BLOCK_M, E_PAD), dtype=tl.float32)
        for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            dy = tl.load(DY + row_off + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            v_t = tl.load(V + experts[None, :] * D + cols[:, None], mask=col_ok[:, None] & expert_ok[None, :],
                          other=0.0)
            u += tl.dot(dy.to(tl.float32), v_t.to(tl.float32), input_precision=PRECISION)
        dg = s * u
        if HAS_GATING_GRAD:
            dg += tl.load(DG + gate_off, mask=gate_ok, other=0.0)
        dlogits = g * (dg - tl.sum(g * dg, axis=1)[:, None])
        tl.store(DL + gate_off, dlogits, mask=gate_ok)
        ds_acc += tl.sum(g * u, axis=0)

        for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            mask = row_ok[:, None] & col_ok[None, :]
            dy = tl.load(DY + row_off + cols[None, :], mask=mask, other=0.0)
            y = tl.load(Y + row_off + cols[None, :], mask=mask, other=0.0)
            param_off = experts[:, None] * D + cols[None, :]
            param_ok = expert_ok[:, None] & col_ok[None, :]
            w = tl.load(W + param_off, mask=param_ok, other=0.0)
            dx = dy.to(tl.float32) + tl.dot(dlogits, w.to(tl.float32), input_precision=PRECISION)
            tl.store(DX + row_off + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            part_ok = param_ok & (tl.zeros_like(param_off) + block > pid)  # the first row block initialises
            dw = tl.load(ws + param_off, mask=part_ok, other=0.0)
            dw += tl.dot(tl.trans(dlogits), y.to(tl.float32), input_precision=PRECISION)
            tl.store(ws + param_off, dw, mask=param_ok)
            dv = tl.load(ws + E * D + param_off, mask=part_ok, other=0.0)
            dv += tl.dot(tl.trans(g), dy.to(tl.float32), input_precision=PRECISION)
            tl.store(ws + E * D + param_off, dv, mask=param_ok)
        tl.debug_barrier()  # this row block's partial-tile stores precede the next one's loads, in every thread

    tl.store(ws + 2 * E * D, tl.sum(ds_acc, axis=0))


def _expert_pad(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def _precision(dtype: torch.dtype) -> str:
    """Exact fp32 products ("ieee") for fp32 x; "tf32" for bf16/fp16 x, whose values tf32 holds exactly."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Row-block bytes the forward's resident programs may keep in L2 for its second sweep, per SM: half of an
# A100's (40 MB / 108 SMs) or H100's (50 MB / 132) share, so the re-read hits while the streams pass through.
L2_BYTES_PER_SM = 192 * 1024
# 64-row backward blocks (same tile, half as wide) halve the partials' read-modify-writes and the W loads per row:
# 341 vs 433 MB L2<->SM at the headline shape (BENCHMARKS.md). Only for 16-bit x at E_PAD <= 32 on this Triton
# or newer: there they compile spill-free with every steady-state load cp.async; fp32 x leaves synchronous loads
# (3.6-3.9), older Tritons leave one in sweep 1 (3.0, 3.2 on sm_90) or abort (3.0, E_PAD = 32).
WIDE_BACKWARD_TRITON = (3, 3)
TRITON_VERSION = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", triton.__version__).groups())
LAUNCH_OPTIONS = ("num_warps", "num_stages")  # launch options; the rest of a config are the kernel's constexprs


def launch_config(kernel: str, dim: int, dtype: torch.dtype, num_experts: int) -> dict:
    """Block sizes and launch options of ``kernel`` ("forward" | "backward") for rows of width ``dim``, and
    ``programs_per_sm``, the size of its persistent grid per SM.

    Every combination is compiled for sm_80 and sm_90 by tests/test_kernels_aot.py, which asserts no spills;
    ``python -m benchmarks.tune`` times alternatives on a GPU.
    """
    e_pad, block_m = _expert_pad(num_experts), 32
    if kernel == "forward":  # exact fp32 products (FMAs) hold more registers
        block_d = {16: 32}.get(e_pad, 16) if dtype == torch.float32 else (64 if e_pad <= 32 else 32)
        stages, row_block_bytes = 3, 32 * dim * torch.finfo(dtype).bits // 8
        # 2 programs cap registers at 128, which spills at E_PAD = 64 (triton 3.2, sm_80): one program there
        per_sm = 1 if e_pad >= 64 else max(1, min(2, L2_BYTES_PER_SM // row_block_bytes))
    else:  # the backward keeps more (rows, E) tiles live: smaller (rows, D) tiles and fewer stages as E grows
        tile = 32 * {16: 64, 32: 32}.get(e_pad, 16) // (2 if dtype == torch.float32 else 1)   # BLOCK_M × BLOCK_D
        block_m = 64 if dtype != torch.float32 and e_pad <= 32 and TRITON_VERSION >= WIDE_BACKWARD_TRITON else 32
        block_d, stages, per_sm = tile // block_m, {16: 4}.get(e_pad, 3), 1
    return dict(E=num_experts, E_PAD=e_pad, BLOCK_M=block_m, BLOCK_D=max(16, min(block_d, triton.next_power_of_2(dim))),
                PRECISION=_precision(dtype), num_warps=8, num_stages=stages, programs_per_sm=per_sm)


def split_config(kernel: str, config: dict) -> Tuple[dict, dict]:
    """(constexprs, Triton launch options) of a launch config. ``num_stages`` is also the kernel's ``STAGES``: each
    D loop asks for it explicitly, which makes Triton pipeline every load of the loop (``cp.async``), not only
    the operands of ``tl.dot``. The persistent grids get a register cap that fits exactly their programs per SM:
    left alone, ptxas aims at more resident programs than the grid runs and spills to get there (16 B per
    thread at E = 8 with triton 3.2 on sm_80 and 3.8 on sm_90)."""
    meta = {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS and k != "programs_per_sm"}
    meta["STAGES"] = config["num_stages"]
    options = {k: config[k] for k in LAUNCH_OPTIONS}
    options["maxnreg"] = min(255, 65536 // (config["programs_per_sm"] * config["num_warps"] * 32))
    return meta, options


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _NullGuard()


class _NullGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _num_programs(t: Tensor, num_blocks: int, per_sm: int) -> int:
    if t.is_cuda:
        cap = per_sm * torch.cuda.get_device_properties(t.device).multi_processor_count
    else:
        cap = INTERPRETER_PROGRAMS
    return max(1, min(num_blocks, cap))


def steer_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], vectors: Tensor, scale: Tensor,
                  save_gating: bool, config: Optional[dict] = None,
                  residual: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """x (N, D) contiguous → y (N, D) in x.dtype, gating (N, E) fp32 ((0, E) unless ``save_gating``).

    With ``residual`` (like x: shape, dtype, contiguous) the op's input is h = residual + x, rounded to x's dtype
    as the unfused add would be, and never written to memory. ``config`` replaces :func:`launch_config`'s."""
    n, d = x.shape
    e = weight.shape[0]
    y = torch.empty_like(x)
    gating = torch.empty((n if save_gating else 0, e), dtype=torch.float32, device=x.device)
    if n == 0:
        return y, gating
    config = config or launch_config("forward", d, x.dtype, e)
    meta, options = split_config("forward", config)
    programs = _num_programs(x, triton.cdiv(n, meta["BLOCK_M"]), config["programs_per_sm"])
    with _device_guard(x):
        _steer_fwd_kernel[(programs,)](
            x, x if residual is None else residual, weight, bias if bias is not None else weight, vectors, scale,
            y, gating, n, d, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            STORE_GATING=save_gating, **meta, **options)
    return y, gating


def steer_backward(grad_y: Tensor, y: Tensor, gating: Tensor, weight: Tensor, vectors: Tensor, scale: Tensor,
                   grad_gating: Optional[Tensor] = None,
                   config: Optional[dict] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dy, y (N, D), gating (N, E) [, its gradient (N, E) fp32] → dx (N, D) in y.dtype; fp32 dW (E, D), db (E,),
    dV (E, D), ds (1,). ``config`` replaces :func:`launch_config`'s."""
    n, d = y.shape
    e = weight.shape[0]
    dx = torch.empty_like(y)
    config = config or launch_config("backward", d, y.dtype, e)
    meta, options = split_config("backward", config)
    programs = _num_programs(y, triton.cdiv(n, meta["BLOCK_M"]), config["programs_per_sm"])
    f32 = dict(dtype=torch.float32, device=y.device)
    if n == 0:
        zero = torch.zeros((e, d), **f32)
        return dx, zero, torch.zeros((e,), **f32), zero.clone(), torch.zeros((1,), **f32)
    workspace = torch.empty((programs, workspace_row(e, d)), **f32)
    dlogits = torch.empty((n, e), **f32)
    with _device_guard(y):
        _steer_bwd_kernel[(programs,)](
            grad_y, y, gating, gating if grad_gating is None else grad_gating, weight, vectors, scale, dx,
            dlogits, workspace, workspace.shape[1], n, d, HAS_GATING_GRAD=grad_gating is not None, **meta,
            **options)
    return (dx, *reduce_workspace(workspace, dlogits, gating, vectors, scale))
