"""The training loop, readable top to bottom; runs alone or under torchrun.

    python -m steermoe.train --config run.yaml [section.key=value ...] [--resume | --overwrite]
    torchrun --nproc_per_node 8 -m steermoe.train --config run.yaml

One optimizer step trains on one global batch of ``batch_size × grad_accum × processes`` examples, the same
batches however that product is split (:class:`~steermoe.data.SpeechBatches`); each process reads its
``grad_accum`` micro-batches of it. The loss is the mean over all target tokens of the global batch: each
micro-batch backpropagates its token-summed loss, the gradients are summed over processes, and divided by the
global token count before clipping, so an update does not depend on how the global batch is split. With float16
frozen weights the loss is scaled (``torch.amp.GradScaler``) for the backward and the gradient unscaled before
that division.

SIGTERM or SIGUSR1 (sent by job schedulers before a kill) makes every process finish the current optimizer step;
the run then writes a checkpoint, says ``interrupted at step N (SIGTERM); last checkpoint step N (PATH)`` and
returns normally. Ctrl-C stops at once, with the same line naming the last checkpoint written, and so does a
second SIGTERM or SIGUSR1.

``--resume`` continues from the newest checkpoint, with the config the run had: only the keys in
``RESUME_MAY_CHANGE`` (``max_steps``, logging, evaluation and saving intervals, ...) may differ, and the number of
processes, ``batch_size`` and ``grad_accum`` may too as long as the global batch stays the same.
"""
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml

from .augment import masks_anything, spec_augment, speed_factors, speed_perturb, utterance_generator
from .checkpoint import (CheckpointError, check_output_dir, load_training_state, remove_checkpoints, rng_state,
                         save_checkpoint, set_rng_state)
from .config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, save_config
from .distributed import StopSignals, all_reduce_gradients, check_parallel, placeholder_batch, shard_frozen_bases
from .ema import ParameterEMA
from .fileio import METRICS_FILE, atomic_write_text, read_metrics  # noqa: F401 - read_metrics: re-exported


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many non-finite losses in a row); the message says why."""


# ----------------------------------------------------------------------------------------------- pieces

def lr_lambda(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup, then cosine down to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rates(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> None:
    """Position the :func:`lr_lambda` schedule at optimizer step ``step``: every group's lr is set to its base lr
    (``initial_lr``, kept in the optimizer's state; the group's lr when first seen) times ``lr_lambda(step)``.

    The schedule is a function of the step alone, so a resumed run takes it from the step rather than restoring a
    saved one (with a changed ``max_steps`` the first resumed step already follows the new schedule), and a
    skipped step moves it on like any other.
    """
    factor = lr_lambda(step, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


def skipped_step_message(loss: float, grad_norm: float, scale: float, new_scale: float, overflow: bool) -> str:
    """Why an optimizer step was skipped, in words: an fp16 loss-scale overflow (``overflow``: the loss is finite,
    the scaled gradient is not), a non-finite loss, or a non-finite gradient of a finite loss."""
    if overflow:
        return (f"fp16 loss scale {scale:g} overflowed the gradients (the loss, {loss:.4f}, is finite); step skipped, "
                f"scale lowered to {new_scale:g}")
    what = f"non-finite loss {loss}" if not math.isfinite(loss) else \
        f"non-finite gradient (norm {grad_norm}) of the finite loss {loss:.4f}"
    scaled = f", fp16 loss scale {scale:g} -> {new_scale:g}" if scale != new_scale else ""
    return f"{what}; step skipped{scaled}"


def build_optimizer(groups: Dict[str, List[torch.nn.Parameter]], cfg: TrainConfig,
                    decayed: Sequence[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW with one learning rate per named group (``lr_router``, ``lr_vectors``, ...).

    Each group is split in two: the parameters in ``decayed`` (weight matrices) get ``weight_decay``, the others
    (biases, scales) none.
    """
    decay_ids = {id(p) for p in decayed}
    param_groups = []
    for name, params in groups.items():
        lr = getattr(cfg, f"lr_{name}", None)
        if lr is None:
            raise ValueError(f"no learning rate for parameter group {name!r}: expected a train.lr_{name} key")
        for decay in (True, False):
            chosen = [p for p in params if p.requires_grad and (id(p) in decay_ids) == decay]
            if chosen:
                param_groups.append({"params": chosen, "lr": lr, "name": name,
                                     "weight_decay": cfg.weight_decay if decay else 0.0})
    return torch.optim.AdamW(param_groups, betas=tuple(cfg.betas))


