"""What the op benchmarks compare: the shapes swept, their inputs, and each way of computing a steered layer.

Implementations (all take x (B, T, D) and return y of the same shape and dtype):
  eager     ``steer_reference``: the composed ops under autograd.
  compile   ``torch.compile`` of ``steer_reference`` (rows marked dynamic: one compile per D, E and dtype).
  original  the original code's way: one ``nn.Linear(D, L·E)`` router evaluated at the layer and sliced to
            its E logits, softmax, ``einsum``, scale, add; its parameters in x's dtype.
  torch / triton / cuda   ``steer(..., backend=name)``: the fused op with float32 parameters.
Every implementation runs with gradients enabled and x and all parameters requiring grad, as in training.
"""
import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from steermoe import available_backends, steer
from steermoe.reference import steer_reference

from .timing import DEVICE

FRAMES = 1500                                   # encoder frames of a 30 s window
WHISPER_LAYERS = {384: 4, 512: 6, 768: 12, 1024: 24, 1280: 32}  # encoder layers of each Whisper width
BASELINES = ("eager", "compile", "original")
HEADLINE = dict(dim=1280, experts=8, dtype=torch.bfloat16, min_rows=16000)  # the shapes the targets name
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class OpCase:
    """One steered layer's shape: x is (batch, frames, dim), ``experts`` experts."""

    batch: int
    frames: int
    dim: int
    experts: int
    dtype: torch.dtype

    @property
    def rows(self) -> int:
        return self.batch * self.frames

    @property
    def elem(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.dim}-E{self.experts}-{DTYPE_NAMES[self.dtype]}"

    @property
    def headline(self) -> bool:
        return (self.dim, self.experts, self.dtype) == (HEADLINE["dim"], HEADLINE["experts"], HEADLINE["dtype"]) \
            and self.rows >= HEADLINE["min_rows"]


def sweep(size: str) -> List[OpCase]:
    """``full``: rows 1.5k..48k (B = 1, 4, 16, 32 × 1500 frames), D ∈ {384, 1280}, E ∈ {4, 8, 16}, bf16 and fp32.
    ``headline``: B = 16 × 1500 frames, D = 1280, E = 8, bf16 (the shape the targets name).
    ``small``: rows 384 and 1536, D = 384, E = 8, fp32 and bf16. ``auto``: full on a GPU, else small.
    Ordered so that consecutive cases reuse one compiled graph."""
    if size == "auto":
        size = "full" if DEVICE.type == "cuda" else "small"
    if size == "full":
        grid = [(b, FRAMES, d, e, dt) for dt in (torch.bfloat16, torch.float32) for d in (384, 1280)
                for e in (4, 8, 16) for b in (1, 4, 16, 32)]
    elif size == "headline":
        grid = [(16, FRAMES, HEADLINE["dim"], HEADLINE["experts"], HEADLINE["dtype"])]
    elif size == "small":
        grid = [(b, 384, 384, 8, dt) for dt in (torch.float32, torch.bfloat16) for b in (1, 4)]
    else:
        raise ValueError(f"sweep size must be 'auto', 'full', 'headline' or 'small'; got {size!r}")
    return [OpCase(*g) for g in grid]


INTERPRETER_CASE = OpCase(1, 64, 64, 4, torch.float32)  # Triton on CPU: an interpreter, not a speed number


def interpreted(impl: str) -> bool:
    """True for the Triton backend running in Triton's CPU interpreter."""
    return impl == "triton" and DEVICE.type != "cuda"


def fused_backends() -> List[str]:
    return list(available_backends(DEVICE))


@dataclass
class OpInputs:
    x: Tensor                      # (B, T, D), requires grad
    grad_y: Tensor                 # (B, T, D)
    weight: Tensor                 # (E, D) fp32, and the rest of the fused op's parameters
    bias: Tensor
    vectors: Tensor
    scale: Tensor
    router: nn.Linear              # the original composition's parameters, in x's dtype
    all_vectors: Tensor            # (L, E, D)
    layer_scales: Tensor           # (L,)
    layer: int


