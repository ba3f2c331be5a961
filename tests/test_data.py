"""Parquet streaming with planted bad rows, filters, and length-grouped, sharded, resumable batches."""
import io
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from steermoe.data import ParquetSpeechSource, SpeechBatches, collate, resolve_parquet_files

SPEECH = os.path.join(os.path.dirname(__file__), "..", "steermoe", "demo", "speech.parquet")
AUDIO_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _wav(audio: np.ndarray, rate: int = 16000, subtype: str = "FLOAT") -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def _decode_reference(data: bytes) -> np.ndarray:
    """soundfile + scipy directly: mono float32 at 16 kHz."""
    import soundfile as sf
    from scipy.signal import resample_poly

    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    audio = audio.mean(1)
    if rate != 16000:
        g = np.gcd(rate, 16000)
        audio = resample_poly(audio, 16000 // g, rate // g)
    return audio.astype(np.float32)


def _speech_rows(n=None):
    table = pq.read_table(SPEECH)
    rows = [{"audio": a, "text": t, "id": i} for a, t, i in zip(table.column("audio").to_pylist(),
                                                                 table.column("text").to_pylist(),
                                                                 table.column("id").to_pylist())]
    return rows[:n] if n else rows


def _write(path, rows, row_group_size=5):
    table = pa.table({"audio": pa.array([r["audio"] for r in rows], AUDIO_TYPE),
                      "text": pa.array([r["text"] for r in rows], pa.string()),
                      "id": pa.array([r["id"] for r in rows], pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Real espeak-ng rows, one resampled/stereo row, one by path, and one bad row of every kind."""
    root = tmp_path_factory.mktemp("planted")
    rows = _speech_rows(10)
    stereo = np.stack([np.sin(np.arange(22050) / 7.0), np.cos(np.arange(22050) / 5.0)], 1).astype(np.float32) * 0.3
    (root / "by_path.wav").write_bytes(rows[0]["audio"]["bytes"])
    nan = np.zeros(8000, np.float32)
    nan[100] = np.nan
    good = rows + [
        {"audio": {"bytes": _wav(stereo, 22050), "path": None}, "text": "stereo", "id": "stereo"},
        {"audio": {"bytes": None, "path": "by_path.wav"}, "text": "by path", "id": "by_path"},
    ]
    bad = [
        {"audio": {"bytes": b"RIFF garbage, not a wav", "path": None}, "text": "x", "id": "bad_bytes"},
        {"audio": {"bytes": _wav(np.zeros(0, np.float32)), "path": None}, "text": "x", "id": "bad_empty"},
        {"audio": {"bytes": _wav(nan), "path": None}, "text": "x", "id": "bad_nan"},
        {"audio": rows[1]["audio"], "text": None, "id": "bad_no_text"},
        {"audio": rows[2]["audio"], "text": "   ", "id": "bad_blank_text"},
        {"audio": None, "text": "x", "id": "bad_null_audio"},
        {"audio": {"bytes": None, "path": "nowhere.wav"}, "text": "x", "id": "bad_missing_path"},
        {"audio": {"bytes": _wav(np.full(200, 0.1, np.float32)), "path": None}, "text": "x", "id": "bad_tiny"},
    ]
    mixed = [r for pair in zip(good, bad) for r in pair] + good[len(bad):]
    path = _write(root / "planted.parquet", mixed, row_group_size=4)
    return path, good


def test_bad_rows_are_skipped_and_counted_by_reason(planted):
    path, good = planted
    source = ParquetSpeechSource(path, id_column="id")
    examples = list(source)
    assert [e.id for e in examples] == [r["id"] for r in good]
    assert source.skipped == Counter({"undecodable_audio": 1, "empty_audio": 1, "non_finite_audio": 1,
                                      "missing_text": 2, "missing_audio": 2, "too_short": 1})
    assert source.rows_read == len(good) + 8
    for example, row in zip(examples, good):
        data = row["audio"]["bytes"] or good[0]["audio"]["bytes"]   # the by-path row holds row 0's audio
        np.testing.assert_array_equal(example.audio, _decode_reference(data))
        assert example.audio.dtype == np.float32 and example.text == row["text"] and example.prompt is None


def test_filters_by_duration_and_text_tokens(tmp_path):
    from steermoe.demo.tiny_models import build_tiny_tokenizer

    rows = _speech_rows(12)
    path = _write(tmp_path / "s.parquet", rows)
    seconds = [len(_decode_reference(r["audio"]["bytes"])) / 16000 for r in rows]
    lo, hi = np.quantile(seconds, [0.25, 0.75])
    source = ParquetSpeechSource(path, min_seconds=lo, max_seconds=hi)
    kept = [e.text for e in source]
    assert kept == [r["text"] for r, s in zip(rows, seconds) if lo <= s <= hi]
    assert source.skipped == Counter({"too_short": sum(s < lo for s in seconds),
                                      "too_long": sum(s > hi for s in seconds)})
    tok = build_tiny_tokenizer(chat=False)
    counts = [len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in rows]
    limit = int(np.median(counts))
    source = ParquetSpeechSource(path, max_text_tokens=limit, tokenizer=tok)
    assert [e.text for e in source] == [r["text"] for r, c in zip(rows, counts) if c <= limit]
    assert source.skipped["text_too_long"] == sum(c > limit for c in counts) > 0
    with pytest.raises(ValueError, match="tokenizer"):
        ParquetSpeechSource(path, max_text_tokens=3)


def test_prompt_column_and_raw_sample_columns(tmp_path):
    rng = np.random.default_rng(3)
    clips = [rng.uniform(-0.5, 0.5, n).astype(np.float32) for n in (8000, 11025, 4410)]
    table = pa.table({"wave": pa.array([c.tolist() for c in clips], pa.list_(pa.float32())),
                      "sr": pa.array([16000, 22050, 44100], pa.int32()),
                      "sentence": ["one", "two", "three"], "question": ["What is said?", "", None]})
    path = str(tmp_path / "raw.parquet")
    pq.write_table(table, path)
    source = ParquetSpeechSource(path, audio_column="wave", text_column="sentence", prompt_column="question",
                                 sampling_rate_column="sr")
    examples = list(source)
    from scipy.signal import resample_poly

    np.testing.assert_array_equal(examples[0].audio, clips[0])
    np.testing.assert_allclose(examples[1].audio, resample_poly(clips[1], 320, 441), atol=1e-6)
    assert len(examples[2].audio) == 1600
    assert [e.prompt for e in examples] == ["What is said?", None, None]
    assert [e.id for e in examples] == ["raw.parquet:0", "raw.parquet:1", "raw.parquet:2"]


def test_bad_files_and_paths_are_clear_errors(tmp_path, planted):
    path, _ = planted
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(ValueError, match="notes.parquet.*not a readable parquet"):
        ParquetSpeechSource(str(not_parquet))
    with pytest.raises(ValueError, match=r"planted.parquet has no column 'transcript'.*audio, text, id"):
        ParquetSpeechSource(path, text_column="transcript")
    with pytest.raises(FileNotFoundError, match="no file matches .*nothing-\\*.parquet"):
        ParquetSpeechSource(str(tmp_path / "nothing-*.parquet"))
    with pytest.raises(FileNotFoundError, match="data path not found: .*missing.parquet"):
        ParquetSpeechSource(str(tmp_path / "missing.parquet"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet file under the directory .*empty_dir"):
        ParquetSpeechSource(str(tmp_path / "empty_dir"))


def test_resolve_directories_and_globs(tmp_path):
    rows = _speech_rows(4)
    (tmp_path / "sub").mkdir()
    b = _write(tmp_path / "sub" / "b.parquet", rows[2:])
    a = _write(tmp_path / "a.parquet", rows[:2])
    assert resolve_parquet_files(str(tmp_path)) == [a, b]
    assert resolve_parquet_files([str(tmp_path / "*.parquet"), b, a]) == [a, b]
    assert [e.text for e in ParquetSpeechSource(str(tmp_path))] == [r["text"] for r in rows]


def test_collate_pads_with_zeros():
    from steermoe.data import SpeechExample

    examples = [SpeechExample("a", np.ones(5, np.float32), "x"), SpeechExample("b", np.full(3, 2, np.float32), "y",
                                                                                 "p")]
    batch = collate(examples)
    assert batch.waveforms.dtype == torch.float32 and batch.lengths.tolist() == [5, 3]
    assert batch.waveforms.tolist() == [[1] * 5, [2, 2, 2, 0, 0]]
    assert batch.texts == ["x", "y"] and batch.prompts == [None, "p"] and batch.ids == ["a", "b"]
    assert batch.to("cpu").waveforms.shape == (2, 5)


# ----------------------------------------------------------------------------------------------- batches
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """48 rows: every bundled utterance, some trimmed to spread the lengths, in small row groups."""
    rng = np.random.default_rng(0)
    rows = []
    for i, row in enumerate(_speech_rows() * 2):
        if i >= 48:
            break
        audio = _decode_reference(row["audio"]["bytes"])
        audio = audio[: int(rng.integers(2000, len(audio)))]
        rows.append({"audio": {"bytes": _wav(audio, subtype="PCM_16"), "path": None}, "text": row["text"],
                     "id": f"u{i:02d}"})
    return _write(tmp_path_factory.mktemp("corpus") / "corpus.parquet", rows, row_group_size=6)


def _steps(batches):
    """Per step, the ids of each of its micro-batches (an empty one as [])."""
    return [[list(b.ids) if b is not None else [] for b in step] for step in batches]


def _ids(batches):
    """Per step, the ids of all its micro-batches in order."""
    return [sum(step, []) for step in _steps(batches)]


def _padding(batches) -> int:
    return sum(int((b.lengths.max() - b.lengths).sum()) for step in batches for b in step if b is not None)


def _global_steps(corpus, batch_size, grad_accum, world_size, **kw):
    """Per step, the set of ids trained on over all ranks, and every rank's micro-batch sizes."""
    per_rank = [_steps(SpeechBatches(ParquetSpeechSource(corpus, id_column="id"), batch_size, grad_accum=grad_accum,
                                     rank=r, world_size=world_size, **kw)) for r in range(world_size)]
    assert len({len(steps) for steps in per_rank}) == 1              # every rank takes the same number of steps
    steps = [sorted(i for rank in ranks for micro in rank for i in micro) for ranks in zip(*per_rank)]
    sizes = [len(micro) for steps_ in per_rank for step in steps_ for micro in step]
    return steps, sizes


def test_length_grouping_reduces_padding(corpus):
    source = ParquetSpeechSource(corpus, id_column="id")
    grouped = [_padding(SpeechBatches(source, 4, bucket_size=48, seed=s)) for s in range(3)]
    random = [_padding(SpeechBatches(source, 4, bucket_size=4, seed=s)) for s in range(3)]
    assert max(grouped) < 0.3 * min(random)


def test_batches_are_seeded_and_epochs_differ(corpus):
    source = ParquetSpeechSource(corpus, id_column="id")
    a, b = SpeechBatches(source, 4, bucket_size=12, seed=7), SpeechBatches(source, 4, bucket_size=12, seed=7)
    first = _ids(a)
    assert first == _ids(b)
    assert sorted(sum(first, [])) == [f"u{i:02d}" for i in range(48)] and len(first) == len(a) == 12
    assert _ids(a) != first                      # the next epoch is shuffled differently
    assert _ids(SpeechBatches(source, 4, bucket_size=12, seed=8)) != first
    ordered = SpeechBatches(source, 4, bucket_size=12, shuffle=False)
    steps = list(ordered)
    assert sorted(sum(_ids(steps[:3]), [])) == [f"u{i:02d}" for i in range(12)]   # buckets in file order
    longest = [int(step[0].lengths.max()) for step in steps[:3]]
    assert longest == sorted(longest)                                              # by increasing length


@pytest.mark.parametrize("split", [(3, 1, 4), (1, 2, 6), (2, 3, 2), (6, 2, 1), (1, 1, 12)])
def test_global_batches_do_not_depend_on_the_split(corpus, split):
    # global batch 12 over 48 rows in buckets of 24 (two buckets); 5 rows of the last bucket over 12 slots
    reference, _ = _global_steps(corpus, 12, 1, 1, bucket_size=24, seed=4)
    steps, sizes = _global_steps(corpus, *split, bucket_size=24, seed=4)
    assert steps == reference
    assert sorted(sum(steps, [])) == [f"u{i:02d}" for i in range(48)]        # each row once
    assert max(sizes) <= split[0]


def test_micro_batches_are_length_sorted_slices_and_ranks_share_each_micro_step(corpus):
    source = ParquetSpeechSource(corpus, id_column="id")
    ranks = [list(SpeechBatches(source, 2, grad_accum=2, world_size=2, rank=r, bucket_size=16, seed=1))
             for r in range(2)]
    for step0, step1 in zip(*ranks):
        # slice i * world_size + rank: micro 0 of ranks 0 and 1, then micro 1 of ranks 0 and 1, by length
        slices = [step0[0], step1[0], step0[1], step1[1]]
        longest = [int(b.lengths.max()) for b in slices]
        shortest = [int(b.lengths.min()) for b in slices]
        assert all(lo >= hi for lo, hi in zip(shortest[1:], longest[:-1]))


def test_a_rank_decodes_only_its_own_rows(corpus, monkeypatch):
    import steermoe.data as data

    decoded = []
    real_decode = data.decode_audio
    monkeypatch.setattr(data, "decode_audio", lambda raw: decoded.append(1) or real_decode(raw))
    batches = SpeechBatches(ParquetSpeechSource(corpus, id_column="id"), 3, world_size=4, rank=2, bucket_size=24)
    served = sum(len(b) for step in batches for b in step if b is not None)
    assert len(decoded) == served == 12


@pytest.mark.parametrize("kind", ["bytes", "path", "array", "samples", "duration_column"])
def test_durations_are_the_decoded_lengths_without_decoding(tmp_path, monkeypatch, kind):
    import steermoe.data as data

    tones = [_tone(n) for n in (1600, 2500, 4410)]
    rates = [16000, 16000, 22050]
    if kind in ("bytes", "path"):
        for i, (tone, rate) in enumerate(zip(tones, rates)):
            (tmp_path / f"{i}.wav").write_bytes(_wav(tone, rate))
        audio = pa.array([{"bytes": None if kind == "path" else _wav(t, r), "path": f"{i}.wav"}
                          for i, (t, r) in enumerate(zip(tones, rates))] + [None], AUDIO_TYPE)
        columns = {"audio": audio}
    elif kind == "array":
        columns = {"audio": pa.array([{"array": t.tolist(), "sampling_rate": r} for t, r in zip(tones, rates)]
                                     + [None], ARRAY_TYPE)}
    else:
        columns = {"audio": pa.array([t.tolist() for t in tones] + [None], pa.list_(pa.float32())),
                   "sampling_rate": rates + [16000]}
    if kind == "duration_column":
        columns["seconds"] = [len(t) / r for t, r in zip(tones, rates)] + [None]
    pq.write_table(pa.table({**columns, "text": ["a", "b", "c", "d"]}), tmp_path / "d.parquet")
    source = ParquetSpeechSource(str(tmp_path / "d.parquet"),
                                 duration_column="seconds" if kind == "duration_column" else None)
    monkeypatch.setattr(data, "decode_audio", lambda raw: {}["durations decode nothing"])
    durations = source.durations(0)
    monkeypatch.undo()
    assert durations.tolist() == [len(e.audio) for e in source] + [0]        # the null row: unknown


def test_skipped_rows_keep_step_counts_equal_across_ranks(planted):
    path, good = planted
    steps, sizes = _global_steps(path, 2, 1, 3, bucket_size=6, seed=0)
    assert set(sum(steps, [])) == {r["id"] for r in good}
    assert max(sizes) <= 2


def test_resume_reproduces_the_batch_sequence_on_any_split(corpus):
    source = ParquetSpeechSource(corpus, id_column="id")
    full = SpeechBatches(source, 4, bucket_size=16, seed=3)
    epoch0, epoch1 = _ids(full), _ids(full)
    for done in (0, 5, len(epoch0) - 1, len(epoch0)):
        for split in ((4, 1, 1), (1, 2, 2)):
            fresh_source = ParquetSpeechSource(corpus, id_column="id")
            ranks = [SpeechBatches(fresh_source, split[0], grad_accum=split[1], world_size=split[2], rank=r,
                                   bucket_size=16, seed=3) for r in range(split[2])]
            for batches in ranks:
                batches.load_state_dict({"epoch": 0, "steps_done": done, "global_batch": 4})
            rest = [sorted(sum(steps, [])) for steps in zip(*map(_ids, ranks))]
            assert rest == [sorted(ids) for ids in (epoch0[done:] or epoch1)]
            if done == 5:   # neither the bucket holding steps 0-3 nor step 4's rows were read again
                assert fresh_source.rows_read == source.num_rows - 5 * 4
    # state is taken between steps, exactly as a training loop sees it
    batches = SpeechBatches(source, 2, grad_accum=2, bucket_size=12, seed=3)
    it = iter(batches)
    next(it), next(it)
    assert batches.state_dict() == {"epoch": 0, "steps_done": 2, "global_batch": 4}
    with pytest.raises(ValueError, match=r"checkpoint's global batch is 8, this run's is 4 \(batch_size 2 × "
                                         r"grad_accum 2 × 1 processes\)"):
        batches.load_state_dict({"epoch": 0, "steps_done": 2, "global_batch": 8})
    with pytest.raises(ValueError, match="has no 'steps_done'"):
        batches.load_state_dict({"epoch": 0, "batches_done": 2})


def test_drop_last_gives_full_batches(corpus):
    steps = _global_steps(corpus, 5, 1, 2, bucket_size=20, drop_last=True)[0]
    assert len(steps) == 2 * (20 // 10) and all(len(s) == 10 for s in steps)


def test_a_bucket_smaller_than_the_global_batch_is_an_error(corpus):
    with pytest.raises(ValueError, match=r"bucket_size must be >= the global batch 12 \(batch_size 3 × grad_accum 2"
                                         r" × 2 processes\); got 8"):
        SpeechBatches(ParquetSpeechSource(corpus), 3, grad_accum=2, world_size=2, bucket_size=8)


def test_collate_copies_read_only_arrays_without_torch_warning():
    """Zero-copy arrow audio is read-only: torch.from_numpy on it warns (once per process, hence a fresh one)."""
    code = ("import numpy as np; from steermoe.data import SpeechExample, collate\n"
            "a = np.arange(500, dtype=np.float32); a.setflags(write=False)\n"
            "assert collate([SpeechExample('a', a, 'x')]).waveforms[0].tolist() == a.tolist()")
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------- raw sample columns
ARRAY_TYPE = pa.struct([("array", pa.list_(pa.float32())), ("sampling_rate", pa.float64())])


def _tone(n=1600, peak=0.3):
    return (peak * np.sin(np.arange(n) / 7.0)).astype(np.float32)


def test_bad_raw_sample_rows_are_skipped_and_counted(tmp_path, monkeypatch):
    import steermoe.data as data

    tone = _tone().tolist()
    rows = [{"array": tone, "sampling_rate": 16000.0}, {"array": tone, "sampling_rate": float("nan")},
            {"array": tone, "sampling_rate": -8000.0}, {"array": tone, "sampling_rate": 16000.5},
            {"array": tone, "sampling_rate": None}, {"array": None, "sampling_rate": 16000.0}, None]
    path = str(tmp_path / "array.parquet")
    pq.write_table(pa.table({"audio": pa.array(rows, ARRAY_TYPE), "text": ["t"] * len(rows)}), path)
    source = ParquetSpeechSource(path)
    assert [e.id for e in source] == ["array.parquet:0"]
    assert source.skipped == Counter({"undecodable_audio": 4, "missing_audio": 2})
    # list columns: channels of unequal length (evenly divisible in total) or null; rates that are strings
    channels = pa.list_(pa.list_(pa.float32()))
    pq.write_table(pa.table({"audio": pa.array([[tone, tone[:-2]], [tone, None], [tone, tone]], channels),
                             "text": ["a", "b", "c"], "sampling_rate": [16000] * 3}), tmp_path / "channels.parquet")
    pq.write_table(pa.table({"audio": pa.array([[tone, tone]] * 2, channels), "text": ["a", "b"],
                             "sampling_rate": ["16000", "16k"]}), tmp_path / "string_rates.parquet")
    source = ParquetSpeechSource(str(tmp_path / "channels.parquet"))
    assert len(list(source)) == 1 and source.skipped == Counter({"undecodable_audio": 2})
    source = ParquetSpeechSource(str(tmp_path / "string_rates.parquet"))
    assert list(source) == [] and source.skipped == Counter({"undecodable_audio": 2})
    # any other failure while decoding a row is counted too, never a crash
    monkeypatch.setattr(data, "_to_mono", lambda values: {}["boom"])
    source = ParquetSpeechSource(str(tmp_path / "array.parquet"))
    assert list(source) == [] and source.skipped["undecodable_audio"] == 5


def test_unusable_raw_sample_layouts_are_errors_naming_file_and_column(tmp_path):
    no_rate = pa.struct([("array", pa.list_(pa.float32()))])
    path = str(tmp_path / "no_rate.parquet")
    pq.write_table(pa.table({"wave": pa.array([{"array": _tone().tolist()}], no_rate), "text": ["a"]}), path)
    with pytest.raises(ValueError, match=r"no_rate.parquet: audio column 'wave' .*'sampling_rate'"):
        ParquetSpeechSource(path, audio_column="wave")
    path = str(tmp_path / "strings.parquet")
    pq.write_table(pa.table({"wave": pa.array([["0.1"] * 800]), "text": ["a"], "sampling_rate": [16000]}), path)
    with pytest.raises(ValueError, match=r"strings.parquet: audio column 'wave' holds list<.*string>"):
        ParquetSpeechSource(path, audio_column="wave")


def test_channel_lists_are_mixed_to_mono_either_way_round(tmp_path):
    left, right = _tone(), _tone(peak=0.1)[::-1].copy()
    channels_first = np.stack([left, right])              # (C, S)
    path = str(tmp_path / "stereo.parquet")
    pq.write_table(pa.table({"audio": pa.array([channels_first.tolist(), channels_first.T.tolist()],
                                               pa.list_(pa.list_(pa.float32()))),
                             "text": ["a", "b"], "sampling_rate": [16000, 16000]}), path)
    examples = list(ParquetSpeechSource(path))
    assert len(examples) == 2
    for example in examples:
        np.testing.assert_allclose(example.audio, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("subtype,arrow_type", [("PCM_16", pa.int16()), ("PCM_32", pa.int32()),
                                                ("PCM_U8", pa.uint8())])
def test_integer_pcm_lists_are_scaled_like_decoded_wav(tmp_path, subtype, arrow_type):
    import soundfile as sf

    wav = _wav(_tone(), subtype=subtype)
    pcm = sf.read(io.BytesIO(wav), dtype="int32")[0] >> (32 - arrow_type.bit_width)   # the file's own integers
    pcm = pcm + 128 if subtype == "PCM_U8" else pcm                                     # 8-bit WAV is unsigned
    path = str(tmp_path / "pcm.parquet")
    pq.write_table(pa.table({"audio": pa.array([pcm.tolist()], pa.list_(arrow_type)), "text": ["a"],
                             "sampling_rate": [16000]}), path)
    example, = ParquetSpeechSource(path)
    np.testing.assert_array_equal(example.audio, _decode_reference(wav))


# ------------------------------------------------------------------------------------------ files and ids
def test_a_file_named_several_ways_is_read_once_and_default_ids_are_unique(tmp_path, monkeypatch):
    rows = [{**r, "id": None} for r in _speech_rows(2)]
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        _write(tmp_path / sub / "part-0.parquet", rows)
    monkeypatch.chdir(tmp_path)
    os.symlink(tmp_path / "a" / "part-0.parquet", tmp_path / "link.parquet")
    same = ["a/part-0.parquet", str(tmp_path / "a" / "part-0.parquet"), "./a/part-0.parquet", "link.parquet"]
    assert resolve_parquet_files(same) == ["a/part-0.parquet"]
    ids = [e.id for e in ParquetSpeechSource(["a", "b"])]
    assert ids == ["a/part-0.parquet:0", "a/part-0.parquet:1", "b/part-0.parquet:0", "b/part-0.parquet:1"]


def test_repeats_read_each_entry_that_many_times_with_distinct_ids(corpus, tmp_path, monkeypatch, caplog):
    rows = [dict(r, id=f"v{i}") for i, r in enumerate(_speech_rows(5))]
    (tmp_path / "small").mkdir()
    small = _write(tmp_path / "small" / "small.parquet", rows, row_group_size=2)
    durations = Counter()
    read_durations = ParquetSpeechSource._read_durations
    monkeypatch.setattr(ParquetSpeechSource, "_read_durations",
                        lambda self, f, g: durations.update([(f, g)]) or read_durations(self, f, g))
    with pytest.raises(ValueError, match=r"small\.parquet is named by .*small.* \(repeats 3\) and by .* \(repeats 1\)"):
        ParquetSpeechSource([corpus, str(tmp_path / "small"), small], repeats=[1, 3, 1])
    source = ParquetSpeechSource([corpus, str(tmp_path / "small"), small], id_column="id",
                                 repeats=np.array([1, 3, 3]))        # named twice with one count: read 3 times
    assert source.num_rows == 48 + 3 * 5
    examples = {e.id: e for e in source}
    copies = [f"v{i}{suffix}" for suffix in ("", "~1", "~2") for i in range(5)]
    assert sorted(examples) == sorted([f"u{i:02d}" for i in range(48)] + copies)
    for i in range(5):
        np.testing.assert_array_equal(examples[f"v{i}~2"].audio, examples[f"v{i}"].audio)
        assert examples[f"v{i}~1"].text == examples[f"v{i}"].text
    batches = SpeechBatches(source, 4, bucket_size=16, seed=3)
    assert len(batches) == 3 * 4 + math.ceil(15 / 4)        # 63 rows: buckets of 16, 16, 16 and 15
    served = sum(_ids(batches), [])
    assert sorted(served) == sorted(examples)
    assert set(durations.values()) == {1} and len(durations) == 8 + 3     # once per row group, copies share it
    # copy k of 3 is placed in the k-th third of the epoch: each row's copies come in separate, later steps
    for seed in range(4):
        step_of = {i: step for step, ids in enumerate(_ids(SpeechBatches(source, 4, bucket_size=8, seed=seed)))
                   for i in ids}
        for i in range(5):
            assert step_of[f"v{i}"] < step_of[f"v{i}~1"] < step_of[f"v{i}~2"], (seed, i)
    assert "usually share a batch" not in caplog.text
    SpeechBatches(source, 4, bucket_size=32, seed=0)         # 2 buckets for 3 copies: said
    assert "rows read 3 times per epoch in 2 bucket(s) of 32 rows" in caplog.text and "at most 21" in caplog.text


@pytest.mark.parametrize("repeats", [[2], [1, 0], [1, True], [1, 1.5]])
def test_bad_repeats_are_named(corpus, one_group, repeats):
    with pytest.raises(ValueError, match=r"repeats must hold one int >= 1 per data path \(2\)"):
        ParquetSpeechSource([corpus, one_group], repeats=repeats)


# ------------------------------------------------------------------------------------------------ shuffle
@pytest.fixture(scope="module")
def one_group(corpus, tmp_path_factory):
    """The corpus in a single row group (pyarrow's default for a small file)."""
    path = str(tmp_path_factory.mktemp("one_group") / "one_group.parquet")
    pq.write_table(pq.read_table(corpus), path, row_group_size=1 << 20)
    return path


def test_shuffle_reorders_one_row_group_every_epoch_and_ranks_shares_change(one_group):
    def epoch_ids(rank, epoch, steps_done=0):
        batches = SpeechBatches(ParquetSpeechSource(one_group, id_column="id"), 2, bucket_size=12, seed=5, rank=rank,
                                world_size=2)
        batches.load_state_dict({"epoch": epoch, "steps_done": steps_done, "global_batch": 4})
        return _ids(batches)

    epochs = [[epoch_ids(rank, epoch) for rank in range(2)] for epoch in range(2)]
    for ranks in epochs:
        assert len(ranks[0]) == len(ranks[1])
        assert sorted(i for batches in ranks for batch in batches for i in batch) == [f"u{i:02d}" for i in range(48)]
    shares = [{i for batch in ranks[0] for i in batch} for ranks in epochs]
    assert shares[0] != shares[1]
    first_buckets = [set(sum(ranks[0][:3] + ranks[1][:3], [])) for ranks in epochs]
    assert first_buckets[0] != first_buckets[1] and {f"u{i:02d}" for i in range(12)} not in first_buckets
    assert epoch_ids(1, 1, steps_done=4) == epochs[1][1][4:]     # resume mid-epoch


def test_shuffle_reads_each_row_group_once_per_epoch_and_durations_once(corpus, monkeypatch):
    reads = []
    read_row_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **kwargs: reads.append((i, "text" in kwargs["columns"]))
                        or read_row_group(self, i, **kwargs))
    source = ParquetSpeechSource(corpus, id_column="id")
    for rank in range(2):
        batches = SpeechBatches(source, 4, bucket_size=8, seed=1, world_size=2, rank=rank)
        for epoch in range(2):
            reads.clear()
            batches.set_epoch(epoch)
            assert len(list(batches)) == len(batches)
            decoding = [i for i, decode in reads if decode]
            assert len(decoding) == len(set(decoding)) >= 4     # groups of 6 rows, buckets of 8 straddling them
            assert sorted(i for i, decode in reads if not decode) == ([] if rank or epoch else list(range(8)))


# ------------------------------------------------------------------------ datasets: relative paths, Dataset
def _clips(root, lengths):
    """Float WAV files ``{relative path: samples}`` of distinct lengths under ``root``."""
    clips = {}
    for i, (rel, n) in enumerate(lengths.items()):
        clips[rel] = np.full(n, 0.01 * (i + 1), np.float32)
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        (root / rel).write_bytes(_wav(clips[rel]))
    return clips


def test_relative_audio_paths_resolve_from_the_parquet_folder_or_above_from_any_cwd(tmp_path, monkeypatch):
    root, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    # beside the parquet file, and (as datasets writes them, from the directory it ran in) from the folder above
    clips = _clips(root, {"data/clips/a.wav": 1600, "data/clips/b.wav": 2400})
    _clips(elsewhere, {"clips/a.wav": 4000})                    # a decoy where the working directory would find it
    rows = [{"audio": {"bytes": None, "path": p}, "text": p, "id": p} for p in ("clips/a.wav", "data/clips/b.wav")]
    parquet = _write(root / "data" / "train.parquet", rows)
    monkeypatch.chdir(elsewhere)
    source = ParquetSpeechSource(parquet, id_column="id")
    examples = list(source)
    assert source.skipped == Counter() and [e.id for e in examples] == ["clips/a.wav", "data/clips/b.wav"]
    for example, rel in zip(examples, ("data/clips/a.wav", "data/clips/b.wav")):
        np.testing.assert_array_equal(example.audio, clips[rel])
    assert source.durations(0).tolist() == [1600, 2400]
    (root / "data" / "clips" / "b.wav").unlink()                  # a path found nowhere: a counted skip
    assert [e.id for e in ParquetSpeechSource(parquet, id_column="id")] == ["clips/a.wav"]


def test_relative_audio_paths_walk_the_folders_once_per_clip_folder(tmp_path, monkeypatch):
    """Rows in one clip folder: the first walks up from the parquet's folder, the rest check one candidate each."""
    from steermoe import data as data_module

    clips = _clips(tmp_path / "corpus", {f"audio/clips/{i}.wav": 1600 + i for i in range(6)})
    os.makedirs(tmp_path / "corpus" / "a" / "b" / "c")
    parquet = _write(tmp_path / "corpus" / "a" / "b" / "c" / "train.parquet",
                     [{"audio": {"bytes": None, "path": p}, "text": p, "id": p} for p in clips])
    monkeypatch.setattr(data_module, "_RESOLVED_BASES", {})
    looked, isfile = [], os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda p: looked.append(p) or isfile(p))
    examples = list(ParquetSpeechSource(parquet, id_column="id"))
    assert [e.id for e in examples] == list(clips)
    walked = [p for p in looked if p.endswith("0.wav")]
    assert len(walked) == 4                         # c/, b/, a/, corpus/: found
    assert len([p for p in looked if p.endswith(".wav")]) == 4 + 5
    for example, rel in zip(examples, clips):
        np.testing.assert_array_equal(example.audio, clips[rel])


def test_a_datasets_dataset_is_read_from_its_arrow_storage(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    rows = _speech_rows(6)
    clips = _clips(tmp_path, {"clips/x.wav": 3200})
    table = {"audio": [r["audio"] for r in rows] + [{"bytes": None, "path": "clips/x.wav"}],
             "text": [r["text"] for r in rows] + ["by path"], "id": [r["id"] for r in rows] + ["x"]}
    ds = datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio())     # storage cast: no encoding
    assert isinstance(ds.features["audio"], datasets.Audio)
    monkeypatch.chdir(tmp_path)                        # a Dataset's relative paths: from the working directory
    view = ds.shuffle(seed=3).select(range(5))         # an indices mapping over the Arrow table
    expected = [table["id"].index(i) for i in view["id"]]
    source = ParquetSpeechSource(view, id_column="id")
    examples = list(source)
    assert [e.id for e in examples] == view["id"] and source.skipped == Counter() and source.num_rows == 5
    for example, k in zip(examples, expected):
        want = clips["clips/x.wav"] if k == 6 else _decode_reference(rows[k]["audio"]["bytes"])
        np.testing.assert_array_equal(example.audio, want)
        assert example.text == table["text"][k]
    assert source.durations(0).tolist() == [len(e.audio) for e in examples]
    assert [e.id for e in ParquetSpeechSource(ds)][:2] == ["0", "1"]                  # default ids: row indices
    steps = list(SpeechBatches(source, 2, shuffle=False))
    assert sorted(i for step in steps for batch in step for i in batch.ids) == sorted(view["id"])
    arrow = ParquetSpeechSource(ds.data.table, id_column="id")                        # a pyarrow Table too
    assert [e.id for e in arrow] == table["id"]
    with pytest.raises(ValueError, match=r"DatasetDict of splits \['train'\]; pass one split, e.g. data\['train'\]"):
        ParquetSpeechSource(datasets.DatasetDict(train=ds))
    with pytest.raises(ValueError, match="IterableDataset; expected a datasets.Dataset"):
        ParquetSpeechSource(ds.to_iterable_dataset())
    with pytest.raises(ValueError, match="the Dataset has no column 'words'; its columns are: audio, text, id"):
        ParquetSpeechSource(ds, text_column="words")


def test_a_parquet_file_datasets_wrote_is_read_from_another_directory(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    clips = _clips(tmp_path, {"data/clips/a.wav": 2000, "data/clips/b.wav": 2800})
    monkeypatch.chdir(tmp_path)
    ds = datasets.Dataset.from_dict({"audio": list(clips), "text": ["a", "b"]}).cast_column("audio", datasets.Audio())
    ds.to_parquet("data/train.parquet")
    assert pq.read_table("data/train.parquet").column("audio")[0]["path"].as_py() == "data/clips/a.wav"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    examples = list(ParquetSpeechSource(tmp_path / "data" / "train.parquet"))
    assert [len(e.audio) for e in examples] == [2000, 2800]
