"""Collects the measured rows, prints the one-screen summary (ending with the targets the rows bear on, met or
missed: reported, never asserted), writes the JSON.

Each benchmark adds a dict (``kind``: op, memory, peak, encoder, clip, overhead or train) that also becomes its pytest-benchmark
``extra_info``. Nothing here measures anything.
"""
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import time
from typing import Dict, List, Optional, Sequence

import torch

from .impls import BASELINES, HEADLINE
from .timing import DEVICE

MAX_OP_SHAPES = 12               # more (backend, shape) lines than this: headline shapes + geometric means
INTERPRETER_NOTE = "* Triton's CPU interpreter: not a speed number"
OP_TARGETS = (  # (mode, row key, at least, wording), held against each fused backend at the headline shapes
    ("fwd", "copy_pct", 90, "fwd %copy ≥ 90"), ("bwd", "copy_pct", 80, "bwd %copy ≥ 80"),
    ("fwd+bwd", "vs_eager", 3, "fwd+bwd ≥ 3× eager"), ("fwd+bwd", "vs_compile", 1.5, "fwd+bwd ≥ 1.5× compile"),
    ("fwd+bwd", "vs_original", 5, "fwd+bwd ≥ 5× original"))


class Results:
    """The rows measured in this session, and the environment they were measured in.

    With a ``path``, the JSON is rewritten at most every ``save_every_s`` seconds as rows arrive (a run cut short
    keeps what it measured) and by :meth:`save` at the end.
    """

    def __init__(self, path: Optional[str] = None, save_every_s: float = 5.0):
        self.rows: List[dict] = []
        self.env: Dict[str, object] = {}
        self.path = path
        self.save_every_s = save_every_s
        self._saved_at = time.monotonic()

    def add(self, kind: str, row: dict, benchmark=None) -> dict:
        row = {"kind": kind, **row}
        self.rows.append(row)
        if benchmark is not None:
            benchmark.extra_info.update(row)
        if self.path and time.monotonic() - self._saved_at >= self.save_every_s:
            self.save()
        return row

    def save(self) -> None:
        """Write the JSON to ``path`` (nothing without one)."""
        if self.path:
            write_json(self.path, self)
            self._saved_at = time.monotonic()

    def of(self, kind: str) -> List[dict]:
        return [r for r in self.rows if r["kind"] == kind]


def environment() -> Dict[str, object]:
    """Device, driver, versions and date, stated with every table."""
    import triton
    import transformers

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "cuda": torch.version.cuda}
    if DEVICE.type == "cuda":
        env["device"] = torch.cuda.get_device_name(DEVICE)
        env["driver"] = _nvidia_driver()
    else:
        threads = torch.get_num_threads()
        env["device"] = f"CPU {_cpu_model()}, {os.cpu_count()} cores, {threads} torch thread{'s' * (threads > 1)}"
    return env


