"""Random inputs for ``steer()`` and the float64 oracle its results are held to, with the tolerances.

Used by the tests (tests/test_ops.py, tests/test_cuda.py) and by the headline correctness check
(``python -m benchmarks.headline_check``): one definition of what "matches the reference" means.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .ops import steer
from .reference import steer_reference

GRAD_NAMES = ("dx", "dW", "db", "dV", "ds")  # gradients of (x, W, b, V, scale)
# Error bound relative to the size of the terms each result sums (see _error_scales). Low-precision results are
# held to a few ulps of x's dtype: y and dx are stored in it (the interpreter truncates instead of rounding: one
# ulp), and the backward recomputes x from the rounded y, which puts the same relative error into dW.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4 * 2 ** -7, torch.float16: 4 * 2 ** -10}


@dataclass(frozen=True)
class Case:
    """One input configuration: x's shape (..., D), layout and dtype; the parameters' dtypes; bias; scale."""
    shape: Tuple[int, ...] = (37, 100)
    experts: int = 8
    dtype: torch.dtype = torch.float32
    params: str = "fp32"        # "fp32"; "x": x's dtype; "mixed": W fp32, b and V in x's dtype
    bias: bool = True
    scale: str = "0d"           # "float", "0d" (0-dim tensor) or "1el" ((1,) tensor); tensors require grad
    layout: str = "contiguous"  # "transposed": D is the strided dim; "swapped": leading dims swapped; "sliced"

    def __str__(self):
        dims = "x".join(map(str, self.shape))
        return (f"E{self.experts}-{dims}-{str(self.dtype)[6:]}-p{self.params}-{'b' if self.bias else 'nob'}"
                f"-s{self.scale}-{self.layout}")


def _make_x(case: Case, device: str) -> Tensor:
    """x of ``case.shape`` requiring grad; a view of a larger leaf unless the layout is contiguous."""
    shape, opts = case.shape, dict(dtype=case.dtype, device=device)
    if case.layout == "contiguous":
        return torch.randn(shape, **opts).requires_grad_()
    if case.layout == "transposed":
        return torch.randn(shape[-1], *shape[:-1], **opts).requires_grad_().movedim(0, -1)
    if case.layout == "swapped":
        return torch.randn(shape[1], shape[0], *shape[2:], **opts).requires_grad_().transpose(0, 1)
    if case.layout == "sliced":
        base = torch.randn(2 * shape[0], *shape[1:-1], shape[-1] + 5, **opts).requires_grad_()
        return base[::2, ..., 2:2 + shape[-1]]
    raise ValueError(f"unknown layout {case.layout!r}")


def make_inputs(case: Case, device: str) -> list:
    """[x, W, b | None, V, scale]: random, never zero; logits of order one so the gating is far from uniform."""
    e, d = case.experts, case.shape[-1]
    low = case.dtype
    w_dtype, bv_dtype = {"fp32": (torch.float32,) * 2, "x": (low, low), "mixed": (torch.float32, low)}[case.params]

    def param(*shape, dtype, std=1.0):
        return (torch.randn(shape, device=device) * std).to(dtype).requires_grad_()

    scale = 0.25 + torch.rand(()).item()
    if case.scale != "float":
        scale = torch.full(() if case.scale == "0d" else (1,), scale, dtype=w_dtype, device=device,
                           requires_grad=True)
    return [_make_x(case, device), param(e, d, dtype=w_dtype, std=2 / max(d, 1) ** 0.5),
            param(e, dtype=bv_dtype) if case.bias else None, param(e, d, dtype=bv_dtype), scale]


def requires_grad(a) -> bool:
    return isinstance(a, Tensor) and a.requires_grad


def differentiable(args) -> list:
    return [a for a in args if requires_grad(a)]


def _error_scales(args, gating: Tensor, dy: Tensor, dgating: Optional[Tensor]) -> Dict[str, Tensor]:
    """How large each result's rounding error may be, up to the dtype's epsilon (float64, from the oracle).

    Sums over rows use the root of the summed squares (rounding errors of independent terms add like a random
    walk) and the softmax gradient the absolute values of its terms, so cancelling results such as
    ds = Σ g·(dy Vᵀ) are not held to more digits than their terms carry.
    """
    x, w, _, v, s = (a.detach().double() if isinstance(a, Tensor) else a for a in args)
    e, d = w.shape
    x, g, dy = x.reshape(-1, d), gating.detach().reshape(-1, e), dy.double().reshape(-1, d)
    s = s.abs() if isinstance(s, Tensor) else abs(s)
    u = dy @ v.t()
    dg = (s * u + (0.0 if dgating is None else dgating.double().reshape(-1, e))).abs()
    dlogits = g * (dg + (g * dg).sum(-1, keepdim=True))
    y = x.abs() + s * (g @ v.abs())
    return {"y": y, "gating": g, "dx": dy.abs() + dlogits @ w.abs(), "dW": (dlogits.t() ** 2 @ y ** 2).sqrt(),
            "db": (dlogits ** 2).sum(0).sqrt(), "dV": s * (g.t() ** 2 @ dy ** 2).sqrt(), "ds": (g * u).norm()}


def reference_results(args, dy: Tensor, dgating: Optional[Tensor] = None) -> Dict[str, Tuple[Tensor, float]]:
    """Float64 oracle: {name: (expected, error scale)} for y, gating and the gradient of every differentiable
    argument (dx, dW, db, dV, ds), given the upstream gradients dy (and dgating, for a loss on the gating)."""
    ref_args = [a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a for a in args]
    y, gating = steer_reference(*ref_args)
    outputs, upstream = [y], [dy.double()]
    if dgating is not None:
        outputs.append(gating)
        upstream.append(dgating.double())
    grads = torch.autograd.grad(outputs, differentiable(ref_args), upstream)
    names = ["y", "gating"] + [n for n, a in zip(GRAD_NAMES, args) if requires_grad(a)]
    scales = _error_scales(args, gating, dy, dgating)
    return {n: (t.detach(), scales[n].max().item() if scales[n].numel() else 0.0)
            for n, t in zip(names, (y, gating, *grads))}


def max_error(actual: Tensor, expected: Tensor, scale: float, dtype: torch.dtype, what: str) -> Tuple[float, float]:
    """(max |actual − expected|, its bound TOLERANCE[dtype] · max(scale, max |expected|)); shapes must be equal."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return 0.0, 0.0
    err = (actual.double() - expected).abs().max().item()
    return err, TOLERANCE[dtype] * max(scale, expected.abs().max().item())


