"""Audio decoding, resampling and the on-device log-mel against independent references."""
import io
import os
import re

import numpy as np
import pytest
import torch

from steermoe.audio import LogMel, decode_audio, load_audio_file, resample

SPEECH = os.path.join(os.path.dirname(__file__), "..", "steermoe", "demo", "speech.parquet")


def _encode(audio: np.ndarray, rate: int, fmt: str, subtype=None) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _speech(n: int):
    """The first ``n`` utterances of the bundled espeak-ng set, decoded with soundfile directly."""
    import pyarrow.parquet as pq
    import soundfile as sf

    rows = pq.read_table(SPEECH, columns=["audio"]).column("audio").to_pylist()[:n]
    return [sf.read(io.BytesIO(r["bytes"]), dtype="float32")[0] for r in rows]


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


# ------------------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("fmt,subtype,tol", [("WAV", "PCM_16", 1 / 32768), ("WAV", "FLOAT", 0.0),
                                             ("FLAC", "PCM_16", 1 / 32768), ("OGG", "VORBIS", 0.05),
                                             ("MP3", "MPEG_LAYER_III", 0.1)])
def test_decode_formats_mixes_channels_to_mono(fmt, subtype, tol):
    rng = np.random.default_rng(1)
    rate = 22050
    t = np.arange(rate // 2) / rate
    left, right = 0.4 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t + rng.uniform())
    audio, got_rate = decode_audio(_encode(np.stack([left, right], 1).astype(np.float32), rate, fmt, subtype))
    assert got_rate == rate and audio.dtype == np.float32 and audio.ndim == 1
    expected = (left + right) / 2
    if fmt == "MP3":   # the encoder adds a delay and trims nothing reliably: compare spectra only
        assert abs(_peak_hz(audio, rate) - 440) < 10
        return
    assert len(audio) == len(expected)
    assert np.abs(audio - expected).max() <= tol + 1e-6


def test_decode_rejects_bytes_that_are_not_audio():
    with pytest.raises(ValueError, match="not audio libsndfile can read: Format not recognised"):
        decode_audio(b"definitely not audio" * 10)


def test_load_audio_file_errors_name_the_file(tmp_path):
    nan = np.full(1600, 0.1, np.float32)
    nan[7] = np.nan
    files = {"garbage.wav": b"definitely not audio" * 10, "nan.wav": _encode(nan, 16000, "WAV", "FLOAT"),
             "short.wav": _encode(np.zeros(399, np.float32), 16000, "WAV"),
             "short_44k.wav": _encode(np.zeros(1000, np.float32), 44100, "WAV"),     # 363 samples at 16 kHz
             "ok.wav": _encode(np.zeros(400, np.float32), 16000, "WAV")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    expected = {"garbage.wav": "not audio libsndfile can read", "nan.wav": "1 NaN/inf samples",
                "short.wav": "too short: 399 samples", "short_44k.wav": "too short: 363 samples",
                "missing.wav": "No such file or directory", "": "Is a directory"}
    for name, message in expected.items():
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=f"^{re.escape(path)}: {message}"):
            load_audio_file(path)
    assert len(load_audio_file(str(tmp_path / "ok.wav"))) == 400


def test_load_audio_file_resamples_to_16k(tmp_path):
    rate = 22050
    audio = (0.3 * np.sin(2 * np.pi * 500 * np.arange(rate) / rate)).astype(np.float32)
    path = tmp_path / "a.wav"
    path.write_bytes(_encode(audio, rate, "WAV", "FLOAT"))
    out = load_audio_file(str(path))
    assert out.dtype == np.float32 and len(out) == 16000
    assert abs(_peak_hz(out, 16000) - 500) < 2


# ----------------------------------------------------------------------------------------------- resample
def test_resample_keeps_frequency_and_suppresses_aliasing():
    rate = 44100
    t = np.arange(int(0.5 * rate)) / rate
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    out = resample(tone, rate, 16000)
    assert out.dtype == np.float32 and len(out) == int(np.ceil(len(tone) * 16000 / rate))
    assert abs(_peak_hz(out, 16000) - 1000) < 2
    middle = out[2000:-2000]
    assert abs(np.sqrt(2) * middle.std() - 1.0) < 0.01          # amplitude kept
    # a 12 kHz tone is above the new 8 kHz Nyquist: naive decimation would fold it to 4 kHz at full power
    high = np.sin(2 * np.pi * 12000 * t).astype(np.float32)
    naive = high[np.round(np.arange(len(out)) * rate / 16000).astype(int).clip(0, len(high) - 1)]
    assert naive[2000:-2000].std() > 0.5
    assert resample(high, rate, 16000)[2000:-2000].std() < 1e-2


def test_resample_same_rate_is_identity_and_bad_rate_is_an_error():
    x = np.random.default_rng(0).standard_normal(123).astype(np.float64)
    out = resample(x, 16000)
    assert out.dtype == np.float32 and np.array_equal(out, x.astype(np.float32))
    with pytest.raises(ValueError, match="orig_sr"):
        resample(x, 0)


# ------------------------------------------------------------------------------------------------- log-mel
@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor_per_sample(n_mels):
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    rng = np.random.default_rng(n_mels)
    waves = [w[: int(rng.integers(len(w) // 2, len(w)))] for w in _speech(3)]
    waves.append((0.05 * rng.standard_normal(4321)).astype(np.float32))   # not a multiple of the hop
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(len(waves), int(lengths.max()))
    for row, w in zip(batch, waves):
        row[: len(w)] = torch.from_numpy(w)
    features, mask = LogMel(extractor)(batch, lengths)
    assert features.dtype == torch.float32 and features.shape == (len(waves), n_mels, int(lengths.max()) // 160)
    for i, w in enumerate(waves):
        ref = extractor(w, sampling_rate=16000, padding="longest", return_tensors="pt").input_features[0]
        frames = len(w) // 160
        assert ref.shape[-1] == frames and int(mask[i].sum()) == frames and bool(mask[i, :frames].all())
        torch.testing.assert_close(features[i, :, :frames], ref, atol=1e-5, rtol=1e-5)
        assert bool((features[i, :, frames:] == 0).all())


def test_log_mel_from_n_mels_and_under_autocast_is_float32():
    wave = torch.from_numpy(_speech(1)[0])[None]
    lengths = torch.tensor([wave.shape[1]])
    plain, _ = LogMel(80)(wave, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = LogMel(80)(wave, lengths)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain)


def test_log_mel_rejects_bad_lengths():
    with pytest.raises(ValueError, match="lengths"):
        LogMel(80)(torch.zeros(2, 1000), torch.tensor([1000, 1001]))
    with pytest.raises(ValueError, match="waveforms"):
        LogMel(80)(torch.zeros(1000), torch.tensor([1000]))


@pytest.mark.gpu
def test_log_mel_on_cuda_matches_cpu():
    wave = torch.from_numpy(_speech(1)[0])[None]
    lengths = torch.tensor([wave.shape[1]])
    cpu, _ = LogMel(128)(wave, lengths)
    gpu, mask = LogMel(128).cuda()(wave.cuda(), lengths.cuda())
    assert gpu.is_cuda and mask.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
