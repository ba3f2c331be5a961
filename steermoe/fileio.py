"""Durable atomic file writes: a temporary sibling, flushed to disk, then a rename, so readers (and a machine that
lost power) see the old file or the new one, never half; and the reader of the JSONL metrics log."""
import json
import os
import warnings
from typing import Any, Callable, Dict, List

METRICS_FILE = "metrics.jsonl"                # a training run's metrics log, in its output_dir


def fsync_path(path: str) -> None:
    """Flush file ``path``'s data, or directory ``path``'s entries (e.g. a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync the result, rename it over ``path`` (creating its directory), fsync the
    directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_path(directory)


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of a JSONL metrics log (``metrics.jsonl``), in file order. A last line left half-written (a run
    stopped while writing it) is dropped with a warning; an unreadable line before it raises ``ValueError``."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().rstrip().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is not valid JSON ({err})") from None
            warnings.warn(f"{path}: dropping the half-written last line {line!r}")
    return records
