"""Triton kernels for the fused steering op and their launchers.

Rows x (N, D) contiguous; W, V (E, D) and b (E,) in fp32 or x's dtype; s a (1,) fp32 tensor read on device.

Forward, one program per BLOCK_M rows, two sweeps over D in BLOCK_D columns:
  1. logits += x_blk · W_blkᵀ  (tensor-core dot; E padded to E_PAD ≥ 16 with masked experts)
     then an fp32 softmax over the E real experts → g (BLOCK_M, E_PAD), stored when asked;
  2. y_blk = x_blk + s · g · V_blk, stored in x's dtype.
  The second sweep re-reads the program's own rows (BLOCK_M·D elements, a few tens of KB) right after the
  first, so it is served by L2: HBM sees x read once and y written once.

Backward, a persistent grid of P programs, each looping over row blocks:
  1. u = dy · Vᵀ; dg = s·u (+ the gating's own gradient, when a loss uses it); dlogits = g ⊙ (dg − Σ_e g·dg);
     db, ds accumulate in registers;
  2. per D block: x = y − s·g·V (recomputed, x is never saved), dx = dy + dlogits · W (stored),
     and the program's own fp32 partials dW_p += dlogitsᵀ · x, dV_p += s · gᵀ · dy (read-modify-write of a
     private (E, D) slice that stays in L2).
  The P partials are summed in a fixed order afterwards: gradients are bitwise deterministic for a given
  device (no float atomics).

Cost per call (E experts, N rows, elem = bytes per element of x):
  forward  ≈ 4·N·D·E FLOPs, minimum bytes 2·N·D·elem (+ N·E·4 for the gating);
  backward ≈ 8·N·D·E FLOPs, minimum bytes 3·N·D·elem + N·E·4 (+ P·E·D·8 for the partials).
At E=8, bf16 this is about 8 FLOP/byte: memory-bound on every current GPU.

Products run on tensor cores with fp32 operands and accumulation: exact ("ieee") for fp32 x, tf32 for bf16 and
fp16 x (their values are exact in tf32, so only W, V, g and dlogits are rounded, to 10 mantissa bits, finer
than the 8 bits a bf16 y keeps). Softmax, its gradient and every sum are fp32.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

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
                      HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_GATING: tl.constexpr,
                      PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    row_off = rows.to(tl.int64)[:, None] * D
    experts = tl.arange(0, E_PAD)
    expert_ok = experts < E

    logits = tl.zeros((BLOCK_M, E_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = _load_rows(X, R, row_off + cols[None, :], row_ok[:, None] & col_ok[None, :], HAS_RESIDUAL)
        w_t = tl.load(W + experts[None, :] * D + cols[:, None], mask=col_ok[:, None] & expert_ok[None, :],
                      other=0.0)
        logits += tl.dot(x.to(tl.float32), w_t.to(tl.float32), input_precision=PRECISION)
    if HAS_BIAS:
        logits += tl.load(B + experts, mask=expert_ok, other=0.0).to(tl.float32)[None, :]
    logits = tl.where(expert_ok[None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    g = p / tl.sum(p, axis=1)[:, None]
    if STORE_GATING:
        tl.store(G + rows.to(tl.int64)[:, None] * E + experts[None, :], g,
                 mask=row_ok[:, None] & expert_ok[None, :])

    s = tl.load(S).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        x = _load_rows(X, R, row_off + cols[None, :], mask, HAS_RESIDUAL).to(tl.float32)
        v = tl.load(V + experts[:, None] * D + cols[None, :], mask=expert_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        y = x + s * tl.dot(g.to(tl.float32), v.to(tl.float32), input_precision=PRECISION)
        tl.store(Y + row_off + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _steer_bwd_kernel(DY, Y, G, DG, W, V, S, DX, DW_PART, DV_PART, DB_PART, DS_PART, N, D,
                      E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_GATING_GRAD: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    experts = tl.arange(0, E_PAD)
    expert_ok = experts < E
    s = tl.load(S).to(tl.float32)
    part_off = pid.to(tl.int64) * E * D
    db_acc = tl.zeros((E_PAD,), dtype=tl.float32)
    ds_acc = tl.zeros((E_PAD,), dtype=tl.float32)

    for block in range(pid, tl.cdiv(N, BLOCK_M), num_programs):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        row_off = rows.to(tl.int64)[:, None] * D
        gate_off = rows.to(tl.int64)[:, None] * E + experts[None, :]
        gate_ok = row_ok[:, None] & expert_ok[None, :]
        g = tl.load(G + gate_off, mask=gate_ok, other=0.0)

        u = tl.zeros((BLOCK_M, E_PAD), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
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
        db_acc += tl.sum(dlogits, axis=0)
        ds_acc += tl.sum(g * u, axis=0)

        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            mask = row_ok[:, None] & col_ok[None, :]
            dy = tl.load(DY + row_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + row_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            param_off = experts[:, None] * D + cols[None, :]
            param_ok = expert_ok[:, None] & col_ok[None, :]
            v = tl.load(V + param_off, mask=param_ok, other=0.0).to(tl.float32)
            w = tl.load(W + param_off, mask=param_ok, other=0.0).to(tl.float32)
            x = y - s * tl.dot(g.to(tl.float32), v.to(tl.float32), input_precision=PRECISION)
            dx = dy + tl.dot(dlogits.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
            tl.store(DX + row_off + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

            part_ok = param_ok & (tl.zeros_like(param_off) + block > pid)  # first row block initialises
            dw = tl.load(DW_PART + part_off + param_off, mask=part_ok, other=0.0)
            dw += tl.dot(tl.trans(dlogits).to(tl.float32), x.to(tl.float32), input_precision=PRECISION)
            tl.store(DW_PART + part_off + param_off, dw, mask=param_ok)
            dv = tl.load(DV_PART + part_off + param_off, mask=part_ok, other=0.0)
            dv += s * tl.dot(tl.trans(g).to(tl.float32), dy.to(tl.float32), input_precision=PRECISION)
            tl.store(DV_PART + part_off + param_off, dv, mask=param_ok)

    tl.store(DB_PART + pid * E + experts, db_acc, mask=expert_ok)
    tl.store(DS_PART + pid, tl.sum(ds_acc, axis=0))


def _expert_pad(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def _precision(dtype: torch.dtype) -> str:
    """Exact fp32 products ("ieee") for fp32 x; "tf32" for bf16/fp16 x, whose values tf32 holds exactly."""
    return "ieee" if dtype == torch.float32 else "tf32"


LAUNCH_OPTIONS = ("num_warps", "num_stages")  # launch options; the rest of a config are the kernel's constexprs


def launch_config(kernel: str, dim: int, dtype: torch.dtype, num_experts: int) -> dict:
    """Block sizes and launch options of ``kernel`` ("forward" | "backward") for rows of width ``dim``; the
    backward's also holds ``programs_per_sm``, its persistent grid's size per SM.

    Every combination is compiled for sm_80 and sm_90 by tests/test_kernels_aot.py, which asserts no spills;
    ``python -m benchmarks.tune`` times alternatives on a GPU.
    """
    e_pad = _expert_pad(num_experts)
    if kernel == "forward":
        block_d = 32 if dtype == torch.float32 and e_pad >= 64 else 64  # exact fp32 products hold more registers
    else:  # the backward keeps more (rows, E) tiles live: narrower D tiles as E grows, and for fp32
        block_d = {16: 64, 32: 32}.get(e_pad, 16) // (2 if dtype == torch.float32 else 1)
    # 3 stages pipeline the forward's loads (more bytes in flight per SM); spill-free at E_PAD = 16 only
    stages = 3 if kernel == "forward" and e_pad == 16 else 1
    config = dict(E=num_experts, E_PAD=e_pad, BLOCK_M=32, BLOCK_D=max(16, min(block_d, triton.next_power_of_2(dim))),
                  PRECISION=_precision(dtype), num_warps=8, num_stages=stages)
    if kernel == "backward":
        config["programs_per_sm"] = 1
    return config


def split_config(kernel: str, config: dict) -> Tuple[dict, dict]:
    """(constexprs, Triton launch options) of a launch config. The persistent backward also gets a register cap
    that fits exactly its programs per SM: left alone, ptxas aims at more resident programs than the grid runs
    and spills to get there (16 B per thread at E = 8 with triton 3.2 on sm_80 and 3.8 on sm_90)."""
    meta = {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS and k != "programs_per_sm"}
    options = {k: config[k] for k in LAUNCH_OPTIONS}
    if kernel == "backward":
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
    meta, options = split_config("forward", config or launch_config("forward", d, x.dtype, e))
    with _device_guard(x):
        _steer_fwd_kernel[(triton.cdiv(n, meta["BLOCK_M"]),)](
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
    dw_part = torch.empty((programs, e, d), **f32)
    dv_part = torch.empty((programs, e, d), **f32)
    db_part = torch.empty((programs, e), **f32)
    ds_part = torch.empty((programs,), **f32)
    if n == 0:
        zero = torch.zeros((e, d), **f32)
        return dx, zero, torch.zeros((e,), **f32), zero.clone(), torch.zeros((1,), **f32)
    with _device_guard(y):
        _steer_bwd_kernel[(programs,)](
            grad_y, y, gating, gating if grad_gating is None else grad_gating, weight, vectors, scale, dx,
            dw_part, dv_part, db_part, ds_part, n, d, HAS_GATING_GRAD=grad_gating is not None, **meta, **options)
    return dx, dw_part.sum(0), db_part.sum(0), dv_part.sum(0), ds_part.sum(0, keepdim=True)
