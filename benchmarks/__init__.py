"""pytest-benchmark suites for steermoe: the fused op, its saved activations, the steered encoder, a train step;
the GPU check and its tools.

Without a GPU the Triton kernels can only run in Triton's CPU interpreter; TRITON_INTERPRET is read when the
kernels are decorated, so it is set here, before any benchmark module imports steermoe.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