def _nvidia_driver() -> Optional[str]:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> List[str]:
    """Plain-text table: first column left-aligned, the rest right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _geomean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _op_lines(rows: List[dict], max_shapes: int = MAX_OP_SHAPES) -> List[str]:
    """One line per (backend, shape): fwd and bwd time and %copy, fwd+bwd time and speedups (what the targets
    name); past ``max_shapes`` lines, the headline shapes plus one geometric-mean line per backend."""
    by_shape: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        if r["impl"] not in BASELINES:
            by_shape.setdefault((r["impl"], r["shape"]), {})[r["mode"]] = r
    if not by_shape:
        return []

    def line(label: str, shape: str, groups: List[Dict[str, dict]]):
        def value(key: str, mode: str):
            values = [g.get(mode, {}).get(key) for g in groups]
            if len(groups) == 1:
                return values[0]
            return None if key == "ms" else _geomean(values)

        return [label, shape, value("ms", "fwd"), value("copy_pct", "fwd"), value("ms", "bwd"),
                value("copy_pct", "bwd"), value("ms", "fwd+bwd"),
                *(value(k, "fwd+bwd") for k in ("vs_eager", "vs_compile", "vs_original"))]

    def tag(modes: Dict[str, dict]) -> str:
        return "*" if any(r["interpreted"] for r in modes.values()) else ""

    shown = [(key, modes) for key, modes in by_shape.items()
             if len(by_shape) <= max_shapes or any(r["headline"] for r in modes.values())]
    table = [line(impl + tag(modes), shape, [modes]) for (impl, shape), modes in shown]
    if len(shown) < len(by_shape):
        for impl in dict.fromkeys(impl for impl, _ in by_shape):
            groups = [modes for (i, _), modes in by_shape.items() if i == impl]
            table.append(line(impl, f"geomean of {len(groups)} shapes", groups))
    lines = ["Fused op, median ms; %copy = (minimum bytes / time) / measured copy bandwidth; speedups of fwd+bwd",
             "over the eager composition, torch.compile of it, and the original code (all rows in the JSON)"]
    lines += format_table(["backend", "rows x D - E - dtype", "fwd ms", "%copy", "bwd ms", "%copy", "f+b ms",
                           "×eager", "×compile", "×orig"], table)
    if any(tag(modes) for _, modes in shown):
        lines.append(INTERPRETER_NOTE)
    return lines


def _memory_lines(rows: List[dict], peaks: List[dict]) -> List[str]:
    if not rows and not peaks:
        return []
    first = rows[0] if rows else peaks[0]
    peak_of = {r["impl"]: r["peak_mb"] for r in peaks}
    saved = {r["impl"]: r for r in rows}
    headers = ["impl", "saved B/row", "beyond y B/row", "layer MB", f"{first['target_layers']} layers GB"]
    table = [[impl] + [saved.get(impl, {}).get(k) for k in ("bytes_per_row", "beyond_y_per_row", "layer_mb",
                                                             "model_gb")] for impl in {**saved, **peak_of}]
    if peaks:
        headers.append(f"peak CUDA MB ({first['target_rows']} rows)")
        table = [r + [peak_of.get(r[0])] for r in table]
    return ([f"Saved activations per steered layer (D={first['dim']} E={first['experts']} {first['dtype']}, parameters "
             "excluded); beyond y = what steering adds,",
             f"y being kept by the next layer anyway; MB, GB: beyond y at whisper-large-v3 B=16 "
             f"({first['target_rows']} rows per layer)"]
            + format_table(headers, table))


def _encoder_lines(rows: List[dict]) -> List[str]:
    if not rows:
        return []
    base = {(r["config"]): r["ms"] for r in rows if r["variant"] == "unsteered, 30 s"}
    table = [[r["config"], r["variant"], r["batch"], r["mel_frames"], r["ms"],
              (r["ms"] / base[r["config"]] - 1) * 100 if r["config"] in base else None] for r in rows]
    return (["Encoder forward+backward (frozen Whisper, random weights): median ms; % over unsteered 30 s"]
            + format_table(["config", "variant", "B", "T_mel", "ms", "% vs unsteered"], table))


def _clip_lines(rows: List[dict]) -> List[str]:
    if not rows:
        return []
    table = [[r["config"], r["padding"], r["mel_frames"], r["ms"]] for r in rows]
    return ([f"Encoding one {rows[0]['seconds']} s clip (steered, forward only): median ms"]
            + format_table(["config", "padded to", "T_mel", "ms"], table))


def _overhead_lines(rows: List[dict]) -> List[str]:
    if not rows:
        return []
    us = {(r["impl"], r["mode"]): r["us"] for r in rows}
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    table = [[impl] + [v for mode in ("fwd", "fwd+bwd") for v in
                       (us.get((impl, mode)), us[("eager", mode)] / us[(impl, mode)]
                        if ("eager", mode) in us and (impl, mode) in us else None)] for impl in impls]
    return ([f"Per call at {rows[0]['shape']} (launch-bound; calls back to back): µs, and eager's time over it"]
            + format_table(["impl", "fwd µs", "×eager", "fwd+bwd µs", "×eager"], table))


def _train_lines(rows: List[dict]) -> List[str]:
    if not rows:
        return []
    headers = ["pipeline", "dtype, padding", "B", "ms", "samples/s"]
    table = [[r["pipeline"], r["padding"], r["batch"], r["ms"], r["samples_per_s"]] for r in rows]
    if any(r["peak_mb"] is not None for r in rows):
        headers.append("peak MB")
        table = [t + [r["peak_mb"]] for t, r in zip(table, rows)]
    return ([f"Train step, {rows[0]['config']}: forward, backward, AdamW; median ms; peak CUDA MB above the "
             "resting model and optimizer"] + format_table(headers, table))


def _worst(rows: List[dict], key: str) -> Optional[float]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return min(values) if values else None


def _target_checks(results: Results) -> List[tuple]:
    """(target, measured value, met) for every target the rows bear on; the measured value is the worst case."""
    checks = []
    op = [r for r in results.of("op") if not r["interpreted"]]
    fused = list(dict.fromkeys(r["impl"] for r in op if r["impl"] not in BASELINES))
    for impl in fused:
        head = [r for r in op if r["impl"] == impl and r["headline"]]
        by_mode = {m: [r for r in head if r["mode"] == m] for m in ("fwd", "bwd", "fwd+bwd")}
        for mode, key, need, text in OP_TARGETS:
            worst = _worst(by_mode[mode], key)
            if worst is not None:
                checks.append((f"{impl} {text} (headline shapes)", worst, worst >= need))
    ms = {(r["impl"], r["mode"], r["shape"]): r["ms"] for r in op}
    if "cuda" in fused and "triton" in fused:
        for mode in ("fwd", "bwd"):
            ratios = [ms[("cuda", mode, r["shape"])] / r["ms"] for r in op if r["impl"] == "triton"
                      and r["mode"] == mode and r["headline"] and ("cuda", mode, r["shape"]) in ms]
            if ratios:
                checks.append((f"cuda {mode} time ≤ 1.15× triton's (headline shapes)", max(ratios),
                               max(ratios) <= 1.15))
    if "cuda" in fused:
        speedups = [ms[("eager", r["mode"], r["shape"])] / r["ms"] for r in op if r["impl"] == "cuda"
                    and ("eager", r["mode"], r["shape"]) in ms]
        if speedups:
            checks.append(("cuda never slower than eager (every shape and mode: ×eager)", min(speedups),
                           min(speedups) >= 1))
    for r in results.of("memory"):
        if r["impl"] not in ("eager", "original"):
            need = 4 * r["experts"]
            checks.append((f"{r['impl']} saves E·4 = {need} B/row beyond y", r["beyond_y_per_row"],
                           r["beyond_y_per_row"] <= need))
    encoder = {(r["config"], r["variant"]): r["ms"] for r in results.of("encoder") if "whisper-large" in r["config"]}
    for (config, variant), steered_ms in encoder.items():
        base = encoder.get((config, "unsteered, 30 s"))
        if variant == "steered, 30 s" and base:
            overhead = (steered_ms / base - 1) * 100
            checks.append(("encoder steering overhead ≤ 1 % (fused residual; whisper-large-v3 shapes, 30 s)",
                           overhead, overhead <= 1))
    clip = {r["padding"]: r for r in results.of("clip")}
    if "30 s" in clip and "none" in clip:
        speedup = clip["30 s"]["ms"] / clip["none"]["ms"]
        checks.append((f"a {clip['none']['seconds']} s clip encodes ≥ 4× faster unpadded than padded to 30 s "
                       f"({clip['none']['config']})", speedup, speedup >= 4))
    train = {r["pipeline"]: r["samples_per_s"] for r in results.of("train") if "whisper-large" in r["config"]}
    if "steermoe" in train and "original" in train:
        ratio = train["steermoe"] / train["original"]
        checks.append(("train step ≥ 3× the original's samples/s (whisper-large-v3 shapes)", ratio, ratio >= 3))
    return checks


def _target_lines(results: Results) -> List[str]:
    checks = _target_checks(results)
    if not checks:
        return []
    return (["Targets: the worst measured case of each; met or MISSED (reported, never asserted)"]
            + format_table(["target", "measured", "verdict"],
                           [[text, value, "met" if met else "MISSED"] for text, value, met in checks]))


def summary_lines(results: Results, max_op_shapes: int = MAX_OP_SHAPES) -> List[str]:
    env = results.env
    driver = f" | driver {env['driver']}" if env.get("driver") else ""
    lines = [f"{env.get('device')}{driver} | {env.get('date')}",
             f"torch {env.get('torch')} (CUDA {env.get('cuda')}) | triton {env.get('triton')} | "
             f"transformers {env.get('transformers')} | python {env.get('python')}"]
    if "copy_gbps" in env:
        lines.append(f"Measured copy bandwidth (read + write): {env['copy_gbps']:.1f} GB/s")
    for section in (_op_lines(results.of("op"), max_op_shapes), _memory_lines(results.of("memory"), results.of("peak")),
                    _encoder_lines(results.of("encoder")), _clip_lines(results.of("clip")),
                    _overhead_lines(results.of("overhead")), _train_lines(results.of("train")),
                    _target_lines(results)):
        if section:
            lines += [""] + section
    return lines


def write_json(path: str, results: Results) -> None:
    """All rows and the environment, written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"environment": results.env, "headline": HEADLINE | {"dtype": "bf16"}, "rows": results.rows},
                  f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(paths: Sequence[str]) -> Results:
    """The rows of one or more JSON files written by :func:`write_json`; the environment of the first."""
    results = Results()
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        results.env = results.env or data["environment"]
        results.rows += data["rows"]
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m benchmarks.report FILE.json ...``: the summary of saved results (e.g. several GPU-check stages)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    parser.add_argument("files", nargs="+", help="JSON files from --bench-out")
    parser.add_argument("--all-shapes", action="store_true", help="one op line per (backend, shape), no geomeans")
    args = parser.parse_args(argv)
    results = read_json(args.files)
    print("\n".join(summary_lines(results, max_op_shapes=10**9 if args.all_shapes else MAX_OP_SHAPES)))


if __name__ == "__main__":
    main()
