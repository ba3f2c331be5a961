"""Base checkpoints that do not exist or do not fit fail before training or loading, naming what the user wrote:
the config key (``model.whisper`` / ``model.llm``), or a checkpoint's stored base and the option that replaces it."""
import json
import os
import shutil

import pytest
from test_cli import fails, run_copy, wav_file  # noqa: F401 - run_copy is a fixture
from test_train import tiny_assets

from steermoe.bases import BaseModelError, check_base_exists, check_tokenizer, loading
from steermoe.checkpoint import latest_checkpoint, list_checkpoints
from steermoe.cli import main
from steermoe.model import CONFIG_NAME


def train_argv(tmp_path, **bases):
    a = tiny_assets()
    names = {"whisper": a["whisper"], "llm": a["llm"], **bases}
    return ["train", f"model.whisper={names['whisper']}", f"model.llm={names['llm']}", "model.dtype=float32",
            "model.num_experts=3", f"data.train={a['rows4']}", f"output_dir={tmp_path / 'run'}", "train.device=cpu",
            "train.max_steps=1"]


@pytest.mark.parametrize("role", ["whisper", "llm"])
def test_a_missing_base_folder_is_named_with_its_config_key(tmp_path, capsys, role):
    missing = str(tmp_path / "nonexistent")
    fails(capsys, train_argv(tmp_path, **{role: missing}), 2, f"model.{role}={missing}: the folder does not exist")
    assert not (tmp_path / "run").exists()


def test_a_hub_id_while_offline_and_a_failed_fetch_name_the_base(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(capsys, train_argv(tmp_path, llm="someorg/somemodel"), 2,
          "model.llm=someorg/somemodel: no such folder, and the hub is offline")
    import huggingface_hub.constants

    cache = tmp_path / "hub"                                # offline, a hub id in the local cache still loads
    snapshot = cache / "models--someorg--somemodel" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--someorg--somemodel" / "refs").mkdir()
    (cache / "models--someorg--somemodel" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    check_base_exists("llm", "someorg/somemodel")
    with pytest.raises(BaseModelError, match="the hub is offline"):
        check_base_exists("llm", "someorg/othermodel")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    check_base_exists("llm", "someorg/somemodel")          # online, a hub id may be fetched
    with pytest.raises(BaseModelError, match="llm checkpoint someorg/somemodel: no such folder, and fetching it as "
                                             "a hub id failed: 404"):
        with loading("llm", "someorg/somemodel"):
            raise OSError("404")
    for name in ("/abs/missing", "./rel/missing", "~/missing", "a/b/c"):
        with pytest.raises(BaseModelError, match="the folder does not exist"):
            check_base_exists("whisper", name)
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(BaseModelError, match="is a file"):
        check_base_exists("whisper", str(file))


def test_swapped_bases_are_named_with_their_config_key(tmp_path, capsys):
    a = tiny_assets()
    fails(capsys, train_argv(tmp_path, llm=a["whisper"]), 2, f"model.llm={a['whisper']}: is a WhisperConfig (whisper), "
          "an encoder-decoder model; expected a decoder-only causal LM")
    fails(capsys, train_argv(tmp_path, whisper=a["llm"]), 2, f"model.whisper={a['llm']}: is a LlamaConfig (llama); "
          "expected a Whisper checkpoint")
    assert not (tmp_path / "run").exists()


def word_level_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "</s>", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def test_an_llm_without_a_usable_tokenizer_is_refused(tmp_path, capsys):
    llm = tmp_path / "llm"
    shutil.copytree(tiny_assets()["llm"], llm)
    for name in os.listdir(llm):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(llm / name)
    word_level_tokenizer([]).save_pretrained(str(llm))      # two tokens: a stub, not a language model's
    fails(capsys, train_argv(tmp_path, llm=str(llm)), 2, f"model.llm={llm}: its tokenizer (", "has 2 tokens; "
          "expected a language model's vocabulary")
    unknown = word_level_tokenizer([f"w{i}" for i in range(200)])   # large enough, but knows none of the words
    with pytest.raises(BaseModelError, match="encodes 'the quick brown fox .*' as \\[0, 0, 0, 0, 0, 0, 0, 0, 0\\]; "
                                             "expected several known tokens"):
        check_tokenizer("x", unknown)
    check_tokenizer("x", word_level_tokenizer([f"w{i}" for i in range(200)] + ["the", "fox"]))


def test_a_checkpoint_whose_bases_moved_names_them_and_the_option(run_copy, tmp_path, capsys):  # noqa: F811
    newest = latest_checkpoint(str(run_copy))
    config_path = os.path.join(newest, CONFIG_NAME)
    with open(config_path) as f:
        config = json.load(f)
    moved = str(tmp_path / "moved-whisper")
    config["whisper"] = moved
    with open(config_path, "w") as f:
        json.dump(config, f)
    audio = wav_file(tmp_path / "a.wav")
    fails(capsys, ["transcribe", "--checkpoint", newest, "--device", "cpu", audio], 1,
          f"checkpoint {newest} names the whisper checkpoint {moved}: the folder does not exist; pass --whisper PATH")
    fails(capsys, ["eval", "--checkpoint", newest, "--device", "cpu", "--data", tiny_assets()["rows4"],
                   "--whisper", tiny_assets()["whisper"], "--llm", str(tmp_path / "gone")], 1,
          f"--llm {tmp_path / 'gone'}: the folder does not exist")
    capsys.readouterr()          # the moved base given with --whisper loads
    assert main(["transcribe", "--checkpoint", newest, "--device", "cpu", "--whisper", tiny_assets()["whisper"],
                 "--max_new_tokens", "2", audio]) == 0
    assert capsys.readouterr().out.startswith(f"{audio}\t")


def test_resume_after_the_bases_moved_names_the_key_and_takes_the_new_place(tmp_path, capsys):
    whisper = tmp_path / "whisper"
    shutil.copytree(tiny_assets()["whisper"], whisper)
    argv = train_argv(tmp_path, whisper=str(whisper))
    assert main(argv) == 0
    moved = tmp_path / "moved"
    os.rename(whisper, moved)
    fails(capsys, argv + ["--resume", "train.max_steps=2"], 2, f"model.whisper={whisper}: the folder does not exist; "
          "if it moved, pass model.whisper=NEW_PATH with --resume")
    assert main(argv + ["--resume", "train.max_steps=2", f"model.whisper={moved}"]) == 0
    out = capsys.readouterr().out
    assert f"model.whisper: {whisper} -> {moved} (a moved base" in out and "resuming from step 1" in out
    assert [s for s, _ in list_checkpoints(str(tmp_path / "run"))] == [1, 2]
