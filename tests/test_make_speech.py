"""The synthetic-speech generator: templated sentences, seeded voices, and the parquet it writes (espeak-ng)."""
import hashlib
import io
import json
import re
import shutil

import pyarrow.parquet as pq
import pytest

from steermoe.demo import make_speech
from steermoe.demo.sentences import (CLOSED_CLASSES, TEMPLATES, VOCABULARY, plain_words, telephone_prompts,
                                     templated_sentences, word_sequences)

HAS_ESPEAK = shutil.which("espeak-ng") is not None
HAS_FLITE = shutil.which("flite") is not None


def test_templated_sentences_are_distinct_seeded_and_filled():
    first = templated_sentences(120, seed=3)
    assert len(first) == len(set(first)) == 120
    assert templated_sentences(120, seed=3) == first
    assert templated_sentences(120, seed=4) != first
    assert templated_sentences(40, seed=3) == first[:40]        # a longer list extends a shorter one
    assert not any("{" in s or "}" in s for s in first)
    assert all(s[0].isupper() for s in first)
    assert {field for t in TEMPLATES for field in re.findall(r"\{(\w+)\}", t)} <= set(VOCABULARY)


def test_the_everyday_sentences_stay_those_the_documented_runs_spoke():
    # BENCHMARKS.md's generated sets are `--sentences 2500 --seed 1`: editing TEMPLATES or an existing word list
    # changes them, and the recorded runs could no longer be reproduced
    digest = hashlib.md5("|".join(templated_sentences(2500, seed=1)).encode()).hexdigest()
    assert digest == "e9a446f4cbc9f44b751e313e03f3443b"


def test_telephone_prompts_speak_every_closed_class_word_once_then_templated_prompts():
    words, seen = [], set()
    for word in (w for ws in CLOSED_CLASSES.values() for w in ws):
        if plain_words(word) not in seen:
            seen.add(plain_words(word))
            words.append(word)
    assert "november" in words and "November" not in words    # one word spoken once, in its first class
    prompts = telephone_prompts(600, seed=1)
    assert prompts[:len(words)] == words and len(set(prompts)) == 600
    assert telephone_prompts(600, seed=1) == prompts and telephone_prompts(600, seed=2) != prompts
    assert telephone_prompts(10, seed=1) == words[:10]
    assert "k" in prompts and "K" not in prompts                # a fragment stays as drawn
    sentences = [p for p in prompts if len(p.split()) > 2]     # fragments have at most two words ("twelve P.M.")
    assert len(sentences) > 250 and all(p[0].isupper() and p.endswith((".", "?")) for p in sentences)


def test_held_out_texts_are_never_spoken():
    held_out = ["K", "alpha.", "Thank   you", templated_sentences(3, seed=1)[2], telephone_prompts(300, seed=1)[299]]
    banned = {plain_words(t) for t in held_out}
    for texts in (templated_sentences(40, seed=1, exclude=held_out), telephone_prompts(300, seed=1, exclude=held_out)):
        assert len(texts) == len(set(texts)) and not banned & {plain_words(t) for t in texts}
    assert len(telephone_prompts(300, seed=1, exclude=held_out)) == 300
    assert plain_words("  Is it, Bob's X-ray?") == "is it bob's x ray"


def test_main_speaks_the_sentences_then_the_prompts_then_the_texts(tmp_path, monkeypatch, capsys):
    import pyarrow as pa

    spoken = []

    def fake_table(utterances, telephone=False):
        spoken.extend(utterances)
        return pa.table({"text": [u.text for u in utterances]})

    monkeypatch.setattr(make_speech, "build_table", fake_table)
    (tmp_path / "extra.txt").write_text("Press one for sales.\nThank you.\n")
    (tmp_path / "dev.txt").write_text("thank you\nalpha\n")
    make_speech.main(["--sentences", "3", "--prompts", "40", "--texts", str(tmp_path / "extra.txt"), "--seed", "2",
                      "--exclude", str(tmp_path / "dev.txt"), "--voices", "en-us", "--id-prefix", "p",
                      "--output", str(tmp_path / "x.parquet")])
    held_out = ["thank you", "alpha"]
    assert [u.text for u in spoken] == (templated_sentences(3, seed=2, exclude=held_out)
                                        + telephone_prompts(40, seed=2, exclude=held_out) + ["Press one for sales."])
    assert [u.id for u in spoken][-1] == "p-00043" and "1 lines of --texts dropped" in capsys.readouterr().out
    spoken.clear()
    make_speech.main(["--prompts", "2", "--voices", "en-us", "--id-prefix", "q",
                      "--output", str(tmp_path / "y.parquet")])
    assert [u.text for u in spoken] == telephone_prompts(2, seed=0)


