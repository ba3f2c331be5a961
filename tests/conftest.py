"""Test setup: run the Triton kernels in Triton's CPU interpreter unless a GPU is present; skip the tiers whose
hardware (``gpu``) or inputs (``real``: STEERMOE_REAL_MODELS) are absent.

TRITON_INTERPRET is read when ``@triton.jit`` decorates the kernels, so it is set here, before any test
module imports steermoe.
"""
import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = _has_cuda()


REAL_MODELS = os.environ.get("STEERMOE_REAL_MODELS")   # a directory of real checkpoints and speech (tier "real")
if REAL_MODELS:   # read when huggingface_hub is imported: local checkpoints load without looking for a hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not HAS_CUDA:
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    if not REAL_MODELS:
        skips["real"] = pytest.mark.skip(reason="needs STEERMOE_REAL_MODELS=DIR, a directory of real checkpoints "
                                                "(README: Real checkpoints)")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
