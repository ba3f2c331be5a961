"""Encoder level: forward+backward of a frozen Whisper encoder, unsteered vs steered (the overhead of steering
every layer), and steered on variable-length input vs 30 s padding.

Random weights built from a ``WhisperConfig`` (no hub): a small config on CPU, whisper-large-v3 shapes in bf16 on a
GPU. Gradients are taken for the input features (so the unsteered encoder runs the same backward through every
layer) and, when steered, for the steering parameters.
"""
from dataclasses import dataclass, field
from typing import Dict, Tuple

import pytest
import torch

from benchmarks.impls import DTYPE_NAMES
from benchmarks.timing import DEVICE, measure

pytest.importorskip("steermoe.encoder", reason="steermoe.encoder (SteeredWhisperEncoder) is not available")

MEL_FRAMES_PER_S = 100
MEL_FRAMES_30S = 3000


@dataclass(frozen=True)
class EncoderSetup:
    name: str
    dtype: torch.dtype
    seconds: Tuple[int, ...]           # clip lengths of the variable-length batch, one per sample
    dims: Dict[str, int] = field(default_factory=dict)


SETUPS = {
    "cpu": EncoderSetup("small (D=128, 2 layers)", torch.float32, (6, 10), dict(
        d_model=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=512, num_mel_bins=80)),
    "cuda": EncoderSetup("whisper-large-v3 shapes", torch.bfloat16, (8, 9, 10, 11, 12, 13, 14, 15), dict(
        d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128)),
}
VARIANTS = ("unsteered, 30 s", "steered, 30 s", "steered, variable")


@pytest.fixture(scope="module")
def encoders():
    """(setup, SteeredWhisperEncoder around a random frozen WhisperEncoder) for this device."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from steermoe import SteeredWhisperEncoder

    setup = SETUPS[DEVICE.type]
    config = WhisperConfig(max_source_positions=MEL_FRAMES_30S // 2, **setup.dims)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        encoder = WhisperEncoder(config).to(setup.dtype)
    return setup, SteeredWhisperEncoder(encoder, num_experts=8)


@pytest.mark.parametrize("variant", VARIANTS)
def test_encoder_step(benchmark, results, encoders, variant):
    setup, steered = encoders
    batch = len(setup.seconds)
    lengths = torch.tensor(setup.seconds, device=DEVICE) * MEL_FRAMES_PER_S
    mel_frames = int(lengths.max()) if variant == "steered, variable" else MEL_FRAMES_30S
    features = torch.randn(batch, steered.config.num_mel_bins, mel_frames, device=DEVICE, dtype=setup.dtype,
                           requires_grad=True)
    if variant == "unsteered, 30 s":
        model, kwargs, params = steered.encoder, {}, [features]
    else:
        params = [features] + [p for p in steered.parameters() if p.requires_grad]
        mask = (torch.arange(mel_frames, device=DEVICE) < lengths[:, None]).long()
        model, kwargs = steered, ({"attention_mask": mask} if variant == "steered, variable" else {})
    grad_out = torch.randn(batch, mel_frames // 2, steered.config.d_model, device=DEVICE, dtype=setup.dtype)

    def step(_):
        return torch.autograd.grad(model(features, **kwargs).last_hidden_state, params, grad_out)

    benchmark.group = f"encoder {setup.name}"
    ms = measure(benchmark, step, rounds=1, min_reps=3, budget_s=0.3)
    results.add("encoder", dict(config=setup.name, variant=variant, batch=batch, mel_frames=mel_frames,
                                dtype=DTYPE_NAMES[setup.dtype], ms=ms), benchmark)
