"""Tiny random checkpoints, written to disk so the real ``from_pretrained`` paths are exercised.

Used by ``steermoe demo`` and the tests; nothing here is downloaded.
"""
import os

import torch


def build_tiny_whisper(path: str, *, d_model: int = 64, layers: int = 2, heads: int = 4, ffn_dim: int = 128,
                       num_mel_bins: int = 80, vocab_size: int = 96, seed: int = 0) -> str:
    """A random WhisperForConditionalGeneration (+ its feature extractor) saved at ``path``; returns ``path``.

    Full-length positions (1500 encoder frames = 30 s), so it accepts the same inputs as a real Whisper.
    """
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=num_mel_bins, d_model=d_model,
        encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=ffn_dim,
        decoder_layers=1, decoder_attention_heads=heads, decoder_ffn_dim=ffn_dim,
        max_source_positions=1500, max_target_positions=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=[], begin_suppress_tokens=[],
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=num_mel_bins).save_pretrained(path)
    return path
