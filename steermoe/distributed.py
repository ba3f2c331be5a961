"""Data-parallel pieces of the training loop: the gradient all-reduce of the trainable tensors, and stop signals.

The frozen bases never get gradients, so data parallelism needs only the trainable tensors' gradients summed over
processes once per optimizer step (one flat all-reduce). A process whose share of a global batch is empty simply
contributes zeros.
"""
import signal
import threading
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def all_reduce_gradients(params: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """Sum the gradients of ``params`` over all processes, in place (a missing gradient counts as zeros and is then
    set, on every process alike)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world_size == 1 or not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 (what job schedulers send ahead of a kill) are recorded, not fatal.

    ``received`` is the first signal's number (None until one arrives); the training loop reads it after each
    optimizer step, agrees over processes, checkpoints and returns. The previous handlers come back on exit.
    Outside the main thread Python cannot install handlers: nothing is installed and the signals keep their
    default effect.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
