"""The launch-configuration tuner runs end to end (on CPU through Triton's interpreter, at a tiny shape)."""
import json

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
    assert len(forward) == 1 + 2 and len(backward) == 1 + 4          # the shipped config, then the grid
    assert sum(r["shipped"] for r in rows) == 2
    assert all(r["error"] is None and r["us"] > 0 and r["copy_pct"] > 0 for r in rows)
    assert {r["config"]["programs_per_sm"] for r in backward} == {1, 2}
    assert [r["us"] for r in forward] == sorted(r["us"] for r in forward)   # fastest first
    printed = capsys.readouterr().out
    assert "forward (shipped)" in printed and "backward (shipped)" in printed


def test_a_candidate_with_other_outputs_is_rejected():
    a = torch.randn(50, 7)
    assert tune._close((a, a[:, 0]), (a + 1e-5, a[:, 0]))
    assert not tune._close((a, a[:, 0]), (a, a[:, 0] * 1.1))
