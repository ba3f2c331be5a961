"""SteerMoE: a frozen Whisper encoder steered layer by layer, feeding a frozen LLM.

Public names: ``steer``, ``available_backends``, ``SteeredWhisperEncoder``, ``SteerMoEModel``.
The modules that need transformers load on first use, so ``import steermoe`` stays light.
"""
from . import _cuda  # noqa: F401  (registers torch.ops.steermoe.cuda_* when the extension is built)
from .ops import available_backends, steer

__version__ = "0.1.0"
__all__ = ["steer", "available_backends", "SteeredWhisperEncoder", "SteerMoEModel", "__version__"]

_LAZY = {"SteeredWhisperEncoder": "encoder", "SteerMoEModel": "model"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'steermoe' has no attribute {name!r}")
