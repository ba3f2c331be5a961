"""SteeredWhisperEncoder against transformers' own encoder and an independent float64 re-implementation."""
import copy
import functools
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from steermoe import SteeredWhisperEncoder
from steermoe.demo.tiny_models import build_tiny_whisper

N_MELS = 32
D_MODEL = 48
N_LAYERS = 3
HEADS = 3


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_whisper(str(tmp_path_factory.mktemp("tiny_whisper")), d_model=D_MODEL, layers=N_LAYERS,
                              heads=HEADS, ffn_dim=80, num_mel_bins=N_MELS, seed=3)


def _randomise_steering(enc, seed, vector_std=1.0, scale=0.7):
    """Make the steering large enough to change every output noticeably."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        enc.router_weight.copy_(torch.randn(enc.router_weight.shape, generator=g))
        enc.router_bias.copy_(torch.randn(enc.router_bias.shape, generator=g))
        enc.steering_vectors.copy_(torch.randn(enc.steering_vectors.shape, generator=g) * vector_std)
        enc.layer_scales.copy_(scale + torch.rand(enc.layer_scales.shape, generator=g))
    return enc


# ------------------------------------------------------------------ independent float64 reference
def _linear(x, lin):
    return F.linear(x, lin.weight.double(), None if lin.bias is None else lin.bias.double())


def _layer_norm(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight.double(), ln.bias.double(), ln.eps)


def _whisper_layer64(layer, h, key_mask):
    """One pre-norm Whisper encoder layer written out in float64; key_mask (B, T) bool or None."""
    b, t, d = h.shape
    heads = layer.self_attn.num_heads
    x = _layer_norm(h, layer.self_attn_layer_norm)
    q = _linear(x, layer.self_attn.q_proj).view(b, t, heads, -1).transpose(1, 2)
    k = _linear(x, layer.self_attn.k_proj).view(b, t, heads, -1).transpose(1, 2)
    v = _linear(x, layer.self_attn.v_proj).view(b, t, heads, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
    h = h + _linear(att, layer.self_attn.out_proj)
    x = _layer_norm(h, layer.final_layer_norm)
    return h + _linear(F.gelu(_linear(x, layer.fc1)), layer.fc2)


def _reference64(enc, features):
    """Steered forward of one unpadded sample batch in float64: (output (B, T_out, D), gates per steered layer,
    router logits per steered layer)."""
    whisper = enc.encoder
    x = features.double()
    h = F.gelu(F.conv1d(x, whisper.conv1.weight.double(), whisper.conv1.bias.double(), padding=1))
    h = F.gelu(F.conv1d(h, whisper.conv2.weight.double(), whisper.conv2.bias.double(), stride=2, padding=1))
    h = h.transpose(1, 2) + whisper.embed_positions.weight.double()[: h.shape[-1]]
    gates, logits = [], []
    for idx, layer in enumerate(whisper.layers):
        h = _whisper_layer64(layer, h, None)
        if idx in enc.steered_layers:
            r = enc.steered_layers.index(idx)
            logits.append(h @ enc.router_weight[r].double().t() + enc.router_bias[r].double())
            g = torch.softmax(logits[-1], -1)
            h = h + enc.layer_scales[r].double() * (g @ enc.steering_vectors[r].double())
            gates.append(g)
    return _layer_norm(h, whisper.layer_norm), gates, logits


# ----------------------------------------------------------------------------------------- tests
def test_lazy_import_and_trainable_parameters(tiny_path):
    import steermoe.encoder

    assert SteeredWhisperEncoder is steermoe.encoder.SteeredWhisperEncoder
    enc = SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=5, steering_scale=0.25, layers=[2, 0])
    trainable = {n: p for n, p in enc.named_parameters() if p.requires_grad}
    assert sorted(trainable) == ["layer_scales", "router_bias", "router_weight", "steering_vectors"]
    assert enc.steered_layers == [0, 2] and enc.num_experts == 5 and enc.hidden_size == D_MODEL
    assert enc.router_weight.shape == (2, 5, D_MODEL) and enc.router_bias.shape == (2, 5)
    assert enc.steering_vectors.shape == (2, 5, D_MODEL) and torch.all(enc.layer_scales == 0.25)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    bound = 1 / math.sqrt(D_MODEL)
    assert enc.router_weight.abs().max() <= bound and enc.router_bias.abs().max() <= bound
    assert 0.005 < enc.steering_vectors.std().item() < 0.02
    enc.train()
    assert enc.training and not enc.encoder.training
    assert not any(m.training for m in enc.encoder.modules())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as inside a from_pretrained(dtype=...) context
    try:
        wrapped = SteeredWhisperEncoder(enc.encoder, num_experts=2)
    finally:
        torch.set_default_dtype(default)
    assert all(p.dtype == torch.float32 for p in wrapped.parameters() if p.requires_grad)


def test_identity_equals_transformers_on_30s_input(tiny_path):
    from transformers import WhisperForConditionalGeneration

    hf = WhisperForConditionalGeneration.from_pretrained(tiny_path).model.encoder.eval()
    enc = SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=4, steering_scale=0.0)
    _randomise_steering(enc, seed=1, scale=0.0)
    enc.layer_scales.data.zero_()
    x = torch.randn(2, N_MELS, enc.max_mel_frames)
    assert enc.max_mel_frames == 3000
    with torch.no_grad():
        want = hf(x, output_hidden_states=True)
        got = enc(x, output_hidden_states=True)
    assert got.last_hidden_state.shape == (2, 1500, D_MODEL)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-6, atol=1e-6)
    assert len(got.hidden_states) == len(want.hidden_states) == N_LAYERS + 1
    for a, b in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # at the full window a padding mask is ignored, as Whisper's encoder ignores it (generate() passes one) ...
    padded = torch.ones(2, 3000, dtype=torch.long)
    padded[1, 1200:] = 0
    full = enc(x, attention_mask=padded, return_dict=False)
    assert len(full) == 1
    torch.testing.assert_close(full[0], want.last_hidden_state, rtol=1e-6, atol=1e-6)
    # ... unless asked for: then the padded sample gets its output alone
    with torch.no_grad():
        masked = enc(x, attention_mask=padded, mask_padding=True)
        alone = enc(x[1:, :, :1200]).last_hidden_state
    assert masked.attention_mask.sum(-1).tolist() == [1500, 600]
    torch.testing.assert_close(masked.last_hidden_state[1, :600], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked.last_hidden_state[0], want.last_hidden_state[0], rtol=1e-6, atol=1e-6)


def test_generate_after_swap(tiny_path):
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tiny_path).eval()
    model.generation_config.suppress_tokens = None  # an empty list trips transformers 4.x's Whisper generate
    model.generation_config.begin_suppress_tokens = None
    x = torch.randn(2, N_MELS, 3000)
    padded = torch.ones(2, 3000, dtype=torch.long)  # what the processor's return_attention_mask=True gives
    padded[1, 1100:] = 0
    kwargs = dict(attention_mask=padded, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                  output_scores=True)
    want = model.generate(x, **kwargs)
    enc = SteeredWhisperEncoder(model.model.encoder, num_experts=3, steering_scale=0.0)
    model.model.encoder = enc
    got = model.generate(x, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    _randomise_steering(enc, seed=2, vector_std=3.0, scale=2.0)
    steered = model.generate(x, **kwargs)
    assert not torch.allclose(steered.scores[0], want.scores[0], atol=1e-3)
    # the training forward of the whole model runs through the swapped encoder too
    model.model.decoder.requires_grad_(False)
    model.proj_out.requires_grad_(False)
    model(x, labels=torch.tensor([[3, 4, 5], [6, 7, 2]])).loss.backward()
    assert all(getattr(enc, n).grad.abs().sum() > 0 for n in ("router_weight", "steering_vectors", "layer_scales"))
    model.freeze_encoder()
    assert not any(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_output_attentions_like_transformers(tiny_path, attn):
    """Attention weights as transformers' encoder returns them (per layer from eager attention; from sdpa none in
    transformers 5, eager's in 4); also through gradient checkpointing, and with a masked padded batch (zero
    weight on padded keys)."""
    from transformers import WhisperForConditionalGeneration

    hf = WhisperForConditionalGeneration.from_pretrained(tiny_path, attn_implementation=attn).model.encoder.eval()
    enc = SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=2, steering_scale=0.0,
                                                attn_implementation=attn)
    x = torch.randn(2, N_MELS, 3000)
    with torch.no_grad():
        want, got = hf(x, output_attentions=True), enc(x, output_attentions=True)
    assert len(got.attentions) == len(want.attentions)   # sdpa: none in transformers 5, eager's in 4
    assert len(got.attentions) == N_LAYERS or attn == "sdpa"
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert enc(x).attentions is None
    if attn == "eager":
        enc.gradient_checkpointing_enable()
        enc.train()
        mask = torch.ones(2, 40, dtype=torch.long)
        mask[1, 30:] = 0
        out = enc(x[..., :40], attention_mask=mask, output_attentions=True)
        out.last_hidden_state.sum().backward()
        assert len(out.attentions) == N_LAYERS and out.attentions[0].shape == (2, HEADS, 20, 20)
        assert torch.all(out.attentions[-1][1, :, :, 15:] == 0) and enc.router_weight.grad is not None


def test_steering_matches_float64_reference(tiny_path):
    enc = _randomise_steering(
        SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=5, layers=[0, 2]), seed=4)
    x = torch.randn(2, N_MELS, 37)
    out = enc(x, return_gating=True, output_hidden_states=True)
    want, gates, _ = _reference64(enc, x)
    assert out.last_hidden_state.shape == (2, 19, D_MODEL)
    torch.testing.assert_close(out.last_hidden_state.double(), want, rtol=1e-5, atol=1e-5)
    assert len(out.gating) == 2
    for g, ref in zip(out.gating, gates):
        assert g.dtype == torch.float32 and g.shape == (2, 19, 5)
        torch.testing.assert_close(g.double(), ref, rtol=1e-5, atol=1e-5)
    unsteered = SteeredWhisperEncoder(enc.encoder, num_experts=5, steering_scale=0.0)(x).last_hidden_state
    assert (unsteered - out.last_hidden_state).abs().max() > 1e-2
    assert out.router_logits is None


def test_router_logits_and_their_z_loss_gradient_match_float64_reference(tiny_path):
    from steermoe.analysis import router_z_loss

    enc = _randomise_steering(
        SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=5, layers=[0, 2]), seed=5)
    x = torch.randn(2, N_MELS, 37)
    out = enc(x, return_gating=True, return_router_logits=True)
    _, gates, logits = _reference64(enc, x)
    for z, g, ref in zip(out.router_logits, out.gating, logits):
        assert z.dtype == torch.float32 and z.shape == (2, 19, 5)
        torch.testing.assert_close(z.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.softmax(z, -1), g, rtol=1e-5, atol=1e-6)
    router_z_loss(out.router_logits).backward()       # the z-loss reaches W and b through the logits
    got = enc.router_weight.grad.clone(), enc.router_bias.grad.clone()
    enc.zero_grad()
    _, _, logits = _reference64(enc, x)
    torch.stack([torch.logsumexp(z, -1).square().mean() for z in logits]).mean().backward()
    for a, b in zip(got, (enc.router_weight.grad, enc.router_bias.grad)):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch_equals_each_sample_alone(tiny_path, attn):
    enc = _randomise_steering(SteeredWhisperEncoder.from_pretrained(
        tiny_path, num_experts=4, layers=[1, 2], attn_implementation=attn), seed=5)
    assert enc.config._attn_implementation == attn
    lengths = [45, 30, 9]
    x = torch.randn(3, N_MELS, 45)
    mask = (torch.arange(45)[None] < torch.tensor(lengths)[:, None]).long()
    x[1, :, 30:], x[2, :, 9:] = float("nan"), float("-inf")  # padding's content must not matter
    with torch.no_grad():
        out = enc(x, attention_mask=mask, return_gating=True)
    out_lengths = enc.output_lengths(torch.tensor(lengths))
    assert out_lengths.tolist() == [(n - 1) // 2 + 1 for n in lengths]
    assert torch.equal(out.attention_mask.sum(-1), out_lengths) and out.attention_mask.dtype == torch.long
    for i, n in enumerate(lengths):
        m = int(out_lengths[i])
        with torch.no_grad():
            alone = enc(x[i:i + 1, :, :n], return_gating=True)
        assert alone.last_hidden_state.shape[1] == m
        torch.testing.assert_close(out.last_hidden_state[i, :m], alone.last_hidden_state[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.gating[1][i, :m], alone.gating[1][0], rtol=1e-5, atol=1e-5)
        assert torch.all(out.last_hidden_state[i, m:] == 0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_every_steering_tensor(tiny_path, checkpointing):
    enc = _randomise_steering(
        SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=3, layers=[0, 1]), seed=6, vector_std=0.3)
    if checkpointing:
        enc.gradient_checkpointing_enable()
    enc.train()
    calls = [0] * N_LAYERS
    for i, layer in enumerate(enc.encoder.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    x = torch.randn(2, N_MELS, 25)
    weights = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    (enc(x).last_hidden_state.double() * weights).sum().backward()

    ref = copy.deepcopy(enc)
    for p in ref.parameters():
        p.grad = None
    ref_out, _, _ = _reference64(ref, x)
    (ref_out * weights).sum().backward()
    for name in ("router_weight", "router_bias", "steering_vectors", "layer_scales"):
        grad = getattr(enc, name).grad
        assert grad is not None and torch.all(grad.reshape(2, -1).abs().sum(-1) > 0), name
        want = getattr(ref, name).grad.double()
        torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    assert all(p.grad is None for p in enc.encoder.parameters())
    # layer 0 sees no trainable input, so only layers 1 and 2 are recomputed in backward
    assert calls == ([1, 2, 2] if checkpointing else [1, 1, 1])


def test_save_load_round_trip(tiny_path, tmp_path):
    enc = _randomise_steering(SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=4, layers=[1, 2]), seed=7)
    enc.save_steering(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["steering.safetensors", "steering_config.json"]
    other = SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=4, layers=[1, 2])
    x = torch.randn(1, N_MELS, 21)
    assert not torch.allclose(other(x).last_hidden_state, enc(x).last_hidden_state)
    other.load_steering(str(tmp_path))
    for name in ("router_weight", "router_bias", "steering_vectors", "layer_scales"):
        assert torch.equal(getattr(other, name), getattr(enc, name))
    torch.testing.assert_close(other(x).last_hidden_state, enc(x).last_hidden_state)
    import json
    config = json.loads((tmp_path / "steering_config.json").read_text())
    assert config["num_experts"] == 4 and config["steered_layers"] == [1, 2] and config["hidden_size"] == D_MODEL
    assert config["source"] == tiny_path


def test_mismatched_load_names_both_shapes(tiny_path, tmp_path_factory):
    src = tmp_path_factory.mktemp("steer_src")
    SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=4, layers=[1, 2]).save_steering(str(src))
    wider = tmp_path_factory.mktemp("tiny_wide")
    build_tiny_whisper(str(wider), d_model=32, layers=N_LAYERS, heads=2, ffn_dim=40, num_mel_bins=N_MELS)
    cases = [
        (SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=6, layers=[1, 2]), (2, 4, 48), (2, 6, 48)),
        (SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=4), (2, 4, 48), (3, 4, 48)),
        (SteeredWhisperEncoder.from_pretrained(str(wider), num_experts=4, layers=[1, 2]), (2, 4, 48), (2, 4, 32)),
    ]
    for enc, theirs, ours in cases:
        with pytest.raises(ValueError) as err:
            enc.load_steering(str(src))
        assert str(theirs) in str(err.value) and str(ours) in str(err.value)
    with pytest.raises(ValueError, match=r"\[1, 2\].*\[0, 2\]"):
        SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=4, layers=[0, 2]).load_steering(str(src))


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16"])
def test_half_precision_encoder(tiny_path, dtype):
    half = _randomise_steering(SteeredWhisperEncoder.from_pretrained(
        tiny_path, num_experts=3, dtype=dtype), seed=8, vector_std=0.5)
    full = SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=3)
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    expected_dtype = torch.bfloat16 if dtype is torch.bfloat16 else torch.float16
    assert half.conv1.weight.dtype == expected_dtype and half.router_weight.dtype == torch.float32
    x = torch.randn(2, N_MELS, 31)
    mask = torch.ones(2, 31, dtype=torch.long)
    mask[1, 20:] = 0
    out = half(x, attention_mask=mask, return_gating=True)
    assert out.last_hidden_state.dtype == expected_dtype and out.gating[0].dtype == torch.float32
    want = full(x, attention_mask=mask).last_hidden_state
    tol = 1e-1 if dtype is torch.bfloat16 else 2e-2
    torch.testing.assert_close(out.last_hidden_state.float(), want, rtol=tol, atol=tol)
    out.last_hidden_state.float().square().sum().backward()
    assert all(torch.isfinite(getattr(half, n).grad).all() and getattr(half, n).grad.dtype == torch.float32
               for n in ("router_weight", "router_bias", "steering_vectors", "layer_scales"))


def test_from_pretrained_reads_only_encoder_tensors(tiny_path, tmp_path):
    """Sharded safetensors with the decoder shards deleted, an encoder-only bf16 file, and a .bin checkpoint."""
    from safetensors.torch import save_file
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tiny_path)
    reference = SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=2, steering_scale=0.0)
    x = torch.randn(1, N_MELS, 17)
    want = reference(x).last_hidden_state

    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="40KB")
    import json
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    encoder_files = {f for k, f in weight_map.items() if k.startswith("model.encoder.")}
    decoder_only = set(weight_map.values()) - encoder_files
    assert decoder_only, "the shard size should split encoder and decoder"
    for name in decoder_only:
        (sharded / name).unlink()
    torch.testing.assert_close(SteeredWhisperEncoder.from_pretrained(
        str(sharded), num_experts=2, steering_scale=0.0)(x).last_hidden_state, want)

    bare = tmp_path / "encoder_only"
    model.config.save_pretrained(str(bare))
    save_file({f"encoder.{k}": v.to(torch.bfloat16).contiguous()
               for k, v in model.model.encoder.state_dict().items()}, str(bare / "model.safetensors"))
    enc = SteeredWhisperEncoder.from_pretrained(str(bare), num_experts=2, steering_scale=0.0, torch_dtype="auto")
    assert enc.conv1.weight.dtype == torch.bfloat16

    pickled = tmp_path / "bin"
    model.config.save_pretrained(str(pickled))
    torch.save(model.state_dict(), str(pickled / "pytorch_model.bin"))
    torch.testing.assert_close(SteeredWhisperEncoder.from_pretrained(
        str(pickled), num_experts=2, steering_scale=0.0)(x).last_hidden_state, want)

    empty = tmp_path / "no_weights"
    model.config.save_pretrained(str(empty))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SteeredWhisperEncoder.from_pretrained(str(empty), num_experts=2)


def test_argument_errors(tiny_path):
    enc = SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=2)
    with pytest.raises(ValueError, match="layers"):
        SteeredWhisperEncoder(enc.encoder, layers=[N_LAYERS])
    with pytest.raises(ValueError, match="num_experts"):
        SteeredWhisperEncoder(enc.encoder, num_experts=0)
    with pytest.raises(TypeError, match="WhisperEncoder"):
        SteeredWhisperEncoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"\(B, 32, T_mel\)"):
        enc(torch.randn(1, N_MELS + 1, 10))
    with pytest.raises(ValueError, match="3000"):
        enc(torch.randn(1, N_MELS, 3001))
    with pytest.raises(ValueError, match=r"\(1, 10\)"):
        enc(torch.randn(1, N_MELS, 10), attention_mask=torch.ones(1, 9))
    with pytest.raises(ValueError, match="right padding"):
        enc(torch.randn(1, N_MELS, 10), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"layers .*\[0, 1\.7\]"):
        SteeredWhisperEncoder(enc.encoder, layers=(i for i in (0, 1.7)))
    with pytest.raises(ValueError, match="num_experts"):
        SteeredWhisperEncoder(enc.encoder, num_experts=2.0)
    assert SteeredWhisperEncoder(enc.encoder, num_experts=np.int64(3), layers=[np.int64(1)]).num_experts == 3
    with pytest.raises(ValueError, match="at least one sample"):
        enc(torch.randn(0, N_MELS, 10))
    with pytest.raises(TypeError, match="not both"):
        SteeredWhisperEncoder.from_pretrained(tiny_path, dtype=torch.float16, torch_dtype=torch.float16)
    with pytest.raises(ValueError, match="attn_implementation"):
        SteeredWhisperEncoder.from_pretrained(tiny_path, attn_implementation="flash_attention_2")
    with pytest.raises(TypeError, match="device_map"):
        SteeredWhisperEncoder.from_pretrained(tiny_path, device_map="auto")
    with pytest.raises(ValueError, match="dtype"):
        SteeredWhisperEncoder.from_pretrained(tiny_path, torch_dtype=torch.int8)


# ----------------------------------------------------------------------------------- fused residual add
_STEERING = ("router_weight", "router_bias", "steering_vectors", "layer_scales")


@pytest.fixture
def layer_calls(monkeypatch):
    """Counts of the calls to WhisperEncoderLayer.forward and to the fused path's _layer_halves."""
    import steermoe.encoder
    from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

    calls = {"forward": 0, "halves": 0}

    def counted(key, fn):
        @functools.wraps(fn)  # keeps the signature the encoder inspects
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(WhisperEncoderLayer, "forward", counted("forward", WhisperEncoderLayer.forward))
    monkeypatch.setattr(steermoe.encoder, "_layer_halves", counted("halves", steermoe.encoder._layer_halves))
    return calls


