"""The ``steermoe`` command's conventions: ``--version``, ``python -m steermoe``, plain-text help that names the
defaults, ``info``, and a parser that answers ``--help`` / ``--version`` without importing torch."""
import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
import types

import pytest
import torch

import steermoe
from steermoe.cli import _parser, main
from steermoe.ops import BACKENDS, available_backends

COMMANDS = ("train", "eval", "transcribe", "demo", "plot", "info")


def run_module(*argv, code=""):
    """``python -m steermoe argv`` in a fresh interpreter, or ``python -c code`` when given."""
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "steermoe", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_version_from_python_m_and_the_console_script():
    proc = run_module("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"steermoe {steermoe.__version__}\n"
    exe = shutil.which("steermoe")
    if exe:
        proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=300)
        assert (proc.returncode, proc.stdout) == (0, f"steermoe {steermoe.__version__}\n"), proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["-V"], ["train", "--help"], ["eval", "--help"],
                                  ["info", "--help"]])
def test_help_and_version_import_neither_torch_nor_transformers(argv):
    code = ("import sys\nfrom steermoe.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "print(sorted(m for m in ('torch', 'transformers', 'triton', 'numpy') if m in sys.modules))")
    proc = run_module(code=code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def _subparsers():
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_is_plain_text_and_names_every_default(capsys):
    parsers = _subparsers()
    assert set(parsers) == set(COMMANDS)
    for text in [_parser().format_help()] + [p.format_help() for p in parsers.values()]:
        assert "``" not in text and ":func:" not in text and ":meth:" not in text, text
    for name, p in parsers.items():
        text = " ".join(p.format_help().split())        # unwrapped
        for action in p._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in text or "default" in action.help, (name, action.dest)
    eval_help = " ".join(parsers["eval"].format_help().split())
    assert "(default: 8)" in eval_help and "(default: auto)" in eval_help and "(default: the checkpoint's" in eval_help
    assert "default: None" not in eval_help and "default: False" not in " ".join(parsers["train"].format_help().split())


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_info_without_cuda(capsys, no_cuda):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in (f"steermoe         {steermoe.__version__}", f"torch            {torch.__version__}",
                   "triton", "transformers", "no CUDA device visible", "backends on cpu:"):
        assert needle in out, out
    assert "backends on cuda" not in out
    reasons = available_backends("cpu", explain=True)
    for name in BACKENDS:
        assert f"  {name:<8}{reasons[name]}" in out.splitlines()
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["steermoe"] == steermoe.__version__ and info["devices"] == ["cpu"]
    assert info["transformers"] == importlib.metadata.version("transformers")
    assert info["backends"] == {"cpu": reasons}


def test_info_lists_each_cuda_device_and_the_backends_there(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU{i}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 * 2 ** 30))
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["devices"] == ["cpu", "cuda:0 GPU0 (sm_90, 80.0 GiB)", "cuda:1 GPU1 (sm_90, 80.0 GiB)"]
    assert info["backends"]["cuda"] == available_backends("cuda", explain=True)
    assert info["backends"]["cuda"]["torch"] == "available"
