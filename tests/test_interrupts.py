"""Every interrupt says where the run stopped: Ctrl-C, a stop signal in or outside the training loop, a second one."""
import signal

import pytest
from test_cli import wav_file
from test_train import tiny_config

import steermoe.cli
from steermoe.checkpoint import list_checkpoints, step_dir
from steermoe.cli import main
from steermoe.config import save_config
from steermoe.distributed import StopSignals
from steermoe.train import train


def interrupt_during_step(monkeypatch, at_step: int, error=KeyboardInterrupt) -> None:
    """Make the forward of optimizer step ``at_step`` (one micro-batch a step) raise ``error``, as Ctrl-C does."""
    from steermoe.model import SteerMoEModel

    calls = {"n": 0}
    real_forward = SteerMoEModel.forward

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise error()
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(SteerMoEModel, "forward", forward)


def test_ctrl_c_names_the_step_and_the_last_checkpoint(tmp_path, monkeypatch, capfd):
    interrupt_during_step(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, batch_size=4, max_steps=6, save_every=2))
    assert capfd.readouterr().out.splitlines()[-1] == (
        f"interrupted at step 3 (Ctrl-C); last checkpoint step 2 ({step_dir(str(tmp_path), 2)}); "
        "--resume continues from it")
    monkeypatch.undo()
    interrupt_during_step(monkeypatch, 1)                   # before any checkpoint, through the command
    save_config(tiny_config(tmp_path / "b", batch_size=4, max_steps=6), str(tmp_path / "b.yaml"))
    assert main(["train", "--config", str(tmp_path / "b.yaml")]) == 130
    out, err = capfd.readouterr()
    assert "interrupted at step 0 (Ctrl-C); no checkpoint written yet" in out
    assert err.splitlines()[-1] == "steermoe train: interrupted (Ctrl-C)"
    assert list_checkpoints(str(tmp_path / "b")) == []


def test_a_second_stop_signal_says_so_before_it_ends_the_process(monkeypatch, capfd):
    killed = []
    monkeypatch.setattr(steermoe.distributed.os, "kill", lambda pid, signum: killed.append(signum))
    with StopSignals(on_second=lambda signum: f"gone at once ({signal.Signals(signum).name})") as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.received == signal.SIGTERM and not killed
        signal.raise_signal(signal.SIGTERM)
        assert killed == [signal.SIGTERM]                    # re-sent with the default action: the process ends
    assert capfd.readouterr().err == "gone at once (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_outside_the_training_loop_ends_the_command_with_a_line(tmp_path, monkeypatch, capsys, signum):
    monkeypatch.setattr(steermoe.cli, "_load_model", lambda args: signal.raise_signal(getattr(signal, signum)))
    assert main(["transcribe", "--checkpoint", str(tmp_path), wav_file(tmp_path / "a.wav")]) == \
        128 + getattr(signal, signum)
    assert capsys.readouterr().err.splitlines() == [f"steermoe transcribe: interrupted ({signum})"]
    assert signal.getsignal(getattr(signal, signum)) is signal.SIG_DFL      # the command's handler is gone
