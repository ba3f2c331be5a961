"""Op level: forward, backward and forward+backward of ``steer`` for every available backend, against the eager
composition, ``torch.compile`` of it, and the original code's way (see :mod:`benchmarks.impls`).

Each row reports the median time, the achieved bandwidth (minimum bytes / time), its share of the measured copy
bandwidth, and the speedups over the three baselines. Nothing about speed is asserted.
"""
from typing import Dict, Tuple

import pytest

from benchmarks.impls import (BASELINES, DTYPE_NAMES, INTERPRETER_CASE, OpCase, fused_backends, interpreted,
                              make_inputs, step_of, sweep)
from benchmarks.roofline import MODES, min_bytes
from benchmarks.timing import measure, median_ms

_INTERPRETER_TIMER = dict(warmup=1, min_reps=1, max_reps=1, rounds=1)


def pytest_generate_tests(metafunc):
    if "op_case" not in metafunc.fixturenames:
        return
    cases = sweep(metafunc.config.getoption("--bench-sweep"))
    params = []
    for case in cases:
        for mode in MODES:
            params += [(case, mode, impl) for impl in BASELINES]
            params += [(case, mode, b) for b in fused_backends() if not interpreted(b)]
    if "triton" in fused_backends() and interpreted("triton"):
        params += [(INTERPRETER_CASE, mode, "triton") for mode in MODES]
    metafunc.parametrize("op_case,mode,impl", params,
                         ids=[f"{impl}-{mode}-{case.name}" for case, mode, impl in params])


class OpTimes:
    """Median ms per (case, mode, impl), each measured once; inputs kept for the current case only."""

    def __init__(self):
        self._ms: Dict[Tuple[OpCase, str, str], float] = {}
        self._inputs = (None, None)

    def inputs(self, case: OpCase):
        if self._inputs[0] != case:
            self._inputs = (None, None)  # free the previous case's tensors first
            self._inputs = (case, make_inputs(case))
        return self._inputs[1]

    def ms(self, case: OpCase, mode: str, impl: str, benchmark=None) -> float:
        """Measured now when ``benchmark`` is given (and recorded there), else remembered or measured now."""
        key = (case, mode, impl)
        if benchmark is not None or key not in self._ms:
            fn, setup = step_of(mode, impl, self.inputs(case))
            timer = _INTERPRETER_TIMER if interpreted(impl) else {}
            if benchmark is not None:
                self._ms[key] = measure(benchmark, fn, setup, **timer)
            else:
                self._ms[key] = median_ms(fn, setup)
        return self._ms[key]


@pytest.fixture(scope="session")
def op_times() -> OpTimes:
    return OpTimes()


def test_steer_op(benchmark, op_times, results, copy_gbps, op_case, mode, impl):
    benchmark.group = f"{mode} {op_case.name}"
    ms = op_times.ms(op_case, mode, impl, benchmark)
    gbps = min_bytes(mode, op_case.rows, op_case.dim, op_case.experts, op_case.elem) / ms / 1e6
    speedups = {f"vs_{b}": None if interpreted(impl) else op_times.ms(op_case, mode, b) / ms for b in BASELINES}
    results.add("op", dict(impl=impl, mode=mode, shape=op_case.name, rows=op_case.rows, dim=op_case.dim,
                           experts=op_case.experts, dtype=DTYPE_NAMES[op_case.dtype], headline=op_case.headline,
                           interpreted=interpreted(impl), ms=ms, gbps=gbps, copy_pct=100 * gbps / copy_gbps,
                           **speedups), benchmark)
