"""Traffic model of the Triton and CUDA kernels: the bytes each moves between the SMs and L2, the bytes L2 moves to and from
HBM, and the time floor those set (predictions from the kernels' structure, not measurements).

A design is a table of terms per kernel. A term is one access of the kernel's loop nest: ``unit`` bytes moved
``count`` times between the SMs and L2 (each load and store goes through L2; no reuse in L1 is assumed). Its HBM
bytes follow from its kind:

    stream    first touch of data that is read or written once: HBM = L2↔SM bytes
    reread    data the same program touched shortly before (its rows of a previous sweep, its own partial sums):
              served by L2 while the working set fits, otherwise from HBM again
    shared    data every program reads (W, V, b, s): from HBM once (``unit`` bytes)
    private   a program's own output tile, rewritten in place: reaches HBM once per program

The working set is the resident programs × the bytes each will re-read (the ``footprint`` of its ``reread``
terms) plus the shared data. Predicted time = max(HBM bytes / copy bandwidth, L2↔SM bytes / L2 bandwidth): a
floor for a kernel that keeps enough bytes in flight, which latency-bound loops do not reach.
``python -m benchmarks.roofline`` prints it at the headline shape; another design is a second entry of DESIGNS.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

KINDS = ("stream", "reread", "shared", "private")


@dataclass(frozen=True)
class Shape:
    """N rows of width D, E experts; ``elem`` bytes per element of x, ``param_elem`` of W, b, V;
    ``gating_grad``: a loss uses the gating (the backward reads its gradient)."""
    rows: int
    dim: int
    experts: int
    elem: int
    param_elem: int = 4
    gating_grad: bool = False


@dataclass(frozen=True)
class Launch:
    """The kernel's launch: ``block_m`` rows per row block, ``programs`` in its grid, ``resident`` at a time."""
    block_m: int
    programs: int
    resident: int

    def row_blocks(self, s: Shape) -> int:
        return -(-s.rows // self.block_m)


@dataclass(frozen=True)
class GPU:
    arch: int
    sms: int
    l2_bytes: int
    copy_tbps: Optional[float]   # device-to-device copy, read + write (measured; None: not measured)
    l2_tbps: float               # L2 ↔ SM bandwidth (assumed)


MIB = 2**20
# copy bandwidth: measured device-to-device copies on an H100 80GB HBM3 and an H200 (≈ 3.0 / 4.3 TB/s); L2 sizes
# as PyTorch reports them. L2 ↔ SM bandwidth assumed, not measured here: 5.5 TB/s for GH100 (H100 and H200 share
# the die and its L2), about what public microbenchmarks of an H100 PCIe report (Chips and Cheese, "Nvidia's H100:
# Funny L2, and Tons of Bandwidth", 2023); A100 7.2 TB/s, its whitepaper's 5120 B/clk at 1.41 GHz.
GPUS = {"A100": GPU(80, 108, 40 * MIB, None, 7.2), "H100": GPU(90, 132, 50 * MIB, 3.0, 5.5),
        "H200": GPU(90, 132, 60 * MIB, 4.3, 5.5)}
# resident forward programs per SM at D = 1280, E = 8, bf16 x, fp32 parameters, from the specialised AOT compile
# (python -m steermoe.kernels.aot --markdown, triton 3.9.0): registers and shared memory allow this many
FORWARD_PER_SM = {80: 4, 90: 5}


Size = Callable[[Shape, Launch], int]


@dataclass(frozen=True)
class Term:
    what: str
    kind: str
    unit: Size
    count: Size
    footprint: Size = lambda s, c: 0   # bytes a resident program keeps for re-reading (reread terms)


def _rows(s, c):      # one (N, D) tensor of x's dtype
    return s.rows * s.dim * s.elem


def _gating(s, c):    # one (N, E) fp32 tensor
    return s.rows * s.experts * 4


def _param(s, c):     # one (E, D) parameter
    return s.experts * s.dim * s.param_elem


def _partials(s, c):  # a program's fp32 dW and dV partials
    return 2 * s.experts * s.dim * 4


def _block_rows(s, c):
    return c.block_m * s.dim * s.elem


_ONCE = lambda s, c: 1
_PER_BLOCK = lambda s, c: c.row_blocks(s)
_PER_PROGRAM = lambda s, c: c.programs

# steermoe/kernels/steer.py before its pipelined redesign (2026-12-01): forward one program per row block (two sweeps
# over D), backward a persistent grid (two sweeps per row block, private fp32 partials read-modify-written each step,
# summed by torch afterwards)
CURRENT = {
    "forward": [
        Term("x, sweep 1", "stream", _rows, _ONCE),
        Term("W, sweep 1 (each row block)", "shared", _param, _PER_BLOCK),
        Term("b and s (each row block)", "shared", lambda s, c: s.experts * s.param_elem + 4, _PER_BLOCK),
        Term("gating store", "stream", _gating, _ONCE),
        Term("x, sweep 2 (the block's own rows)", "reread", _rows, _ONCE, footprint=_block_rows),
        Term("V, sweep 2 (each row block)", "shared", _param, _PER_BLOCK),
        Term("y store", "stream", _rows, _ONCE),
    ],
    "backward": [
        Term("s (each program)", "shared", lambda s, c: 4, _PER_PROGRAM),
        Term("gating", "stream", _gating, _ONCE),
        Term("gating gradient (when a loss uses the gating)", "stream", _gating, lambda s, c: int(s.gating_grad)),
        Term("dy, sweep 1", "stream", _rows, _ONCE),
        Term("V, sweep 1 (each row block)", "shared", _param, _PER_BLOCK),
        Term("dy, sweep 2 (the block's own rows)", "reread", _rows, _ONCE, footprint=_block_rows),
        Term("y, sweep 2", "stream", _rows, _ONCE),
        Term("V and W, sweep 2 (each row block)", "shared", lambda s, c: 2 * _param(s, c), _PER_BLOCK),
        Term("dx store", "stream", _rows, _ONCE),
        Term("dW, dV partials load (each row block but a program's first)", "reread", _partials,
             lambda s, c: c.row_blocks(s) - c.programs, footprint=_partials),
        Term("dW, dV partials store (each row block)", "private", _partials, _PER_BLOCK),
        Term("db, ds partials store", "private", lambda s, c: (s.experts + 1) * 4, _PER_PROGRAM),
        Term("final sums: read the P partials", "stream", lambda s, c: _partials(s, c) + (s.experts + 1) * 4,
             _PER_PROGRAM),
        Term("final sums: write dW, dV, db, ds", "stream", lambda s, c: _partials(s, c) + (s.experts + 1) * 4,
             _ONCE),
    ],
}


CURRENT_BLOCK_M = 32   # rows per block of both kernels before the redesign


def current_launches(s: Shape, gpu: GPU) -> Dict[str, Launch]:
    """The grids before the redesign: the forward one program per row block, FORWARD_PER_SM of them resident,
    the backward one program per SM, all resident; 32-row blocks."""
    blocks = -(-s.rows // CURRENT_BLOCK_M)
    programs = min(blocks, gpu.sms)
    return dict(forward=Launch(CURRENT_BLOCK_M, blocks, min(blocks, FORWARD_PER_SM[gpu.arch] * gpu.sms)),
                backward=Launch(CURRENT_BLOCK_M, programs, programs))


_WS_ROW = lambda s, c: _partials(s, c) + 16 * 4   # a program's workspace row: partials, ds, padding

# steermoe/kernels/steer.py's pipelined design: both kernels persistent and resident; every D loop's loads cp.async; the
# forward loads b and s once per program; the backward drops V from sweep 2 (no recomputed x: dW from y and an
# E×E correction), stores dlogits (N, E), and its partials, ds and the correction are reduced by torch afterwards
PIPELINED = {
    "forward": [t if not t.what.startswith("b and s") else
                Term("b and s (each program)", "shared", lambda s, c: s.experts * s.param_elem + 4, _PER_PROGRAM)
                for t in CURRENT["forward"]],
    "backward": [
        *CURRENT["backward"][:5],
        Term("dlogits store", "stream", _gating, _ONCE),
        *CURRENT["backward"][5:7],
        Term("W, sweep 2 (each row block)", "shared", _param, _PER_BLOCK),
        *CURRENT["backward"][8:11],
        Term("ds store", "private", lambda s, c: 4, _PER_PROGRAM),
        Term("final sums: read the P workspace rows", "stream", _WS_ROW, _PER_PROGRAM),
        Term("final: dlogits and gating for db and the correction dlogitsᵀ·g", "stream",
             lambda s, c: 2 * _gating(s, c), _ONCE),
        Term("final: V for the correction, write dW, dV, db, ds", "stream",
             lambda s, c: _param(s, c) + _partials(s, c) + (s.experts + 1) * 4, _ONCE),
    ],
}


def pipelined_launches(s: Shape, gpu: GPU) -> Dict[str, Launch]:
    """launch_config's grids: ``programs_per_sm`` per SM for both kernels, all resident."""
    from steermoe.kernels.steer import launch_config
    dtype = torch.float32 if s.elem == 4 else torch.bfloat16
    out = {}
    for kernel in ("forward", "backward"):
        config = launch_config(kernel, s.dim, dtype, s.experts)
        programs = min(-(-s.rows // config["BLOCK_M"]), config["programs_per_sm"] * gpu.sms)
        out[kernel] = Launch(config["BLOCK_M"], programs, programs)
    return out



def _cuda_fwd_rows(s: Shape) -> int:     # rows per warp of csrc/steer_kernels.cu's forward (FwdShape::R)
    return max(1, (4 if s.experts <= 8 else 2 if s.experts <= 16 else 1) // (2 if s.elem == 4 else 1))


def _cuda_stash(s: Shape) -> bool:      # the forward keeps its block's rows in shared memory (≤ 48 KB)
    return 4 * _cuda_fwd_rows(s) * s.dim * s.elem <= 48 * 1024


def _cuda_bwd_steps(s: Shape, c: Launch) -> int:   # phase-2 steps of RG = 2 rows, over all tiles
    return c.row_blocks(s) * -(-c.block_m // 2)


# csrc/steer_kernels.cu: the forward a block of 4 warps per 4·R rows (not persistent), its rows kept in shared
# memory when they fit (else re-read); the backward persistent blocks over row tiles, phase 2 a thread per column
# group re-reading W every RG = 2 rows, dW from y (no recomputed x), its workspace reduced by steermoe/workspace.py.
# L1 is assumed to serve a block's warps reading the same W/V lines together (the rest of the model assumes no L1).
CUDA = {
    "forward": [
        Term("x, pass 1", "stream", _rows, _ONCE),
        Term("W, pass 1 (each block; its warps share the lines in L1)", "shared", _param, _PER_BLOCK),
        Term("b and s (each block)", "shared", lambda s, c: s.experts * 4 + 4, _PER_BLOCK),
        Term("gating store", "stream", _gating, _ONCE),
        Term("x, pass 2 (from L2 when shared memory cannot keep it)", "reread", _rows,
             lambda s, c: int(not _cuda_stash(s)), footprint=lambda s, c: 0 if _cuda_stash(s) else _block_rows(s, c)),
        Term("V, pass 2 (each block)", "shared", _param, _PER_BLOCK),
        Term("y store", "stream", _rows, _ONCE),
    ],
    "backward": [
        *CURRENT["backward"][:4],
        Term("V, phase 1 (each row tile; its warps share the lines in L1)", "shared", _param, _PER_BLOCK),
        Term("dlogits store", "stream", _gating, _ONCE),
        Term("dy, phase 2 (the tile's own rows)", "reread", _rows, _ONCE, footprint=_block_rows),
        Term("dy, the dV sweep (E > 16)", "reread", _rows, lambda s, c: int(s.experts > 16),
             footprint=_block_rows),
        Term("y, phase 2 (prefetched into L2 by phase 1)", "stream", _rows, _ONCE),
        Term("W, phase 2 (every 2 rows, no L1 reuse assumed: an upper bound)", "shared", _param, _cuda_bwd_steps),
        *PIPELINED["backward"][9:],
    ],
}


def cuda_launches(s: Shape, gpu: GPU) -> Dict[str, Launch]:
    """launch_steer_forward / launch_steer_backward's grids (csrc/steer_kernels.cu, mirrored here): forward blocks
    of 4·R rows, resident as __launch_bounds__ asks (4 per SM at E ≤ 16, else 2, the registers' limit at E = 64);
    the backward's tiles of 32..64 rows over at most MIN_BLOCKS · SMs blocks, all resident."""
    per_block = 4 * _cuda_fwd_rows(s)
    blocks = -(-s.rows // per_block)
    forward = Launch(per_block, blocks, min(blocks, (4 if s.experts <= 16 else 2) * gpu.sms))
    c2 = 4 if s.experts <= 8 else 2 if s.experts <= 16 else 1
    items = max(1, -(-s.dim // c2))
    sweeps = -(-items // 256)
    warps = min(8, -(-(-(-items // sweeps)) // 32))
    max_blocks = gpu.sms * max(2 if s.experts <= 16 else 1, 8 // warps)
    rounds = -(-s.rows // (max_blocks * 64))
    tile = min(64, max(32, -(-(-(-s.rows // (rounds * max_blocks))) // 4) * 4))
    programs = min(-(-s.rows // tile), max_blocks)
    return dict(forward=forward, backward=Launch(tile, programs, programs))


DESIGNS = {"current": (CURRENT, current_launches), "pipelined": (PIPELINED, pipelined_launches),
           "cuda": (CUDA, cuda_launches)}


@dataclass
class Traffic:
    l2_bytes: int          # between L2 and the SMs
    hbm_bytes: int         # between HBM and L2, when the working set fits L2
    hbm_overflow: int      # ... when it does not (re-reads from HBM)
    working_set: int       # resident programs × bytes each re-reads + shared data
    terms: List[Tuple[str, str, int]]   # (what, kind, L2↔SM bytes)

    def hbm(self, l2_capacity: int) -> int:
        return self.hbm_bytes if self.working_set <= l2_capacity else self.hbm_overflow


def traffic(terms: List[Term], s: Shape, c: Launch) -> Traffic:
    """Sum a kernel's terms at shape ``s`` and launch ``c``."""
    l2 = hbm = overflow = working = 0
    rows = []
    for t in terms:
        if t.kind not in KINDS:
            raise ValueError(f"term {t.what!r}: kind must be one of {KINDS}, got {t.kind!r}")
        unit, count = t.unit(s, c), t.count(s, c)
        moved = unit * count
        once = {"stream": moved, "reread": 0, "shared": unit, "private": unit * c.programs}[t.kind]
        l2, hbm, overflow = l2 + moved, hbm + once, overflow + (moved if t.kind == "reread" else once)
        working += c.resident * t.footprint(s, c) + (unit if t.kind == "shared" else 0)
        rows.append((t.what, t.kind, moved))
    return Traffic(l2, hbm, overflow, working, rows)


def predicted_us(t: Traffic, gpu: GPU) -> float:
    """max(HBM bytes / copy bandwidth, L2↔SM bytes / L2 bandwidth) in µs."""
    return max(t.hbm(gpu.l2_bytes) / gpu.copy_tbps, t.l2_bytes / gpu.l2_tbps) / 1e6


def design_traffic(design: str, s: Shape, gpu: GPU) -> Dict[str, Tuple[Launch, Traffic]]:
    """{kernel: (launch, traffic)} of one entry of DESIGNS on ``gpu``."""
    terms, launches = DESIGNS[design]
    return {kernel: (c, traffic(terms[kernel], s, c)) for kernel, c in launches(s, gpu).items()}


def lines(s: Shape, gpus=("A100", "H100", "H200")) -> List[str]:
    """Per design, kernel and GPU: grid, resident programs, L2↔SM and HBM bytes, the minimum (roofline), the
    working set against L2, the predicted time, what bounds it, the roofline floor and its share of the predicted
    time (predicted %copy); then each kernel's terms on the first GPU with a copy bandwidth."""
    from .roofline import min_bytes
    out = [f"Traffic model (predicted from the kernels' structure, not measured): N={s.rows} D={s.dim} E={s.experts}"
           f" elem={s.elem} B, parameters {s.param_elem} B",
           "copy bandwidth measured: " + ", ".join(f"{g} {GPUS[g].copy_tbps}" for g in gpus if GPUS[g].copy_tbps)
           + " TB/s; L2↔SM bandwidth assumed: " + ", ".join(f"{g} {GPUS[g].l2_tbps}" for g in gpus) + " TB/s",
           f"{'design':8} {'kernel':9} {'GPU':5} {'grid':>5} {'resident':>8} {'L2↔SM MB':>9} {'HBM MB':>7} "
           f"{'min MB':>7} {'working set / L2 MB':>19} {'predicted µs':>12} {'bound':>5} {'floor µs':>8} "
           f"{'%copy':>5}"]
    for design in DESIGNS:
        for name in gpus:
            gpu = GPUS[name]
            for kernel, (c, t) in design_traffic(design, s, gpu).items():
                need = min_bytes({"forward": "fwd", "backward": "bwd"}[kernel], s.rows, s.dim, s.experts, s.elem)
                hbm = t.hbm(gpu.l2_bytes)
                if gpu.copy_tbps is None:
                    timing = f"{'–':>12} {'–':>5} {'–':>8} {'–':>5}"
                else:
                    us = predicted_us(t, gpu)
                    bound = "HBM" if hbm / gpu.copy_tbps >= t.l2_bytes / gpu.l2_tbps else "L2"
                    floor = need / gpu.copy_tbps / 1e6
                    timing = f"{us:12.1f} {bound:>5} {floor:8.1f} {100 * floor / us:5.0f}"
                out.append(f"{design:8} {kernel:9} {name:5} {c.programs:5} {c.resident:8} {t.l2_bytes / 1e6:9.1f} "
                           f"{hbm / 1e6:7.1f} {need / 1e6:7.1f} {t.working_set / 1e6:9.1f} / {gpu.l2_bytes / 1e6:7.1f} "
                           f"{timing}")
    name = next(g for g in gpus if GPUS[g].copy_tbps is not None)
    for design in DESIGNS:
        for kernel, (c, t) in design_traffic(design, s, GPUS[name]).items():
            out += ["", f"{design} {kernel} on {name}: {'term':60} {'kind':8} {'L2↔SM MB':>9}"]
            out += [f"  {what:60} {kind:8} {moved / 1e6:9.2f}" for what, kind, moved in t.terms]
    return out