def assert_close(actual: Tensor, expected: Tensor, scale: float, dtype: torch.dtype, what: str) -> None:
    """:func:`max_error` within its bound."""
    err, bound = max_error(actual, expected, scale, dtype, what)
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def errors_against_reference(case: Case, backend: Tuple[str, str],
                             gating_grad: bool = False) -> Dict[str, Tuple[float, float]]:
    """{name: (max error, bound)} of steer's y, gating and every gradient vs the float64 oracle, for a loss on y
    (and on the gating when ``gating_grad``); checks that gradients keep their argument's dtype."""
    name, device = backend
    args = make_inputs(case, device)
    x = args[0]
    y, gating = steer(*args, return_gating=True, backend=name)
    assert y.dtype == x.dtype and gating.dtype == torch.float32
    assert gating.shape == (*x.shape[:-1], case.experts)
    dy = torch.randn_like(y)
    dgating = torch.randn_like(gating) if gating_grad else None
    outputs, upstream = ([y, gating], [dy, dgating]) if gating_grad else ([y], [dy])
    grads = torch.autograd.grad(outputs, differentiable(args), upstream)
    for grad, arg in zip(grads, differentiable(args)):
        assert grad.dtype == arg.dtype, f"gradient dtype {grad.dtype}, expected the argument's {arg.dtype}"
    return {what: max_error(actual, expected, scale, case.dtype, what)
            for (what, (expected, scale)), actual in zip(reference_results(args, dy, dgating).items(),
                                                           (y, gating, *grads))}


def check_against_reference(case: Case, backend: Tuple[str, str], gating_grad: bool = False) -> None:
    """Asserts :func:`errors_against_reference` within bounds."""
    for what, (err, bound) in errors_against_reference(case, backend, gating_grad).items():
        assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"