def make_inputs(case: OpCase, seed: int = 0) -> OpInputs:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, std=1.0, dtype=torch.float32, grad=True):
        t = (torch.randn(*shape, generator=gen) * std).to(device=DEVICE, dtype=dtype)
        return t.requires_grad_(grad)

    d, e = case.dim, case.experts
    layers = WHISPER_LAYERS.get(d, 32)
    router = nn.Linear(d, layers * e).to(device=DEVICE, dtype=case.dtype)
    return OpInputs(
        x=randn(case.batch, case.frames, d, dtype=case.dtype), grad_y=randn(case.batch, case.frames, d,
                                                                            dtype=case.dtype, grad=False),
        weight=randn(e, d, std=d ** -0.5), bias=randn(e, std=0.1), vectors=randn(e, d, std=0.1),
        scale=torch.tensor(0.1, device=DEVICE, requires_grad=True), router=router,
        all_vectors=randn(layers, e, d, std=0.1, dtype=case.dtype),
        layer_scales=torch.full((layers,), 0.1, device=DEVICE, dtype=case.dtype, requires_grad=True),
        layer=layers // 2)


def seed_steer(x: Tensor, router: nn.Linear, all_vectors: Tensor, layer_scales: Tensor, layer: int) -> Tensor:
    """The original code's steering of x (B, T, D) at ``layer``, op for op: all L·E logits, then this layer's E."""
    e = all_vectors.shape[1]
    router_output = router(x)                                           # (B, T, L·E): every layer's logits
    logits = router_output[:, :, layer * e:(layer + 1) * e]
    gating = torch.softmax(logits, dim=-1)
    adjustment = torch.einsum("bte,ef->btf", gating, all_vectors[layer])
    return x + layer_scales[layer] * adjustment


def _reference_output(x, weight, bias, vectors, scale):
    return steer_reference(x, weight, bias, vectors, scale)[0]


@functools.lru_cache(maxsize=1)
def _compiled_reference():
    config = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):  # the sweep needs one graph per (D, E, dtype)
        if hasattr(config, limit):
            setattr(config, limit, max(getattr(config, limit), 64))
    return torch.compile(_reference_output)


def compiled_steer(inp: OpInputs) -> Tensor:
    rows = inp.x.flatten(0, 1)
    torch._dynamo.maybe_mark_dynamic(rows, 0)
    return _compiled_reference()(rows, inp.weight, inp.bias, inp.vectors, inp.scale).view_as(inp.x)


def forward_of(impl: str, inp: OpInputs) -> Tuple[Callable[[], Tensor], List[Tensor]]:
    """(a call computing y, the tensors the gradient is taken for) of implementation ``impl``."""
    fused_params = [inp.x, inp.weight, inp.bias, inp.vectors, inp.scale]
    if impl == "eager":
        return lambda: _reference_output(inp.x, inp.weight, inp.bias, inp.vectors, inp.scale), fused_params
    if impl == "compile":
        return lambda: compiled_steer(inp), fused_params
    if impl == "original":
        return (lambda: seed_steer(inp.x, inp.router, inp.all_vectors, inp.layer_scales, inp.layer),
                [inp.x, inp.router.weight, inp.router.bias, inp.all_vectors, inp.layer_scales])
    return lambda: steer(inp.x, inp.weight, inp.bias, inp.vectors, inp.scale, backend=impl), fused_params


def step_of(mode: str, impl: str, inp: OpInputs) -> Tuple[Callable, Optional[Callable[[], Tensor]]]:
    """(timed call, untimed setup or None) for ``mode``: ``fwd``; ``bwd`` (the forward is the setup);
    ``fwd+bwd``. Gradients are returned, never accumulated into ``.grad``."""
    forward, params = forward_of(impl, inp)
    if mode == "fwd":
        return (lambda _: forward()), None
    if mode == "bwd":
        return (lambda y: torch.autograd.grad(y, params, inp.grad_y)), forward
    if mode == "fwd+bwd":
        return (lambda _: torch.autograd.grad(forward(), params, inp.grad_y)), None
    raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd+bwd'; got {mode!r}")
