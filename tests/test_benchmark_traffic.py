"""The kernels' traffic model: exact bytes on a case computed by hand, never below the roofline's minimum, and the
launchers' grids (design "current": the kernels before the pipelined redesign)."""
import importlib

import pytest

from benchmarks import roofline, traffic
from benchmarks.traffic import CURRENT, GPUS, Launch, Shape

# N = 100, D = 64, E = 2, bf16 x, fp32 parameters, row blocks of 32 → 4 blocks. Per tensor: rows 100·64·2 = 12800,
# gating 100·2·4 = 800, a parameter 2·64·4 = 512, a program's dW + dV partials 2·2·64·4 = 1024, its rows 4096.
SMALL = Shape(rows=100, dim=64, experts=2, elem=2)


def test_forward_by_hand():
    t = traffic.traffic(CURRENT["forward"], SMALL, Launch(block_m=32, programs=4, resident=2))
    # x twice, y, gating; W and V per row block (4 × 512 each); b (2·4) and s (4) per row block
    assert t.l2_bytes == 3 * 12800 + 800 + 2 * 4 * 512 + 4 * 12
    assert t.hbm_bytes == 2 * 12800 + 800 + 2 * 512 + 12          # x once, y, gating, parameters once
    assert t.hbm_overflow == t.hbm_bytes + 12800                   # x's re-read from HBM
    assert t.working_set == 2 * 4096 + 2 * 512 + 12              # 2 resident programs re-read their rows
    assert t.hbm(t.working_set) == t.hbm_bytes and t.hbm(t.working_set - 1) == t.hbm_overflow


def test_backward_by_hand():
    t = traffic.traffic(CURRENT["backward"], SMALL, Launch(block_m=32, programs=3, resident=3))
    rows = 4 * 12800 + 800                      # dy twice, y, dx; gating
    params = 4 * 512 + 4 * 1024 + 3 * 4         # V (sweep 1), V and W (sweep 2) per row block; s per program
    partials = (4 - 3) * 1024 + 4 * 1024 + 3 * 12  # loads but on each program's first block, stores, db/ds
    sums = 3 * 1036 + 1036                       # read P × (2·E·D + E + 1)·4, write one
    assert t.l2_bytes == rows + params + partials + sums
    assert t.hbm_bytes == 3 * 12800 + 800 + (512 + 1024 + 4) + 3 * 1024 + 3 * 12 + sums
    assert t.hbm_overflow == t.hbm_bytes + 12800 + 1024   # dy's re-read and the partials' loads from HBM
    assert t.working_set == 3 * (4096 + 1024) + 4 + 512 + 1024
    with_grad = traffic.traffic(CURRENT["backward"], Shape(100, 64, 2, 2, gating_grad=True), Launch(32, 3, 3))
    assert with_grad.l2_bytes - t.l2_bytes == with_grad.hbm_bytes - t.hbm_bytes == 800


@pytest.mark.parametrize("shape", [SMALL, Shape(24000, 1280, 8, 2), Shape(24000, 1280, 8, 4),
                                   Shape(24000, 1280, 64, 2, 2), Shape(1001, 384, 33, 2, gating_grad=True)])
@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("design", sorted(traffic.DESIGNS))
def test_modelled_bytes_are_at_least_the_minimum(shape, gpu, design):
    for kernel, (c, t) in traffic.design_traffic(design, shape, GPUS[gpu]).items():
        need = roofline.min_bytes({"forward": "fwd", "backward": "bwd"}[kernel], shape.rows, shape.dim,
                                  shape.experts, shape.elem)
        assert need <= t.hbm_bytes <= t.hbm_overflow <= t.l2_bytes, (kernel, need, t)
        if GPUS[gpu].copy_tbps:
            assert traffic.predicted_us(t, GPUS[gpu]) >= need / GPUS[gpu].copy_tbps / 1e6


def test_headline_backward_on_h100():
    """132 persistent programs over 750 row blocks: the repeated V and W loads are 3·E·D·4 per row block."""
    c, t = traffic.design_traffic("current", Shape(24000, 1280, 8, 2), GPUS["H100"])["backward"]
    assert (c.programs, c.resident, c.row_blocks(Shape(24000, 1280, 8, 2))) == (132, 132, 750)
    moved = dict((what, b) for what, _, b in t.terms)
    assert moved["V, sweep 1 (each row block)"] + moved["V and W, sweep 2 (each row block)"] == 750 * 3 * 8 * 1280 * 4
    f, _ = traffic.design_traffic("current", Shape(24000, 1280, 8, 2), GPUS["H100"])["forward"]
    assert (f.programs, f.resident) == (750, 132 * traffic.FORWARD_PER_SM[90])


def test_headline_pipelined_backward_on_h100_uses_64_row_blocks(monkeypatch):
    """On triton >= 3.3 the bf16 backward's 64-row blocks: 375 row blocks over 132 programs, so the partials'
    read-modify-writes and W's loads are half the 32-row design's; the bound moves from L2 to HBM."""
    steer = importlib.import_module("steermoe.kernels.steer")
    shape = Shape(24000, 1280, 8, 2)
    monkeypatch.setattr(steer, "TRITON_VERSION", (3, 9))
    c, t = traffic.design_traffic("pipelined", shape, GPUS["H100"])["backward"]
    assert (c.block_m, c.programs, c.row_blocks(shape)) == (64, 132, 375)
    moved = dict((what, b) for what, _, b in t.terms)
    assert moved["W, sweep 2 (each row block)"] == 375 * 8 * 1280 * 4
    assert t.l2_bytes < t.hbm_bytes / GPUS["H100"].copy_tbps * GPUS["H100"].l2_tbps
    monkeypatch.setattr(steer, "TRITON_VERSION", (3, 2))
    narrow, narrow_t = traffic.design_traffic("pipelined", shape, GPUS["H100"])["backward"]
    assert narrow.block_m == 32 and narrow_t.l2_bytes - t.l2_bytes > 90e6


def test_headline_cuda_launches_on_h100():
    """The CUDA launchers' grids at the headline shape: forward blocks of 4 warps × 4 rows, kept in shared memory;
    backward 5 warps a block (320 column groups of 4), 2 blocks per SM, tiles of 48 rows; W re-read every 2 rows."""
    shape = Shape(24000, 1280, 8, 2)
    launches = traffic.design_traffic("cuda", shape, GPUS["H100"])
    (f, ft), (b, bt) = launches["forward"], launches["backward"]
    assert (f.block_m, f.programs, f.resident) == (16, 1500, 528)
    assert (b.block_m, b.programs, b.resident) == (48, 264, 264)
    moved = dict((what, n) for what, _, n in bt.terms)
    assert moved["W, phase 2 (every 2 rows, no L1 reuse assumed: an upper bound)"] == 500 * 24 * 8 * 1280 * 4
    assert dict((what, n) for what, _, n in ft.terms)["x, pass 2 (from L2 when shared memory cannot keep it)"] == 0


def test_printed_by_roofline(capsys):
    roofline.main([])
    out = capsys.readouterr().out
    assert "Traffic model" in out and "current  backward  H100" in out and "assumed" in out


def test_unknown_kind_is_refused():
    bad = [traffic.Term("x", "streamed", lambda s, c: 1, lambda s, c: 1)]
    with pytest.raises(ValueError, match="kind must be one of"):
        traffic.traffic(bad, SMALL, Launch(32, 1, 1))
