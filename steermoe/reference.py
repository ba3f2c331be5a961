"""Plain-PyTorch steering: the test oracle, the CPU path, and the ``torch`` backend's forward/backward.

Shapes: x (N, D) rows, W and V (E, D), b (E,) or None, s a 1-element fp32 tensor; gating g (N, E) fp32;
residual r (N, D) like x, or None.

    h = r + x  (in x's dtype; h = x without r),   y = h + s · softmax(h Wᵀ + b) V

All other arithmetic is fp32 (float64 when the inputs are float64); y is returned in x's dtype.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def steer_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], vectors: Tensor, scale,
                    residual: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Composed ops, differentiable by autograd; any leading dims. Returns (y in x.dtype, gating).

    The oracle: call it with float64 tensors to get the exact answer the kernels are held to.
    """
    ct = _compute_dtype(x)
    xc = (x if residual is None else residual + x).to(ct)
    logits = xc @ weight.to(ct).t()
    if bias is not None:
        logits = logits + bias.to(ct)
    gating = torch.softmax(logits, dim=-1)
    s = scale.to(ct) if isinstance(scale, Tensor) else scale
    y = xc + s * (gating @ vectors.to(ct))
    return y.to(x.dtype), gating


def steer_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], vectors: Tensor, scale: Tensor,
                  save_gating: bool, residual: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """x [+ residual] (N, D) → y (N, D) in x.dtype, gating (N, E) fp32 (float64 for float64 x; (0, E) when not
    ``save_gating``)."""
    y, gating = steer_reference(x, weight, bias, vectors, scale.reshape(()), residual)
    if not save_gating:
        gating = gating.new_empty((0, weight.shape[0]))
    return y, gating


def steer_backward(grad_y: Tensor, y: Tensor, gating: Tensor, weight: Tensor, vectors: Tensor, scale: Tensor,
                   grad_gating: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients from the saved output: x (h, with a residual) is recomputed as y − s·(g V).

    ``grad_gating`` (N, E) is the upstream gradient of the returned gating (e.g. from a load-balancing loss).

    Returns dx (N, D) in y.dtype, and dW (E, D), db (E,), dV (E, D), ds (1,) in fp32 (float64 for float64 y).
    """
    ct = _compute_dtype(y)
    dy = grad_y.to(ct)
    g = gating.to(ct)
    w = weight.to(ct)
    v = vectors.to(ct)
    s = scale.to(ct).reshape(())
    x = y.to(ct) - s * (g @ v)
    u = dy @ v.t()                                            # (N, E)
    dg = s * u if grad_gating is None else s * u + grad_gating.to(ct)
    dlogits = g * (dg - (g * dg).sum(-1, keepdim=True))
    dx = dy + dlogits @ w
    return dx.to(y.dtype), dlogits.t() @ x, dlogits.sum(0), s * (g.t() @ dy), (g * u).sum().reshape(1)
