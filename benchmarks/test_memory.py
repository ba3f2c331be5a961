"""Memory of one steered layer: the activations saved for backward (counted with ``saved_tensors_hooks``, so the
same on any device) and, on a GPU, the peak CUDA memory of forward+backward.

Saved bytes are counted per unique storage, parameters excluded. "Beyond y" also excludes the output y, which the
next encoder layer keeps anyway: it is what steering adds to the activation memory. Bytes grow linearly with the
rows, so two row counts give bytes per row, extrapolated to whisper-large-v3 at B=16 (24000 rows, 32 layers).
"""
from typing import Dict, Set

import pytest
import torch

from benchmarks.impls import (DTYPE_NAMES, FRAMES, WHISPER_LAYERS, OpCase, forward_of, fused_backends,
                              make_inputs)
from benchmarks.timing import DEVICE

D, E, DTYPE = 1280, 8, torch.bfloat16              # whisper-large-v3 width, 8 experts, bf16 activations
TARGET_BATCH = 16
TARGET_ROWS, TARGET_LAYERS = TARGET_BATCH * FRAMES, WHISPER_LAYERS[D]
FIT_FRAMES = (96, 192)                             # two row counts for the linear fit (small for the interpreter)
IMPLS = ["eager", "original"] + fused_backends()


def saved_bytes(impl: str, case: OpCase) -> Dict[str, int]:
    """Bytes the forward of ``impl`` saves for backward: ``all`` and ``beyond_y`` (parameters never counted)."""
    inp = make_inputs(case)
    forward, params = forward_of(impl, inp)
    excluded: Set[int] = {p.untyped_storage().data_ptr() for p in params[1:]}  # params[0] is x
    storages: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    total = sum(storages.values())
    return {"all": total, "beyond_y": total - storages.get(y.untyped_storage().data_ptr(), 0)}


@pytest.mark.parametrize("impl", IMPLS)
def test_saved_activations(impl, results):
    small, large = (saved_bytes(impl, OpCase(1, f, D, E, DTYPE)) for f in FIT_FRAMES)
    rows = FIT_FRAMES[1] - FIT_FRAMES[0]
    per_row = {k: (large[k] - small[k]) / rows for k in small}
    at_target = {k: large[k] + per_row[k] * (TARGET_ROWS - FIT_FRAMES[1]) for k in small}
    results.add("memory", dict(impl=impl, dim=D, experts=E,
                               dtype=DTYPE_NAMES[DTYPE], bytes_per_row=per_row["all"],
                               beyond_y_per_row=per_row["beyond_y"], target_rows=TARGET_ROWS,
                               target_layers=TARGET_LAYERS, layer_mb=at_target["beyond_y"] / 1e6,
                               model_gb=at_target["beyond_y"] * TARGET_LAYERS / 1e9))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="peak CUDA memory needs a CUDA device")
@pytest.mark.parametrize("impl", IMPLS)
def test_peak_cuda_memory(impl, results):
    """Peak memory above the inputs during one forward+backward at whisper-large-v3 B=16 layer shape."""
    inp = make_inputs(OpCase(TARGET_BATCH, FRAMES, D, E, DTYPE))
    forward, params = forward_of(impl, inp)
    torch.autograd.grad(forward(), params, inp.grad_y)  # warm-up: compiles, allocator pools
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(forward(), params, inp.grad_y)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del grads
    results.add("peak", dict(impl=impl, rows=TARGET_ROWS, dim=D, experts=E, dtype=DTYPE_NAMES[DTYPE],
                             peak_mb=peak / 1e6))
