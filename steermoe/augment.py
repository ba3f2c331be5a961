"""Training augmentation: speed perturbation of waveforms (Ko et al., 2015) and SpecAugment-style masking of
log-mel features (Park et al., 2019: time and frequency masks).

    generators = [utterance_generator(seed, step, utterance_id) for utterance_id in batch.ids]
    factors = speed_factors(0.1, generators)                               # drawn first, then the masks
    waveforms, lengths = speed_perturb(batch.waveforms, batch.lengths, factors, max_samples=480000)
    features = spec_augment(features, mask, time_masks=2, time_width=15, freq_masks=2, freq_width=10,
                            generators=generators)

Speed perturbation resamples each waveform to play ``factor`` times as fast (tempo and pitch together, like sox's
``speed`` effect but by linear interpolation, without its low-pass filter), the factor uniform in [1 - p, 1 + p]; a
perturbed clip may fall outside ``data.min_seconds`` / ``max_seconds`` (only the encoder's window is enforced).

Each utterance gets ``time_masks`` bands of ``0..time_width`` consecutive real frames (at most
:data:`MAX_TIME_FRACTION` of its length each) and ``freq_masks`` bands of ``0..freq_width`` mel bins, set to the
utterance's mean log-mel value (over its real frames); padding frames are left as they are.

Each utterance's draws come from its own CPU generator: keyed by (seed, step, utterance id), its factor and masks
do not depend on the device, on the batch it shares, or on how a global batch is split over processes and
accumulation steps.
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .config import MAX_SPEED_PERTURB

MAX_TIME_FRACTION = 0.2   # SpecAugment's p: one time mask covers at most this fraction of an utterance


def utterance_generator(seed: int, step: int, utterance_id: str) -> torch.Generator:
    """A CPU generator seeded from ``seed``, ``step`` and ``utterance_id`` (all of its UTF-8 bytes): the same masks
    for the same utterance at the same step, so a resumed run masks as the uninterrupted one."""
    key = int.from_bytes(b"\x01" + utterance_id.encode(), "little")      # a leading byte keeps trailing NULs
    state = np.random.SeedSequence([seed, step, key]).generate_state(1, np.uint64)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) >> 1)


def masks_anything(time_masks: int, time_width: int, freq_masks: int, freq_width: int) -> bool:
    """Whether these settings mask any frame or bin (a count or a width of 0 turns that kind of mask off)."""
    return bool(time_masks and time_width or freq_masks and freq_width)


def speed_factors(perturb: float, generators: Sequence[Optional[torch.Generator]]) -> List[float]:
    """One speed factor per generator, uniform in [1 - perturb, 1 + perturb] (``perturb`` 0: all 1.0, nothing
    drawn)."""
    if isinstance(perturb, bool) or not isinstance(perturb, (int, float)) or not 0 <= perturb < MAX_SPEED_PERTURB:
        raise ValueError(f"perturb must be a number in [0, {MAX_SPEED_PERTURB}); got {perturb!r}")
    if perturb == 0:
        return [1.0] * len(generators)
    return [1.0 + perturb * (2.0 * torch.rand(1, generator=g, device="cpu").item() - 1.0) for g in generators]


def speed_perturb(waveforms: Tensor, lengths: Tensor, factors: Sequence[float],
                  max_samples: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Each waveform played ``factor`` times as fast: ``(waveforms (B, S'), lengths (B,))``, new tensors.

    ``waveforms``: (B, S) float, zero after each row's ``lengths`` (B,) samples. Row b is resampled to
    ``round(lengths[b] / factors[b])`` samples (at least 1 unless empty; at most ``max_samples``: a clip slowed past
    it is slowed only to fill it) by linear interpolation between sample centres (little aliasing for factors near
    1 on speech at 16 kHz), and zero-padded to the longest new row.
    """
    if waveforms.dim() != 2:
        raise ValueError(f"waveforms must be (B, S); got shape {tuple(waveforms.shape)}")
    batch = waveforms.shape[0]
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be (B,) = ({batch},); got shape {tuple(lengths.shape)}")
    if len(factors) != batch or not all(f > 0 for f in factors):
        raise ValueError(f"factors must be {batch} numbers > 0; got {list(factors)!r}")
    old = lengths.tolist()
    new = [n and max(1, round(n / f)) for n, f in zip(old, factors)]
    if max_samples is not None:
        new = [min(m, max(max_samples, n)) for m, n in zip(new, old)]
    out = waveforms.new_zeros(batch, max(new, default=0))
    for b, (n, m) in enumerate(zip(old, new)):
        if n == m:
            out[b, :n] = waveforms[b, :n]
            continue
        # sample centres aligned, positions in float64 (a float32 position is 0.03 samples off at 30 s)
        where = ((torch.arange(m, dtype=torch.float64, device=waveforms.device) + 0.5) * (n / m) - 0.5).clamp(0, n - 1)
        left = where.floor().long()
        frac = (where - left).to(torch.float32)
        row = waveforms[b, :n].float()
        out[b, :m] = torch.lerp(row[left], row[(left + 1).clamp(max=n - 1)], frac).to(waveforms.dtype)
    return out, torch.tensor(new, dtype=lengths.dtype, device=lengths.device)


