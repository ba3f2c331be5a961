"""Gating statistics and the load-balancing loss on hand-checkable gates and against plain-Python loops."""
import json
import math

import pytest
import torch

from steermoe.analysis import (GatingAccumulator, gating_statistics, load_balancing_loss, router_health,
                              router_z_loss, usage_sums)


def _random_gates(layers, batch, frames, experts, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(batch, frames, experts, generator=g) * 2, -1) for _ in range(layers)]


def _prefix_mask(lengths, frames):
    return (torch.arange(frames)[None] < torch.tensor(lengths)[:, None]).long()


def test_hand_checked_statistics():
    gates = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])
    stats = gating_statistics([gates], torch.tensor([[1, 1, 0]]), layer_ids=[7])
    layer = stats["layers"][0]
    assert stats["num_experts"] == 2 and stats["num_frames"] == 2 and layer["layer"] == 7
    assert layer["usage"] == pytest.approx([0.5, 0.5])
    assert layer["entropy"] == pytest.approx(0.0)
    assert layer["usage_entropy"] == pytest.approx(math.log(2)) and layer["top_share"] == pytest.approx(0.5)
    assert layer["top_experts"] == [0, 1] and layer["top1_share"] == pytest.approx([0.5, 0.5])
    unmasked = gating_statistics([gates])["layers"][0]
    assert unmasked["entropy"] == pytest.approx(math.log(2) / 3)

    collapsed = torch.tensor([[0.0, 0.1, 0.9], [0.0, 0.2, 0.8]])
    layer = gating_statistics([collapsed], top_k=2)["layers"][0]
    assert layer["usage"] == pytest.approx([0.0, 0.15, 0.85]) and layer["top_experts"] == [2, 1]
    assert layer["top_share"] == pytest.approx(0.85)
    assert layer["usage_entropy"] == pytest.approx(-0.15 * math.log(0.15) - 0.85 * math.log(0.85))


def test_router_health_by_hand():
    usage = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    health = router_health(usage)
    assert health["usage_entropy"] == pytest.approx([math.log(4), 0.0, -sum(p * math.log(p) for p in (.1, .2, .3, .4))])
    assert health["top_share"] == pytest.approx([0.25, 1.0, 0.4])
    # usage_sums: gate sums over the real frames only, and their count
    gates = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]], [[0.2, 0.8], [0.9, 0.1], [0.3, 0.7]]])
    sums, frames = usage_sums([gates, gates.flip(-1)], torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert frames.item() == 3 and sums.dtype == torch.float64
    torch.testing.assert_close(sums, torch.tensor([[1.7, 1.3], [1.3, 1.7]], dtype=torch.float64))
    assert usage_sums([gates])[1].item() == 6


def test_statistics_match_plain_loops():
    gates = _random_gates(layers=3, batch=3, frames=11, experts=5, seed=0)
    lengths = [11, 4, 7]
    mask = _prefix_mask(lengths, 11)
    stats = gating_statistics(gates, mask, layer_ids=[2, 5, 9], top_k=5)
    json.dumps(stats)
    real = [(b, t) for b in range(3) for t in range(lengths[b])]
    assert stats["num_frames"] == len(real)
    for layer, g in zip(stats["layers"], gates):
        usage = [sum(float(g[b, t, e]) for b, t in real) / len(real) for e in range(5)]
        entropy = sum(-sum(float(p) * math.log(float(p)) for p in g[b, t]) for b, t in real) / len(real)
        assert layer["usage"] == pytest.approx(usage, rel=1e-9)
        assert layer["entropy"] == pytest.approx(entropy, rel=1e-9)
        assert layer["usage_entropy"] == pytest.approx(-sum(u * math.log(u) for u in usage), rel=1e-9)
        assert layer["top_experts"] == sorted(range(5), key=lambda e: -usage[e])
        wins = [sum(1 for b, t in real if int(g[b, t].argmax()) == e) / len(real) for e in range(5)]
        assert layer["top1_share"] == pytest.approx(wins)


def test_accumulator_over_batches_equals_one_batch():
    first = _random_gates(layers=2, batch=2, frames=6, experts=4, seed=1)
    second = _random_gates(layers=2, batch=3, frames=6, experts=4, seed=2)
    m1, m2 = _prefix_mask([6, 2], 6), _prefix_mask([5, 6, 1], 6)
    acc = GatingAccumulator(layer_ids=[0, 3]).update(first, m1).update(second, m2)
    whole = gating_statistics([torch.cat([a, b]) for a, b in zip(first, second)], torch.cat([m1, m2]),
                              layer_ids=[0, 3])
    got = acc.result()
    assert got["num_frames"] == whole["num_frames"] == 20
    for a, b in zip(got["layers"], whole["layers"]):
        assert a["usage"] == pytest.approx(b["usage"]) and a["entropy"] == pytest.approx(b["entropy"])
        assert a["top_experts"] == b["top_experts"] and a["top1_share"] == pytest.approx(b["top1_share"])


def test_load_balancing_loss_hand_checked():
    balanced = torch.eye(4).repeat(2, 1)                  # 8 frames, each expert wins twice with gate 1
    assert load_balancing_loss([balanced]).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, 4)
    collapsed[:, 1] = 1
    assert load_balancing_loss([collapsed]).item() == pytest.approx(4.0)
    assert load_balancing_loss([balanced, collapsed]).item() == pytest.approx(2.5)
    # padded frames are ignored: the collapsed rows are masked away
    mixed = torch.cat([balanced, collapsed[:5]])[None]
    mask = torch.tensor([[1] * 8 + [0] * 5])
    assert load_balancing_loss([mixed], mask).item() == pytest.approx(1.0)


