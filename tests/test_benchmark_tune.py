"""The launch-configuration tuner runs end to end (on CPU through Triton's interpreter, at a tiny shape)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from benchmarks import tune  # noqa: E402

TINY_GRID = {"BLOCK_M": [16, 32], "BLOCK_D": [16], "num_warps": [4], "num_stages": [1], "programs_per_sm": [1, 2]}


def test_every_candidate_is_checked_and_timed(tmp_path, capsys):
    out = tmp_path / "tune.json"
    tune.main(["--rows", "37", "--dim", "33", "--experts", "3", "--dtype", "fp32", "--grid", json.dumps(TINY_GRID),
               "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    forward = [r for r in rows if r["kernel"] == "forward"]
    backward = [r for r in rows if r["kernel"] == "backward"]
    assert len(forward) == 1 + 4 and len(backward) == 1 + 4          # the shipped config, then the grid
    assert sum(r["shipped"] for r in rows) == 2
    assert all(r["error"] is None and r["us"] > 0 and r["copy_pct"] > 0 for r in rows)
    assert {r["config"]["programs_per_sm"] for r in forward} == {r["config"]["programs_per_sm"] for r in backward} \
        == {1, 2}
    assert [r["us"] for r in forward] == sorted(r["us"] for r in forward)   # fastest first
    printed = capsys.readouterr().out
    assert "forward (shipped)" in printed and "backward (shipped)" in printed


def test_a_time_budget_tries_the_shipped_configuration_and_its_neighbours_first(tmp_path, capsys):
    grid = {"BLOCK_M": (16, 32, 64), "BLOCK_D": (16, 32), "num_warps": (4, 8)}
    found = tune.candidates("forward", 33, torch.float32, 3, grid)
    shipped = found[0]
    changed = [sum(c[k] != shipped[k] for k in grid) for c in found]
    assert changed[0] == 0 and changed == sorted(changed) and len(found) == 3 * 2 * 2  # the shipped one is in the grid
    out = tmp_path / "tune.json"
    tune.main(["--rows", "37", "--dim", "33", "--experts", "3", "--dtype", "fp32", "--grid", json.dumps(TINY_GRID),
               "--budget-s", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["shipped"]) for r in rows] == [("forward", True), ("backward", True)]
    assert "backward: time budget of 0 s spent, 4 candidates not tried" in capsys.readouterr().out


def test_a_candidate_with_other_outputs_is_rejected():
    a = torch.randn(50, 7)
    assert tune._close((a, a[:, 0]), (a + 1e-5, a[:, 0]))
    assert not tune._close((a, a[:, 0]), (a, a[:, 0] * 1.1))


def test_resource_usage_of_the_fastest(tmp_path):
    """The GPU-only step (registers, spills, shared memory of the fastest candidates), run here through the
    ahead-of-time compiler for sm_90 in a subprocess without TRITON_INTERPRET."""
    script = """
import json, sys, torch
from unittest import mock
from benchmarks import tune
from steermoe.kernels.steer import launch_config
rows = [dict(config=launch_config(kernel, 1280, torch.bfloat16, 8)) for kernel in ("forward", "backward")]
with mock.patch.object(torch.cuda, "get_device_capability", return_value=(9, 0)):
    for kernel, row in zip(("forward", "backward"), rows):
        tune._add_resource_usage(kernel, torch.bfloat16, [row])
print(json.dumps(rows))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    assert all(0 < r["regs"] <= 255 and r["spill_bytes"] == 0 and r["smem"] > 0 for r in rows)
