"""Data-parallel pieces of the training loop: sharding the frozen bases, the gradient all-reduce of the trainable
tensors, and stop signals.

The frozen bases never get gradients, so data parallelism needs only the trainable tensors' gradients summed over
processes once per optimizer step (one flat all-reduce), under ``parallel: ddp`` (every process holds the whole
model) and ``parallel: fsdp`` alike. With ``fsdp`` the Whisper encoder's layers and the LLM's decoder layers are
sharded with FSDP2 (``fully_shard``): each process keeps 1/world of their weights and gathers a layer only while it
runs. The steering tensors, the projector, the encoder's convolutional front end and the LLM's embeddings stay
whole, plain tensors on every process, so the fused steering op, the optimizer and the checkpoints see exactly
what they see without sharding.
"""
import os
import signal
import threading
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .interrupts import STOP_SIGNALS

PARALLEL_MODES = ("ddp", "fsdp")
FSDP_MIN_TORCH = (2, 6)


def check_parallel(parallel: str, world_size: int) -> None:
    """Raise ``ValueError`` unless ``train.parallel`` can run here (checked before any model loads)."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"train.parallel must be ddp or fsdp; got {parallel!r}")
    if parallel != "fsdp":
        return
    if world_size < 2:
        raise ValueError("train.parallel=fsdp shards the frozen weights over processes and needs at least 2; this "
                         "run has 1 (start it with torchrun --nproc_per_node N, or use parallel=ddp)")
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if version < FSDP_MIN_TORCH:
        raise ValueError(f"train.parallel=fsdp needs torch >= {'.'.join(map(str, FSDP_MIN_TORCH))} (FSDP2's "
                         f"fully_shard); this is torch {torch.__version__}: upgrade torch or use parallel=ddp")


def frozen_layers(model: nn.Module) -> List[nn.Module]:
    """The blocks ``fsdp`` shards: the Whisper encoder's layers, then the LLM's decoder layers (the modules whose
    class the LLM names in ``_no_split_modules``, as for ``device_map`` splitting)."""
    llm = model.llm
    names = set(getattr(llm, "_no_split_modules", None) or ())
    decoder = [m for m in llm.modules() if type(m).__name__ in names]
    if not decoder:
        raise ValueError(f"train.parallel=fsdp: cannot find the decoder layers of {type(llm).__name__} (no module of "
                         f"a class in its _no_split_modules {sorted(names)})")
    return list(model.encoder.encoder.layers) + decoder


def shard_frozen_bases(model: nn.Module, device: torch.device, world_size: int) -> Dict[str, int]:
    """Shard :func:`frozen_layers` of ``model`` (built on the CPU) over ``world_size`` processes on ``device`` and
    move the rest of it there whole. Returns bytes of frozen weights: ``sharded_local`` (this process's shards),
    ``sharded_total`` (the sharded layers whole) and ``whole`` (frozen tensors kept whole on every process)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(device.type, (world_size,))
    for layer in frozen_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)    # moves its shard to ``device``
    for module in model.modules():          # everything else: whole, plain tensors on every process
        for name, p in module.named_parameters(recurse=False):
            if not isinstance(p, DTensor):
                p.data = p.data.to(device)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and not isinstance(b, DTensor):
                module._buffers[name] = b.to(device)
    held = {"sharded_local": 0, "sharded_total": 0, "whole": 0}
    for p in model.parameters():
        if p.requires_grad:
            continue
        if isinstance(p, DTensor):
            held["sharded_local"] += p.to_local().numel() * p.element_size()
            held["sharded_total"] += p.numel() * p.element_size()
        else:
            held["whole"] += p.numel() * p.element_size()
    return held


def placeholder_batch():
    """A one-utterance batch (0.1 s of silence, transcript "a") that a process whose slice of a global batch is
    empty runs with zero weight under ``fsdp``: every process must join each layer's gathers in the same order."""
    from .audio import MIN_SAMPLES
    from .data import SpeechExample, collate

    return collate([SpeechExample("placeholder", np.zeros(4 * MIN_SAMPLES, np.float32), "a")])


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
    optimizer step, agrees over processes, checkpoints and returns. A second signal ends the process at once (as
    without the handler: for a process stuck in a collective), after writing ``on_second(signum)`` (a line, or
    None for none) to stderr. The previous handlers come back on exit.
    Outside the main thread Python cannot install handlers: nothing is installed and the signals keep their
    default effect.
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self, on_second: Optional[Callable[[int], Optional[str]]] = None):
        self.received: Optional[int] = None
        self.on_second = on_second
        self._previous = {}

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            return
        message = self.on_second(signum) if self.on_second is not None else None
        if message:
            os.write(2, f"{message}\n".encode())    # unbuffered: safe inside a signal handler
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
