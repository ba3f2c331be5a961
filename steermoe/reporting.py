"""Where training metrics go besides ``metrics.jsonl``: ``train.report_to: tensorboard`` (off by default).

The TensorBoard event files go to ``train.logging_dir`` (default ``<output_dir>/runs``), as Hugging Face
``Trainer`` writes them, with its tag names: ``train/loss``, ``train/learning_rate/<group>``, ``train/grad_norm``,
``eval/wer``, ...; per-layer lists (router health) become one tag per layer, ``.../layer_<i>``. Needs the
``tensorboard`` package: ``pip install -e ".[tensorboard]"``.
"""
import importlib.util
import math
import os
from typing import Any, Dict, Optional

from .config import ConfigError


def scalar_tags(record: Dict[str, Any]) -> Dict[str, float]:
    """A ``metrics.jsonl`` record -> ``{tag: value}``: ``eval/*`` keys kept, the others under ``train/``,
    ``lr/<group>`` renamed ``learning_rate/<group>``, list values split per layer, non-numbers and ``step`` left out.
    """
    tags = {}
    for key, value in record.items():
        if key == "step":
            continue
        if key.startswith("lr/"):
            key = "learning_rate/" + key[len("lr/"):]
        tag = key if key.startswith("eval/") else f"train/{key}"
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                tags[f"{tag}/layer_{i}" if isinstance(value, list) else tag] = float(v)
    return tags


class TensorBoardReporter:
    """Mirrors metrics records into TensorBoard scalars at ``record["step"]``, flushed on every record.

    Events an earlier run left in ``logging_dir`` beyond ``start_step`` (the step this run starts from: 0, or the
    resumed step) are hidden (``purge_step``), as ``metrics.jsonl`` drops its lines.
    """

    def __init__(self, logging_dir: str, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=logging_dir, purge_step=start_step + 1)

    def write(self, record: Dict[str, Any]) -> None:
        for tag, value in scalar_tags(record).items():
            if math.isfinite(value):
                self.writer.add_scalar(tag, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def check_report_to(report_to: str) -> None:
    """Raise ConfigError when ``train.report_to`` names a backend whose package is not installed."""
    if report_to == "tensorboard" and not tensorboard_installed():
        raise ConfigError("train.report_to=tensorboard needs the tensorboard package: pip install -e "
                          "\".[tensorboard]\" (or pip install tensorboard), or set train.report_to=none")


def open_reporter(report_to: str, logging_dir: Optional[str], output_dir: str,
                  start_step: int = 0) -> Optional[TensorBoardReporter]:
    """The reporter ``train.report_to`` names (None for ``none``), logging into ``logging_dir`` or
    ``<output_dir>/runs``."""
    check_report_to(report_to)
    if report_to != "tensorboard":
        return None
    return TensorBoardReporter(logging_dir or os.path.join(output_dir, "runs"), start_step)
