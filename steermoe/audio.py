"""Audio: decode bytes, mix to mono, resample to 16 kHz, and Whisper's log-mel spectrogram on the training device.

soundfile and scipy are imported inside the functions that need them, so importing this module needs neither.
"""
import io
import math
from typing import Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

SAMPLE_RATE = 16000
MIN_SAMPLES = 400     # one 25 ms analysis window at 16 kHz: the shortest audio accepted


def decode_audio(data: bytes) -> Tuple[np.ndarray, int]:
    """Decode wav/flac/ogg/mp3 ``data`` (whatever libsndfile reads) → (float32 (S,) mono samples, sample rate in Hz).

    Channels are averaged; integer PCM is scaled to [-1, 1). Raises ``ValueError`` when the bytes are not audio
    libsndfile can read.
    """
    import soundfile as sf

    try:
        audio, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, TypeError, ValueError) as err:   # libsndfile's LibsndfileError is a RuntimeError
        reason = getattr(err, "error_string", None) or f"{type(err).__name__}: {err}"
        raise ValueError(f"not audio libsndfile can read: {reason}") from None
    return audio.mean(axis=1, dtype=np.float32), int(sample_rate)


def audio_info(data: Union[bytes, str]) -> Tuple[int, int]:
    """(frames, sample rate in Hz) of encoded audio ``data`` (bytes, or a file path) from its header, not decoding it.

    Raises ``ValueError`` when libsndfile cannot read the header.
    """
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"not audio libsndfile can read: {getattr(err, 'error_string', None) or err}") from None
    return int(info.frames), int(info.samplerate)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling of (S,) ``audio`` from ``orig_sr`` to ``target_sr`` Hz, anti-aliased (Kaiser FIR).

    Returns float32 (ceil(S · target_sr / orig_sr),); the input itself (as float32) when the rates are equal.
    """
    if int(orig_sr) <= 0 or int(target_sr) <= 0:
        raise ValueError(f"sample rates must be positive; got orig_sr={orig_sr}, target_sr={target_sr}")
    audio = np.asarray(audio, dtype=np.float32)
    if orig_sr == target_sr:
        return audio
    from scipy.signal import resample_poly

    g = math.gcd(int(orig_sr), int(target_sr))
    return resample_poly(audio, int(target_sr) // g, int(orig_sr) // g).astype(np.float32, copy=False)


def check_audio_file(path: str) -> None:
    """Raise ``ValueError`` starting with ``path`` when its header says the file cannot be used: not a readable file,
    not audio libsndfile reads, or shorter than one 25 ms analysis window at 16 kHz (nothing is decoded)."""
    try:
        with open(path, "rb"):
            pass
        frames, sample_rate = audio_info(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: {(err.strerror or err) if isinstance(err, OSError) else err}") from None
    _check_length(path, math.ceil(frames * SAMPLE_RATE / sample_rate))


def _check_length(path: str, samples: int) -> None:
    if samples < MIN_SAMPLES:
        raise ValueError(f"{path}: too short: {samples} samples at {SAMPLE_RATE} Hz; need at least {MIN_SAMPLES} "
                         "(one 25 ms analysis window)")


def load_audio_file(path: str) -> np.ndarray:
    """The audio file at ``path`` as float32 (S,) mono samples at 16 kHz, S >= ``MIN_SAMPLES``.

    Raises ``ValueError`` starting with ``path`` when the file cannot be read or decoded, is shorter than one
    25 ms analysis window, or holds NaN/inf samples.
    """
    try:
        with open(path, "rb") as f:
            audio, sample_rate = decode_audio(f.read())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: {(err.strerror or err) if isinstance(err, OSError) else err}") from None
    if not np.isfinite(audio).all():
        raise ValueError(f"{path}: {int((~np.isfinite(audio)).sum())} NaN/inf samples")
    audio = resample(audio, sample_rate)
    _check_length(path, len(audio))
    return audio


class LogMel(nn.Module):
    """Whisper's log-mel spectrogram of a padded batch, computed on the waveforms' device, without 30 s padding.

    Each sample's features equal ``WhisperFeatureExtractor``'s (torch path) for that sample alone and unpadded:
    reflect padding at both of its own ends, a 400-point Hann STFT with hop 160, Slaney mel filters, log10 floored
    8 below the sample's own maximum, then (x + 4) / 4. A sample of S samples has S // 160 frames (the extractor
    drops the STFT's last frame). So a sample's features never depend on the rest of its batch.

    Args:
        feature_extractor_or_n_mels: a ``WhisperFeatureExtractor`` (its mel filters, FFT size, hop and rate are
            used) or the number of mel bins (80 for Whisper up to large-v2, 128 for large-v3).

    Call: ``(waveforms (B, S) float, lengths (B,) int samples)`` → ``(features (B, n_mels, T_mel) float32,
    attention_mask (B, T_mel) long)``, T_mel = max(lengths) // hop; features are 0 at padded frames.
    """

    def __init__(self, feature_extractor_or_n_mels: Union[int, object] = 80):
        super().__init__()
        if isinstance(feature_extractor_or_n_mels, int):
            from transformers import WhisperFeatureExtractor

            extractor = WhisperFeatureExtractor(feature_size=feature_extractor_or_n_mels)
        else:
            extractor = feature_extractor_or_n_mels
            if not hasattr(extractor, "mel_filters"):
                raise TypeError("feature_extractor_or_n_mels must be an int or a WhisperFeatureExtractor; got "
                                f"{type(extractor).__name__}")
        self.n_fft = int(extractor.n_fft)
        self.hop_length = int(extractor.hop_length)
        self.sampling_rate = int(extractor.sampling_rate)
        self.n_mels = int(extractor.feature_size)
        self.register_buffer("mel_filters", torch.from_numpy(np.asarray(extractor.mel_filters, np.float32)),
                             persistent=False)  # (n_fft // 2 + 1, n_mels)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def extra_repr(self) -> str:
        return f"n_mels={self.n_mels}, n_fft={self.n_fft}, hop_length={self.hop_length}"

    def num_frames(self, lengths: Tensor) -> Tensor:
        """Mel frames for ``lengths`` samples."""
        return lengths // self.hop_length

    def forward(self, waveforms: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        if not isinstance(waveforms, Tensor) or waveforms.dim() != 2 or not waveforms.is_floating_point():
            got = tuple(waveforms.shape) if isinstance(waveforms, Tensor) else type(waveforms).__name__
            raise ValueError(f"waveforms must be a (B, S) float tensor; got {got}")
        batch, total = waveforms.shape
        device = waveforms.device
        lengths = torch.as_tensor(lengths, device=device).long()
        if tuple(lengths.shape) != (batch,) or bool((lengths < self.hop_length).any()) or bool((lengths > total).any()):
            raise ValueError(f"lengths must be ({batch},) sample counts in [{self.hop_length}, {total}] (at least one "
                             f"mel frame each); got {lengths.tolist()}")
        with torch.autocast(device.type, enabled=False):
            padded = self._reflect_pad(waveforms.float(), lengths)
            stft = torch.stft(padded, self.n_fft, self.hop_length, window=self.window.to(device), center=False,
                              return_complex=True)
            frames = total // self.hop_length
            power = stft[..., :frames].abs().pow(2)
            log_spec = (self.mel_filters.to(device).T @ power).clamp_min(1e-10).log10()  # (B, n_mels, T)
            mask = torch.arange(frames, device=device) < self.num_frames(lengths)[:, None]
            peak = log_spec.masked_fill(~mask[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)
            log_spec = torch.maximum(log_spec, peak - 8.0)
            features = ((log_spec + 4.0) / 4.0).masked_fill(~mask[:, None, :], 0.0)
        return features, mask.long()

    def _reflect_pad(self, x: Tensor, lengths: Tensor) -> Tensor:
        """(B, S) → (B, S + n_fft): each row reflect-padded by n_fft // 2 at its own ends, then zeros."""
        pad = self.n_fft // 2
        pos = torch.arange(-pad, x.shape[1] + pad, device=x.device)
        end = lengths[:, None]
        src = pos.abs().expand(x.shape[0], -1)
        src = torch.where(src >= end, 2 * (end - 1) - src, src)   # reflect about the last real sample
        inside = pos < end + pad
        return torch.gather(x, 1, src.clamp(0, x.shape[1] - 1)) * inside
