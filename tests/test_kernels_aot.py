"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, with the launchers' exact configurations and the
specialisation Triton's JIT gives their calls, for every parameter dtype steer() takes, and spills no registers.
No GPU needed; the interpreter accepts code the GPU compiler rejects, so this is the check that the kernels build
for hardware.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(args, timeout):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    assert proc.returncode == 0, f"ahead-of-time compile failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def compiled():
    """All (kernel, dtype, parameter dtype, E, arch) compiles, in a subprocess without TRITON_INTERPRET."""
    out = _run(["-m", "steermoe.kernels.aot", "--arch", "80", "90", "--dim", "1280"], timeout=1800)
    return [json.loads(line) for line in out.splitlines()]


def test_every_configuration_compiled(compiled):
    from steermoe.kernels import aot
    expected = {(k, x, aot.X_DTYPES[x] if p == "x" else p, e, a) for k, x, p in aot.cases() for e in aot.EXPERTS
                for a in (80, 90)}
    expected = {(k, x, str(p).replace("torch.", ""), e, a) for k, x, p, e, a in expected}
    assert {(r["kernel"], r["dtype"], r["params"], r["experts"], r["arch"]) for r in compiled} == expected
    assert {(r["dtype"], r["params"]) for r in compiled} == {
        ("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16"), ("float16", "float32"),
        ("float16", "float16")}
    assert all(r["ptx_bytes"] > 0 for r in compiled)


def test_no_register_spills(compiled):
    spilled = [r for r in compiled if r["LOCAL"] > 0 or r["STACK"] > 0]
    assert not spilled, "register spills:\n" + "\n".join(json.dumps(r) for r in spilled)
    assert all(r["REG"] <= 255 for r in compiled)


def test_compiled_with_the_launch_specialisation(compiled):
    """At N = 24000, D = 1280 every pointer (torch allocations are 16-byte aligned) and N, D are multiples of 16:
    the compiled TTIR carries tt.divisibility on each of them."""
    pointers = {"forward": 8, "forward+residual": 8, "backward": 11}  # the backward: 10 and the workspace row
    for r in compiled:  # (without a residual the forward passes x as R too)
        assert r["divisible"][-2:] == ["N", "D"] and len(r["divisible"]) == pointers[r["kernel"]] + 2, r
        assert r["divisibility_attrs"] == len(r["divisible"]) and r["ones"] == [], r


# Triton's own JIT derivation of the specialisation for the installed version, compared with aot.specialisation
# for launches of several shapes, then one compile with and without it.
SCRIPT = r"""
import inspect, json, torch, triton
from triton.backends.compiler import GPUTarget
from steermoe.kernels import aot

try:
    from triton.compiler.compiler import make_backend
except ImportError:
    from triton.compiler import make_backend
backend = make_backend(GPUTarget("cuda", 90, 32))

def triton_own(launch):
    fn, values = launch.fn, [launch.args[p.name] for p in launch.fn.params]
    runtime = [p for p in fn.params if not p.is_constexpr]
    if hasattr(backend, "get_attrs_descriptor"):  # 3.2
        attrs = backend.get_attrs_descriptor(fn.params, values).arg_properties
        div, ones = attrs["tt.divisibility"], attrs["tt.equal_to"]
    elif hasattr(fn, "_get_config"):  # 3.0, 3.1
        config = fn._get_config(*values)
        div, ones = config.divisible_by_16, config.equal_to_1
    else:  # 3.3+: the binder the launch itself runs
        from triton.runtime.jit import create_function_from_signature
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        _, spec, _ = binder(**launch.args, **launch.options)
        div = [p.num for p, (ty, key) in zip(fn.params, spec) if isinstance(key, str) and "D" in key]
        ones = [p.num for p, (ty, key) in zip(fn.params, spec) if ty == "constexpr" and not p.is_constexpr]
    return dict(divisible=[p.name for p in runtime if p.num in div], ones=[p.name for p in runtime if p.num in ones])

checked = []
for rows, dim in ((24000, 1280), (1001, 1280), (1, 40)):
    for kernel in aot.KERNELS:
        for x, p in ((torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float32)):
            for launch in aot.launches(kernel, x, p, 8, dim, rows):
                spec = aot.specialisation(launch)
                ours = dict(divisible=spec.divisible, ones=spec.ones)
                assert ours == triton_own(launch), (kernel, rows, dim, ours, triton_own(launch))
                assert spec.signature["W"] == aot.POINTER[p] and spec.signature["V"] == aot.POINTER[p]
                checked.append((kernel, rows, dim, ours))
(launch,) = aot.launches("forward", torch.bfloat16, torch.float32, 8, 1280)
regs = {}
for s in (True, False):
    compiled = aot.compile_launch(launch, 90, s)
    listing = compiled.asm["ptx"]
    regs[s] = dict(aot.usage(compiled, 8), loads=listing.count("ld.global") + listing.count("cp.async.c"))
print(json.dumps(dict(checked=checked, specialised=regs[True], unspecialised=regs[False])))
"""


