"""The run configuration: one dataclass tree, loaded from YAML and overridden by dotted ``key=value`` pairs.

Sections: ``model`` (what :meth:`SteerMoEModel.from_pretrained` takes), ``data`` (parquet sources and filters),
``train`` (the loop), and the top-level ``output_dir``. An unknown key anywhere is an error naming the key,
so a typo never trains silently with a default.
"""
import argparse
import dataclasses
import difflib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml


WHISPER_SECONDS = 30.0                    # the longest input Whisper's encoder takes
REPORT_TO = ("none", "tensorboard")       # train.report_to: where metrics go besides metrics.jsonl
MAX_SPEED_PERTURB = 0.5                   # train.speed_perturb < this: speed factors stay inside (0.5, 1.5)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and what was expected."""


def _key(default: Any, meaning: str) -> Any:
    """A config key: its default (a list is copied for each instance) and its meaning, which the key table in
    README.md shows (``python -m steermoe.config --readme README.md`` rewrites that table)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"meaning": meaning})
    return field(default=default, metadata={"meaning": meaning})


@dataclass
class ModelConfig:
    whisper: str = _key("", "Whisper checkpoint (directory or hub id); only its encoder is used")
    llm: str = _key("", "any `AutoModelForCausalLM` checkpoint (directory or hub id)")
    dtype: str = _key("bfloat16", "frozen weights: bfloat16, float16 or float32 (the trainable tensors stay float32)")
    num_experts: int = _key(8, "steering experts per steered layer (E)")
    steering_scale: float = _key(0.1, "initial value of every layer's steering scale s_l (0: the encoder starts as "
                                      "Whisper's own)")
    layers: Optional[List[int]] = _key(None, "encoder layers to steer (null: all)")
    downsample: int = _key(4, "encoder frames stacked or pooled per LLM position (4: 50 Hz -> 12.5 Hz)")
    downsample_mode: str = _key("stack", "how those frames are merged: stack, avg or max")
    projector: str = _key("linear", "encoder-to-LLM projector: linear or mlp (two layers)")
    prompt: str = _key("Transcribe the audio.", "instruction in the user turn, after the audio (a row's "
                                                "`data.prompt_column` value replaces it)")
    system_prompt: Optional[str] = _key(None, "chat template's system message (null: the template's default)")
    max_new_tokens: int = _key(128, "greedy decoding budget for evaluation and transcription")
    max_tokens_per_second: Optional[float] = _key(None, "caps an utterance's decoding budget at ceil(this × its "
                                                        "seconds) tokens, cutting run-on generations (null: no cap)")


@dataclass
class DataConfig:
    train: List[str] = _key([], "training parquet files, directories or globs")
    train_repeats: List[int] = _key([], "times each data.train entry is read per epoch, one int >= 1 per entry, to "
                                        "oversample a small set (empty: once each); copy k >= 1 of a row has the id "
                                        "`<id>~k`")
    eval: List[str] = _key([], "evaluation parquet files, directories or globs (empty: no evaluation)")
    audio_column: str = _key("audio", "column holding the audio")
    text_column: str = _key("text", "column holding the transcript")
    prompt_column: Optional[str] = _key(None, "column holding a per-row instruction (null: `model.prompt` for all)")
    id_column: Optional[str] = _key(None, "column holding the row ids (null: `<file>:<row>`)")
    min_seconds: Optional[float] = _key(None, "training rows shorter than this are skipped (null: no limit)")
    max_seconds: float = _key(30.0, "rows longer than this are skipped (and counted), in training and evaluation; "
                                    "in (0, 30], Whisper's window")
    max_text_tokens: Optional[int] = _key(None, "training rows whose transcript has more LLM tokens are skipped "
                                                "(null: no limit)")
    bucket_size: Optional[int] = _key(None, "rows sorted by length together, rounded down to a multiple of the "
                                            "global batch (null: 64 global batches)")
    duration_column: Optional[str] = _key(None, "column of seconds per row: plans length grouping without reading "
                                                "audio headers")


@dataclass
class TrainConfig:
    batch_size: int = _key(8, "utterances per process and step; global batch = batch_size * grad_accum * processes")
    grad_accum: int = _key(1, "micro-batches accumulated per optimizer step")
    max_steps: int = _key(1000, "optimizer steps")
    warmup_steps: int = _key(100, "linear warmup, then cosine decay to min_lr_ratio * lr at max_steps")
    min_lr_ratio: float = _key(0.1, "final learning rate as a fraction of each group's, in [0, 1]")
    lr_router: float = _key(3e-4, "learning rate of the router weights and biases (1e-3 and above collapse a real "
                                  "Whisper's router: BENCHMARKS.md)")
    lr_vectors: float = _key(1e-3, "learning rate of the steering vectors")
    lr_scales: float = _key(1e-3, "learning rate of the layer scales")
    lr_projector: float = _key(2e-4, "learning rate of the projector")
    weight_decay: float = _key(0.01, "AdamW weight decay, on weight matrices only (router weights, steering "
                                     "vectors, projector weights)")
    betas: List[float] = _key([0.9, 0.999], "AdamW betas, two numbers in [0, 1)")
    grad_clip: float = _key(1.0, "global gradient-norm clip (0 disables)")
    seed: int = _key(0, "seed of the trainable tensors' initialisation and of the data order")
    log_every: int = _key(10, "steps between printed progress lines and router-health records (metrics.jsonl "
                              "logs every step)")
    eval_every: int = _key(0, "steps between evaluations (0: only at the end, when data.eval is set)")
    eval_utterances: int = _key(200, "the first N utterances of data.eval, in file order")
    eval_batch_size: int = _key(8, "utterances per evaluation batch")
    save_every: int = _key(500, "steps between checkpoints (the last step is always saved)")
    keep_checkpoints: int = _key(2, "newest checkpoints kept (0: all)")
    gradient_checkpointing: bool = _key(False, "recompute the frozen encoder layers in the backward to save memory")
    aux_loss_weight: float = _key(0.0, "weight of the load-balancing loss on the router's gating")
    z_loss_weight: float = _key(0.0, "weight of the router z-loss: mean logsumexp(router logits)^2")
    speed_perturb: float = _key(0.0, "speed perturbation: each training utterance played at a speed uniform in "
                                     "[1 - p, 1 + p] (steermoe.augment)")
    ema_decay: float = _key(0.0, "moving average of the trainable parameters (steermoe.ema), in [0, 1) (0: off); "
                                 "evaluations and checkpoints then use the averages, and the trained values are "
                                 "evaluated too (eval_online/*)")
    spec_time_masks: int = _key(0, "SpecAugment time masks per training utterance (steermoe.augment)")
    spec_time_width: int = _key(0, "widest time mask, in 10 ms frames (at most a fifth of the utterance)")
    spec_freq_masks: int = _key(0, "SpecAugment frequency masks per training utterance")
    spec_freq_width: int = _key(0, "widest frequency mask, in mel bins")
    max_nonfinite_steps: int = _key(10, "consecutive non-finite steps before the run stops (float16 overflows while "
                                        "the loss scale is >= 1 do not count: the scaler halves it)")
    device: str = _key("auto", "auto, cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    parallel: str = _key("ddp", "ddp: every process holds the frozen bases; fsdp: their layers sharded")
    report_to: str = _key("none", "none or tensorboard (also log the metrics as TensorBoard scalars: pip install -e "
                                  "\".[tensorboard]\")")
    logging_dir: Optional[str] = _key(None, "folder of the TensorBoard event files (None: <output_dir>/runs)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = _key("runs/steermoe", "where config.yaml, metrics.jsonl and checkpoints/ go")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Check the values a run needs; raises ConfigError naming the key."""
        m, d, t = self.model, self.data, self.train
        _require(bool(m.whisper), "model.whisper", "a Whisper checkpoint path or hub id")
        _require(bool(m.llm), "model.llm", "a causal-LM checkpoint path or hub id")
        _require(m.dtype in ("bfloat16", "float16", "float32"), "model.dtype", "bfloat16, float16 or float32",
                 m.dtype)
        _require(m.num_experts >= 1, "model.num_experts", ">= 1", m.num_experts)
        _require(math.isfinite(m.steering_scale), "model.steering_scale", "a finite number", m.steering_scale)
        _require(m.layers is None or (len(m.layers) > 0 and all(i >= 0 for i in m.layers)), "model.layers",
                 "null (all layers) or a non-empty list of encoder layer indices >= 0", m.layers)
        _require(m.downsample >= 1, "model.downsample", ">= 1", m.downsample)
        _require(m.downsample_mode in ("stack", "avg", "max"), "model.downsample_mode", "stack, avg or max",
                 m.downsample_mode)
        _require(m.projector in ("linear", "mlp"), "model.projector", "linear or mlp", m.projector)
        _require(m.max_new_tokens >= 1, "model.max_new_tokens", ">= 1", m.max_new_tokens)
        _require(m.max_tokens_per_second is None or 0 < m.max_tokens_per_second < math.inf,
                 "model.max_tokens_per_second", "null or a number > 0", m.max_tokens_per_second)
        _require(len(d.train) > 0, "data.train", "at least one parquet file, directory or glob")
        _require(not d.train_repeats or len(d.train_repeats) == len(d.train) and all(r >= 1 for r in d.train_repeats),
                 "data.train_repeats", f"empty or one int >= 1 per data.train entry ({len(d.train)})", d.train_repeats)
        _require(0 < d.max_seconds <= WHISPER_SECONDS, "data.max_seconds", f"in (0, {WHISPER_SECONDS}] (Whisper's "
                 "window)", d.max_seconds)
        _require(d.min_seconds is None or 0 <= d.min_seconds <= d.max_seconds, "data.min_seconds",
                 f"null or in [0, data.max_seconds={d.max_seconds}]", d.min_seconds)
        _require(d.max_text_tokens is None or d.max_text_tokens >= 1, "data.max_text_tokens", "null or >= 1",
                 d.max_text_tokens)
        for key in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_batch_size", "save_every"):
            _require(getattr(t, key) >= 1, f"train.{key}", ">= 1", getattr(t, key))
        for key in ("warmup_steps", "eval_every", "eval_utterances", "keep_checkpoints", "weight_decay",
                    "grad_clip", "aux_loss_weight", "z_loss_weight", "spec_time_masks", "spec_time_width",
                    "spec_freq_masks", "spec_freq_width"):
            _require(getattr(t, key) >= 0, f"train.{key}", ">= 0", getattr(t, key))
        for key in ("lr_router", "lr_vectors", "lr_scales", "lr_projector"):
            _require(getattr(t, key) >= 0, f"train.{key}", ">= 0", getattr(t, key))
        _require(d.bucket_size is None or d.bucket_size >= t.batch_size, "data.bucket_size",
                 f"null or >= train.batch_size={t.batch_size}", d.bucket_size)
        _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "in [0, 1]", t.min_lr_ratio)
        _require(0 <= t.speed_perturb < MAX_SPEED_PERTURB, "train.speed_perturb", f"in [0, {MAX_SPEED_PERTURB})",
                 t.speed_perturb)
        _require(0 <= t.ema_decay < 1, "train.ema_decay", "in [0, 1) (0: off)", t.ema_decay)
        _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas",
                 "two numbers in [0, 1)", t.betas)
        _require(t.parallel in ("ddp", "fsdp"), "train.parallel", "ddp or fsdp", t.parallel)
        _require(t.report_to in REPORT_TO, "train.report_to", " or ".join(REPORT_TO), t.report_to)
        _require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", ">= 1", t.max_nonfinite_steps)
        _require(bool(self.output_dir), "output_dir", "a directory path")
        return self


