"""``steer()``: argument checks, backend choice, and the ``torch.library`` custom op with its autograd.

One contract, three implementations (``torch``: :mod:`steermoe.reference`, ``triton``: :mod:`steermoe.kernels`,
``cuda``: :mod:`steermoe._cuda`); this module is the only place that knows there are three. Each
implementation provides

    forward(x (N, D), W (E, D), b (E,) | None, V (E, D), s (1,) fp32, save_gating, residual=r (N, D) | None)
                                                    -> y (N, D), g (N, E) fp32   [input h = r + x in x's dtype]
    backward(dy, y, g, W, V, s, dg (N, E) | None) -> dx (N, D) x.dtype, dW (E, D), db (E,), dV (E, D), ds (1,)
                                                    [gradients of the parameters in fp32; dg: gating's gradient]

and saves nothing itself: the autograd registration below keeps only y, the gating and the parameters,
and the backward recomputes x (or h) = y − s·(g V); with a residual, dh is the gradient of both r and x.
torch.compile traces the custom ops; eager calls go through an ``autograd.Function`` built from the same pieces,
because torch.library's per-call dispatch costs more than the whole eager composition at small sizes (measured on
CPU, torch backend, 4 × 8 rows: steer() forward 94 → 48 µs, forward + backward 270 → 184 µs; the eager composition
22 / 108 µs).
"""
import importlib
import os
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _cuda  # noqa: F401  (registers torch.ops.steermoe.cuda_* when the extension is built)

BACKENDS = ("torch", "triton", "cuda")
KERNEL_MAX_EXPERTS = 64
_IMPL_MODULES = {"torch": "steermoe.reference", "triton": "steermoe.kernels", "cuda": "steermoe._cuda"}
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _import_reason(name: str) -> Optional[str]:
    """None when the backend's module imports and reports itself usable, else why not."""
    try:
        module = importlib.import_module(_IMPL_MODULES[name])
    except ImportError as err:
        return f"{_IMPL_MODULES[name]} cannot be imported ({err})"
    return getattr(module, "UNAVAILABLE_REASON", None)


_IMPORT_REASONS: Dict[str, Optional[str]] = {}


def _module_reason(name: str) -> Optional[str]:
    if name not in _IMPORT_REASONS:
        _IMPORT_REASONS[name] = _import_reason(name)
    return _IMPORT_REASONS[name]


def _triton_interpreted() -> bool:
    return _module_reason("triton") is None and importlib.import_module("steermoe.kernels").INTERPRET


def _unavailable(name: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                 num_experts: Optional[int] = None) -> Optional[str]:
    """Why backend ``name`` cannot run for tensors on ``device`` (None when it can)."""
    if name == "torch":
        return None
    reason = _module_reason(name)
    if reason is not None:
        return reason
    if device.type != "cuda" and not (name == "triton" and _triton_interpreted()):
        hint = " (or set TRITON_INTERPRET=1 before importing steermoe to run the kernels on CPU)" \
            if name == "triton" else ""
        return f"the {name} backend needs CUDA tensors, got a tensor on {device}{hint}"
    if dtype is not None and dtype not in _X_DTYPES:
        return f"the {name} backend takes x in float32, bfloat16 or float16, got {dtype}"
    if num_experts is not None and num_experts > KERNEL_MAX_EXPERTS:
        return f"the {name} backend supports 1..{KERNEL_MAX_EXPERTS} experts, got E={num_experts}"
    return None


