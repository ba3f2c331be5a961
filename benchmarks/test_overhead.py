"""Per-call cost at a tiny shape (8 rows × 64, E = 4), where Python and launch overhead decide: ``steer`` on every
available backend against the eager composition, forward and forward+backward, called back to back
(:func:`benchmarks.timing.per_call_us`). The op sweep's device times hide this cost; a caller whose steered
layers are this small pays it.
"""
import pytest
import torch

from benchmarks.impls import DTYPE_NAMES, OpCase, fused_backends, interpreted, make_inputs, step_of
from benchmarks.timing import DEVICE, per_call_us

CASE = OpCase(1, 8, 64, 4, torch.bfloat16 if DEVICE.type == "cuda" else torch.float32)
IMPLS = ["eager"] + [b for b in fused_backends() if not interpreted(b)]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_call_overhead(benchmark, results, impl, mode):
    fn, _ = step_of(mode, impl, make_inputs(CASE))
    us = per_call_us(fn)
    benchmark.group = f"per-call {mode} {CASE.name}"
    benchmark.pedantic(lambda: fn(None), rounds=20, iterations=1, warmup_rounds=2)
    results.add("overhead", dict(impl=impl, mode=mode, shape=CASE.name, dtype=DTYPE_NAMES[CASE.dtype], us=us),
                benchmark)