def test_word_sequences_are_distinct_seeded_runs_of_listed_words():
    words = ["Alpha", "bravo", "charlie", "delta", "echo", "bravo", "Foxtrot."]
    texts = word_sequences(200, words, seed=5, min_words=2, max_words=4)
    assert len(texts) == len(set(texts)) == 200
    assert word_sequences(200, words, seed=5, min_words=2, max_words=4) == texts
    assert word_sequences(200, words, seed=6, min_words=2, max_words=4) != texts
    assert word_sequences(50, words, seed=5, min_words=2, max_words=4) == texts[:50]
    assert {len(t.split()) for t in texts} == {2, 3, 4}
    assert {w for t in texts for w in t.split()} == {"alpha", "bravo", "charlie", "delta", "echo", "foxtrot"}
    singles = word_sequences(3, ["a", "b", "c", "d", "e"], seed=0, max_words=1, exclude=["B.", "c"])
    assert sorted(singles) == ["a", "d", "e"]
    with pytest.raises(ValueError, match="cannot make 4 distinct texts from 5 words"):
        word_sequences(4, ["a", "b", "c", "d", "e"], seed=0, max_words=1, exclude=["B.", "c"])


def test_word_sequences_reject_bad_arguments():
    for kwargs, message in (({"words": []}, "words must hold at least one word"),
                            ({"words": ["a"], "min_words": 0}, "need 1 <= min_words <= max_words"),
                            ({"words": ["a"], "min_words": 3, "max_words": 2}, "need 1 <= min_words <= max_words"),
                            ({"words": ["a", "b"], "max_words": 1}, "cannot make 3 distinct texts from 2 words")):
        with pytest.raises(ValueError, match=message):
            word_sequences(3, **kwargs)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        word_sequences(-1, ["a"])


