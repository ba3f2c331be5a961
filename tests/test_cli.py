"""The ``steermoe`` command: bad input ends with one clear line on stderr, a non-zero exit, nothing overwritten."""
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from test_evaluate import unusable_parquet
from test_train import tiny_assets, tiny_config, tiny_run

from steermoe.checkpoint import list_checkpoints
from steermoe.cli import _parser, main
from steermoe.config import save_config
from steermoe.train import read_metrics


def snapshot(directory):
    """{relative path: sha256} of every file under ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def fails(capsys, argv, code, *needles):
    """Run ``steermoe argv``; check the exit ``code`` and that stderr holds one line containing ``needles``."""
    capsys.readouterr()
    assert main(argv) == code
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and not re.match(r"^\r?(Loading weights|Writing model shards)", line)]
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]


def wav_file(path, samples=1600) -> str:
    """A silent 16 kHz wav file of ``samples`` samples."""
    import numpy as np
    import soundfile as sf

    sf.write(str(path), np.zeros(samples, np.float32), 16000)
    return str(path)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the command loads a model (its checks must come first)."""
    import steermoe.cli

    monkeypatch.setattr(steermoe.cli, "_load_model", lambda args: pytest.fail("the model was loaded"))


@pytest.fixture
def run_copy(tmp_path):
    """A copy of a finished run (config.yaml + checkpoints) that a test may try to damage."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run(), out)
    with open(out / "config.yaml") as f:
        values = yaml.safe_load(f)
    values["output_dir"] = str(out)
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(values, f)
    return out


def test_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--data", "x.parquet"])           # --checkpoint missing: argparse's own usage error
    assert exc.value.code == 2


@pytest.mark.parametrize("argv, expected", [
    (["train", "--config", "c.yaml", "a=1", "--overwrite", "b=2"],
     {"config": "c.yaml", "overrides": ["a=1", "b=2"], "overwrite": True, "resume": False}),
    (["train", "a=1", "--resume", "b=2", "--config", "c.yaml", "c=3"],
     {"config": "c.yaml", "overrides": ["a=1", "b=2", "c=3"], "overwrite": False, "resume": True}),
    (["demo", "a=1", "--output_dir", "d", "b=2"], {"output_dir": "d", "overrides": ["a=1", "b=2"]}),
    (["transcribe", "a.wav", "--checkpoint", "c", "b.wav", "--device", "cpu"],
     {"checkpoint": "c", "audio": ["a.wav", "b.wav"], "device": "cpu"}),
])
def test_positionals_are_taken_wherever_they_stand_among_the_options(argv, expected):
    args = vars(_parser().parse_args(argv))
    assert {k: args[k] for k in expected} == expected


def test_non_positive_batch_size_or_token_limit_is_a_usage_error_naming_the_option(capsys):
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as exc:
            main(["eval", "--checkpoint", "x", "--data", "x.parquet", "--batch_size", bad])
        assert exc.value.code == 2
        assert f"argument --batch_size: expected an int >= 1; got '{bad}'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["transcribe", "--checkpoint", "x", "--max_new_tokens", "0", "a.wav"])
    assert exc.value.code == 2 and "argument --max_new_tokens: expected an int >= 1" in capsys.readouterr().err


def test_eval_output_is_checked_before_the_model_loads(tmp_path, capsys, no_model):
    (tmp_path / "out.summary.json").mkdir()
    (tmp_path / "a_file").write_text("")
    for output, needle in ((tmp_path, "is a directory"), (tmp_path / "out.jsonl", "out.summary.json is a directory"),
                           (tmp_path / "a_file" / "out.jsonl", "File exists")):
        fails(capsys, ["eval", "--checkpoint", "unused", "--data", tiny_assets()["rows4"], "--output", str(output)],
              1, needle, str(tmp_path))


def test_eval_without_a_usable_row_fails_naming_the_data(tmp_path, capsys):
    path = unusable_parquet(tmp_path / "unusable.parquet")
    fails(capsys, ["eval", "--checkpoint", tiny_run(), "--data", path, "--device", "cpu"], 1,
          f"no usable row in {path}", "missing_text=3")


def test_transcribe_names_each_bad_file_and_loads_no_model_when_none_is_usable(tmp_path, capsys, no_model):
    wav_file(tmp_path / "short.wav", samples=100)
    (tmp_path / "garbage.wav").write_bytes(b"not audio at all")
    cases = (("garbage.wav", "not audio libsndfile can read"), ("", "Is a directory"), ("short.wav", "too short"),
             ("missing.wav", "No such file or directory"))
    for bad, needle in cases:
        fails(capsys, ["transcribe", "--checkpoint", "unused", str(tmp_path / bad)], 1, f"{tmp_path / bad}: {needle}")
    assert main(["transcribe", "--checkpoint", "unused", *(str(tmp_path / bad) for bad, _ in cases)]) == 1
    assert len(capsys.readouterr().err.splitlines()) == len(cases)      # one line each (mixed with good files:
                                                                        # test_longform)


def test_unknown_config_key_and_bad_override(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    save_config(tiny_config(tmp_path / "out"), str(config))
    fails(capsys, ["train", "--config", str(config), "train.lr_routr=1e-3"], 2,
          "unknown config key 'train.lr_routr'")
    fails(capsys, ["train", "--config", str(config), "train.batch_size=two"], 2, "train.batch_size", "int")
    fails(capsys, ["train", "--config", str(config), "train.device=tpu"], 2, "device must be")
    if not torch.cuda.is_available():
        fails(capsys, ["train", "--config", str(config), "train.device=cuda"], 2, "no CUDA device")
    assert not (tmp_path / "out").exists()


def test_train_with_an_unusable_eval_set_fails_before_the_first_step(tmp_path, capsys):
    path = unusable_parquet(tmp_path / "unusable.parquet")
    config = tmp_path / "run.yaml"
    save_config(tiny_config(tmp_path / "out"), str(config))
    fails(capsys, ["train", "--config", str(config), f"data.eval={path}"], 1, f"no usable row in {path}")
    metrics = tmp_path / "out" / "metrics.jsonl"
    assert not metrics.exists() or not read_metrics(str(metrics))   # no step was trained


def test_existing_checkpoints_need_resume_or_overwrite(run_copy, capsys):
    before = snapshot(run_copy)
    fails(capsys, ["train", "--config", str(run_copy / "config.yaml")], 1,
          "already holds checkpoints", "--resume", "--overwrite")
    assert snapshot(run_copy) == before


def test_missing_data_path_overwrites_nothing(run_copy, capsys):
    before = snapshot(run_copy)
    for flag in ("--resume", "--overwrite"):
        fails(capsys, ["train", "--config", str(run_copy / "config.yaml"), flag, "data.train=/no/such/speech.parquet"],
              1, "/no/such/speech.parquet")
        assert snapshot(run_copy) == before
    fails(capsys, ["eval", "--checkpoint", str(run_copy), "--data", str(run_copy / "missing.parquet")], 1,
          "missing.parquet")


def test_config_checkpoint_mismatch_on_resume(run_copy, capsys):
    before = snapshot(run_copy)
    fails(capsys, ["train", "--config", str(run_copy / "config.yaml"), "--resume", "model.num_experts=5"], 1,
          "cannot resume", "num_experts")
    other_whisper = os.path.join(tiny_assets()["root"], "other-whisper")
    if not os.path.isdir(other_whisper):
        from steermoe.demo.tiny_models import build_tiny_whisper
        build_tiny_whisper(other_whisper, d_model=48, layers=3, heads=2, ffn_dim=48)
    fails(capsys, ["train", "--config", str(run_copy / "config.yaml"), "--resume", f"model.whisper={other_whisper}"],
          1, "cannot resume", f"model.whisper: '{tiny_assets()['whisper']}' -> '{other_whisper}'")
    assert snapshot(run_copy) == before
    # eval on a base of another width: the checkpoint's tensors do not fit
    fails(capsys, ["eval", "--checkpoint", str(run_copy), "--data", tiny_assets()["rows4"], "--whisper", other_whisper,
                 "--device", "cpu"], 1, "cannot load checkpoint")


def test_unreadable_checkpoint(run_copy, tmp_path, capsys):
    (_, newest), = list_checkpoints(str(run_copy))[-1:]
    with open(os.path.join(newest, "trainable.safetensors"), "wb") as f:
        f.write(b"\x00garbage")
    fails(capsys, ["eval", "--checkpoint", newest, "--data", tiny_assets()["rows4"], "--device", "cpu"], 1,
          "cannot load checkpoint", newest)
    audio = wav_file(tmp_path / "a.wav")
    fails(capsys, ["transcribe", "--checkpoint", str(tmp_path / "nowhere"), audio], 1, "checkpoint not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(capsys, ["transcribe", "--checkpoint", str(empty), audio], 1, "not a SteerMoE checkpoint")
    assert not os.listdir(empty)


def test_console_script_reports_one_line_and_fails(tmp_path):
    exe = shutil.which("steermoe")
    cmd = [exe] if exe else [sys.executable, "-m", "steermoe.cli"]
    proc = subprocess.run(cmd + ["train", "--config", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"steermoe train: error: config file not found: "
                                                f"{tmp_path / 'missing.yaml'}"]
    proc = subprocess.run([sys.executable, "-m", "steermoe.train", "--config", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "config file not found" in proc.stderr


def test_demo_runs_end_to_end_and_reruns_in_place(tmp_path, capsys, monkeypatch):
    import steermoe.demo.demo

    monkeypatch.setitem(steermoe.demo.demo.LLM_PRETRAINING, "steps", 2)
    argv = ["demo", "--output_dir", str(tmp_path), "train.max_steps=2", "train.save_every=2",
            "train.eval_utterances=3", "model.max_new_tokens=2"]
    for _ in range(2):                                 # a rerun replaces the previous demo run
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "before training: train (3 utterances): WER" in out and "held-out (3 utterances): WER" in out
        summary = out.split("4/4")[1]
        assert "training loss" in summary and "train utterances: WER" in summary
        assert "held-out utterances: WER" in summary and "train from pretrained checkpoints" in summary
    assert [s for s, _ in list_checkpoints(str(tmp_path / "run"))] == [2]
    assert os.path.isfile(tmp_path / "models" / "tiny-llm" / "config.json")
