"""Encoder level: forward+backward of a frozen Whisper encoder, unsteered vs steered (the overhead of steering
every layer, with each layer's last residual add fused into the steering op, and unfused: the layer's own forward,
then the op), and steered on variable-length input vs 30 s padding (:mod:`benchmarks.models` for the shapes); and
encoding (forward, no gradients) one 5 s clip with and without 30 s padding.

Gradients are taken for the input features (so the unsteered encoder runs the same backward through every layer)
and, when steered, for the steering parameters.
"""
import dataclasses

import pytest
import torch

from benchmarks.impls import DTYPE_NAMES
from benchmarks.models import SETUP, mel_batch, whisper_encoder
from benchmarks.timing import measure

pytest.importorskip("steermoe.encoder", reason="steermoe.encoder (SteeredWhisperEncoder) is not available")

VARIANTS = ("unsteered, 30 s", "steered, 30 s", "steered unfused, 30 s", "steered, variable")


@pytest.fixture(scope="module")
def steered():
    """A SteeredWhisperEncoder around a random frozen WhisperEncoder (``.encoder`` is the unsteered one)."""
    from steermoe import SteeredWhisperEncoder

    return SteeredWhisperEncoder(whisper_encoder(), num_experts=8)


@pytest.mark.parametrize("variant", VARIANTS)
def test_encoder_step(benchmark, results, steered, variant):
    features, mask = mel_batch(steered.config.num_mel_bins, padded_30s=variant.endswith("30 s"), requires_grad=True)
    if variant == "unsteered, 30 s":
        model, params = steered.encoder, [features]
    else:
        model, params = steered, [features] + [p for p in steered.parameters() if p.requires_grad]
    kwargs = {} if mask is None else {"attention_mask": mask}
    batch, _, mel_frames = features.shape
    grad_out = torch.randn(batch, mel_frames // 2, steered.config.d_model, device=features.device,
                           dtype=features.dtype)

    def step(_):
        return torch.autograd.grad(model(features, **kwargs).last_hidden_state, params, grad_out)

    benchmark.group = f"encoder {SETUP.name}"
    steered.fuse_residual = "unfused" not in variant
    try:
        ms = measure(benchmark, step, rounds=1, min_reps=3, budget_s=0.3)
    finally:
        steered.fuse_residual = True
    results.add("encoder", dict(config=SETUP.name, variant=variant, batch=batch, mel_frames=mel_frames,
                                dtype=DTYPE_NAMES[SETUP.dtype], ms=ms), benchmark)


CLIP_SECONDS = 5


@pytest.mark.parametrize("padding", ("30 s", "none"))
def test_encode_short_clip(benchmark, results, steered, padding):
    setup = dataclasses.replace(SETUP, seconds=(CLIP_SECONDS,))
    features, mask = mel_batch(steered.config.num_mel_bins, padded_30s=padding == "30 s", setup=setup)
    kwargs = {} if mask is None else {"attention_mask": mask}

    def encode(_):
        with torch.no_grad():
            return steered(features, **kwargs).last_hidden_state

    benchmark.group = f"encode one {CLIP_SECONDS} s clip, {SETUP.name}"
    ms = measure(benchmark, encode, rounds=1, min_reps=3, budget_s=0.3)
    results.add("clip", dict(config=SETUP.name, seconds=CLIP_SECONDS, padding=padding, mel_frames=features.shape[-1],
                             dtype=DTYPE_NAMES[SETUP.dtype], ms=ms), benchmark)
