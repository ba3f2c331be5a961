"""SteerMoE: a frozen Whisper encoder steered layer by layer, feeding a frozen LLM.

Public names: ``steer``, ``available_backends``, ``SteeredWhisperEncoder``, ``SteerMoEModel``. Each loads its
module (and torch) on first use, so ``import steermoe`` and ``steermoe --help`` stay light.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["steer", "available_backends", "SteeredWhisperEncoder", "SteerMoEModel", "__version__"]

_LAZY = {"steer": "ops", "available_backends": "ops", "SteeredWhisperEncoder": "encoder", "SteerMoEModel": "model"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'steermoe' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
