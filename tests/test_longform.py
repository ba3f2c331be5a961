"""Long-form audio: window cuts at known silences, seam joining, and transcripts of files and eval rows over 30 s."""
import io
import json

import numpy as np
import pytest
import torch
from test_train import tiny_run

from steermoe.audio import MIN_SAMPLES, SAMPLE_RATE
from steermoe.cli import main
from steermoe.longform import join_transcripts, window_bounds

SR = SAMPLE_RATE
WINDOW = 30 * SR


def check_cover(bounds, total, max_samples):
    """Windows in order, each within max_samples, consecutive ones overlapping by 0.2 s, covering [0, total)."""
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    for (a, b), (c, d) in zip(bounds, bounds[1:]):
        assert b - c == round(0.2 * SR) and a < c < b < d
    for a, b in bounds:
        assert 0 < b - a <= max_samples and b - a >= MIN_SAMPLES


def bursts(rng, layout):
    """Noise for ``("s", seconds)`` and zeros for ``("q", seconds)`` pieces, concatenated; returns the silences too."""
    pieces, silences, at = [], [], 0
    for kind, seconds in layout:
        n = round(seconds * SR)
        pieces.append(rng.standard_normal(n).astype(np.float32) * 0.3 if kind == "s" else np.zeros(n, np.float32))
        if kind == "q":
            silences.append((at, at + n))
        at += n
    return np.concatenate(pieces), silences


def test_short_audio_is_one_window():
    assert window_bounds(np.ones(WINDOW, np.float32), WINDOW) == [(0, WINDOW)]
    assert window_bounds(np.ones(500, np.float32), WINDOW) == [(0, 500)]


def test_cuts_fall_in_the_silences_where_they_are():
    rng = np.random.default_rng(0)
    # speech that leaves one pause in each window's last 5 s, at irregular places, plus a decoy pause too early
    audio, silences = bursts(rng, [("s", 12), ("q", 0.6), ("s", 14), ("q", 0.5), ("s", 26.5), ("q", 0.8), ("s", 27),
                                   ("q", 0.4), ("s", 10)])
    bounds = window_bounds(audio, WINDOW)
    check_cover(bounds, len(audio), WINDOW)
    assert len(bounds) == 4
    used = silences[1:]                                    # the decoy at 12 s is not near a window's end
    for (_, end), (start, _), (q0, q1) in zip(bounds, bounds[1:], used):
        assert q0 <= start < end <= q1                    # both sides of the seam inside that pause
    # the cut is the latest fully silent 0.2 s stretch: the window ends where the pause ends
    assert [end for _, end in bounds[:-1]] == [q1 for _, q1 in used]


def test_the_quietest_point_wins_when_nothing_is_silent():
    rng = np.random.default_rng(1)
    audio = rng.standard_normal(70 * SR).astype(np.float32)
    for centre in (27.3, 53.9):                           # a dip to 5 % amplitude, 0.3 s long
        audio[round((centre - 0.15) * SR):round((centre + 0.15) * SR)] *= 0.05
    bounds = window_bounds(audio, WINDOW)
    check_cover(bounds, len(audio), WINDOW)
    cuts = [(end + start) / 2 / SR for (_, end), (start, _) in zip(bounds, bounds[1:])]
    assert cuts == pytest.approx([27.3, 53.9], abs=0.06)


@pytest.mark.parametrize("seed", range(20))
def test_random_layouts_are_covered_within_the_limit(seed):
    rng = np.random.default_rng(seed)
    total = int(rng.integers(WINDOW + 1, 5 * WINDOW))
    audio = rng.standard_normal(total).astype(np.float32) * rng.uniform(0, 1, total).astype(np.float32)
    bounds = window_bounds(audio, WINDOW)
    check_cover(bounds, total, WINDOW)
    assert all(b - a > WINDOW - 5.2 * SR for a, b in bounds[1:-1])      # no needlessly short middle window
    edge = WINDOW + int(rng.integers(1, MIN_SAMPLES))                     # just over: the last window still usable
    check_cover(window_bounds(np.ones(edge, np.float32), WINDOW), edge, WINDOW)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"1-D waveform; got shape \(2, 10\)"):
        window_bounds(np.zeros((2, 10)), WINDOW)
    with pytest.raises(ValueError, match="overlap_seconds > 0"):
        window_bounds(np.zeros(10), WINDOW, overlap_seconds=0)
    with pytest.raises(ValueError, match="max_samples=16000 is too short"):
        window_bounds(np.zeros(10), SR)


def test_join_drops_a_repeat_at_the_seam_only():
    assert join_transcripts(["the cat sat on", "On the mat.", "", "mat. Then it left"]) == \
        "the cat sat on the mat. Then it left"
    assert join_transcripts(["a b c", "b c d"]) == "a b c d"                     # two words repeated
    assert join_transcripts(["a b c", "a b c d"], max_repeat_words=2) == "a b c a b c d"  # three: not a seam repeat
    assert join_transcripts(["one", "two"]) == "one two" and join_transcripts([]) == ""


# ------------------------------------------------------------------ transcripts of synthetic long audio
TONES = [200 * 1.3 ** k for k in range(12)]               # one "word" per tone: 12 distinct mel bins


