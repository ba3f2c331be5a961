"""Triton kernels for SteerMoE and their launchers.

``INTERPRET`` records whether ``TRITON_INTERPRET=1`` was set when the kernels were decorated (then they run
on CPU tensors in Triton's interpreter). No autograd here: see :mod:`steermoe.ops`.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
UNAVAILABLE_REASON = None

from .steer import steer_backward, steer_forward  # noqa: E402

__all__ = ["steer_forward", "steer_backward", "INTERPRET"]
