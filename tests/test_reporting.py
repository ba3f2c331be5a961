"""TensorBoard scalars (``train.report_to``) and ``steermoe plot``'s PNGs."""
import functools
import glob
import os
import sys
import types

import pytest

from test_train import tiny_assets, tiny_config

import steermoe.reporting
import steermoe.train
from steermoe.cli import main
from steermoe.config import ConfigError, load_config
from steermoe.fileio import atomic_write_text, read_metrics
from steermoe.reporting import check_report_to, scalar_tags
from steermoe.train import train

STEPS = 3
EXPECTED_TAGS = {"train/loss", "train/grad_norm", "train/learning_rate/vectors", "train/learning_rate/router",
                 "eval/wer", "eval/cer", "eval/loss"}


def test_scalar_tags_follow_the_trainer_names():
    record = {"step": 4, "loss": 2.5, "grad_norm": 0.5, "lr/router": 1e-3, "router/top_share": [0.5, 0.75],
              "skipped": 0}
    assert scalar_tags(record) == {"train/loss": 2.5, "train/grad_norm": 0.5, "train/learning_rate/router": 1e-3,
                                   "train/router/top_share/layer_0": 0.5, "train/router/top_share/layer_1": 0.75,
                                   "train/skipped": 0.0}
    assert scalar_tags({"step": 4, "eval/wer": 0.25, "eval/router/usage": {"0": [0.5, 0.5]}}) == {"eval/wer": 0.25}


def test_report_to_is_checked(monkeypatch):
    with pytest.raises(ConfigError, match="train.report_to' must be none or tensorboard, got 'wandb'"):
        tiny_config("unused", report_to="wandb")
    monkeypatch.setattr(steermoe.reporting, "tensorboard_installed", lambda: False)
    check_report_to("none")
    with pytest.raises(ConfigError, match=r'needs the tensorboard package: pip install -e "\.\[tensorboard\]"'):
        check_report_to("tensorboard")


def test_a_missing_tensorboard_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(steermoe.reporting, "tensorboard_installed", lambda: False)
    monkeypatch.setattr(steermoe.train, "build_model", lambda *a: pytest.fail("the model was loaded"))
    a = tiny_assets()
    argv = ["train", f"model.whisper={a['whisper']}", f"model.llm={a['llm']}", f"data.train={a['rows4']}",
            f"output_dir={tmp_path}", "train.report_to=tensorboard"]
    assert main(argv) == 2
    assert "pip install -e \".[tensorboard]\"" in capsys.readouterr().err


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records (tag, value, step) per instance."""
    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_training_mirrors_every_metrics_record_to_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    monkeypatch.setattr(steermoe.reporting, "tensorboard_installed", lambda: True)
    FakeWriter.made.clear()
    train(tiny_config(tmp_path, batch_size=2, max_steps=STEPS, report_to="tensorboard",
                      logging_dir=tmp_path / "tb"))
    (writer,) = FakeWriter.made
    assert writer.log_dir == str(tmp_path / "tb") and writer.purge_step == 1 and writer.closed
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    expected = sorted((tag, value, r["step"]) for r in records for tag, value in scalar_tags(r).items())
    assert sorted(writer.scalars) == expected
    assert sorted(s for t, _, s in writer.scalars if t == "train/loss") == list(range(1, STEPS + 1))


@functools.lru_cache(maxsize=None)
def evaluated_run(root: str) -> str:
    """A three-step run with an evaluation after each step, TensorBoard on when the package is there."""
    report_to = "tensorboard" if steermoe.reporting.tensorboard_installed() else "none"
    a = tiny_assets()
    train(load_config(None, [
        f"model.whisper={a['whisper']}", f"model.llm={a['llm']}", "model.dtype=float32", "model.num_experts=3",
        "model.max_new_tokens=3", f"data.train={a['rows4']}", f"data.eval={a['rows4']}", f"output_dir={root}",
        "train.device=cpu", "train.batch_size=2", f"train.max_steps={STEPS}", "train.eval_every=1",
        "train.eval_utterances=2", "train.log_every=1", "train.save_every=100", f"train.report_to={report_to}"]))
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return evaluated_run(str(tmp_path_factory.mktemp("evaluated")))


def test_evaluations_record_the_gate_usage_per_layer_and_expert(run_dir):
    evals = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "eval/wer" in r]
    assert [r["step"] for r in evals] == list(range(1, STEPS + 1))
    usage = evals[-1]["eval/router/usage"]
    assert list(usage) == ["0", "1"] and all(len(row) == 3 for row in usage.values())
    assert all(abs(sum(row) - 1) < 1e-3 for row in usage.values())


def test_tensorboard_event_file_holds_the_scalars(run_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(os.path.join(run_dir, "runs", "events.out.tfevents.*"))
    acc = EventAccumulator(events)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert EXPECTED_TAGS <= tags and "train/router/usage_entropy/layer_1" in tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)


def _check_png(path, min_bytes=5_000):
    """The PNG at ``path`` exists, is not tiny, and is not one flat colour."""
    import matplotlib.image

    assert os.path.getsize(path) > min_bytes
    pixels = matplotlib.image.imread(path)[..., :3]
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.reshape(-1, 3).std(0).max() > 0.05          # not a blank canvas
    assert len({tuple(p) for p in pixels.reshape(-1, 3)[::7].tolist()}) > 10


def test_plot_writes_the_charts(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["plot", run_dir, "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("training", "eval_wer", "gate_usage"):
        assert f"{name}: {tmp_path / (name + '.png')}" in out
        _check_png(tmp_path / f"{name}.png")


def test_plot_without_evaluations_says_so(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    atomic_write_text(str(tmp_path / "metrics.jsonl"), "".join(
        f'{{"step": {s}, "loss": {3 - s / 10}, "grad_norm": {1 / s}, "lr/router": {s * 1e-4}}}\n' for s in range(1, 9)))
    assert main(["plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "eval_wer: nothing to plot" in out and "gate_usage: nothing to plot" in out
    _check_png(tmp_path / "plots" / "training.png")


def test_plot_errors(tmp_path, monkeypatch, capsys):
    assert main(["plot", str(tmp_path)]) == 1
    assert "metrics.jsonl not found: RUN_DIR must be a training run's output_dir" in capsys.readouterr().err
    atomic_write_text(str(tmp_path / "metrics.jsonl"), '{"step": 1, "loss": 1.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)               # import matplotlib raises ImportError
    assert main(["plot", str(tmp_path)]) == 1
    assert 'steermoe plot needs matplotlib: pip install -e ".[plot]"' in capsys.readouterr().err