def test_load_balancing_loss_value_and_gradient_match_loops():
    logits = [torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    for t in logits:
        t.requires_grad_(True)
    gates = [torch.softmax(t, -1) for t in logits]
    lengths = [7, 3]
    mask = _prefix_mask(lengths, 7)
    loss = load_balancing_loss(gates, mask)
    assert loss.dtype == torch.float32 and loss.dim() == 0

    real = [(b, t) for b in range(2) for t in range(lengths[b])]
    expected = 0.0
    for g in gates:
        g = g.detach()
        wins = [sum(1 for b, t in real if int(g[b, t].argmax()) == e) / len(real) for e in range(3)]
        means = [sum(float(g[b, t, e]) for b, t in real) / len(real) for e in range(3)]
        expected += 3 * sum(f * p for f, p in zip(wins, means)) / len(gates)
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    loss.backward()
    for t, g in zip(logits, gates):    # d loss / d gate[b, t, e] = E f_e / (N · L) on real frames, 0 on padding
        g = g.detach()
        wins = torch.tensor([sum(1 for b, s in real if int(g[b, s].argmax()) == e) / len(real) for e in range(3)])
        dgate = mask[..., None] * 3 * wins / (len(real) * len(gates))
        want = g * (dgate - (g * dgate).sum(-1, keepdim=True))
        torch.testing.assert_close(t.grad, want.float(), rtol=1e-5, atol=1e-7)


def test_router_z_loss_by_hand():
    z = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [9.0, 5.0]]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss = router_z_loss([z, 2 * z], mask)             # layer 1: lse = log 2, log 4; layer 2: log 2, log 10
    lse1, lse2 = [math.log(2), math.log(4)], [math.log(2), math.log(10)]
    want = (sum(v * v for v in lse1) / 2 + sum(v * v for v in lse2) / 2) / 2
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    # d/dz_te of (1/L) mean_t lse_t² = 2 lse_t softmax(z_t)_e / (N L), through both layers (the second: z → 2z)
    p1 = [[0.5, 0.5], [0.75, 0.25]]
    p2 = [[0.5, 0.5], [0.9, 0.1]]
    want_grad = torch.zeros(1, 3, 2)
    for t in range(2):
        for e in range(2):
            want_grad[0, t, e] = 2 * lse1[t] * p1[t][e] / 4 + 2 * (2 * lse2[t] * p2[t][e] / 4)
    torch.testing.assert_close(z.grad, want_grad, rtol=1e-5, atol=1e-7)
    assert router_z_loss([torch.full((4, 3), -math.log(3))]).item() == pytest.approx(0.0, abs=1e-12)


def test_router_z_loss_matches_loops():
    logits = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(6)) * 3
    lengths = [5, 2]
    real = [(b, t) for b in range(2) for t in range(lengths[b])]
    want = sum(math.log(sum(math.exp(float(v)) for v in logits[b, t])) ** 2 for b, t in real) / len(real)
    assert router_z_loss([logits], _prefix_mask(lengths, 5)).item() == pytest.approx(want, rel=1e-5)


def test_statistics_of_a_steered_encoder(tmp_path):
    from steermoe import SteeredWhisperEncoder
    from steermoe.demo.tiny_models import build_tiny_whisper

    path = build_tiny_whisper(str(tmp_path / "w"), d_model=32, layers=2, heads=2, ffn_dim=40, num_mel_bins=16)
    enc = SteeredWhisperEncoder.from_pretrained(path, num_experts=3, layers=[1])
    mask = _prefix_mask([20, 9], 20)
    out = enc(torch.randn(2, 16, 20), attention_mask=mask, return_gating=True)
    stats = gating_statistics(out.gating, out.attention_mask, layer_ids=enc.steered_layers)
    assert stats["num_frames"] == 10 + 5 and stats["layers"][0]["layer"] == 1
    assert sum(stats["layers"][0]["usage"]) == pytest.approx(1.0)
    loss = load_balancing_loss(out.gating, out.attention_mask)
    loss.backward()
    assert enc.router_weight.grad.abs().sum() > 0


def test_errors():
    gates = _random_gates(layers=2, batch=2, frames=5, experts=3, seed=5)
    with pytest.raises(TypeError, match="list or tuple"):
        gating_statistics(gates[0])
    with pytest.raises(TypeError, match="list or tuple"):
        load_balancing_loss([])
    with pytest.raises(ValueError, match=r"gating_per_layer\[1\]"):
        gating_statistics([gates[0], gates[1][:, :4]])
    with pytest.raises(ValueError, match=r"mask must have the gating's frame shape \(2, 5\)"):
        gating_statistics(gates, torch.ones(2, 4))
    with pytest.raises(ValueError, match="no real frames"):
        load_balancing_loss(gates, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="no real frames for the router z-loss"):
        router_z_loss(gates, torch.zeros(2, 5))
    with pytest.raises(TypeError, match="list or tuple"):
        router_z_loss(gates[0])
    with pytest.raises(ValueError, match="no real frames"):
        gating_statistics(gates, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="layer_ids"):
        gating_statistics(gates, layer_ids=[1])
    with pytest.raises(ValueError, match="earlier updates"):
        GatingAccumulator().update(gates).update(gates[:1])
    with pytest.raises(ValueError, match="top_k"):
        GatingAccumulator(top_k=0)
