"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, with the launchers' exact configurations,
and spills no registers. No GPU needed; the interpreter accepts code the GPU compiler rejects, so this is the
check that the kernels build for hardware.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled():
    """All (kernel, dtype, E, arch) compiles, in a subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "steermoe.kernels.aot", "--arch", "80", "90", "--dim", "1280"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"ahead-of-time compile failed:\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_every_configuration_compiled(compiled):
    from steermoe.kernels import aot
    expected = {(k, d, e, a) for k in ("forward", "backward") for d in aot.X_DTYPES for e in aot.EXPERTS
                for a in (80, 90)}
    assert {(r["kernel"], r["dtype"], r["experts"], r["arch"]) for r in compiled} == expected
    assert all(r["ptx_bytes"] > 0 for r in compiled)


def test_no_register_spills(compiled):
    spilled = [r for r in compiled if r["LOCAL"] > 0 or r["STACK"] > 0]
    assert not spilled, "register spills:\n" + "\n".join(json.dumps(r) for r in spilled)
    assert all(r["REG"] <= 255 for r in compiled)