def tone(freq, seconds):
    t = np.arange(round(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def spoken(freqs, word=8.0, pause=1.0):
    """Tones of ``word`` s, each followed by ``pause`` s of silence."""
    return np.concatenate([np.concatenate([tone(f, word), np.zeros(round(pause * SR), np.float32)]) for f in freqs])


def tone_words(features, mask):
    """A stand-in ASR over log-mel: each run of loud frames is the word ``w<loudest mel bin mid-run>``."""
    out = []
    for feats, n in zip(features, mask.sum(-1).tolist()):
        feats = feats[:, :n]
        loud = (feats.max(0).values > feats.min() + 1.0).tolist() + [False]
        words, start = [], None
        for t, on in enumerate(loud):
            if on and start is None:
                start = t
            elif not on and start is not None:
                if t - start >= 10:
                    words.append(f"w{int(feats[:, (start + t) // 2].argmax())}")
                start = None
        out.append(" ".join(words))
    return out


@pytest.fixture
def tone_asr(monkeypatch):
    """Replace the model's generate with :func:`tone_words`; returns the list of batch sizes it was called with."""
    from steermoe.model import SteerMoEModel

    calls = []

    def generate(self, input_features, attention_mask=None, prompts=None, max_new_tokens=128, **kwargs):
        assert input_features.shape[-1] <= self.encoder.max_mel_frames
        calls.append(len(input_features))
        return tone_words(input_features, attention_mask)

    monkeypatch.setattr(SteerMoEModel, "generate", generate)
    return calls


def expected_words(freqs):
    """The stand-in's words for each tone heard alone."""
    from steermoe.audio import LogMel

    log_mel = LogMel(80)
    words = []
    for f in freqs:
        audio = torch.from_numpy(spoken([f]))[None]
        words.extend(tone_words(*log_mel(audio, torch.tensor([audio.shape[1]]))))
    assert len(set(words)) == len(words) and all(len(w.split()) == 1 for w in words)
    return " ".join(words)


def wav_bytes(audio):
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, audio, SR, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def test_transcribe_joins_the_windows_of_a_long_file_and_goes_on_past_a_bad_one(tmp_path, capsys, tone_asr):
    long_audio = spoken(TONES)                             # 108 s: four windows
    assert len(window_bounds(long_audio, WINDOW)) == 4
    files = {"long.wav": long_audio, "short.wav": spoken(TONES[3:5]), "nan.wav": np.full(SR, np.nan, np.float32)}
    for name, audio in files.items():
        (tmp_path / name).write_bytes(wav_bytes(audio))
    (tmp_path / "garbage.wav").write_bytes(b"not audio")
    paths = [str(tmp_path / n) for n in ("short.wav", "garbage.wav", "long.wav", "nan.wav", "short.wav")]
    code = main(["transcribe", "--checkpoint", tiny_run(), "--device", "cpu", "--batch_size", "3", *paths])
    out, err = capsys.readouterr()
    assert code == 1
    short, long = expected_words(TONES[3:5]), expected_words(TONES)
    assert out.splitlines() == [f"{paths[0]}\t{short}", f"{paths[2]}\t{long}", f"{paths[4]}\t{short}"]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 2
    assert f"error: {paths[1]}: not audio libsndfile can read" in errors[0]
    assert f"error: {paths[3]}: {SR} NaN/inf samples" in errors[1]
    assert tone_asr == [3, 3]                               # 1 + 4 + 1 windows, three at a time across files


def long_form_parquet(path):
    """A 108 s row between two short ones, each with its stand-in transcript as text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [("a", TONES[:2]), ("long", TONES), ("b", TONES[5:6])]
    pq.write_table(pa.Table.from_pylist([{"id": uid, "audio": {"bytes": wav_bytes(spoken(freqs)), "path": None},
                                          "text": expected_words(freqs)} for uid, freqs in rows]), path)
    return str(path)


def test_eval_skips_and_counts_long_rows_unless_asked_for_long_form(tmp_path, capsys, tone_asr):
    data = long_form_parquet(tmp_path / "long.parquet")
    base = ["eval", "--checkpoint", tiny_run(), "--data", data, "--device", "cpu", "--id_column", "id"]
    assert main(base + ["--output", str(tmp_path / "short.jsonl")]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.split("\ngating over")[0])
    assert summary["skipped"] == {"too_long": 1} and summary["utterances"] == 2
    assert "1 utterances over 30 s skipped (too_long); --long_form transcribes them" in err
    assert main(base + ["--output", str(tmp_path / "all.jsonl"), "--long_form", "--batch_size", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\ngating over")[0])
    assert summary["skipped"] == {} and summary["utterances"] == 3 and summary["long_form_utterances"] == 1
    assert summary["wer"] == 0.0 and np.isfinite(summary["loss"])
    records = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "long", "b"]
    assert all(r["hypothesis"] == r["reference"] for r in records)


def test_evaluate_without_long_form_names_the_long_utterance(tone_asr):
    from steermoe.checkpoint import resolve_checkpoint
    from steermoe.data import SpeechExample, collate
    from steermoe.evaluate import evaluate, text_normalizer
    from steermoe.model import SteerMoEModel

    model = SteerMoEModel.from_trainable(resolve_checkpoint(tiny_run()))
    batch = collate([SpeechExample("x", spoken(TONES[:4]), "w")])
    with pytest.raises(ValueError, match=r"longer than 480000 samples \(30 s.*\['x'\]; pass long_form=True"):
        evaluate(model, [batch], normalize=text_normalizer(None))