@pytest.fixture(scope="module")
def versus_triton():
    return json.loads(_run(["-c", SCRIPT], timeout=600).splitlines()[-1])


def test_specialisation_is_the_jits(versus_triton):
    """aot.specialisation agrees with the installed Triton's own derivation at aligned, unaligned (N = 1001) and
    value-1 (N = 1) shapes."""
    by_shape = {(k, n, d): s for k, n, d, s in versus_triton["checked"]}
    assert by_shape[("forward", 1001, 1280)]["divisible"][-1:] == ["D"]
    assert by_shape[("backward", 1, 40)]["ones"] == ["N"] and "D" not in by_shape[("backward", 1, 40)]["divisible"]


def test_specialisation_changes_the_compile(versus_triton):
    """The specialised bf16 forward (E = 8, sm_90) has tt.divisibility on its 10 arguments (8 pointers, N, D), and
    its aligned rows load in wider instructions: fewer global loads and copies in its PTX (14 against 43 with
    triton 3.9, whose specialised compile copies 16 bytes at a time, ``cp.async.cg``, the other 4, ``.ca``)."""
    spec, plain = versus_triton["specialised"], versus_triton["unspecialised"]
    assert spec["divisibility_attrs"] == 10 and plain["divisibility_attrs"] == 0
    assert spec["loads"] < plain["loads"]


def _synchronous_loads_allowed(kernel: str) -> int:
    """Synchronous global loads the second D sweep of ``kernel`` may issue. Triton 3.3 pipelines only the operands
    of ``tl.dot``, even in a loop that asks for stages (the forward's re-read of x may stay ``ld.global``, seen with
    fp32 x, and the backward's two partial-tile loads), and 3.2 does the same in the backward at some E (seen at
    E = 33 on sm_90)."""
    import triton
    version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    return {(3, 3): {"forward": 1, "backward": 2}, (3, 2): {"backward": 2}}.get(version, {}).get(kernel, 0)


@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_steady_state_loads_are_asynchronous(compiled, kernel):
    """Each kernel's steady state, its two innermost loops (the D sweeps over a row block), loads global memory
    only with cp.async, read off the PTX of the specialised compile: no chain of loads the loop waits on."""
    rows = [r for r in compiled if r["kernel"] == kernel]
    assert rows
    for r in rows:
        what = json.dumps({k: r[k] for k in ("dtype", "params", "experts", "arch", "loops")})
        assert len(r["loops"]) == 2, f"expected the two D sweeps as innermost loops: {what}"
        assert all(loop["async_loads"] > 0 for loop in r["loops"]), what
        first, second = (loop["sync_loads"] for loop in r["loops"])
        assert first == 0 and second <= _synchronous_loads_allowed(kernel), \
            f"synchronous global loads in the steady state: {what}"
