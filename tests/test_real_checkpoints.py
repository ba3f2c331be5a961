"""Tier ``real``: the package on real pretrained checkpoints and real recorded speech.

Runs when STEERMOE_REAL_MODELS names a directory holding Hugging Face checkpoints under ``hf/`` (whisper-base,
whisper-tiny.en, smollm2-135m-instruct) and parquet speech under ``speech/`` (asterisk_train, asterisk_dev);
``pytest -m real`` selects the tier (tests/conftest.py skips it without the variable and sets HF_HUB_OFFLINE=1
with it). Everything runs on CPU, in float32 unless a test says otherwise.
"""
import contextlib
import math
import os

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.real

WHISPERS = ("whisper-base", "whisper-tiny.en")
LLM = "smollm2-135m-instruct"
NEEDED = tuple(f"hf/{name}" for name in WHISPERS + (LLM,)) + ("speech/asterisk_train.parquet",
                                                                "speech/asterisk_dev.parquet")
DEV_CLIPS = 3          # the first rows of asterisk_dev: 0.7, 3.5 and 2.6 s
GREEDY = dict(do_sample=False, num_beams=1)


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def real_dir() -> str:
    root = os.environ.get("STEERMOE_REAL_MODELS", "")
    missing = [path for path in NEEDED if not os.path.exists(os.path.join(root, path))]
    if missing:
        pytest.fail(f"STEERMOE_REAL_MODELS={root!r} lacks {', '.join(missing)}")
    return root


@pytest.fixture(scope="module", autouse=True)
def _all_cpus():
    """Use every CPU this process may run on (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    yield
    torch.set_num_threads(threads)


def examples(real_dir: str, split: str, indices):
    """SpeechExamples of ``speech/asterisk_<split>.parquet`` rows ``indices``, read by the package's reader."""
    from steermoe.data import ParquetSpeechSource

    rows = list(ParquetSpeechSource(os.path.join(real_dir, "speech", f"asterisk_{split}.parquet")))
    return [rows[i] for i in indices]


@pytest.fixture(scope="module")
def dev_clips(real_dir):
    return examples(real_dir, "dev", range(DEV_CLIPS))


