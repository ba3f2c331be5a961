"""Evaluation: corpus WER/CER against an independent edit distance, normalisation, gating statistics."""
import io
import json
import math
import random
import sys

import pytest
from test_train import SPEECH, tiny_run

from steermoe.cli import main
from steermoe.evaluate import english_spelling_mapping, error_rates, text_normalizer


def edit_distance(ref, hyp):
    """Plain Levenshtein distance between two sequences (the test's own oracle)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def test_corpus_wer_and_cer_match_an_independent_edit_distance():
    rng = random.Random(7)
    words = "the cat sat on a mat with red hat and bat".split()
    refs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for _ in range(23)]
    hyps = []
    for r in refs:
        w = r.split()
        if rng.random() < 0.5:
            w[rng.randrange(len(w))] = rng.choice(words)
        if rng.random() < 0.3:
            w.insert(rng.randrange(len(w) + 1), rng.choice(words))
        if rng.random() < 0.3 and len(w) > 1:
            w.pop(rng.randrange(len(w)))
        hyps.append(" ".join(w))
    refs.append("")                       # an empty reference: its hypothesis words are insertions
    hyps.append("extra words")
    out = error_rates(refs, hyps)
    word_edits = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps))
    ref_words = sum(len(r.split()) for r in refs)
    char_edits = sum(edit_distance(list(r), list(h)) for r, h in zip(refs, hyps))
    ref_chars = sum(len(r) for r in refs)
    assert out["word_errors"] == word_edits and out["reference_words"] == ref_words
    assert out["char_errors"] == char_edits and out["reference_chars"] == ref_chars
    assert out["wer"] == pytest.approx(word_edits / ref_words)
    assert out["cer"] == pytest.approx(char_edits / ref_chars)
    # corpus-level, not the mean of per-utterance rates
    per_utt = [edit_distance(r.split(), h.split()) / len(r.split()) for r, h in zip(refs[:-1], hyps[:-1])]
    assert out["wer"] != pytest.approx(sum(per_utt) / len(per_utt))
    assert error_rates(["a b"], ["a b"])["wer"] == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        error_rates(["a"], [])


def test_whisper_normaliser_and_spelling_mapping(tmp_path):
    normalize = text_normalizer(None)
    assert normalize("Hello, World!  It's   twenty-five  dollars.") == normalize("hello world it is $25")
    assert normalize("Mr. Smith") == normalize("mister smith")
    # a checkpoint directory's normalizer.json adds its spelling map; no file means no map
    assert english_spelling_mapping(str(tmp_path)) == {}
    (tmp_path / "normalizer.json").write_text(json.dumps({"colour": "color"}))
    assert english_spelling_mapping(str(tmp_path)) == {"colour": "color"}
    assert text_normalizer(str(tmp_path))("The colour red") == "the color red"
    assert text_normalizer(None)("The colour red") == "the colour red"
    assert english_spelling_mapping("not/a/real-model-id") == {}


def planted_parquet(path, good_rows=5):
    """``good_rows`` bundled utterances plus one row without text and one whose audio will not decode."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(SPEECH).slice(20, good_rows).to_pylist()
    rows.append({**rows[0], "id": "no-text", "text": None})
    rows.append({**rows[1], "id": "bad-audio", "audio": {"bytes": b"not audio at all", "path": "x.wav"}})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return [r for r in rows if r["id"] not in ("no-text", "bad-audio")]


