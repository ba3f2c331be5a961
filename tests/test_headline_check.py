"""The headline correctness check (``python -m benchmarks.headline_check``) at a reduced row count: on CPU the
Triton backend runs in Triton's interpreter, whose persistent backward has INTERPRETER_PROGRAMS programs, so 800
rows give each program more than four row blocks of up to 64 rows and the accumulation across row blocks runs."""
import json

import pytest
import torch

pytest.importorskip("triton")
from benchmarks import headline_check  # noqa: E402

ARGS = ["--batch", "2", "--frames", "400", "--dim", "48", "--experts", "4"]


def test_triton_matches_the_oracle_with_several_row_blocks_per_program(tmp_path, capsys):
    out = tmp_path / "headline-triton.json"
    assert headline_check.main(["--backend", "triton", *ARGS, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["passed"] and result["shape"]["rows"] == 800
    assert min(result["shape"]["row_blocks_per_program"].values()) >= 4
    runs = {(r["dtype"], r["loss"]) for r in result["rows"]}
    assert runs == {(d, loss) for d in ("bf16", "fp16", "fp32") for loss in ("y", "y+gating")}
    tensors = {r["tensor"] for r in result["rows"]}
    assert tensors == {"y", "gating", "dx", "dW", "db", "dV", "ds"}
    assert all(0 <= r["max_error"] <= r["bound"] and r["ok"] for r in result["rows"])
    assert "headline check triton: passed" in capsys.readouterr().out


def test_an_error_over_its_bound_fails_the_check(tmp_path, monkeypatch):
    """A backend whose dW misses one row block's contribution is caught (exit 1, the failing rows marked)."""
    import steermoe.kernels

    shipped = steermoe.kernels.steer_backward

    def dropped_block(grad_y, y, gating, weight, vectors, scale, grad_gating=None):
        dx, dw, db, dv, ds = shipped(grad_y, y, gating, weight, vectors, scale, grad_gating)
        partial = shipped(grad_y[:32], y[:32], gating[:32], weight, vectors, scale,
                          None if grad_gating is None else grad_gating[:32])
        return dx, dw - partial[1], db, dv, ds

    monkeypatch.setattr(steermoe.kernels, "steer_backward", dropped_block)
    out = tmp_path / "headline-triton.json"
    assert headline_check.main(["--backend", "triton", *ARGS, "--dtype", "fp32", "--out", str(out)]) == 1
    result = json.loads(out.read_text())
    assert not result["passed"]
    assert {r["tensor"] for r in result["rows"] if not r["ok"]} == {"dW"}


def test_a_run_that_raises_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    import steermoe.kernels

    shipped = steermoe.kernels.steer_forward

    def no_fp16(x, *args, **kwargs):
        if x.dtype == torch.float16:
            raise RuntimeError("no fp16 here")
        return shipped(x, *args, **kwargs)

    monkeypatch.setattr(steermoe.kernels, "steer_forward", no_fp16)
    out = tmp_path / "headline-triton.json"
    assert headline_check.main(["--backend", "triton", *ARGS, "--dtype", "fp16", "bf16", "--out", str(out)]) == 1
    rows = json.loads(out.read_text())["rows"]
    errors = [r for r in rows if r["tensor"] == "error"]
    assert [(r["dtype"], r["error"]) for r in errors] == [("fp16", "RuntimeError: no fp16 here")] * 2
    assert all(r["ok"] for r in rows if r["dtype"] == "bf16") and len(rows) == 2 + 2 * 7
