"""Tests for ``steer()``: every backend that can run here against the float64 oracle, autograd, memory, errors.

Backends: ``torch`` on CPU; ``triton`` on CUDA tensors, or on CPU tensors in Triton's interpreter (conftest sets
TRITON_INTERPRET=1 without a GPU); ``cuda`` (the C++ extension) only with a GPU, skipped when it is not built.
Each test seeds torch from its own id, so inputs are random, differ between tests and reproduce on rerun.
Shapes are tiny on purpose: the interpreter costs about a millisecond per program.
"""
import importlib
import re
import zlib
from typing import Tuple

import pytest
import torch
from torch import Tensor

import steermoe.kernels
import steermoe.ops
import steermoe.reference
from steermoe import available_backends, steer
from steermoe.reference import steer_reference
from steermoe.testing import (GRAD_NAMES, TOLERANCE, Case, _error_scales, assert_close, check_against_reference,
                              differentiable, make_inputs, reference_results)

HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(("triton", KERNEL_DEVICE), id="triton"),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=BACKENDS)
def backend(request) -> Tuple[str, str]:
    """(backend name, device of its tensors); the optional CUDA extension is skipped when not built."""
    name, device = request.param
    why = available_backends(device, explain=True)[name]
    if name == "cuda" and why != "available":
        pytest.skip(why)
    return name, device