def byte_level_tokenizer_dir(path, tokens):
    """A tokenizer directory whose tokens are ``tokens`` ("Ġ" = a leading space, as byte-level BPE writes it)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["[UNK]", *tokens])}, unk_token="[UNK]"))
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return str(path)


def test_read_words_from_a_tokenizer_a_word_list_and_both(tmp_path):
    tokenizer = byte_level_tokenizer_dir(tmp_path / "tok", ["Ġthe", "Ġcon", "ing", "Ġab", "ĠThe", "ĠcafÃ©", "Ġx1",
                                                            "Ġsteer", "Ġmixture"])
    assert make_speech.read_words([tokenizer]) == ["the", "con", "steer", "mixture"]
    (tmp_path / "dict.txt").write_text("mixture\nthe\nsteer\nrouter\nthe\nna\u00efve\nEmma\nrouter's\nan\n")
    assert make_speech.read_words([str(tmp_path / "dict.txt")]) == ["mixture", "the", "steer", "router"]
    assert make_speech.read_words([tokenizer, str(tmp_path / "dict.txt")]) == ["the", "steer", "mixture"]
    assert make_speech.read_words([str(tmp_path / "dict.txt"), tokenizer]) == ["mixture", "the", "steer"]
    (tmp_path / "other.txt").write_text("router\nEmma\n")
    with pytest.raises(ValueError, match="no word is in all of them"):
        make_speech.read_words([tokenizer, str(tmp_path / "other.txt")])
    (tmp_path / "names.txt").write_text("Emma\nab\n")
    with pytest.raises(ValueError, match="names.txt: no words"):
        make_speech.read_words([str(tmp_path / "names.txt")])
    assert make_speech.read_words([tokenizer, str(tmp_path / "dict.txt")], limit=2) == ["the", "steer"]


def test_main_speaks_words_after_the_prompts_and_checks_their_flags(tmp_path, monkeypatch, capsys):
    import pyarrow as pa

    spoken = []
    monkeypatch.setattr(make_speech, "build_table",
                        lambda utterances, telephone=False: spoken.extend(utterances) or pa.table({"x": [1]}))
    (tmp_path / "words.txt").write_text("alpha\nbravo\ncharlie\ndelta\n")
    (tmp_path / "extra.txt").write_text("Press one.\n")
    out = str(tmp_path / "x.parquet")
    make_speech.main(["--prompts", "60", "--words", "12", "--word-source", str(tmp_path / "words.txt"),
                      "--word-limit", "3", "--texts", str(tmp_path / "extra.txt"), "--seed", "4", "--voices", "en-us",
                      "--output", out])
    prompts, three = telephone_prompts(60, seed=4), ["alpha", "bravo", "charlie"]     # prompts 27-29: these three
    assert [u.text for u in spoken] == prompts + word_sequences(12, three, seed=4, exclude=prompts) + ["Press one."]
    assert set(three) & set(word_sequences(12, three, seed=4))        # without the prompts excluded, one repeats
    assert "--words: 12 texts from 3 words" in capsys.readouterr().out
    for bad, message in ((["--words", "2"], "--words needs --word-source"),
                         (["--words", "-1"], "--words must be >= 0"),
                         (["--words", "2", "--word-source", str(tmp_path / "missing")], "no such file or directory"),
                         (["--word-source", str(tmp_path / "words.txt")], "--word-source needs --words"),
                         (["--words", "2", "--word-source", str(tmp_path / "extra.txt")], "extra.txt: no words"),
                         (["--words", "2", "--word-source", str(tmp_path / "words.txt"), "--word-limit", "0"],
                          "--word-limit must be >= 1")):
        with pytest.raises(SystemExit):
            make_speech.main([*bad, "--output", out])
        assert message in capsys.readouterr().err


def test_templated_sentences_reject_bad_templates():
    for bad in ((), "Press {digit}."):
        with pytest.raises(ValueError, match="templates must be a non-empty sequence of strings"):
            templated_sentences(3, templates=bad)


@pytest.mark.parametrize("n", [-1, 1.5, True])
def test_templated_sentences_reject_bad_counts(n):
    for generate in (templated_sentences, telephone_prompts):
        with pytest.raises(ValueError, match="n must be an int >= 0"):
            generate(n)


def test_training_utterances_draw_seeded_voices_from_the_given_lists():
    texts = [f"sentence {i}" for i in range(30)]
    a = make_speech.training_utterances(texts, voices=["en-us", "en-gb+f3"], speeds=[140, 180], pitches=[40],
                                        seed=1)
    assert [u.text for u in a] == texts and [u.id for u in a][:2] == ["espeak-00000", "espeak-00001"]
    assert {u.voice for u in a} == {"en-us", "en-gb+f3"} and {u.speed for u in a} == {140, 180}
    assert {u.pitch for u in a} == {40}
    assert make_speech.training_utterances(texts, voices=["en-us", "en-gb+f3"], speeds=[140, 180], pitches=[40],
                                           seed=1) == a
    with pytest.raises(ValueError, match="voices must name at least one value"):
        make_speech.training_utterances(texts, voices=[])


def test_read_texts_from_parquet_and_text_files(tmp_path):
    (tmp_path / "t.txt").write_text("One.\n\n  Two.  \n")
    assert make_speech.read_texts(str(tmp_path / "t.txt")) == ["One.", "Two."]
    assert make_speech.read_texts(make_speech.DEFAULT_OUTPUT)[:2] == make_speech.SENTENCES[:2]


@pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not installed (apt-get install -y espeak-ng)")
def test_generated_set_schema_and_determinism(tmp_path):
    import soundfile as sf

    from steermoe.data import ParquetSpeechSource

    args = ["--sentences", "2", "--texts", str(tmp_path / "extra.txt"), "--voices", "en-us,en-gb+f3",
            "--seed", "5", "--row-group-size", "2"]
    (tmp_path / "extra.txt").write_text("Press one for sales.\n")
    for name in ("a", "b"):
        make_speech.main([*args, "--output", str(tmp_path / f"{name}.parquet")])
    a, b = (pq.read_table(tmp_path / f"{n}.parquet") for n in ("a", "b"))
    assert a.equals(b)                                          # deterministic, audio bytes included
    assert a.column_names == ["audio", "text", "id"]
    assert json.loads(a.schema.metadata[b"huggingface"])["info"]["features"]["audio"]["_type"] == "Audio"
    assert a.column("text").to_pylist() == templated_sentences(2, seed=5) + ["Press one for sales."]
    assert a.column("id").to_pylist() == ["espeak-00000", "espeak-00001", "espeak-00002"]
    assert pq.ParquetFile(tmp_path / "a.parquet").metadata.num_row_groups == 2
    for cell in a.column("audio").to_pylist():
        samples, rate = sf.read(io.BytesIO(cell["bytes"]))
        assert rate == 16000 and 0.5 < len(samples) / rate < 10 and samples.std() > 0.01
    source = ParquetSpeechSource(str(tmp_path / "a.parquet"), id_column="id")
    assert [e.text for e in source] == a.column("text").to_pylist() and not source.skipped
    make_speech.main([*args, "--id-prefix", "tel", "--output", str(tmp_path / "c.parquet")])
    assert pq.read_table(tmp_path / "c.parquet").column("id").to_pylist() == ["tel-00000", "tel-00001", "tel-00002"]


def median_f0(samples, rate=16000):
    """Median autocorrelation pitch (Hz) over the voiced 40 ms frames of ``samples``."""
    import numpy as np

    frame, pitches = int(0.04 * rate), []
    for start in range(0, len(samples) - frame, frame // 2):
        x = samples[start:start + frame] - samples[start:start + frame].mean()
        if x.std() < 0.02:
            continue
        ac = np.correlate(x, x, "full")[frame - 1:]
        lag = rate // 400 + int(np.argmax(ac[rate // 400: rate // 60]))
        if ac[lag] > 0.5 * ac[0]:
            pitches.append(rate / lag)
    return float(np.median(pitches))


def test_flite_voices_map_speed_and_pitch_to_its_parameters(monkeypatch):
    seen = []

    def run(command, check):
        seen.append(command)
        raise RuntimeError("stop")

    monkeypatch.setattr(make_speech, "flite_voices", lambda: ("flite:slt", "flite:awb"))
    monkeypatch.setattr(make_speech.subprocess, "run", run)
    with pytest.raises(RuntimeError, match="stop"):
        make_speech.synthesize("Hello.", "flite:awb", 140, 70)
    assert seen[-1] == ["flite", "-voice", "awb", "--setf", "duration_stretch=1.2500", "--setf",
                        f"f0_shift={2 ** 0.2:.4f}", "-t", "Hello.", "-o", seen[-1][-1]]
    with pytest.raises(RuntimeError, match="stop"):
        make_speech.synthesize("Hello.", "en-us+f2", 140, 70)
    assert seen[-1][:7] == ["espeak-ng", "-v", "en-us+f2", "-s", "140", "-p", "70"]
    # flite falls back to its default voice on an unknown name: the name is checked before flite runs
    with pytest.raises(ValueError, match="voice 'flite:rms': flite offers flite:slt, flite:awb"):
        make_speech.synthesize("Hello.", "flite:rms", 140)
    assert len(seen) == 2


def test_main_rejects_an_unknown_flite_voice_before_synthesising(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(make_speech, "flite_voices", lambda: ())
    monkeypatch.setattr(make_speech, "build_table", lambda *a, **k: pytest.fail("synthesised"))
    with pytest.raises(SystemExit):
        make_speech.main(["--sentences", "1", "--voices", "en-us,flite:slt", "--output", str(tmp_path / "x.parquet")])
    assert "--voices: voice 'flite:slt': flite offers nothing (not installed" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_FLITE, reason="flite is not installed (apt-get install -y flite)")
def test_flite_speed_stretches_durations_and_pitch_scales_f0():
    text = "Please enter the extension number followed by the pound key."
    own = make_speech.synthesize(text, "flite:slt", make_speech.ESPEAK_RATE, 50)
    slow_high = make_speech.synthesize(text, "flite:slt", 125, 80)
    assert own.dtype.name == "float32" and own.std() > 0.01
    assert 1.3 < len(slow_high) / len(own) < 1.5                       # 175 / 125 = 1.4
    assert 1.15 < median_f0(slow_high) / median_f0(own) < 1.31         # 2 ** 0.3 = 1.23
    assert set(make_speech.FLITE_VOICES) <= set(make_speech.flite_voices())


def test_main_rejects_bad_arguments(tmp_path, capsys):
    for bad in (["--sentences", "-2"], ["--prompts", "-1"], ["--row-group-size", "0"],
                ["--sentences", "1", "--id-prefix", " "], ["--sentences", "1", "--id-prefix", "a~b"],
                ["--id-prefix", "tel"], ["--speeds", "150,0"]):
        with pytest.raises(SystemExit):
            make_speech.main([*bad, "--output", str(tmp_path / "x.parquet")])
        assert bad[-2] in capsys.readouterr().err


def test_telephone_channel_keeps_the_voice_band_and_drops_the_rest():
    import numpy as np

    t = np.arange(16000) / 16000
    low, high = 0.5 * np.sin(2 * np.pi * 1000 * t), 0.3 * np.sin(2 * np.pi * 6000 * t)
    out = make_speech.telephone_channel((low + high).astype(np.float32))
    assert out.dtype == np.float32 and out.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(out[1000:-1000])) ** 2
    freq = np.fft.rfftfreq(14000, 1 / 16000)
    assert spectrum[freq > 4000].sum() < 1e-4 * spectrum.sum()           # the 6 kHz tone is gone
    kept = out[1000:-1000] @ low[1000:-1000] / (low[1000:-1000] @ low[1000:-1000])
    assert 0.97 < kept < 1.03                                             # the 1 kHz tone passes at its level
    residual = out[1000:-1000] - kept * low[1000:-1000]
    snr = 10 * np.log10((low[1000:-1000] ** 2).sum() / (residual ** 2).sum())
    assert snr > 25                                                       # μ-law's 8-bit steps keep the tone clean
    quiet = make_speech.telephone_channel((0.005 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))
    residual = quiet[1000:-1000] - 0.005 * np.sin(2 * np.pi * 1000 * t[1000:-1000])
    # μ-law's fine steps near zero: a linear 8-bit code (steps of 1/128) would bury a tone of 0.005
    assert 10 * np.log10((0.005 ** 2 / 2 * 14000) / (residual ** 2).sum()) > 25
    assert np.all(make_speech.telephone_channel(np.zeros(800, np.float32)) == 0)   # silence stays silent


def test_telephone_channel_quantises_to_256_mu_law_levels(monkeypatch):
    import numpy as np

    from steermoe import audio

    original, seen = audio.resample, {}

    def spy(samples, orig_sr, target_sr=16000):
        if orig_sr == make_speech.TELEPHONE_RATE:
            seen["narrow"] = samples.copy()
        return original(samples, orig_sr, target_sr)

    monkeypatch.setattr(audio, "resample", spy)
    make_speech.telephone_channel(np.random.default_rng(0).uniform(-1, 1, 8000).astype(np.float32))
    assert 200 < len(np.unique(seen["narrow"])) <= 255
