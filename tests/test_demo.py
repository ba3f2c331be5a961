"""The demo's pieces: the train / held-out split of the bundled speech and the tiny LLM's pretraining."""
import pyarrow.parquet as pq
import pytest

from steermoe.demo import demo
from steermoe.demo.make_speech import SENTENCES
from steermoe.demo.tiny_models import build_tiny_llm, pretrain_tiny_llm


def test_held_out_utterances_are_never_trained_on(tmp_path):
    paths = demo.split_speech(str(tmp_path))
    texts = {name: pq.read_table(path).column("text").to_pylist() for name, path in paths.items()}
    assert len(texts["held-out"]) == demo.HELD_OUT and len(texts["train"]) == len(SENTENCES) - demo.HELD_OUT
    assert not set(texts["train"]) & set(texts["held-out"])
    assert sorted(texts["train"] + texts["held-out"]) == sorted(SENTENCES)


def test_pretraining_teaches_the_llm_to_repeat_a_sentence(tmp_path):
    path = build_tiny_llm(str(tmp_path / "llm"), hidden_size=64, layers=2, heads=4, ffn_dim=128)
    first, last = pretrain_tiny_llm(path, SENTENCES[:8], prompt="Transcribe the audio.", steps=40, batch_size=8)
    assert first > 4 and last < 0.5 * first        # nats per answer token
    again = pretrain_tiny_llm(path, SENTENCES[:8], prompt="Transcribe the audio.", steps=10, batch_size=8)
    assert again[0] < 0.6 * first                  # the pretrained weights were saved in place


def test_demo_whisper_output_depends_on_the_audio(tmp_path):
    """At transformers' default init (0.02) ~0.1 % of a tiny random Whisper's output variance depends on the audio
    (the sinusoidal positions swamp the convolutions) and no adapter can learn from it; the demo's init keeps most."""
    import torch
    from transformers import WhisperModel

    from steermoe.audio import LogMel, decode_audio
    from steermoe.demo.tiny_models import build_tiny_whisper

    table = pq.read_table(demo.SPEECH).slice(0, 16)
    waves = [torch.as_tensor(decode_audio(row["bytes"])[0]) for row in table.column("audio").to_pylist()]
    frames = min(len(w) for w in waves)
    mel, _ = LogMel(80)(torch.stack([w[:frames] for w in waves]), torch.full((len(waves),), frames))
    encoder = WhisperModel.from_pretrained(build_tiny_whisper(str(tmp_path / "w"), **demo.TINY_WHISPER)).encoder
    with torch.no_grad():
        h = encoder(torch.nn.functional.pad(mel, (0, 3000 - mel.shape[-1]))).last_hidden_state[:, : mel.shape[-1] // 2]
    across_utterances = h.var(0).mean() / (h - h.mean((0, 1))).pow(2).mean()
    assert across_utterances > 0.5


@pytest.mark.slow
def test_demo_learns_the_utterances_it_trains_on(tmp_path):
    """The whole demo as `steermoe demo` runs it (4–10 min on 2 cores): the loss and the train WER fall."""
    result = demo.run_demo(str(tmp_path))
    assert result["loss_end"] < 0.25 * result["loss_start"]
    before, after = result["before"], result["after"]
    assert after["train"]["wer"] < 0.6 and after["train"]["wer"] < before["train"]["wer"] - 0.4
    assert after["train"]["utterances"] == len(SENTENCES) - demo.HELD_OUT
    assert after["held-out"]["utterances"] == demo.HELD_OUT