def available_backends(device: Union[str, torch.device, None] = None, *,
                       explain: bool = False) -> Union[List[str], Dict[str, str]]:
    """Backends that can run on ``device`` (default: ``cuda`` when a GPU is visible, else ``cpu``).

    With ``explain=True`` returns ``{name: "available" | reason it is not}`` for every backend.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    reasons = {name: _unavailable(name, device) for name in BACKENDS}
    if explain:
        return {name: why or "available" for name, why in reasons.items()}
    return [name for name, why in reasons.items() if why is None]


def _resolve_backend(backend: Optional[str], x: Tensor, num_experts: int) -> str:
    requested = backend if backend is not None else os.environ.get("STEERMOE_BACKEND", "auto")
    requested = requested.strip().lower()
    if requested not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of 'auto', 'torch', 'triton', 'cuda'; got {requested!r}")
    if requested == "auto":
        if x.device.type == "cuda":
            for name in ("triton", "cuda"):
                if _unavailable(name, x.device, x.dtype, num_experts) is None:
                    return name
        return "torch"
    why = _unavailable(requested, x.device, x.dtype, num_experts)
    if why is not None:
        raise RuntimeError(f"steermoe backend {requested!r} cannot run here: {why}")
    return requested


def _impl(name: str):
    return importlib.import_module(_IMPL_MODULES[name])


# ----------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("steermoe::steer_forward", mutates_args=())
def _steer_forward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], vectors: Tensor, scale: Tensor,
                      backend: str, save_gating: bool, residual: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return _impl(backend).steer_forward(x, weight, bias, vectors, scale, save_gating, residual=residual)


@_steer_forward_op.register_fake
def _(x, weight, bias, vectors, scale, backend, save_gating, residual=None):
    rows = x.shape[0] if save_gating else 0
    gating_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty_like(x), x.new_empty((rows, weight.shape[0]), dtype=gating_dtype)


@torch.library.custom_op("steermoe::steer_backward", mutates_args=())
def _steer_backward_op(grad_y: Tensor, y: Tensor, gating: Tensor, weight: Tensor, vectors: Tensor,
                       scale: Tensor, grad_gating: Optional[Tensor],
                       backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _impl(backend).steer_backward(grad_y, y, gating, weight, vectors, scale, grad_gating)


@_steer_backward_op.register_fake
def _(grad_y, y, gating, weight, vectors, scale, grad_gating, backend):
    e, d = weight.shape
    return (torch.empty_like(y), gating.new_empty((e, d)), gating.new_empty((e,)), gating.new_empty((e, d)),
            gating.new_empty((1,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, vectors, scale, backend, save_gating, residual = inputs
    y, gating = output
    ctx.backend = backend
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype, vectors.dtype)
    ctx.set_materialize_grads(False)  # an unused gating output passes None, not a zero (N, E) tensor
    ctx.save_for_backward(y, gating, weight, vectors, scale)


def _backward(ctx, grad_y, grad_gating, backward_op=_steer_backward_op):
    if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients have no derivative of their own
        raise RuntimeError("steermoe: steer() is differentiable once; backward with create_graph=True (double "
                           "backward) is not supported. For higher derivatives use steermoe.reference.steer_reference")
    y, gating, weight, vectors, scale = ctx.saved_tensors
    if gating.shape[0] != y.shape[0]:
        raise RuntimeError("steermoe: the forward ran without saving the gating, so it cannot be differentiated")
    if grad_y is None:
        grad_y = torch.zeros_like(y)
    if grad_gating is not None:
        grad_gating = grad_gating.contiguous().to(gating.dtype)
    dx, dw, db, dv, ds = backward_op(grad_y.contiguous(), y, gating, weight, vectors, scale, grad_gating, ctx.backend)
    w_dtype, b_dtype, v_dtype = ctx.param_dtypes
    return (dx, dw.to(w_dtype), db.to(b_dtype) if ctx.has_bias else None, dv.to(v_dtype), ds,
            None, None, dx if ctx.has_residual else None)  # h = residual + x: one gradient for both, no copy


_steer_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _eager_backward_op(grad_y, y, gating, weight, vectors, scale, grad_gating, backend):
    return _impl(backend).steer_backward(grad_y, y, gating, weight, vectors, scale, grad_gating)


class _SteerFunction(torch.autograd.Function):
    """The custom ops' eager twin: the same implementations, saved tensors and backward, without torch.library's
    dispatch (which costs more per call than the eager composition at small sizes). torch.compile traces the
    custom ops instead; steer() picks this only outside compilation."""

    @staticmethod
    def forward(ctx, *inputs):  # the op's (x, weight, bias, vectors, scale, backend, save_gating, residual)
        x, weight, bias, vectors, scale, backend, save_gating, residual = inputs
        output = _impl(backend).steer_forward(x, weight, bias, vectors, scale, save_gating, residual=residual)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_gating):
        return _backward(ctx, grad_y, grad_gating, backward_op=_eager_backward_op)


# ----------------------------------------------------------------------------------------- public API
def _shape_error(arg: str, expected: str, got) -> ValueError:
    return ValueError(f"{arg} must have shape {expected}; got {tuple(got)}")


def _check_param(arg: str, t, x: Tensor, shape: Tuple[int, ...], expected: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor of shape {expected}; got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise _shape_error(arg, expected, t.shape)
    if t.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{arg} must be float32 or x's dtype ({x.dtype}); got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{arg} is on {t.device} but x is on {x.device}; all arguments must share a device")


def _scale_tensor(scale, x: Tensor) -> Tensor:
    """The scale as a (1,) float32 tensor on x's device (differentiable when it is a tensor)."""
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a scalar (0-dim or 1-element tensor); got shape {tuple(scale.shape)}")
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a floating-point tensor; got {scale.dtype}")
        if scale.device != x.device:
            raise ValueError(f"scale is on {scale.device} but x is on {x.device}; all arguments must share a device")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return scale.reshape(1).to(dtype)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or a 1-element tensor; got {type(scale).__name__}")
    return torch.full((1,), float(scale), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                      device=x.device)


