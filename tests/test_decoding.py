"""The decoding settings (``model.max_new_tokens``, ``model.max_tokens_per_second``) travel with the trainable
weights: eval and transcribe use the checkpoint's unless told otherwise, and checkpoints written without them still
load."""
import json
import os

import pytest
import torch
from test_cli import run_copy, wav_file  # noqa: F401 - run_copy is a fixture
from test_train import tiny_assets, tiny_config, tiny_run

import steermoe.cli
from steermoe.checkpoint import latest_checkpoint
from steermoe.cli import main
from steermoe.model import CONFIG_NAME, SteerMoEModel
from steermoe.train import build_model


@pytest.fixture
def budgets(monkeypatch):
    """The max_new_tokens every LLM generate() of the commands receives, in call order."""
    seen = []
    load = steermoe.cli._load_model

    def spying_load(args):
        model, path = load(args)
        generate = model.llm.generate
        model.llm.generate = lambda *a, **kw: seen.append(kw["max_new_tokens"]) or generate(*a, **kw)
        return model, path

    monkeypatch.setattr(steermoe.cli, "_load_model", spying_load)
    return seen


def test_the_checkpoint_keeps_max_new_tokens_and_the_commands_default_to_it(tmp_path, budgets):
    newest = latest_checkpoint(tiny_run())                      # trained with model.max_new_tokens=6
    with open(os.path.join(newest, CONFIG_NAME)) as f:
        assert json.load(f)["max_new_tokens"] == 6
    assert SteerMoEModel.from_trainable(newest, dtype="float32").config["max_new_tokens"] == 6
    audio = wav_file(tmp_path / "a.wav")
    assert main(["transcribe", "--checkpoint", newest, "--device", "cpu", audio]) == 0
    assert main(["eval", "--checkpoint", newest, "--device", "cpu", "--data", tiny_assets()["rows4"]]) == 0
    assert set(budgets) == {6}
    budgets.clear()
    for command in (["transcribe", audio], ["eval", "--data", tiny_assets()["rows4"]]):
        assert main([command[0], "--checkpoint", newest, "--device", "cpu", "--max_new_tokens", "3",
                     *command[1:]]) == 0
    assert set(budgets) == {3}


def test_a_checkpoint_without_decoding_settings_loads_with_the_default(run_copy, tmp_path, budgets):  # noqa: F811
    newest = latest_checkpoint(str(run_copy))
    path = os.path.join(newest, CONFIG_NAME)
    with open(path) as f:
        config = json.load(f)
    del config["max_new_tokens"], config["max_tokens_per_second"]   # as checkpoints were written before
    with open(path, "w") as f:
        json.dump(config, f)
    assert main(["transcribe", "--checkpoint", newest, "--device", "cpu", wav_file(tmp_path / "a.wav")]) == 0
    assert budgets == [128]


def test_max_tokens_per_second_travels_with_the_checkpoint_and_the_commands_override_it(run_copy, tmp_path,  # noqa: F811
                                                                                      budgets, capsys):
    newest = latest_checkpoint(str(run_copy))
    path = os.path.join(newest, CONFIG_NAME)
    with open(path) as f:
        config = json.load(f)
    assert config["max_tokens_per_second"] is None               # the run's default: no cap
    config["max_tokens_per_second"] = 20.0
    with open(path, "w") as f:
        json.dump(config, f)
    audio = wav_file(tmp_path / "a.wav")                         # 0.1 s: 10 mel frames
    for extra, budget in (([], 2), (["--max_tokens_per_second", "40"], 4), (["--max_tokens_per_second", "none"], 6)):
        budgets.clear()
        assert main(["transcribe", "--checkpoint", newest, "--device", "cpu", *extra, audio]) == 0
        assert budgets == [budget], extra                        # ceil(rate x 0.1 s), at most max_new_tokens=6
    records = tmp_path / "eval.jsonl"
    assert main(["eval", "--checkpoint", newest, "--device", "cpu", "--data", tiny_assets()["rows4"],
                 "--output", str(records)]) == 0
    with open(tmp_path / "eval.summary.json") as f:
        summary = json.load(f)
    assert (summary["max_new_tokens"], summary["max_tokens_per_second"]) == (6, 20.0)   # what the WER was decoded with
    with pytest.raises(SystemExit) as exc:
        main(["transcribe", "--checkpoint", newest, "--max_tokens_per_second", "0", audio])
    assert exc.value.code == 2
    assert "argument --max_tokens_per_second: expected a number > 0 or 'none'; got '0'" in capsys.readouterr().err


def test_the_run_config_sets_the_models_decoding_settings(tmp_path):
    cfg = tiny_config(tmp_path / "run", extra=["model.max_tokens_per_second=3"])
    model = build_model(cfg.model, torch.device("cpu"))
    assert model.config["max_new_tokens"] == 6 and model.config["max_tokens_per_second"] == 3.0
