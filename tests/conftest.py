"""Test setup: run the Triton kernels in Triton's CPU interpreter unless a GPU is present.

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


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