def _check_residual(residual, x: Tensor) -> None:
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a torch.Tensor of x's shape {tuple(x.shape)} or None; "
                        f"got {type(residual).__name__}")
    if residual.shape != x.shape:
        raise _shape_error("residual", f"{tuple(x.shape)} (x's shape)", residual.shape)
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have x's dtype ({x.dtype}); got {residual.dtype}")
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but x is on {x.device}; all arguments must share a "
                         "device")


def _rows(t: Tensor, dim: int) -> Tensor:
    rows = t.reshape(-1, dim)
    return rows if rows.is_contiguous() else rows.contiguous()


def steer(x: Tensor, router_weight: Tensor, router_bias: Optional[Tensor], vectors: Tensor, scale, *,
          residual: Optional[Tensor] = None, return_gating: bool = False, backend: Optional[str] = None):
    """Fused SteerMoE step ``y = h + scale · softmax(h Wᵀ + b) V`` with ``h = x``, or ``h = residual + x``.

    Args:
        x: (..., D) activations, float32 / bfloat16 / float16 (float64 on the ``torch`` backend only).
        residual: None, or a tensor of x's shape, dtype and device: the op then steers ``h = residual + x``
            (rounded to x's dtype exactly as that add alone), fusing a block's residual add (x its branch) into
            the step, so that h is never stored; residual and x both get h's gradient.
        router_weight: W, (E, D), float32 or x's dtype.
        router_bias: b, (E,) or None.
        vectors: V, (E, D) steering vectors.
        scale: s, a float or a 0-dim / 1-element tensor (differentiable).
        return_gating: also return the gating softmax(h Wᵀ + b), (..., E) float32.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"``; default: env ``STEERMOE_BACKEND``, else auto
            (on CUDA tensors triton, then cuda, then torch; on CPU torch).

    Returns:
        y with x's shape and dtype, or ``(y, gating)``. Softmax and all accumulation run in float32.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (..., D); got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype not in _X_DTYPES + (torch.float64,):
        raise TypeError(f"x must be float32, bfloat16 or float16; got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have shape (..., D) with at least one dimension; got a 0-dim tensor")
    if not isinstance(router_weight, Tensor) or router_weight.dim() != 2:
        got = router_weight.shape if isinstance(router_weight, Tensor) else type(router_weight).__name__
        raise ValueError(f"router_weight must have shape (E, D) with D = x.shape[-1] = {x.shape[-1]}; got {got}")
    num_experts, dim = router_weight.shape
    if num_experts < 1:
        raise _shape_error("router_weight", f"(E, {x.shape[-1]}) with E >= 1", router_weight.shape)
    _check_param("router_weight", router_weight, x, (num_experts, x.shape[-1]), f"(E, {x.shape[-1]})")
    _check_param("vectors", vectors, x, (num_experts, dim), f"(E, D) = ({num_experts}, {dim})")
    if router_bias is not None:
        _check_param("router_bias", router_bias, x, (num_experts,), f"(E,) = ({num_experts},)")
    if residual is not None:
        _check_residual(residual, x)
    s = _scale_tensor(scale, x)
    name = _resolve_backend(backend, x, num_experts)

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, router_weight, router_bias, vectors, s))
    forward = _steer_forward_op if torch.compiler.is_compiling() else _SteerFunction.apply
    y, gating = forward(_rows(x, dim), router_weight.contiguous(),
                        None if router_bias is None else router_bias.contiguous(), vectors.contiguous(), s, name,
                        bool(return_gating or needs_grad), None if residual is None else _rows(residual, dim))
    y = y.reshape(x.shape)
    if return_gating:
        return y, gating.reshape(*x.shape[:-1], num_experts)
    return y