def _bands(count: int, max_width: int, size: int, extent: int, generator: Optional[torch.Generator]) -> Tensor:
    """(extent,) bool: ``count`` bands, each of a uniform width in [0, max_width], placed inside [0, size)."""
    hit = torch.zeros(extent, dtype=torch.bool, device="cpu")
    for _ in range(count):
        u_width, u_start = torch.rand(2, generator=generator, device="cpu").tolist()
        width = int(u_width * (max_width + 1))
        start = int(u_start * max(size - width + 1, 1))
        hit[start:start + width] = True
    return hit


def spec_augment(features: Tensor, mask: Optional[Tensor] = None, *, time_masks: int = 0, time_width: int = 0,
                 freq_masks: int = 0, freq_width: int = 0,
                 generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> Tensor:
    """``features`` (B, n_mels, T) with time and frequency bands set to each utterance's mean; a new tensor.

    ``mask``: (B, T), 1 = real frame (None: all real). Widths are in frames (10 ms) and mel bins. ``generators``:
    one CPU generator per utterance (None: torch's default generator). Zero masks or zero widths return
    ``features`` itself.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (B, n_mels, T); got shape {tuple(features.shape)}")
    for name, value in (("time_masks", time_masks), ("time_width", time_width), ("freq_masks", freq_masks),
                        ("freq_width", freq_width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0; got {value!r}")
    batch, n_mels, frames = features.shape
    if generators is not None and len(generators) != batch:
        raise ValueError(f"generators must hold one generator per utterance ({batch}); got {len(generators)}")
    if not masks_anything(time_masks, time_width, freq_masks, freq_width):
        return features
    real = torch.ones(batch, frames, dtype=torch.bool, device=features.device) if mask is None else mask.bool()
    lengths = real.sum(1).tolist()
    in_time, in_freq = [], []
    for b, length in enumerate(lengths):
        generator = None if generators is None else generators[b]
        in_time.append(_bands(time_masks, min(time_width, int(length * MAX_TIME_FRACTION)), length, frames,
                              generator))
        in_freq.append(_bands(freq_masks, min(freq_width, n_mels), n_mels, n_mels, generator))
    in_time, in_freq = torch.stack(in_time).to(features.device), torch.stack(in_freq).to(features.device)
    weights = real.float()[:, None, :]
    count = (torch.tensor(lengths, dtype=torch.float32, device=features.device) * n_mels).clamp(min=1)
    mean = (features.float() * weights).sum((1, 2)) / count                               # fp32: no fp16 overflow
    hit = (in_time & real)[:, None, :] | (in_freq[:, :, None] & real[:, None, :])
    return torch.where(hit, mean[:, None, None].to(features.dtype), features)