def _require(ok: bool, key: str, expected: str, got: Any = dataclasses.MISSING) -> None:
    if not ok:
        tail = "" if got is dataclasses.MISSING else f", got {got!r}"
        raise ConfigError(f"config key '{key}' must be {expected}{tail}")


class _Override(str):
    """The raw text of a command-line value: kept verbatim for ``str`` keys, read as YAML for the others."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (ints widen to floats, a string to a one-item list)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, _Override):
        if tp is str:
            return str(value)
        if origin is typing.Union and str in args:  # Optional[str]: null, ~ or nothing means None
            return None if value.strip() in ("", "null", "~", "None") else str(value)
        try:
            value = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"config key '{key}': {str(value)!r} is not valid YAML ({err})") from None
    if origin is typing.Union:                       # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin in (list, List):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):      # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: Dict[str, Any], prefix: str) -> Any:
    """An instance of dataclass ``cls`` from a (possibly partial) mapping; unknown keys are errors."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            where = f" in '{prefix.rstrip('.')}'" if prefix else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{_suggestion(prefix, key, names)} "
                              f"(known keys{where}: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def _suggestion(prefix: str, key: str, names: Sequence[str]) -> str:
    """``": did you mean 'train.lr_router'?"`` for ``train.lr_routr``: the same key in another section, else the
    closest of ``names`` (the keys next to it); ``""`` when none is close."""
    elsewhere = [name for name, _, _ in _walk(Config, "") if name.rsplit(".", 1)[-1] == key]
    close = elsewhere or [prefix + name for name in difflib.get_close_matches(key, names, n=1)]
    return f": did you mean '{close[0]}'?" if close else ""