@dataclass
class Distributed:
    """Where this process runs: ``rank`` of ``world_size``, its device, and whether it logs and saves."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: torch.Tensor) -> List[float]:
        """Element-wise sum of the (n,) tensor ``values`` over all processes, as Python floats (one sync)."""
        values = values.to(self.device, torch.float64)
        if self.world_size > 1:
            dist.all_reduce(values)
        return values.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device (``cuda`` means ``cuda:local_rank``)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device")
    return dev


def init_distributed(device: str) -> Distributed:
    """Join the torchrun process group when one is set up (nccl on GPUs, gloo on CPU); pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Distributed(rank=rank, world_size=world_size, device=dev)


def autocast_for(model) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA when the frozen weights are half precision; nothing otherwise (CPU, float32)."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(model.config["dtype"])
    if dtype is not None and model.device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def build_model(m: ModelConfig, device: torch.device, *, resuming: bool = False):
    """The :class:`SteerMoEModel` ``m`` describes, its frozen bases loaded from their checkpoints, on ``device``.

    A base that does not exist or does not fit (see :mod:`steermoe.bases`) is a ConfigError naming its key (and,
    ``resuming``, how to give a moved base's new place)."""
    from .bases import BaseModelError
    from .model import SteerMoEModel

    try:
        return SteerMoEModel.from_pretrained(
            m.whisper, m.llm, dtype=m.dtype, num_experts=m.num_experts, steering_scale=m.steering_scale,
            layers=m.layers, downsample=m.downsample, downsample_mode=m.downsample_mode, projector=m.projector,
            prompt=m.prompt, system_prompt=m.system_prompt, max_new_tokens=m.max_new_tokens,
            max_tokens_per_second=m.max_tokens_per_second, device=device)
    except BaseModelError as err:
        moved = f"; if it moved, pass model.{err.role}=NEW_PATH with --resume" if resuming else ""
        raise ConfigError(f"model.{err.role}={err.path}: {err.reason}{moved}") from None


