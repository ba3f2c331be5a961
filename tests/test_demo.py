"""The demo's pieces: the train / held-out split of the bundled speech and the tiny LLM's pretraining."""
import pyarrow.parquet as pq

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