def _walk(cls: type, prefix: str) -> Iterator[Tuple[str, Any, dataclasses.Field]]:
    """``(dotted key, annotation, field)`` of every key under dataclass ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _walk(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, hints[f.name], f


def _type_name(tp: Any) -> str:
    """``Optional[List[int]]`` -> ``list of int, or null``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:
        return f"{_type_name(next(a for a in args if a is not type(None)))}, or null"
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(args[0])}"
    return tp.__name__


def config_keys() -> List[Tuple[str, str, str, str]]:
    """``(key, type, default as YAML, meaning)`` for every config key, in declaration order."""
    rows = []
    for name, tp, f in _walk(Config, ""):
        if "meaning" not in f.metadata:
            raise ValueError(f"config key '{name}' has no meaning: declare it as _key(default, meaning)")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((name, _type_name(tp), json.dumps(default), f.metadata["meaning"]))
    return rows


def markdown_table() -> str:
    """Every config key as a Markdown table: key, type, default, meaning (README.md holds it)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, tp, default, meaning in config_keys():
        cells = (f"`{name}`", tp, f"`{default}`", meaning)
        lines.append("| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


TABLE_START = "<!-- config keys: generated by python -m steermoe.config --readme README.md -->\n"
TABLE_END = "<!-- end of config keys -->"


def with_table(readme: str) -> str:
    """``readme`` (README.md's text) with :func:`markdown_table` between its ``TABLE_START`` and ``TABLE_END``."""
    head, start, rest = readme.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not (start and end):
        raise ValueError(f"no config key table: expected the lines {TABLE_START.strip()} and {TABLE_END}")
    return head + start + markdown_table() + end + tail


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    """``tree[a][b] = value`` for ``dotted == "a.b"``, creating sections on the way."""
    *sections, leaf = dotted.split(".")
    node = tree
    for i, name in enumerate(sections):
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{'.'.join(sections[:i + 1])}' is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """``["train.lr_router=1e-3", "data.train=[a.parquet,b.parquet]"]`` -> nested dict of raw values.

    A value is read as YAML (numbers, booleans, ``null``, ``[lists]``) unless its key holds text.
    """
    tree: Dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(tree, key.strip(), _Override(raw))
    return tree


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """The validated Config from YAML file ``path`` (None: defaults) with dotted ``overrides`` applied."""
    values: Dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    values = _merge(values, parse_overrides(overrides))
    return _build(Config, values, "").validate()


def save_config(config: Config, path: str) -> None:
    """Write ``config`` as YAML, atomically."""
    from .fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m steermoe.config", description="Print every config key: key, "
                                     "type, default and meaning, tab-separated.")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--markdown", action="store_true", help="print them as a Markdown table")
    what.add_argument("--readme", metavar="PATH", help="rewrite the table in this README in place")
    options = parser.parse_args()
    if options.readme:
        with open(options.readme, encoding="utf-8") as f:
            text = f.read()
        from .fileio import atomic_write_text
        atomic_write_text(options.readme, with_table(text))
    else:
        sys.stdout.write(markdown_table() if options.markdown
                         else "".join("\t".join(row) + "\n" for row in config_keys()))