def open_source(data: DataConfig, paths: List[str], *, tokenizer=None, for_eval: bool = False,
                repeats: Optional[List[int]] = None):
    """A :class:`ParquetSpeechSource` over ``paths`` with ``data``'s columns and filters.

    ``for_eval`` keeps every row Whisper can take (only ``max_seconds`` applies): an evaluation set is never
    filtered by the training limits. ``repeats``: reads per pass of each entry of ``paths`` (None: once).
    """
    from .data import ParquetSpeechSource

    return ParquetSpeechSource(
        paths, audio_column=data.audio_column, text_column=data.text_column, prompt_column=data.prompt_column,
        id_column=data.id_column, duration_column=data.duration_column, max_seconds=data.max_seconds,
        min_seconds=None if for_eval else data.min_seconds,
        max_text_tokens=None if for_eval else data.max_text_tokens,
        tokenizer=None if for_eval or data.max_text_tokens is None else tokenizer, repeats=repeats)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MetricsLog:
    """Append-only JSONL at ``output_dir/metrics.jsonl``, one object per line; written on the main process only.

    On resume, lines from beyond the resumed step (written by the interrupted run) are dropped first, and so is a
    last line the interrupted run left half-written (with a warning); an unreadable line before it is an error.
    ``mirror``: an object whose ``write(record)`` gets every record too (``steermoe.reporting``), closed by
    :meth:`close`.
    """

    def __init__(self, path: Optional[str], resume_step: Optional[int] = None, mirror=None):
        self.path, self.mirror = path, mirror
        if path is None:
            return
        kept = []
        if resume_step is not None and os.path.exists(path):
            try:
                records = read_metrics(path)
            except ValueError as err:
                raise TrainingError(f"{err}; repair or delete that line, then resume") from None
            kept = [json.dumps(r) + "\n" for r in records if r.get("step", 0) <= resume_step]
        atomic_write_text(path, "".join(kept))

    def write(self, record: Dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.mirror is not None:
            self.mirror.write(record)

    def close(self) -> None:
        if self.mirror is not None:
            self.mirror.close()


# keys a resumed run may change: they touch neither the data order nor the optimization trajectory, except that a
# new max_steps moves the end of the cosine schedule (the point of extending a run); batch_size and grad_accum split
# the global batch, which the checkpoint's data state holds and checks
RESUME_MAY_CHANGE = frozenset({"train.batch_size", "train.grad_accum",
    "output_dir", "model.max_new_tokens", "model.max_tokens_per_second", "data.eval", "train.max_steps",
    "train.log_every", "train.eval_every",
    "train.eval_utterances", "train.eval_batch_size", "train.save_every", "train.keep_checkpoints",
    "train.gradient_checkpointing", "train.max_nonfinite_steps", "train.device", "train.parallel",
    "train.report_to", "train.logging_dir"})


# keys that may name a base at a new place, when the run's no longer holds a folder (the base moved)
MOVABLE_BASES = ("model.whisper", "model.llm")


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_resume_config(cfg: Config, saved_path: str) -> Dict[str, Tuple[Any, Any]]:
    """Refuse to resume with ``cfg`` when it differs from the run's config (``saved_path``) outside
    :data:`RESUME_MAY_CHANGE`; returns the keys that do differ, ``{key: (saved, current)}``.

    Every other key sets the data order (batch_size, grad_accum, seed, data paths and filters) or the optimization
    trajectory (the model, learning rates, schedule, optimizer). Learning rates in particular cannot change: the
    checkpoint's optimizer state carries the old ones as its base rates. Changing them takes a new run. A base
    (:data:`MOVABLE_BASES`) may change only when the run's is no longer a folder: the same base, moved.
    """
    if not os.path.isfile(saved_path):
        raise CheckpointError(f"--resume: {saved_path} is missing, so this config cannot be checked against the run's")
    with open(saved_path, encoding="utf-8") as f:
        saved = _flatten(yaml.safe_load(f) or {})
    current = _flatten(cfg.to_dict())
    defaults = _flatten(Config().to_dict())     # a key newer than the run's config: the run had its default
    saved = {**{key: defaults[key] for key in current.keys() - saved.keys() if key in defaults}, **saved}
    absent = "<absent>"
    differ = {key: (saved.get(key, absent), current.get(key, absent)) for key in sorted(saved.keys() | current.keys())
              if saved.get(key, absent) != current.get(key, absent)}
    changed = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in differ.items()
               if key not in RESUME_MAY_CHANGE and not (key in MOVABLE_BASES and not os.path.isdir(str(old)))]
    if changed:
        raise CheckpointError(f"cannot resume with this config: it differs from the run's {saved_path} in keys that "
                              f"set the data order or the optimization trajectory: {'; '.join(changed)}. Restore "
                              "them, or start a new run (another output_dir, or --overwrite)")
    return differ


# ----------------------------------------------------------------------------------------------- the loop

@dataclass
class RunProgress:
    """How far a run got, for the line an interrupt prints: optimizer steps done and the newest checkpoint.
    ``running``: the loop has begun; ``reporting``: this process prints the line (the main one); ``bar``: the
    progress bar, closed before the line is printed."""
    step: int = 0
    checkpoint_step: Optional[int] = None
    checkpoint: Optional[str] = None
    running: bool = False
    reporting: bool = field(default_factory=lambda: int(os.environ.get("RANK", "0")) == 0)
    bar: Any = None

    def interrupted(self, how: str) -> str:
        where = f"at step {self.step}" if self.running else f"before step {self.step + 1}"
        saved = (f"last checkpoint step {self.checkpoint_step} ({self.checkpoint}); --resume continues from it"
                 if self.checkpoint else "no checkpoint written yet")
        return f"interrupted {where} ({how}); {saved}"


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> Dict[str, Any]:
    """Train as ``cfg`` says; returns ``{"step", "loss", "checkpoint", "eval", "nonfinite_steps", "interrupted"}``
    (``interrupted``: a SIGTERM or SIGUSR1 stopped the run early, after checkpointing). Ctrl-C (KeyboardInterrupt)
    propagates, after a line saying where the run stopped."""
    progress = RunProgress()

    def forced(signum: int) -> Optional[str]:
        return progress.interrupted(f"{signal.Signals(signum).name} again: stopped at once") if progress.reporting \
            else None

    with StopSignals(on_second=forced) as stop_signals:
        try:
            return _train(cfg, resume, overwrite, stop_signals, progress)
        except KeyboardInterrupt:
            if progress.bar is not None:
                progress.bar.close()
            if progress.reporting:
                print(progress.interrupted("Ctrl-C"), flush=True)
            raise