def test_eval_command_scores_the_whole_set(tmp_path, capsys):
    good = planted_parquet(tmp_path / "eval.parquet")
    out = tmp_path / "results" / "eval.jsonl"
    assert main(["eval", "--checkpoint", tiny_run(), "--data", str(tmp_path / "eval.parquet"), "--output", str(out),
                 "--batch_size", "2", "--max_new_tokens", "5", "--id_column", "id", "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    printed = json.loads(stdout.split("\ngating over")[0])
    assert "layer  0: usage entropy" in stdout and "layer  1: usage entropy" in stdout and "top share" in stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in good)       # every usable row, once
    assert {r["id"]: r["reference"] for r in records} == {r["id"]: r["text"] for r in good}
    summary = json.loads((tmp_path / "results" / "eval.summary.json").read_text())
    assert summary["skipped"] == {"missing_text": 1, "undecodable_audio": 1}
    assert printed["skipped"] == summary["skipped"] and printed["wer"] == summary["wer"]
    normalize = text_normalizer(None)
    expected = error_rates([normalize(r["reference"]) for r in records], [normalize(r["hypothesis"]) for r in records])
    assert summary["wer"] == pytest.approx(expected["wer"]) and summary["cer"] == pytest.approx(expected["cer"])
    assert summary["utterances"] == len(good) and math.isfinite(summary["loss"])
    gating = summary["gating"]
    assert [layer["layer"] for layer in gating["layers"]] == [0, 1]                 # every steered layer
    for layer in gating["layers"]:
        assert len(layer["usage"]) == 3 and sum(layer["usage"]) == pytest.approx(1.0)
        assert layer["top_share"] == pytest.approx(max(layer["usage"]))
        assert layer["usage_entropy"] == pytest.approx(-sum(u * math.log(u) for u in layer["usage"]))


def test_transcribe_prints_one_line_per_file_matching_eval(tmp_path, capsys):
    import soundfile as sf

    from steermoe.audio import decode_audio
    good = planted_parquet(tmp_path / "eval.parquet", good_rows=3)
    paths = []
    for row in good:
        audio, rate = decode_audio(row["audio"]["bytes"])
        paths.append(str(tmp_path / f"{row['id']}.wav"))
        sf.write(paths[-1], audio, rate)
    assert main(["transcribe", "--checkpoint", tiny_run(), "--max_new_tokens", "5", "--device", "cpu", *paths]) == 0
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert [line.split("\t")[0] for line in lines] == paths
    out = tmp_path / "eval.jsonl"
    main(["eval", "--checkpoint", tiny_run(), "--data", str(tmp_path / "eval.parquet"), "--output", str(out),
          "--max_new_tokens", "5", "--id_column", "id", "--device", "cpu"])
    hypotheses = {json.loads(line)["id"]: json.loads(line)["hypothesis"] for line in out.read_text().splitlines()}
    assert [line.split("\t", 1)[1] for line in lines] == [hypotheses[row["id"]] for row in good]


def unusable_parquet(path, rows=3) -> str:
    """``rows`` bundled utterances, every one without a transcript."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    utterances = pq.read_table(SPEECH).slice(0, rows).to_pylist()
    pq.write_table(pa.Table.from_pylist([{**r, "text": None} for r in utterances]), path)
    return str(path)


def test_eval_batches_checks_batch_size_and_fails_on_data_without_a_usable_row(tmp_path):
    from steermoe.data import ParquetSpeechSource
    from steermoe.evaluate import eval_batches

    planted_parquet(tmp_path / "eval.parquet", good_rows=5)
    source = ParquetSpeechSource(str(tmp_path / "eval.parquet"))
    assert [len(batch) for batch in eval_batches(source, 2)] == [2, 2, 1]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"batch_size must be an int >= 1; got {bad!r}"):
            next(eval_batches(source, bad))
    path = unusable_parquet(tmp_path / "unusable.parquet")
    with pytest.raises(ValueError, match=r"no usable row in .*unusable.parquet \(3 rows; skipped: missing_text=3\)"):
        list(eval_batches(ParquetSpeechSource(path), 2))
    assert list(eval_batches(ParquetSpeechSource(path), 2, limit=0)) == []      # asked for none: no error


def test_eval_records_keep_the_file_order_and_a_progress_bar_counts_utterances(tmp_path, monkeypatch):
    from steermoe.checkpoint import resolve_checkpoint
    from steermoe.data import ParquetSpeechSource
    from steermoe.evaluate import eval_batches, evaluate
    from steermoe.model import SteerMoEModel

    planted_parquet(tmp_path / "eval.parquet", good_rows=7)
    source = ParquetSpeechSource(str(tmp_path / "eval.parquet"), id_column="id")
    ids = [e.id for e in source]
    served = [i for batch in eval_batches(source, 2) for i in batch.ids]
    assert sorted(served) == sorted(ids) and served != ids              # length sorting does reorder this set
    model = SteerMoEModel.from_trainable(resolve_checkpoint(tiny_run()))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for progress, tty in ((None, False), (None, True), (True, False), (False, True)):  # default: a bar on a TTY
        out, stderr = tmp_path / f"records-{progress}-{tty}.jsonl", (Terminal if tty else io.StringIO)()
        monkeypatch.setattr(sys, "stderr", stderr)
        summary = evaluate(model, eval_batches(source, 2), normalize=text_normalizer(None), max_new_tokens=2,
                           records_path=str(out), total=source.num_rows, progress=progress)
        assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ids
        bar = "eval: " in stderr.getvalue() and f"{len(ids)}/{source.num_rows} " in stderr.getvalue()  # 2 rows skipped
        assert bar == (tty if progress is None else progress)
    assert summary["utterances"] == len(ids)
