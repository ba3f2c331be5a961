"""Training checkpoints: atomic writes, reads, and finding the newest one to resume from.

Layout under a run's ``output_dir``::

    checkpoints/step_00000100/
        <model.save_trainable(...)>   trainable tensors (safetensors) + the JSON config naming the base models
        training_state.pt             step, world size, optimizer, loss-scaler, RNG and data-position
                                      state, and the non-finite step counts

A checkpoint is written into a hidden temporary sibling, fsynced, and renamed into place only when complete, so a
crash mid-save (or a power loss) leaves every earlier checkpoint intact and never a half-written ``step_*``
directory.
"""
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .fileio import fsync_path

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, found or read; the message names the path."""


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, CHECKPOINTS, f"step_{step:08d}")


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str) -> str:
    """A trainable-weights directory from ``path``: a checkpoint itself, or a run's ``output_dir`` (its newest)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint not found: {path} is not a directory")
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no complete checkpoint in {os.path.join(path, CHECKPOINTS)}")
        return latest
    return path


def check_output_dir(output_dir: str, *, resume: bool, overwrite: bool) -> Optional[str]:
    """The checkpoint to resume from (None: start fresh); refuses to train over existing checkpoints.

    Only decides; deleting what ``overwrite`` allows is :func:`remove_checkpoints`.
    """
    if resume and overwrite:
        raise CheckpointError("--resume and --overwrite exclude each other")
    latest = latest_checkpoint(output_dir)
    if resume:
        if latest is None:
            raise CheckpointError(f"--resume: no checkpoint found in {os.path.join(output_dir, CHECKPOINTS)}")
        return latest
    if latest is not None and not overwrite:
        raise CheckpointError(f"{output_dir} already holds checkpoints (newest: {os.path.basename(latest)}); "
                              "pass --resume to continue that run or --overwrite to start over")
    return None


def remove_checkpoints(output_dir: str) -> None:
    shutil.rmtree(os.path.join(output_dir, CHECKPOINTS), ignore_errors=True)


def save_checkpoint(output_dir: str, step: int, model, state: Dict[str, Any], *, keep: int = 0) -> str:
    """Write ``model``'s trainable tensors and ``state`` as the step-``step`` checkpoint; returns its path.

    Every file and the directory are fsynced before the rename into place, and ``checkpoints/`` after it, so a
    checkpoint is on disk before ``keep`` > 0 prunes all but the newest ``keep``.
    """
    root = os.path.join(output_dir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    final = step_dir(output_dir, step)
    for name in os.listdir(root):                    # leftovers of a save that crashed
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tmp = os.path.join(root, f".tmp-{os.path.basename(final)}-{os.getpid()}")
    model.save_trainable(tmp)
    torch.save(state, os.path.join(tmp, STATE_FILE))
    for name in os.listdir(tmp):
        fsync_path(os.path.join(tmp, name))
    fsync_path(tmp)
    old = None
    if os.path.exists(final):                        # same step saved again: swap, then drop the old copy
        old = f"{tmp}.old"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(root)
    fsync_path(output_dir)                           # holds checkpoints/, which may be new
    if old is not None:
        shutil.rmtree(old)
    if keep > 0:
        older = [path for _, path in list_checkpoints(output_dir) if path != final]
        for path in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(path)
    return final


def load_training_state(path: str) -> Dict[str, Any]:
    """The ``training_state.pt`` of checkpoint directory ``path``."""
    file = os.path.join(path, STATE_FILE)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read is reported the same way
        raise CheckpointError(f"cannot read {file}: {err}") from err


def rng_state() -> Dict[str, Any]:
    """The Python, NumPy, torch and CUDA generator states (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