# ------------------------------------------------------------------------------------ numerics vs oracle
SIZES = [  # (E, x shape): odd D, rows not a multiple of any block, leading dims, zero rows, every E padding, wide D
    (1, (37, 33)), (3, (70, 100)), (8, (2, 35, 257)), (16, (1, 100)), (33, (5, 7, 33)),
    (8, (0, 100)), (8, (2, 0, 33)), (20, (45, 70)), (64, (37, 48)), (8, (3, 1280)), (3, (2, 3, 2, 5, 17)), (8, (4, 1)),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VARIANTS = [
    Case(layout="transposed"), Case(layout="sliced", dtype=torch.bfloat16),
    Case(shape=(3, 4, 33), layout="swapped", dtype=torch.float16), Case(shape=(2, 5, 3, 33), layout="sliced"),
    Case(dtype=torch.bfloat16, params="x"), Case(dtype=torch.float16, params="x"),
    Case(dtype=torch.bfloat16, params="mixed", bias=False),
    Case(bias=False, scale="float"), Case(scale="1el"), Case(dtype=torch.bfloat16, scale="float"),
    Case(dtype=torch.bfloat16, params="x", scale="1el", layout="transposed"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("experts, shape", SIZES, ids=[f"E{e}-{'x'.join(map(str, s))}" for e, s in SIZES])
def test_sizes_match_reference(backend, experts, shape, dtype):
    check_against_reference(Case(shape=shape, experts=experts, dtype=dtype), backend)


@pytest.mark.parametrize("case", VARIANTS, ids=str)
def test_variants_match_reference(backend, case):
    check_against_reference(case, backend)


LAUNCH_VARIANTS = [  # other Triton launch configurations, wide and narrow (both fit an A100's shared memory)
    dict(BLOCK_M=64, BLOCK_D=128, num_warps=4, num_stages=2),
    dict(BLOCK_M=16, BLOCK_D=16, num_warps=8, num_stages=2, programs_per_sm=2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("override", LAUNCH_VARIANTS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_launch_configurations_match_reference(monkeypatch, override, dtype):
    """Any configuration the tuner may pick computes the same op: row and D tails, several row blocks per
    persistent program, gating gradient included."""
    module = importlib.import_module("steermoe.kernels.steer")
    shipped = module.launch_config

    def launch_config(kernel, dim, x_dtype, num_experts):
        config = shipped(kernel, dim, x_dtype, num_experts)
        return {**config, **{k: v for k, v in override.items() if k in config}}

    monkeypatch.setattr(module, "launch_config", launch_config)
    check_against_reference(Case(shape=(2, 53, 161), experts=5, dtype=dtype), ("triton", KERNEL_DEVICE),
                            gating_grad=True)


@pytest.mark.parametrize("version, dtype, experts, rows", [
    ((3, 3), torch.bfloat16, 8, 64), ((3, 9), torch.float16, 32, 64), ((3, 2), torch.bfloat16, 8, 32),
    ((3, 9), torch.float32, 8, 32), ((3, 9), torch.bfloat16, 33, 32)])
def test_backward_row_blocks_are_wide_only_where_verified(monkeypatch, version, dtype, experts, rows):
    """64-row backward blocks for 16-bit x at E_PAD <= 32 on triton >= 3.3, with the (rows, D) tile of the
    32-row configuration; everything else keeps the 32-row configuration."""
    module = importlib.import_module("steermoe.kernels.steer")
    monkeypatch.setattr(module, "TRITON_VERSION", (3, 0))
    narrow = module.launch_config("backward", 1280, dtype, experts)
    monkeypatch.setattr(module, "TRITON_VERSION", version)
    config = module.launch_config("backward", 1280, dtype, experts)
    assert narrow["BLOCK_M"] == 32 and config["BLOCK_M"] == rows
    assert config["BLOCK_M"] * config["BLOCK_D"] == narrow["BLOCK_M"] * narrow["BLOCK_D"]
    assert {k: v for k, v in config.items() if k not in ("BLOCK_M", "BLOCK_D")} == \
        {k: v for k, v in narrow.items() if k not in ("BLOCK_M", "BLOCK_D")}


RESIDUAL_CASES = [Case(shape=(37, 33), experts=1, dtype=torch.float32), Case(shape=(70, 100), experts=20),
                  Case(shape=(45, 70), experts=64, dtype=torch.bfloat16, params="x"),
                  Case(shape=(53, 161), experts=5, dtype=torch.float16, bias=False)]


@pytest.mark.parametrize("case", RESIDUAL_CASES, ids=str)
def test_triton_fused_residual_matches_reference(case):
    """The forward launcher's residual input: y and gating of h = residual + x (rounded to x's dtype as the unfused
    add), against the float64 oracle; rows and D tails, several programs."""
    x, w, b, v, s = (a.detach() if isinstance(a, Tensor) else a for a in make_inputs(case, KERNEL_DEVICE))
    residual = torch.randn_like(x) * 4
    scale = torch.as_tensor(s, dtype=torch.float32, device=x.device).reshape(1)
    y, gating = steermoe.kernels.steer_forward(x, w, b, v, scale, True, residual=residual)
    h = residual + x
    expected_y, expected_gating = steer_reference(h.double(), w.double(), None if b is None else b.double(),
                                                  v.double(), scale.double())
    scales = _error_scales([h, w, b, v, scale], expected_gating, torch.zeros_like(y), None)
    assert y.dtype == x.dtype
    assert_close(y, expected_y, scales["y"].max().item(), case.dtype, "y")
    assert_close(gating, expected_gating, scales["gating"].max().item(), case.dtype, "gating")
    unfused_y, unfused_gating = steermoe.kernels.steer_forward(h, w, b, v, scale, True)
    if case.dtype != torch.bfloat16 or HAS_CUDA:  # the interpreter truncates fp32 -> bf16 instead of rounding
        assert torch.equal(y, unfused_y) and torch.equal(gating, unfused_gating)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_gradient_through_gating(backend, dtype):
    """A loss on the returned gating (e.g. load balancing) reaches x, W and b."""
    check_against_reference(Case(shape=(2, 19, 33), dtype=dtype), backend, gating_grad=True)


def test_forward_without_autograd_matches(backend):
    """Under no_grad the gating is not stored; y is the same, and return_gating=False returns y alone."""
    name, device = backend
    args = make_inputs(Case(dtype=torch.bfloat16), device)
    y = steer(*args, backend=name)
    with torch.no_grad():
        y_plain = steer(*args, backend=name)
        y_gated, gating = steer(*args, return_gating=True, backend=name)
    assert isinstance(y, Tensor) and not y_plain.requires_grad
    assert torch.equal(y, y_plain) and torch.equal(y, y_gated)
    assert_close(gating, *reference_results(args, torch.zeros_like(y))["gating"], torch.bfloat16, "gating")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_extreme_logits_stay_finite(backend, dtype):
    """|logit| up to 1e4 (weights and bias): y, gating and every gradient finite; gating rows sum to one."""
    name, device = backend
    args = make_inputs(Case(shape=(2, 19, 33), dtype=dtype), device)
    with torch.no_grad():
        w, b = args[1], args[2]
        w.mul_(5e3 / (w.float().abs().sum(1, keepdim=True) * 3))
        b.copy_(torch.where(b > 0, 5e3, -5e3))
    y, gating = steer(*args, return_gating=True, backend=name)
    logits = args[0].detach().float() @ w.detach().float().t() + b.detach().float()
    assert 4e3 < logits.abs().max() <= 1e4
    grads = torch.autograd.grad(y, differentiable(args), torch.randn_like(y))
    for t in (y, gating, *grads):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(gating.sum(-1), torch.ones(gating.shape[:-1], device=device))


# ----------------------------------------------------------------------------------- fused residual add
def check_residual_against_reference(case: Case, backend: Tuple[str, str], gating_grad: bool = False) -> None:
    """steer(x, ..., residual=r) against the float64 oracle at h = r + x rounded to x's dtype (the add the fused op
    replaces): y, gating, every parameter's gradient, and h's gradient, which r and x both get (one tensor, no
    copy); the outputs equal the unfused steer(r + x) bit for bit (but in Triton's interpreter, whose fp32 → bf16
    conversion truncates where torch's add rounds)."""
    name, device = backend
    args = make_inputs(case, device)
    x, residual = args[0], make_inputs(case, device)[0]  # x's shape, dtype and layout
    y, gating = steer(*args, residual=residual, return_gating=True, backend=name)
    h = (residual + x).detach().requires_grad_()
    y_unfused, gating_unfused = steer(h, *args[1:], return_gating=True, backend=name)
    if not (name == "triton" and steermoe.kernels.INTERPRET and case.dtype == torch.bfloat16):
        assert torch.equal(y, y_unfused) and torch.equal(gating, gating_unfused)
    dy = torch.randn_like(y)
    dgating = torch.randn_like(gating) if gating_grad else None
    outputs, upstream = ([y, gating], [dy, dgating]) if gating_grad else ([y], [dy])
    d_residual, *grads = torch.autograd.grad(outputs, [residual, *differentiable(args)], upstream)
    assert d_residual.data_ptr() == grads[0].data_ptr() and d_residual.dtype == x.dtype
    oracle = reference_results([h, *args[1:]], dy, dgating)
    for (what, (expected, scale)), actual in zip(oracle.items(), (y, gating, *grads)):
        assert_close(actual, expected, scale, case.dtype, what)


RESIDUAL_SIZES = [(1, (37, 33)), (8, (2, 35, 257)), (33, (5, 7, 33)), (8, (0, 100)), (64, (37, 48)),
                  (3, (2, 3, 2, 5, 17))]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("experts, shape", RESIDUAL_SIZES,
                         ids=[f"E{e}-{'x'.join(map(str, s))}" for e, s in RESIDUAL_SIZES])
def test_residual_sizes_match_reference(backend, experts, shape, dtype):
    check_residual_against_reference(Case(shape=shape, experts=experts, dtype=dtype), backend)


@pytest.mark.parametrize("case", [Case(layout="transposed", dtype=torch.bfloat16), Case(shape=(2, 5, 3, 33),
                                  layout="sliced", dtype=torch.float16, params="x", bias=False, scale="float")],
                         ids=str)
def test_residual_layouts_match_reference(backend, case):
    check_residual_against_reference(case, backend, gating_grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_residual_gradient_through_gating(backend, dtype):
    check_residual_against_reference(Case(shape=(2, 19, 33), dtype=dtype), backend, gating_grad=True)


def test_residual_is_never_saved(backend):
    """With a residual the op saves what it saves without one: y and the gating, neither input nor their sum."""
    name, device = backend
    args = make_inputs(Case(shape=(2, 37, 100), dtype=torch.bfloat16), device)
    residual = torch.randn_like(args[0], requires_grad=True)
    y, saved = _saved_tensors(lambda: steer(*args, residual=residual, backend=name))
    rows_d = [t for t in saved if t.numel() == y.numel()]
    assert [_storage(t) for t in rows_d] == [_storage(y)]
    assert sum(t.numel() == 2 * 37 * 8 for t in saved) == 1


# --------------------------------------------------------------------------------- autograd properties
def _float64_inputs():
    case = Case(shape=(2, 3, 5), experts=3, dtype=torch.float64, params="x")
    return tuple(make_inputs(case, "cpu"))


def test_gradcheck_reference():
    assert torch.autograd.gradcheck(steer_reference, _float64_inputs())


@pytest.mark.parametrize("return_gating", [False, True])
def test_gradcheck_torch_backend(return_gating):
    def fn(*args):
        return steer(*args, return_gating=return_gating, backend="torch")
    assert torch.autograd.gradcheck(fn, _float64_inputs())


@pytest.mark.parametrize("path", ["eager", "custom-op"])
def test_double_backward_raises(path):
    """create_graph=True raises a clear error on both autograd paths instead of returning a gradient without a
    derivative (the kernels' backward is not differentiable): the eager autograd.Function and the custom op's
    torch.library autograd, which torch.compile uses."""
    x, w, b, v, s = _float64_inputs()
    rows = x.reshape(-1, x.shape[-1])
    if path == "eager":
        y = steer(x, w, b, v, s, backend="torch")
    else:
        y = steermoe.ops._steer_forward_op(rows, w, b, v, s.reshape(1), "torch", True)[0]
    with pytest.raises(RuntimeError, match="differentiable once; backward with create_graph=True"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_gradcheck_torch_backend_residual():
    inputs = _float64_inputs()
    residual = torch.randn_like(inputs[0], requires_grad=True)

    def fn(residual, *args):
        return steer(*args, residual=residual, return_gating=True, backend="torch")
    assert torch.autograd.gradcheck(fn, (residual, *inputs))


def test_backward_is_deterministic(backend):
    """Two forward+backward passes give bitwise-identical outputs and gradients (several row blocks/program)."""
    name, device = backend
    args = make_inputs(Case(shape=(5, 37, 100), dtype=torch.bfloat16), device)
    dy = torch.randn(args[0].shape, dtype=args[0].dtype, device=device)

    def run():
        y = steer(*args, backend=name)
        return (y, *torch.autograd.grad(y, differentiable(args), dy))
    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_cuda_graph_capture(name):
    """Forward+backward captured in a CUDA graph (no host syncs, graph-pool allocations) replays to the eager
    results, bit for bit."""
    why = available_backends("cuda", explain=True)[name]
    if why != "available":
        pytest.skip(why)
    args = make_inputs(Case(shape=(3, 50, 257), dtype=torch.bfloat16), "cuda")
    dy = torch.randn(args[0].shape, dtype=args[0].dtype, device="cuda")

    def step():
        y = steer(*args, backend=name)
        return (y, *torch.autograd.grad(y, differentiable(args), dy))

    expected = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for what, got, want in zip(("y",) + GRAD_NAMES, captured, expected):
        assert torch.equal(got, want), f"{what} differs after graph replay"


def _saved_tensors(fn):
    """Run fn under saved_tensors_hooks; returns (fn's output, every tensor autograd saved)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(), saved


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_saved_tensor_budget(backend):
    """Beyond the parameters steer saves only y (the output's storage) and the fp32 gating: rows·E·4 bytes;
    the eager composition saves two or more rows×D tensors."""
    name, device = backend
    args = make_inputs(Case(shape=(2, 37, 100), dtype=torch.bfloat16), device)
    x, params = args[0], args[1:]
    rows, (e, d) = x.shape[0] * x.shape[1], params[0].shape
    param_storages = {_storage(p) for p in params}

    y, saved = _saved_tensors(lambda: steer(*args, backend=name))
    extra = [t for t in saved if _storage(t) not in param_storages]
    outputs = [t for t in extra if _storage(t) == _storage(y)]
    others = [t for t in extra if _storage(t) != _storage(y)]
    assert len(outputs) == 1 and outputs[0].numel() == rows * d
    assert [(tuple(t.shape), t.dtype) for t in others] == [((rows, e), torch.float32)]
    assert all(_storage(t) != _storage(x) for t in saved)

    _, eager_saved = _saved_tensors(lambda: steer_reference(*args))
    eager_rows_d = [t for t in eager_saved if _storage(t) not in param_storages and t.numel() == rows * d]
    assert len(eager_rows_d) >= 2


# --------------------------------------------------------------------------------------------- errors
ERRORS = [  # (id, changes to the valid arguments, exception, message pattern)
    ("x-not-tensor", lambda a: {"x": a["x"].tolist()}, TypeError, "x must be a torch.Tensor"),
    ("x-0dim", lambda a: {"x": a["x"][0, 0, 0]}, ValueError, r"x must have shape \(\.\.\., D\)"),
    ("x-int", lambda a: {"x": a["x"].long()}, TypeError, "x must be float32, bfloat16 or float16"),
    ("x-complex", lambda a: {"x": a["x"].to(torch.complex64)}, TypeError, "x must be float32"),
    ("W-rank1", lambda a: {"router_weight": a["router_weight"][0]}, ValueError, r"router_weight must have shape"),
    ("W-rank3", lambda a: {"router_weight": a["router_weight"][None]}, ValueError, "router_weight must have shape"),
    ("W-no-experts", lambda a: {"router_weight": a["router_weight"][:0]}, ValueError, "router_weight.*E >= 1"),
    ("W-D", lambda a: {"router_weight": a["router_weight"][:, :-1]}, ValueError, r"router_weight .*\(E, 5\)"),
    ("W-dtype", lambda a: {"router_weight": a["router_weight"].half()}, TypeError, "router_weight must be float32"),
    ("W-list", lambda a: {"router_weight": a["router_weight"].tolist()}, ValueError, "router_weight must have"),
    ("V-E", lambda a: {"vectors": a["vectors"][:-1]}, ValueError, r"vectors must have shape \(E, D\) = \(3, 5\)"),
    ("V-D", lambda a: {"vectors": a["vectors"][:, 1:]}, ValueError, r"vectors must have shape .*\(3, 5\)"),
    ("V-rank1", lambda a: {"vectors": a["vectors"][0]}, ValueError, "vectors must have shape"),
    ("V-not-tensor", lambda a: {"vectors": 1.0}, TypeError, "vectors must be a torch.Tensor"),
    ("b-E", lambda a: {"router_bias": a["router_bias"][:-1]}, ValueError, r"router_bias must have shape \(E,\)"),
    ("b-rank2", lambda a: {"router_bias": a["router_bias"][None]}, ValueError, "router_bias must have shape"),
    ("b-dtype", lambda a: {"router_bias": a["router_bias"].double()}, TypeError, "router_bias must be float32"),
    ("W-device", lambda a: {"router_weight": a["router_weight"].to("meta")}, ValueError, "router_weight is on meta"),
    ("V-device", lambda a: {"vectors": a["vectors"].to("meta")}, ValueError, "vectors is on meta"),
    ("b-device", lambda a: {"router_bias": a["router_bias"].to("meta")}, ValueError, "router_bias is on meta"),
    ("scale-device", lambda a: {"scale": a["scale"].to("meta")}, ValueError, "scale is on meta"),
    ("x-device", lambda a: {"x": a["x"].to("meta")}, ValueError, "router_weight is on .* but x is on meta"),
    ("scale-shape", lambda a: {"scale": a["scale"].expand(2)}, ValueError, "scale must be a scalar"),
    ("scale-int", lambda a: {"scale": torch.tensor(2)}, TypeError, "scale must be a floating-point tensor"),
    ("scale-str", lambda a: {"scale": "0.5"}, TypeError, "scale must be a float or a 1-element tensor"),
    ("scale-bool", lambda a: {"scale": True}, TypeError, "scale must be a float"),
    ("backend-name", lambda a: {"backend": "numpy"}, ValueError, "backend must be one of .*'numpy'"),
    ("residual-list", lambda a: {"residual": a["x"].tolist()}, TypeError, "residual must be a torch.Tensor"),
    ("residual-shape", lambda a: {"residual": a["x"][:, :1]}, ValueError,
     re.escape("residual must have shape (2, 4, 5) (x's shape); got (2, 1, 5)")),
    ("residual-dtype", lambda a: {"residual": a["x"].double()}, TypeError,
     re.escape("residual must have x's dtype (torch.float32); got torch.float64")),
    ("residual-device", lambda a: {"residual": a["x"].to("meta")}, ValueError, "residual is on meta but x is on cpu"),
    ("triton-E65", lambda a: {"router_weight": torch.randn(65, 5), "vectors": torch.randn(65, 5),
                              "router_bias": None, "backend": "triton"}, RuntimeError, "1..64 experts, got E=65"),
    ("triton-float64", lambda a: {k: v.double() for k, v in a.items() if isinstance(v, Tensor)}
     | {"backend": "triton"}, RuntimeError, "backend 'triton' cannot run here: .*float64"),
]


@pytest.mark.parametrize("change, error, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_arguments_raise(change, error, match):
    args = dict(zip(("x", "router_weight", "router_bias", "vectors", "scale"),
                    make_inputs(Case(shape=(2, 4, 5), experts=3, scale="1el"), "cpu")), backend="torch")
    args.update(change(args))
    if args["backend"] == "triton" and HAS_CUDA:
        args = {k: v.cuda() if isinstance(v, Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        steer(**args)


def test_explicit_backend_that_cannot_run_says_why(monkeypatch):
    """An explicit backend that cannot run raises with available_backends' reason (the CUDA extension never runs
    on CPU tensors; the Triton kernels do only in the interpreter)."""
    args = make_inputs(Case(shape=(4, 5), experts=3), "cpu")
    monkeypatch.setattr(steermoe.kernels, "INTERPRET", False)
    for name in ("cuda", "triton"):
        why = available_backends("cpu", explain=True)[name]
        assert why != "available"
        with pytest.raises(RuntimeError, match=re.escape(f"steermoe backend {name!r} cannot run here: {why}")):
            steer(*args, backend=name)
    assert "TRITON_INTERPRET=1" in why


# ------------------------------------------------------------------------------------ backend choice
def _record_backend_calls(monkeypatch) -> list:
    """Wrap each runnable implementation's forward so that calls append its backend name to the returned list."""
    calls = []
    for name, module in (("torch", steermoe.reference), ("triton", steermoe.kernels)):

        def forward(*args, _name=name, _orig=module.steer_forward, **kwargs):
            calls.append(_name)
            return _orig(*args, **kwargs)
        monkeypatch.setattr(module, "steer_forward", forward)
    return calls


AUTO = "triton" if HAS_CUDA else "torch"


@pytest.mark.parametrize("env, argument, expected", [
    ("triton", None, "triton"), (" Torch ", None, "torch"), ("auto", None, AUTO), (None, None, AUTO),
    ("torch", "triton", "triton"), ("triton", "auto", AUTO),
])
def test_backend_choice_honours_env(monkeypatch, env, argument, expected):
    if env is None:
        monkeypatch.delenv("STEERMOE_BACKEND", raising=False)
    else:
        monkeypatch.setenv("STEERMOE_BACKEND", env)
    calls = _record_backend_calls(monkeypatch)
    steer(*make_inputs(Case(shape=(4, 5), experts=3), KERNEL_DEVICE), backend=argument)
    assert calls == [expected]


def test_bad_env_backend_raises(monkeypatch):
    monkeypatch.setenv("STEERMOE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="backend must be one of .*'fastest'"):
        steer(*make_inputs(Case(shape=(4, 5), experts=3), "cpu"))


def test_available_backends_explains():
    reasons = available_backends("cpu", explain=True)
    assert set(reasons) == {"torch", "triton", "cuda"}
    assert all(isinstance(why, str) and why for why in reasons.values())
    assert available_backends("cpu") == [n for n, why in reasons.items() if why == "available"]
    assert reasons["torch"] == "available"
    assert reasons["cuda"] != "available"  # the extension never runs on CPU tensors
    if not HAS_CUDA:
        assert reasons["triton"] == "available"  # in the interpreter


# --------------------------------------------------------------------------------------- torch.compile
def test_compile_traces_the_custom_ops():
    """Eager calls take the autograd.Function twin; under torch.compile steer() emits the custom op instead."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    args = make_inputs(Case(shape=(4, 9), experts=3), "cpu")
    torch.compile(lambda *a: steer(*a, backend="torch"), fullgraph=True, backend=capture)(*args)
    assert len(graphs) == 1 and "steermoe.steer_forward" in graphs[0]
    node = steer(*args, backend="torch").grad_fn.next_functions[0][0]    # under the reshape back to x's shape
    assert type(node).__name__ == "_SteerFunctionBackward"


@pytest.mark.parametrize("residual", [False, True], ids=["x", "residual"])
def test_compile_fullgraph_matches_eager(residual):
    """torch.compile(fullgraph=True) traces steer (custom op + fake + autograd) with no graph break."""
    torch._dynamo.reset()
    args = make_inputs(Case(shape=(2, 5, 33), experts=3, dtype=torch.bfloat16), "cpu")
    if residual:
        args.append(torch.randn_like(args[0], requires_grad=True))

    def fn(x, w, b, v, s, r=None):
        y, gating = steer(x, w, b, v, s, residual=r, return_gating=True, backend="torch")
        return y * 2, gating

    compiled = torch.compile(fn, fullgraph=True)
    dy = torch.randn(args[0].shape, dtype=args[0].dtype)
    dgating = torch.randn(*args[0].shape[:-1], 3)
    results = []
    for f in (fn, compiled):
        y, gating = f(*args)
        results.append((y, gating, *torch.autograd.grad([y, gating], differentiable(args), [dy, dgating])))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=TOLERANCE[torch.bfloat16], atol=1e-5)
