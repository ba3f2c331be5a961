"""Data-parallel pieces of the training loop: the gradient all-reduce of the trainable tensors.

The frozen bases never get gradients, so data parallelism needs only the trainable tensors' gradients summed over
processes once per optimizer step (one flat all-reduce). A process whose share of a global batch is empty simply
contributes zeros.
"""
from typing import Sequence

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