def _train(cfg: Config, resume: bool, overwrite: bool, stop_signals: StopSignals,
           progress: RunProgress) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    from .analysis import load_balancing_loss, router_health, router_z_loss, usage_sums
    from .data import SpeechBatches
    from .evaluate import eval_batches, evaluate, text_normalizer
    from .reporting import check_report_to, open_reporter

    tc = cfg.train
    check_report_to(tc.report_to)
    env = init_distributed(tc.device)
    try:
        check_parallel(tc.parallel, env.world_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    fsdp = tc.parallel == "fsdp"
    progress.reporting = env.is_main
    resume_from = check_output_dir(cfg.output_dir, resume=resume, overwrite=overwrite)
    moved = {}          # bases given at a new place on resume
    if resume_from is not None:
        changed = check_resume_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        moved = {key: change for key, change in changed.items() if key in MOVABLE_BASES}
    seed_everything(tc.seed)

    # ---- model: frozen Whisper encoder + frozen LLM, trainable steering and projector (fp32)
    m = cfg.model
    model = build_model(m, torch.device("cpu") if fsdp else env.device,   # fsdp: sharded onto the device below
                        resuming=resume_from is not None)
    if resume_from is not None:
        try:
            model.load_trainable(resume_from, check_base=not moved)
        except Exception as err:  # noqa: BLE001 - an unreadable or mismatched checkpoint, however it fails
            raise CheckpointError(f"cannot resume from {resume_from}: {err}") from err
    if tc.gradient_checkpointing:
        model.encoder.gradient_checkpointing_enable()
    if fsdp:
        held = shard_frozen_bases(model, env.device, env.world_size)
        print(f"fsdp: rank {env.rank} holds {held['sharded_local']} of the {held['sharded_total']} bytes of the "
              f"sharded layers' weights, and {held['whole']} bytes of frozen weights kept whole", flush=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the moving average (train.ema_decay): what evaluations see and checkpoints hold; the trained values resume
    ema = ParameterEMA(trainable, tc.ema_decay) if tc.ema_decay > 0 else None

    def with_averages():
        """The moving averages in the trainable parameters inside the block (no-op without ``train.ema_decay``)."""
        return ema.swapped() if ema is not None else contextlib.nullcontext()

    # ---- optimizer (one LR per group); the schedule (warmup, then cosine to max_steps) is built at the start step
    optimizer = build_optimizer(model.trainable_parameter_groups(), tc, model.decayed_parameters())
    # float16 frozen weights: scale the loss so the backward through them does not underflow; a step whose
    # gradient overflowed is skipped (and counted) like any non-finite step, and the scale halves
    scaler = torch.amp.GradScaler(env.device.type, enabled=m.dtype == "float16")

    # ---- data: length-grouped global batches, each process reading its slice of each
    train_source = open_source(cfg.data, cfg.data.train, tokenizer=model.tokenizer,
                               repeats=cfg.data.train_repeats or None)
    train_batches = SpeechBatches(train_source, tc.batch_size, grad_accum=tc.grad_accum,
                                  bucket_size=cfg.data.bucket_size, shuffle=True, seed=tc.seed, rank=env.rank,
                                  world_size=env.world_size)
    if cfg.data.eval:   # an eval set without a usable row fails now, not at the first evaluation
        next(eval_batches(open_source(cfg.data, cfg.data.eval, for_eval=True), 1, limit=1))
    step = nonfinite_total = nonfinite_in_a_row = 0
    if resume_from is not None:
        state = load_training_state(resume_from)
        try:
            train_batches.load_state_dict(state["data"])
        except ValueError as err:
            raise CheckpointError(f"cannot resume {resume_from}: {err}") from None
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        step, nonfinite_total, nonfinite_in_a_row = state["step"], state["nonfinite_total"], state["nonfinite_in_a_row"]
        progress.step, progress.checkpoint_step, progress.checkpoint = step, step, resume_from
        if env.is_main:
            for key, (old, new) in moved.items():
                print(f"{key}: {old} -> {new} (a moved base: it must hold the checkpoint the run trained with)",
                      flush=True)
            print(f"resuming from step {step} (checkpoint {resume_from})", flush=True)
    batch_iter = iter(train_batches)

    def next_micro_batches():
        """This process's ``grad_accum`` micro-batches of the next global batch (None: an empty slice)."""
        nonlocal batch_iter
        try:
            return next(batch_iter)
        except StopIteration:           # end of epoch: the data's own state knows which epoch comes next
            batch_iter = iter(train_batches)
            return next(batch_iter)

    # ---- outputs: config, metrics log, progress bar (main process only)
    if env.is_main:
        if overwrite:
            remove_checkpoints(cfg.output_dir)
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    env.barrier()
    reporter = open_reporter(tc.report_to, tc.logging_dir, cfg.output_dir, step) if env.is_main else None
    log = MetricsLog(os.path.join(cfg.output_dir, METRICS_FILE) if env.is_main else None,
                     resume_step=step if resume_from is not None else None, mirror=reporter)
    bar = progress.bar = tqdm(total=tc.max_steps, initial=step, disable=not env.is_main, dynamic_ncols=True,
                              desc="train")

    def say(message: str) -> None:
        if env.is_main:                 # tqdm.write prints even where the bar is disabled
            bar.write(message)
    normalize = text_normalizer(m.whisper)

    def evaluate_now():
        source = open_source(cfg.data, cfg.data.eval, for_eval=True)
        return evaluate(model, eval_batches(source, tc.eval_batch_size, limit=tc.eval_utterances),
                        normalize=normalize, max_new_tokens=m.max_new_tokens,
                        total=min(source.num_rows, tc.eval_utterances), progress=None if env.is_main else False)

    def run_eval(at_step: int) -> Optional[Dict[str, Any]]:
        """Greedy WER/CER on the first ``eval_utterances`` of ``data.eval`` (main process; others wait, or under
        fsdp, whose layers every process must gather together, evaluate the same utterances alongside). With a
        moving average, of the averages (``eval/*``), and of the trained values (``eval_online/*``)."""
        summary = None
        if (env.is_main or fsdp) and cfg.data.eval:
            online = evaluate_now() if ema is not None else None
            with with_averages():
                summary = evaluate_now()
            gating = summary["gating"]["layers"] if summary["gating"] else []
            log.write({"step": at_step, **{f"eval/{k}": v for k, v in summary.items() if k != "gating"},
                       **{f"eval/router/{k}": [round(layer[k], 5) for layer in gating]
                          for k in ("usage_entropy", "top_share")},
                       # per steered layer (keyed by its index), each expert's mean gate: steermoe plot's heatmap
                       "eval/router/usage": {str(layer["layer"]): [round(u, 5) for u in layer["usage"]]
                                             for layer in gating},
                       **({f"eval_online/{k}": online[k] for k in ("loss", "wer", "cer")} if online else {})})
            averaged = f" (moving average; trained values: WER {online['wer']:.2%} CER {online['cer']:.2%} loss " \
                       f"{online['loss']:.4f})" if online else ""
            say(f"step {at_step}: eval WER {summary['wer']:.2%} CER {summary['cer']:.2%} "
                f"loss {summary['loss']:.4f} on {summary['utterances']} utterances{averaged}")
        env.barrier()
        return summary

    def checkpoint() -> str:
        path = None
        if env.is_main:
            # the data position is the same on every process; the RNG state is the main process's (the loop
            # draws no random numbers: the frozen parts have no dropout and the data order is seeded)
            state = {"step": step, "world_size": env.world_size, "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(),
                     "data": train_batches.state_dict(), "rng": rng_state(), "nonfinite_total": nonfinite_total,
                     "nonfinite_in_a_row": nonfinite_in_a_row}
            if ema is not None:     # the saved weights are the averages; the training state holds the trained values
                state["ema"] = ema.state_dict()
            with with_averages():
                path = save_checkpoint(cfg.output_dir, step, model, state, keep=tc.keep_checkpoints)
        env.barrier()
        return path

    # ---- the loop
    model.train()
    loss = float("nan")
    checkpoint_path, eval_summary, interrupted = resume_from, None, False
    num_layers, num_experts = model.encoder.router_bias.shape
    progress.running = True
    augmenting = tc.speed_perturb > 0 or masks_anything(tc.spec_time_masks, tc.spec_time_width,
                                                        tc.spec_freq_masks, tc.spec_freq_width)
    while step < tc.max_steps:
        t_start = time.perf_counter()
        set_learning_rates(optimizer, tc, step)
        # router health is logged every log_every steps, from the gates the op returns (no extra forward)
        log_health = (step + 1) % tc.log_every == 0
        # this process's sums over its micro-batches: token loss, target tokens, token-weighted aux and z losses,
        # samples; then the gates' (L, E) sums over real encoder frames and the frame count
        sums = torch.zeros(5, dtype=torch.float64, device=env.device)
        gate_sums = torch.zeros(num_layers * num_experts + 1, dtype=torch.float64, device=env.device)
        for batch in next_micro_batches():
            # an empty slice of a small global batch: nothing to do, except under fsdp, where every process joins
            # each layer's gathers in the same order: a placeholder utterance, with zero weight
            placeholder = batch is None
            if placeholder and not fsdp:
                continue
            batch = placeholder_batch() if placeholder else batch
            # one generator per utterance and step: its speed factor first, then its masks
            generators = [utterance_generator(tc.seed, step, i) for i in batch.ids] if augmenting else None
            waveforms, lengths = batch.waveforms, batch.lengths
            if tc.speed_perturb > 0:
                waveforms, lengths = speed_perturb(waveforms, lengths, speed_factors(tc.speed_perturb, generators),
                                                   max_samples=model.window_samples)
            features, mask = model.features(waveforms, lengths)
            if augmenting:
                features = spec_augment(features, mask, time_masks=tc.spec_time_masks,
                                        time_width=tc.spec_time_width, freq_masks=tc.spec_freq_masks,
                                        freq_width=tc.spec_freq_width, generators=generators)
            with autocast_for(model):
                out = model(features, attention_mask=mask, texts=batch.texts, prompts=batch.prompts,
                            return_gating=tc.aux_loss_weight > 0 or log_health,
                            return_router_logits=tc.z_loss_weight > 0)
            objective = out.loss_sum.float()
            aux = z_loss = torch.zeros((), device=env.device)
            if tc.aux_loss_weight > 0:   # token-weighted, like the main loss
                aux = load_balancing_loss(out.gating, mask=out.gating_mask) * out.num_tokens
                objective = objective + tc.aux_loss_weight * aux
            if tc.z_loss_weight > 0:
                z_loss = router_z_loss(out.router_logits, mask=out.gating_mask) * out.num_tokens
                objective = objective + tc.z_loss_weight * z_loss
            scaler.scale(objective * (0.0 if placeholder else 1.0)).backward()
            if not placeholder:
                sums += torch.stack([out.loss_sum.detach().double(), out.num_tokens.double(), aux.detach().double(),
                                     z_loss.detach().double(),
                                     torch.tensor(len(batch), dtype=torch.float64, device=env.device)])
                if log_health:
                    usage, frames = usage_sums(out.gating, out.gating_mask)
                    gate_sums += torch.cat([usage.reshape(-1), frames.reshape(1)])

        # mean over the global batch's target tokens: gradients summed over processes, then divided (a global batch
        # whose every row was skipped has no tokens: a non-finite loss, and the step is skipped)
        loss_sum, tokens, aux_sum, z_sum, samples, *gate_totals = env.all_sum(torch.cat([sums, gate_sums]))
        all_reduce_gradients(trainable, env.world_size)
        scaler.unscale_(optimizer)
        for p in trainable:
            p.grad.div_(max(tokens, 1.0))
        loss = loss_sum / tokens if tokens else math.nan
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip if tc.grad_clip > 0 else math.inf))
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        loss_scale = scaler.get_scale()
        stepped = math.isfinite(loss) and math.isfinite(grad_norm)   # the same on every process: grads are all-reduced
        if stepped:
            scaler.step(optimizer)
            if ema is not None:
                ema.update()
            nonfinite_in_a_row = 0
        else:
            nonfinite_total += 1
            # an overflow of the scaled float16 gradient while the scale is still >= 1 is the scaler finding its
            # level (it halves the scale), not divergence: it does not count toward max_nonfinite_steps
            overflow = scaler.is_enabled() and math.isfinite(loss) and loss_scale >= 1
            nonfinite_in_a_row += 0 if overflow else 1
        scaler.update()
        if not stepped:
            say(f"step {step + 1}: " + skipped_step_message(loss, grad_norm, loss_scale, scaler.get_scale(), overflow)
                + (f" ({nonfinite_total} skipped in total)" if overflow else
                   f" ({nonfinite_in_a_row} in a row, {nonfinite_total} in total)"))
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.step = step

        seconds = time.perf_counter() - t_start
        record = {"step": step, "loss": loss, "grad_norm": grad_norm, "tokens": int(tokens), "samples": int(samples),
                  "seconds": seconds, "samples_per_s": samples / seconds, "skipped": nonfinite_total,
                  **{f"lr/{k}": v for k, v in lrs.items()}}
        if tc.aux_loss_weight > 0:
            record["aux_loss"] = aux_sum / max(tokens, 1.0)
        if tc.z_loss_weight > 0:
            record["z_loss"] = z_sum / max(tokens, 1.0)
        if log_health:   # per steered layer, over the step's real encoder frames on all processes
            usage = torch.tensor(gate_totals[:-1], dtype=torch.float64).view(num_layers, num_experts)
            health = router_health(usage / max(gate_totals[-1], 1.0))
            record.update({f"router/{k}": [round(v, 5) for v in values] for k, values in health.items()})
        if scaler.is_enabled():
            record["loss_scale"] = loss_scale
        log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs.get('vectors', next(iter(lrs.values()))):.2e}",
                        samples_s=f"{record['samples_per_s']:.1f}")
        if log_health:
            say(f"step {step}: loss {loss:.4f}  grad norm {grad_norm:.3f}  "
                f"{record['samples_per_s']:.1f} samples/s  router usage entropy "
                f"min {min(record['router/usage_entropy']):.3f} (log E = {math.log(num_experts):.3f}), "
                f"top share max {max(record['router/top_share']):.3f}")
        if nonfinite_in_a_row >= tc.max_nonfinite_steps:
            bar.close()
            raise TrainingError(f"stopped at step {step}: {nonfinite_in_a_row} steps in a row had a non-finite loss "
                                f"or gradient; lower the learning rates, check the data, or resume from the last "
                                f"checkpoint in {cfg.output_dir}")
        # a stop signal on any process stops all of them here, after the same step
        interrupted = env.all_sum(torch.tensor([float(stop_signals.received is not None)]))[0] > 0
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps and not interrupted:
            eval_summary = run_eval(step)
        if step % tc.save_every == 0 or step == tc.max_steps or interrupted:
            checkpoint_path = checkpoint()
            progress.checkpoint_step, progress.checkpoint = step, checkpoint_path
        if interrupted:
            received = stop_signals.received
            say(progress.interrupted(signal.Signals(received).name if received else "stop signal on another process"))
            break
    bar.close()
    if cfg.data.eval and not interrupted:
        eval_summary = run_eval(step)
    log.close()
    return {"step": step, "loss": loss, "checkpoint": checkpoint_path, "eval": eval_summary,
            "nonfinite_steps": nonfinite_total, "interrupted": interrupted}


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m steermoe.train ...``: the same as ``steermoe train ...``."""
    from .cli import main as cli_main
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
