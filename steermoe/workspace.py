"""The backward's weight-gradient workspace, shared by the Triton and CUDA kernels: its layout and its one reduction.

Each of the backward's P programs (Triton) or blocks (CUDA) owns one fp32 row of a (P, 2·E·D + 16) workspace:

    [ Σ dlogitsᵀ·y  (E, D) | Σ gᵀ·dy  (E, D) | Σ g·u  (1) | padding (15) ]

summed over the program's rows (u = dy·Vᵀ, dlogits = g ⊙ (s·u − Σ_e g·s·u) without a gating loss), and the
kernels store dlogits (N, E) fp32. :func:`reduce_workspace` turns these into the weight gradients.
"""
from typing import Tuple

import torch
from torch import Tensor


def workspace_row(num_experts: int, dim: int) -> int:
    """Floats per workspace row: 2·E·D partial sums and ds, padded to a multiple of 16 so that each row starts
    64-byte aligned (with D % 8 == 0) and its tiles load in 16-byte vectors."""
    return 2 * num_experts * dim + 16


def reduce_workspace(workspace: Tensor, dlogits: Tensor, gating: Tensor, vectors: Tensor,
                     scale: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """workspace (P, workspace_row(E, D)) fp32, summed over its P rows in one fixed-order reduction, and dlogits,
    gating (N, E) fp32 → fp32 dW = Σ dlogitsᵀ·y − s·(dlogitsᵀ·g)·V (as x = y − s·g·V: no recomputed x),
    db = Σ dlogits, dV = s·Σ gᵀ·dy (E, D), ds = Σ g·u (1,). No float atomics: bitwise deterministic for a given
    device and P."""
    e, d = vectors.shape
    total = workspace.sum(0)
    scale = scale.reshape(1).float()
    correction = (dlogits.t() @ gating) * scale  # (E, E)
    dw = torch.addmm(total[:e * d].view(e, d), correction, vectors.float(), alpha=-1)
    return dw, dlogits.sum(0), total[e * d:2 * e * d].view(e, d) * scale, total[2 * e * d:2 * e * d + 1]
