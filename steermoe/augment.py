"""SpecAugment-style masking of log-mel features for training (Park et al., 2019: time and frequency masks).

    features = spec_augment(features, mask, time_masks=2, time_width=20, freq_masks=2, freq_width=15,
                            generator=augment_generator(seed, step, rank, micro_batch))

Each utterance gets ``time_masks`` bands of ``0..time_width`` consecutive real frames (at most
:data:`MAX_TIME_FRACTION` of its length each) and ``freq_masks`` bands of ``0..freq_width`` mel bins, set to the
utterance's mean log-mel value (over its real frames); padding frames are left as they are. The draws come from
``generator`` on the CPU, so a seeded generator makes the masks independent of the device.
"""
from typing import Optional

import numpy as np
import torch
from torch import Tensor

MAX_TIME_FRACTION = 0.2   # SpecAugment's p: one time mask covers at most this fraction of an utterance


def augment_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from the integers ``key`` (e.g. seed, step, rank, micro-batch): the same masks
    for the same key, so a resumed run masks its steps as the uninterrupted run would."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1))


def _bands(count: int, max_width: Tensor, size: Tensor, extent: int, generator: torch.Generator) -> Tensor:
    """(B, extent) bool: ``count`` bands per row, each of a uniform width in [0, max_width] inside [0, size)."""
    hit = torch.zeros(max_width.shape[0], extent, dtype=torch.bool)
    position = torch.arange(extent)
    for _ in range(count):
        width = (torch.rand(max_width.shape, generator=generator) * (max_width + 1)).long()
        start = (torch.rand(size.shape, generator=generator) * (size - width + 1).clamp(min=1)).long()
        hit |= (position >= start[:, None]) & (position < (start + width)[:, None])
    return hit


def spec_augment(features: Tensor, mask: Optional[Tensor] = None, *, time_masks: int = 0, time_width: int = 0,
                 freq_masks: int = 0, freq_width: int = 0, generator: Optional[torch.Generator] = None) -> Tensor:
    """``features`` (B, n_mels, T) with time and frequency bands set to each utterance's mean; a new tensor.

    ``mask``: (B, T), 1 = real frame (None: all real). Widths are in frames (10 ms) and mel bins; zero masks or
    zero widths return ``features`` unchanged.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (B, n_mels, T); got shape {tuple(features.shape)}")
    for name, value in (("time_masks", time_masks), ("time_width", time_width), ("freq_masks", freq_masks),
                        ("freq_width", freq_width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0; got {value!r}")
    if (time_masks == 0 or time_width == 0) and (freq_masks == 0 or freq_width == 0):
        return features
    batch, n_mels, frames = features.shape
    real = torch.ones(batch, frames, dtype=torch.bool, device=features.device) if mask is None else mask.bool()
    lengths = real.sum(1).cpu()
    generator = generator if generator is not None else torch.default_generator
    max_time = torch.minimum(torch.full_like(lengths, time_width), (lengths * MAX_TIME_FRACTION).long())
    in_time = _bands(time_masks, max_time, lengths, frames, generator).to(features.device)
    in_freq = _bands(freq_masks, torch.full((batch,), min(freq_width, n_mels)), torch.full((batch,), n_mels),
                     n_mels, generator).to(features.device)
    weights = real.to(features.dtype)[:, None, :]
    mean = (features * weights).sum((1, 2), keepdim=True) / (weights.sum((1, 2), keepdim=True) * n_mels).clamp(min=1)
    hit = (in_time & real)[:, None, :] | (in_freq[:, :, None] & real[:, None, :])
    return torch.where(hit, mean.to(features.dtype), features)
