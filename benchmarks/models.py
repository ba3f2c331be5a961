"""Random frozen models for the encoder and train-step benchmarks, built from configs (nothing downloaded).

CPU: a small Whisper encoder and a tiny Llama, float32. GPU: whisper-large-v3 encoder shapes and a ~1.2B-parameter
Llama, bfloat16. Input batches: random log-mel features for clips of ``seconds`` seconds, either padded to the
batch's longest clip with a mask (variable length) or to Whisper's 30 s window without one.
"""
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .timing import DEVICE

MEL_FRAMES_PER_S = 100
MEL_FRAMES_30S = 3000


@dataclass(frozen=True)
class ModelSetup:
    name: str
    dtype: torch.dtype                 # frozen weights
    seconds: Tuple[int, ...]           # clip lengths of the batch, one per sample
    whisper: Dict[str, int] = field(default_factory=dict)
    llm: Dict[str, int] = field(default_factory=dict)


SETUPS = {
    "cpu": ModelSetup(
        "small (D=128, 2 layers)", torch.float32, (6, 10),
        whisper=dict(d_model=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=512, num_mel_bins=80),
        llm=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128)),
    "cuda": ModelSetup(
        "whisper-large-v3 shapes", torch.bfloat16, (8, 9, 10, 11, 12, 13, 14, 15),
        whisper=dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                     num_mel_bins=128),
        llm=dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=8192, vocab_size=32000)),
}
SETUP = SETUPS[DEVICE.type]


def whisper_encoder(setup: ModelSetup = SETUP):
    """A random, frozen transformers ``WhisperEncoder`` (sdpa attention) on the benchmark device."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(max_source_positions=MEL_FRAMES_30S // 2, **setup.whisper)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        encoder = WhisperEncoder(config).to(setup.dtype)
    return encoder.requires_grad_(False).eval()


def causal_lm(tokenizer, setup: ModelSetup = SETUP):
    """A random, frozen Llama for ``tokenizer`` (a larger vocabulary than the tokenizer's when the setup says so)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = {"vocab_size": len(tokenizer), **setup.llm}
    config = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **dims)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        llm = LlamaForCausalLM(config).to(setup.dtype)
    return llm.requires_grad_(False).eval()


def mel_batch(n_mels: int, *, padded_30s: bool, setup: ModelSetup = SETUP,
              requires_grad: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """(features (B, n_mels, T_mel), mask (B, T_mel) or None): 30 s padding without a mask, or padding to the
    longest clip with one."""
    lengths = torch.tensor(setup.seconds, device=DEVICE) * MEL_FRAMES_PER_S
    frames = MEL_FRAMES_30S if padded_30s else int(lengths.max())
    features = torch.randn(len(setup.seconds), n_mels, frames, device=DEVICE, dtype=setup.dtype,
                           requires_grad=requires_grad)
    mask = None if padded_30s else (torch.arange(frames, device=DEVICE) < lengths[:, None]).long()
    return features, mask
