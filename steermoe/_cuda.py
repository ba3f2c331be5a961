"""Thin Python interface over the CUDA C++ fallback in ``csrc/`` (built as ``steermoe._C``).

Importing ``steermoe._C`` registers ``torch.ops.steermoe.cuda_forward`` and ``torch.ops.steermoe.cuda_backward``
(schemas in ``csrc/steer_ops.cpp``); when it is missing or broken, ``UNAVAILABLE_REASON`` says why. The backward's
workspace has the Triton backward's layout and goes through the same reduction (:mod:`steermoe.workspace`).
"""
import importlib
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .workspace import reduce_workspace, workspace_row

try:
    importlib.import_module("steermoe._C")  # registers the ops
    UNAVAILABLE_REASON: Optional[str] = None
except (ImportError, OSError) as err:
    UNAVAILABLE_REASON = (f"the CUDA extension steermoe._C is not available ({err}); build it with "
                          "STEERMOE_BUILD_CUDA=1 pip install --no-build-isolation -e .")


def steer_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], vectors: Tensor, scale: Tensor,
                  save_gating: bool, residual: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return torch.ops.steermoe.cuda_forward(x, weight, bias, vectors, scale, save_gating, residual)


def steer_backward(grad_y: Tensor, y: Tensor, gating: Tensor, weight: Tensor, vectors: Tensor, scale: Tensor,
                   grad_gating: Optional[Tensor] = None,
                   op: Optional[Callable] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx (N, D) in y's dtype; fp32 dW (E, D), db (E,), dV (E, D), ds (1,). ``op``: the kernels' op
    (default ``torch.ops.steermoe.cuda_backward``; the tests pass a CPU build of the same sources)."""
    op = op or torch.ops.steermoe.cuda_backward
    e, d = vectors.shape
    dx, dlogits, workspace = op(grad_y, y, gating, weight, vectors, scale, grad_gating, workspace_row(e, d))
    return (dx, *reduce_workspace(workspace, dlogits, gating, vectors, scale))