@pytest.fixture(scope="module", params=WHISPERS)
def whisper(request, real_dir):
    """(Whisper model, its processor, SteeredWhisperEncoder of the same checkpoint at steering scale 0)."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from steermoe import SteeredWhisperEncoder

    path = os.path.join(real_dir, "hf", request.param)
    model = WhisperForConditionalGeneration.from_pretrained(path).eval()
    steered = SteeredWhisperEncoder.from_pretrained(path, steering_scale=0.0).eval()
    return model, WhisperProcessor.from_pretrained(path), steered


def whisper_generate(model, **inputs) -> torch.Tensor:
    """Greedy token ids (English transcription for multilingual checkpoints)."""
    kwargs = dict(GREEDY)
    if model.generation_config.is_multilingual:
        kwargs.update(language="en", task="transcribe")
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)


@contextlib.contextmanager
def encoder_swapped(model, encoder):
    """``model`` (a WhisperForConditionalGeneration) with ``encoder`` in place of its own."""
    own = model.model.encoder
    model.model.encoder = encoder
    try:
        yield model
    finally:
        model.model.encoder = own


@contextlib.contextmanager
def whisper_encoder_at_length(encoder, frames: int):
    """Whisper's own encoder taking inputs of ``frames`` encoder frames instead of 30 s: its position table and the
    input length it insists on are cut to ``frames`` for the duration (its forward code is unchanged)."""
    table, config = encoder.embed_positions, encoder.config
    window = config.max_source_positions
    encoder.embed_positions = nn.Embedding.from_pretrained(table.weight[:frames])
    config.max_source_positions = frames
    try:
        yield encoder
    finally:
        encoder.embed_positions, config.max_source_positions = table, window


def word_error_rate(references, hypotheses, whisper_path: str) -> float:
    from steermoe.evaluate import error_rates, text_normalizer

    normalize = text_normalizer(whisper_path)
    return error_rates([normalize(r) for r in references], [normalize(h) for h in hypotheses])["wer"]


# ------------------------------------------------------------------------------ the drop-in encoder, scale 0

def test_steered_encoder_at_scale_0_is_whisper_on_30s_windows(whisper, dev_clips):
    model, processor, steered = whisper
    inputs = processor.feature_extractor([e.audio for e in dev_clips], sampling_rate=16000, return_tensors="pt",
                                         return_attention_mask=True)
    assert inputs.input_features.shape[-1] == 3000
    with torch.no_grad():
        expected = model.model.encoder(inputs.input_features).last_hidden_state
        got = steered(inputs.input_features, attention_mask=inputs.attention_mask).last_hidden_state
    assert torch.equal(got, expected)

    # generate() with the steered encoder swapped in: the same greedy tokens as Whisper's own, and real transcripts
    ids = whisper_generate(model, input_features=inputs.input_features, attention_mask=inputs.attention_mask)
    with encoder_swapped(model, steered):
        swapped = whisper_generate(model, input_features=inputs.input_features, attention_mask=inputs.attention_mask)
    assert torch.equal(swapped, ids)
    texts = processor.batch_decode(ids, skip_special_tokens=True)
    assert word_error_rate([e.text for e in dev_clips], texts, model.config._name_or_path) < 0.3, texts


def test_steered_encoder_at_scale_0_is_whisper_on_unpadded_clips(whisper, dev_clips):
    """Each clip at its own length, alone and in a batch padded to the longest clip.

    Whisper's encoder only takes 30 s windows, so the reference is its own forward with the position table cut to
    the clip (:func:`whisper_encoder_at_length`). Whisper's ``generate()`` pads features to 30 s itself, so the
    transcripts compared here (for the padded rows) are its decoder's on the encoder states (``encoder_outputs``),
    capped at 16 tokens: fed unpadded states, Whisper's decoder (trained on 30 s windows) often does not stop.
    """
    from transformers.modeling_outputs import BaseModelOutput

    from steermoe.audio import LogMel
    from steermoe.data import collate

    model, processor, steered = whisper
    batch = collate(dev_clips)
    features, mask = LogMel(processor.feature_extractor)(batch.waveforms, batch.lengths)
    with torch.no_grad():
        batched = steered(features, attention_mask=mask)
    frames = steered.output_lengths(mask.sum(-1))
    assert torch.equal(batched.attention_mask.sum(-1), frames)
    for i, n in enumerate(frames.tolist()):
        alone = features[i:i + 1, :, :int(mask[i].sum())]
        with torch.no_grad(), whisper_encoder_at_length(model.model.encoder, n) as encoder:
            expected = encoder(alone).last_hidden_state
            got = steered(alone).last_hidden_state
        assert torch.equal(got, expected)                # alone: no padding, the same computation
        row = batched.last_hidden_state[i:i + 1]
        # in the batch: padded keys masked out (another attention kernel: float32 rounding), padded frames zero
        torch.testing.assert_close(row[:, :n], expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
        assert not row[:, n:].any()
        if n < row.shape[1]:                              # a padded row: does the rounding change the transcript?
            ids = [whisper_generate(model, encoder_outputs=BaseModelOutput(last_hidden_state=states),
                                    max_new_tokens=16) for states in (expected, row[:, :n])]
            assert torch.equal(ids[0], ids[1]), [processor.batch_decode(x, skip_special_tokens=True) for x in ids]


# --------------------------------------------------------------------------------- SteerMoEModel on SmolLM2

TRAIN_ROWS = (6, 43)   # asterisk_train: "Followed by the pound key." (1.5 s), "To leave the conference..." (1.5 s)
SYSTEM_TURN = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def smollm2_model(real_dir, dtype="float32", **kwargs):
    from steermoe.model import SteerMoEModel

    return SteerMoEModel.from_pretrained(os.path.join(real_dir, "hf", "whisper-base"),
                                         os.path.join(real_dir, "hf", LLM), dtype=dtype, **kwargs)


def test_smollm2_chat_template_puts_the_audio_in_the_user_turn_and_labels_only_the_answer(real_dir):
    model = smollm2_model(real_dir)
    fmt, tokenizer = model.prompt_format, model.tokenizer
    assert fmt.chat and tokenizer.convert_ids_to_tokens(fmt.end_token_id) == "<|im_end|>"
    before, after = fmt.around_audio()
    # the real tokenizer's rendering of the conversation, with the audio where "AUDIO" stands
    texts = ["Followed by the pound key.", "To leave the conference..."]
    for text in texts:
        conversation = tokenizer.apply_chat_template(
            [{"role": "user", "content": "AUDIO\nTranscribe the audio."}, {"role": "assistant", "content": text}],
            tokenize=False)
        ours = tokenizer.decode(before) + "AUDIO" + tokenizer.decode(after) + tokenizer.decode(fmt.target(text))
        assert conversation == ours + "\n"              # the template closes the turn with "<|im_end|>\n"
    assert tokenizer.decode(before) == SYSTEM_TURN + "<|im_start|>user\n"
    assert tokenizer.decode(after) == "\nTranscribe the audio.<|im_end|>\n<|im_start|>assistant\n"

    # the rows the LLM is fed: prompt · audio · prompt · transcript · <|im_end|>, labels on the last two only
    hidden = model.llm.get_input_embeddings().embedding_dim
    audio, lengths = torch.randn(2, 7, hidden), torch.tensor([7, 4])
    embed = model.llm.get_input_embeddings()
    with torch.no_grad():
        embeds, mask, labels = model._sequences(audio, lengths, None, texts, left_pad=False)
        for i, text in enumerate(texts):
            target, n_audio = fmt.target(text), int(lengths[i])
            start = len(before) + n_audio + len(after)
            end = start + len(target)
            assert int(mask[i].sum()) == end and bool(mask[i, :end].all())
            assert labels[i, start:end].tolist() == target
            assert bool((labels[i, :start] == -100).all()) and bool((labels[i, end:] == -100).all())
            torch.testing.assert_close(embeds[i, :len(before)], embed(torch.tensor(before)), rtol=0, atol=0)
            torch.testing.assert_close(embeds[i, len(before):len(before) + n_audio], audio[i, :n_audio])
            torch.testing.assert_close(embeds[i, len(before) + n_audio:end], embed(torch.tensor(after + target)),
                                       rtol=0, atol=0)
        # generation rows: left-padded, ending where the assistant's answer starts
        embeds, mask, labels = model._sequences(audio, lengths, None, None, left_pad=True)
        assert labels is None and mask.sum(-1).tolist() == [len(before) + n + len(after) for n in (7, 4)]
        torch.testing.assert_close(embeds[:, -len(after):], embed(torch.tensor(after)).expand(2, -1, -1),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_steps_reduce_the_loss_and_the_saved_checkpoint_transcribes_the_same(real_dir, dev_clips, dtype,
                                                                                       tmp_path, monkeypatch):
    """A fixed batch of two real utterances, four steps of the package's training loop; then the trained model
    and the one reloaded from its checkpoint give the same greedy transcripts and hold the same tensors."""
    import pyarrow.parquet as pq

    import steermoe.train
    from steermoe.config import load_config
    from steermoe.data import collate
    from steermoe.model import SteerMoEModel

    data = tmp_path / "train.parquet"
    pq.write_table(pq.read_table(os.path.join(real_dir, "speech", "asterisk_train.parquet")).take(list(TRAIN_ROWS)),
                   data)
    built = []
    build_model = steermoe.train.build_model
    monkeypatch.setattr(steermoe.train, "build_model", lambda m, device, **kw: built.append(build_model(m, device, **kw)) or built[-1])
    lr = 3e-3
    cfg = load_config(None, [
        f"model.whisper={os.path.join(real_dir, 'hf', 'whisper-base')}", f"model.llm={os.path.join(real_dir, 'hf', LLM)}",
        f"model.dtype={dtype}", f"data.train={data}", f"output_dir={tmp_path / 'run'}", "train.device=cpu",
        "train.batch_size=2", "train.max_steps=4", "train.warmup_steps=0", "train.log_every=1",
        *(f"train.lr_{group}={lr}" for group in ("router", "vectors", "scales", "projector"))])
    result = steermoe.train.train(cfg)
    losses = [r["loss"] for r in steermoe.train.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))]
    assert len(losses) == 4 and all(map(math.isfinite, losses))
    # each logged loss is the one before that step's update; bfloat16 frozen weights make the descent noisy
    assert max(losses[1:]) < losses[0] and min(losses[1:]) < 0.85 * losses[0], losses

    trained = built[0].eval()
    reloaded = SteerMoEModel.from_trainable(result["checkpoint"], device="cpu").eval()
    assert reloaded.config["dtype"] == dtype
    for (name, p), (other, q) in zip(trained._named_trainable().items(), reloaded._named_trainable().items()):
        assert name == other and torch.equal(p, q), name
    batch = collate(dev_clips)
    features, mask = trained.features(batch)
    assert reloaded.generate(features, attention_mask=mask, max_new_tokens=12) == \
        trained.generate(features, attention_mask=mask, max_new_tokens=12)


def test_long_form_cuts_of_recorded_speech_fall_in_its_pauses(real_dir):
    """40 recorded prompts back to back (about 90 s, no gap added): every cut lies in a pause within an utterance
    or between two, its 0.2 s over 40 dB below the speech."""
    import numpy as np

    from steermoe.longform import window_bounds

    audio = np.concatenate([e.audio for e in examples(real_dir, "dev", range(40))]).astype(np.float64)
    bounds = window_bounds(audio, 30 * 16000)
    assert len(bounds) >= 4
    level = np.sqrt(np.mean(audio ** 2))
    for (_, end), (start, _) in zip(bounds, bounds[1:]):
        assert np.sqrt(np.mean(audio[start:end] ** 2)) < 0.01 * level