def _outputs_and_grads(enc, x, mask):
    out = enc(x, attention_mask=mask, return_gating=True, output_hidden_states=True)
    weights = torch.randn(out.last_hidden_state.shape, generator=torch.Generator().manual_seed(0))
    loss = (out.last_hidden_state.float() * weights).sum() + sum((g * g).sum() for g in out.gating)
    grads = torch.autograd.grad(loss, [getattr(enc, n) for n in _STEERING])
    return [out.last_hidden_state, *out.hidden_states, *out.gating, *grads]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_residual_matches_unfused(tiny_path, layer_calls, dtype, masked, checkpointing):
    """Steered layers hand their last residual add to the steering op: the outputs, hidden states, gates and the
    steering gradients (a loss on the gates too) equal those of each layer's own forward followed by the step."""
    enc = _randomise_steering(SteeredWhisperEncoder.from_pretrained(
        tiny_path, num_experts=4, layers=[0, 2], dtype=dtype), seed=9, vector_std=0.5)
    if checkpointing:
        enc.gradient_checkpointing_enable()
    x = torch.randn(2, N_MELS, 31)
    mask = None
    if masked:
        mask = torch.ones(2, 31, dtype=torch.long)
        mask[1, 20:] = 0
    fused = _outputs_and_grads(enc, x, mask)
    # layer 1 runs its own forward; layer 2 (input requires grad) is recomputed in backward when checkpointing
    assert layer_calls == {"forward": 2 if checkpointing else 1, "halves": 3 if checkpointing else 2}
    enc.fuse_residual = False
    unfused = _outputs_and_grads(enc, x, mask)
    assert layer_calls["halves"] == (3 if checkpointing else 2)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8
    for a, b in zip(fused, unfused, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def _subclassed(enc):
    from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

    enc.encoder.layers[0].__class__ = type("Layer", (WhisperEncoderLayer,), {})


FALLBACKS = {  # (change to the encoder, forward kwargs): each steered layer runs its own forward
    "subclassed-layer": (_subclassed, {}),
    "hooked-layer": (lambda enc: enc.encoder.layers[0].register_forward_hook(lambda *_: None), {}),
    "instance-forward": (lambda enc: setattr(enc.encoder.layers[0], "forward", enc.encoder.layers[0].forward), {}),
    "layer-in-train-mode": (lambda enc: enc.encoder.layers[0].train(), {}),
    "output-attentions": (lambda enc: None, {"output_attentions": True}),
    "float16": (lambda enc: enc.encoder.half(), {}),
    "switched-off": (lambda enc: setattr(enc, "fuse_residual", False), {}),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_fused_residual_falls_back_to_the_layer(tiny_path, layer_calls, name):
    """Where the fused halves might not compute what the layer does (its class, hooks or mode changed, the
    attention weights wanted, float16's clamp after the add) the layer's own forward runs."""
    change, kwargs = FALLBACKS[name]
    enc = _randomise_steering(SteeredWhisperEncoder.from_pretrained(tiny_path, num_experts=2, layers=[0]), seed=10)
    change(enc)
    with torch.no_grad():
        enc(torch.randn(1, N_MELS, 21), **kwargs)
    assert layer_calls == {"forward": N_LAYERS, "halves": 0}
