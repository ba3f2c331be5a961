"""The training loop and its pieces: LR schedule, optimizer groups, checkpoints, resume, accumulation."""
import atexit
import functools
import math
import os
import shutil
import tempfile

import pytest
import torch

import steermoe
import steermoe.train
from steermoe.checkpoint import (CheckpointError, check_output_dir, latest_checkpoint, list_checkpoints,
                                 load_training_state, rng_state, save_checkpoint, set_rng_state, step_dir)
from steermoe.config import Config, TrainConfig, load_config
from steermoe.fileio import atomic_write_text
from steermoe.train import Distributed, MetricsLog, TrainingError, build_optimizer, lr_lambda, read_metrics, train


# ------------------------------------------------------------------------------------------ schedule, optimizer

def test_lr_schedule_warmup_then_cosine():
    kw = dict(warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    mults = [lr_lambda(s, **kw) for s in range(21)]
    assert mults[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for s in range(4, 21):   # independent formula: cosine from 1 down to the floor over the remaining steps
        t = (s - 4) / 16
        assert mults[s] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * t)) / 2)
    assert all(a >= b for a, b in zip(mults[3:], mults[4:]))
    assert mults[20] == pytest.approx(0.1)
    assert lr_lambda(0, warmup_steps=0, max_steps=5, min_lr_ratio=0.0) == pytest.approx(1.0)


def test_each_group_gets_its_own_lr_and_matrices_only_decay():
    torch.manual_seed(0)
    router_w, router_b = torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(3))
    vectors, scales = torch.nn.Parameter(torch.randn(2, 3, 5)), torch.nn.Parameter(torch.randn(2))
    proj_w, proj_b = torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(7))
    groups = {"router": [router_w, router_b], "vectors": [vectors], "scales": [scales], "projector": [proj_w, proj_b]}
    cfg = TrainConfig(lr_router=1e-1, lr_vectors=2e-2, lr_scales=3e-3, lr_projector=4e-4, weight_decay=0.05)
    opt = build_optimizer(groups, cfg, decayed=[router_w, vectors, proj_w])
    seen = {}
    for g in opt.param_groups:
        for p in g["params"]:
            seen[id(p)] = (g["name"], g["lr"], g["weight_decay"])
    assert seen[id(router_w)] == ("router", 1e-1, 0.05)
    assert seen[id(router_b)] == ("router", 1e-1, 0.0)
    assert seen[id(vectors)] == ("vectors", 2e-2, 0.05)
    assert seen[id(scales)] == ("scales", 3e-3, 0.0)
    assert seen[id(proj_w)] == ("projector", 4e-4, 0.05)
    assert seen[id(proj_b)] == ("projector", 4e-4, 0.0)
    assert len(seen) == 6

    # the rates are the ones the update uses: one SGD-like Adam step moves each tensor by ~lr
    before = {n: [p.detach().clone() for p in ps] for n, ps in groups.items()}
    for ps in groups.values():
        for p in ps:
            p.grad = torch.ones_like(p)
    opt = build_optimizer(groups, TrainConfig(lr_router=1e-1, lr_vectors=2e-2, lr_scales=3e-3, lr_projector=4e-4,
                                              weight_decay=0.0), decayed=[])
    opt.step()
    for name, lr in (("router", 1e-1), ("vectors", 2e-2), ("scales", 3e-3), ("projector", 4e-4)):
        for p, p0 in zip(groups[name], before[name]):
            torch.testing.assert_close(p0 - p.detach(), torch.full_like(p0, lr), rtol=1e-3, atol=1e-7)


def test_only_the_real_models_weight_matrices_decay():
    from steermoe.model import SteerMoEModel

    a = tiny_assets()
    model = SteerMoEModel.from_pretrained(a["whisper"], a["llm"], dtype="float32", num_experts=3, projector="mlp")
    assert model.encoder.router_bias.ndim == 2               # (L, E): a bias, though not a vector
    opt = build_optimizer(model.trainable_parameter_groups(), TrainConfig(weight_decay=0.05),
                          model.decayed_parameters())
    names = {id(p): name for name, p in model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay == {"encoder.router_weight": 0.05, "encoder.router_bias": 0.0, "encoder.steering_vectors": 0.05,
                     "encoder.layer_scales": 0.0, "projector.0.weight": 0.05, "projector.0.bias": 0.0,
                     "projector.2.weight": 0.05, "projector.2.bias": 0.0}


def test_unknown_group_is_an_error():
    with pytest.raises(ValueError, match="lr_gates"):
        build_optimizer({"gates": [torch.nn.Parameter(torch.ones(2))]}, TrainConfig(), decayed=[])


# ------------------------------------------------------------------------------------------ checkpoints

class FakeModel:
    """Writes one file like save_trainable does; can be told to crash halfway."""

    def __init__(self, value, crash=False):
        self.value, self.crash = value, crash

    def save_trainable(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "weights.txt"), "w") as f:
            f.write(str(self.value))
        if self.crash:
            raise OSError("disk full")


def test_checkpoint_write_discovery_and_pruning(tmp_path):
    out = str(tmp_path)
    assert latest_checkpoint(out) is None
    for step in (2, 4, 10):
        save_checkpoint(out, step, FakeModel(step), {"step": step, "x": torch.arange(step)}, keep=2)
    assert [s for s, _ in list_checkpoints(out)] == [4, 10]
    assert latest_checkpoint(out) == step_dir(out, 10)
    state = load_training_state(latest_checkpoint(out))
    assert state["step"] == 10 and torch.equal(state["x"], torch.arange(10))

    # a crash mid-save leaves the earlier checkpoints intact and no new step directory
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(out, 12, FakeModel(12, crash=True), {"step": 12}, keep=2)
    assert [s for s, _ in list_checkpoints(out)] == [4, 10]
    assert open(os.path.join(step_dir(out, 10), "weights.txt")).read() == "10"
    assert not os.path.exists(step_dir(out, 12))
    # the next save cleans the leftovers; saving the same step again replaces it whole
    save_checkpoint(out, 10, FakeModel("again"), {"step": 10}, keep=0)
    assert open(os.path.join(step_dir(out, 10), "weights.txt")).read() == "again"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000004", "step_00000010"]


def record_disk_events(monkeypatch) -> list:
    """Log each os.fsync (as the inode it flushed), os.replace and shutil.rmtree, in call order."""
    events = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        events.append(("rmtree", os.path.basename(path)))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return events


def flushed(path) -> tuple:
    return ("fsync", os.stat(path).st_ino)


def test_atomic_write_flushes_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = record_disk_events(monkeypatch)
    atomic_write_text(str(tmp_path / "a.txt"), "hello")
    renamed = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert len(renamed) == 1
    assert flushed(tmp_path / "a.txt") in events[:renamed[0]]
    assert flushed(tmp_path) in events[renamed[0] + 1:]


def test_checkpoint_is_on_disk_before_older_ones_are_pruned(tmp_path, monkeypatch):
    out = str(tmp_path)
    save_checkpoint(out, 1, FakeModel(1), {"step": 1}, keep=1)
    events = record_disk_events(monkeypatch)
    final = save_checkpoint(out, 2, FakeModel(2), {"step": 2}, keep=1)
    renamed = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert len(renamed) == 1 and events[renamed[0]][2] == "step_00000002"
    before, after = events[:renamed[0]], events[renamed[0] + 1:]
    for name in ("weights.txt", "training_state.pt"):
        assert flushed(os.path.join(final, name)) in before, name
    assert flushed(final) in before                          # its entries
    assert after.index(flushed(tmp_path / "checkpoints")) < after.index(("rmtree", "step_00000001"))
    assert [s for s, _ in list_checkpoints(out)] == [2]


def test_output_dir_guard(tmp_path):
    out = str(tmp_path)
    assert check_output_dir(out, resume=False, overwrite=False) is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        check_output_dir(out, resume=True, overwrite=False)
    save_checkpoint(out, 3, FakeModel(3), {"step": 3})
    with pytest.raises(CheckpointError, match="already holds checkpoints.*--resume.*--overwrite"):
        check_output_dir(out, resume=False, overwrite=False)
    assert check_output_dir(out, resume=True, overwrite=False) == step_dir(out, 3)
    assert check_output_dir(out, resume=False, overwrite=True) is None
    assert os.path.isdir(step_dir(out, 3))           # deciding deletes nothing


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_metrics_log_drops_lines_past_the_resumed_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    MetricsLog(path, resume_step=3).write({"step": 4, "loss": 0.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.0)]
    MetricsLog(path)                                  # a fresh run starts an empty log
    assert read_metrics(path) == []


def test_metrics_log_resume_drops_a_torn_last_line_and_names_a_bad_earlier_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')   # killed mid-append
    with pytest.warns(UserWarning, match="half-written last line"):
        log = MetricsLog(str(path), resume_step=2)
    log.write({"step": 3, "loss": 1.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(str(path))] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    path.write_text('{"step": 1}\n{"step": 2}')                # whole, but its newline never written
    MetricsLog(str(path), resume_step=2).write({"step": 3})
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2, 3]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(TrainingError, match=r"metrics\.jsonl line 2 is not valid JSON"):
        MetricsLog(str(path), resume_step=3)


# ------------------------------------------------------------------------------------------ the loop, end to end

@functools.lru_cache(maxsize=None)
def tiny_assets() -> dict:
    """Tiny random Whisper + Llama-style LLM on disk and parquet slices of the bundled speech (built once)."""
    import pyarrow.parquet as pq

    from steermoe.demo.tiny_models import build_tiny_llm, build_tiny_whisper

    root = tempfile.mkdtemp(prefix="steermoe-tiny-")
    atexit.register(shutil.rmtree, root, True)
    assets = {"root": root,
              "whisper": build_tiny_whisper(os.path.join(root, "whisper"), d_model=32, layers=2, heads=2, ffn_dim=48),
              "llm": build_tiny_llm(os.path.join(root, "llm"), hidden_size=32, layers=1, heads=2, ffn_dim=48)}
    table = pq.read_table(SPEECH)
    for rows in (4, 5):
        assets[f"rows{rows}"] = os.path.join(root, f"rows{rows}.parquet")
        pq.write_table(table.slice(7, rows), assets[f"rows{rows}"])
    return assets


SPEECH = os.path.join(os.path.dirname(steermoe.__file__), "demo", "speech.parquet")


def tiny_config(output_dir, data="rows4", dtype="float32", extra=(), **train) -> Config:
    """A CPU run on the tiny models (frozen weights in ``dtype``); ``train`` entries override ``train.*`` keys,
    ``extra`` holds further ``key=value`` overrides."""
    a = tiny_assets()
    overrides = [f"model.whisper={a['whisper']}", f"model.llm={a['llm']}", f"model.dtype={dtype}",
                 "model.num_experts=3", "model.max_new_tokens=6", f"data.train={a[data]}", f"output_dir={output_dir}",
                 "train.device=cpu", "train.warmup_steps=1", "train.log_every=100", "train.save_every=100",
                 "train.lr_router=3e-3", "train.lr_vectors=2e-3", "train.lr_scales=1e-2", "train.lr_projector=1e-3",
                 "train.keep_checkpoints=0"]
    return load_config(None, overrides + list(extra) + [f"train.{k}={v}" for k, v in train.items()])


@functools.lru_cache(maxsize=None)
def tiny_run() -> str:
    """The output_dir of a finished two-step run on the tiny models (trained once)."""
    out = os.path.join(tiny_assets()["root"], "run")
    train(tiny_config(out, batch_size=2, max_steps=2))
    return out


def trained_weights(output_dir, step=None):
    from safetensors.torch import load_file
    path = latest_checkpoint(str(output_dir)) if step is None else step_dir(str(output_dir), step)
    return load_file(os.path.join(path, "trainable.safetensors"))


def losses(output_dir):
    return [r["loss"] for r in read_metrics(os.path.join(output_dir, "metrics.jsonl")) if "loss" in r]


def capture_gradients(monkeypatch):
    """Make every optimizer the loop builds record the gradients it steps with: a list (per step) of lists."""
    captured = []

    def build(groups, cfg, decayed):
        opt = build_optimizer(groups, cfg, decayed)
        opt.register_step_pre_hook(
            lambda o, args, kwargs: captured.append([p.grad.clone() for g in o.param_groups for p in g["params"]]))
        return opt

    monkeypatch.setattr(steermoe.train, "build_optimizer", build)
    return captured


SPEC = dict(spec_time_masks=2, spec_time_width=30, spec_freq_masks=2, spec_freq_width=20)
SPEED = dict(speed_perturb=0.2)


@pytest.mark.parametrize("augment", [{}, SPEC, dict(SPEC, **SPEED)], ids=["plain", "spec_augment", "speed_and_masks"])
def test_splitting_the_batch_into_accumulation_steps_gives_the_same_update(tmp_path, monkeypatch, augment):
    runs = {}
    for name, batch, accum in (("whole", 4, 1), ("halves", 2, 2), ("singles", 1, 4)):
        grads = capture_gradients(monkeypatch)
        out = tmp_path / name
        train(tiny_config(out, batch_size=batch, grad_accum=accum, max_steps=3, **augment))
        runs[name] = (losses(out), grads, trained_weights(out))
    whole_losses, whole_grads, whole_weights = runs["whole"]
    assert len(whole_losses) == 3 and len(whole_grads) == 3
    for name in ("halves", "singles"):
        split_losses, split_grads, split_weights = runs[name]
        assert split_losses == pytest.approx(whole_losses, rel=1e-5)
        for step_grads, whole_step_grads in zip(split_grads, whole_grads):
            for g, ref in zip(step_grads, whole_step_grads):
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
        for key, value in whole_weights.items():       # Adam's first steps are ~lr·sign(g): loose on weights
            torch.testing.assert_close(split_weights[key], value, rtol=0, atol=1e-4)
    # the global batch really is all four utterances each step
    records = read_metrics(os.path.join(tmp_path / "singles", "metrics.jsonl"))
    whole_records = read_metrics(os.path.join(tmp_path / "whole", "metrics.jsonl"))
    assert [r["samples"] for r in records] == [4, 4, 4]
    assert [r["tokens"] for r in records] == [r["tokens"] for r in whole_records]


def test_an_utterances_speed_factor_and_masks_come_from_one_generator_and_slowing_stops_at_the_window(
        tmp_path, monkeypatch):
    seen = {"factors": [], "masks": [], "max_samples": []}
    real_factors, real_perturb, real_masks = (steermoe.train.speed_factors, steermoe.train.speed_perturb,
                                              steermoe.train.spec_augment)

    def factors(perturb, generators):
        seen["factors"].append([id(g) for g in generators])
        return real_factors(perturb, generators)

    def perturb(waveforms, lengths, factors, max_samples=None):
        seen["max_samples"].append(max_samples)
        return real_perturb(waveforms, lengths, factors, max_samples=max_samples)

    def masks(features, mask, generators=None, **kw):
        seen["masks"].append([id(g) for g in generators])
        return real_masks(features, mask, generators=generators, **kw)

    monkeypatch.setattr(steermoe.train, "speed_factors", factors)
    monkeypatch.setattr(steermoe.train, "speed_perturb", perturb)
    monkeypatch.setattr(steermoe.train, "spec_augment", masks)
    train(tiny_config(tmp_path, batch_size=2, max_steps=2, **SPEC, **SPEED))
    assert len(seen["factors"]) == 2 and seen["factors"] == seen["masks"]
    assert seen["max_samples"] == [30 * 16000] * 2                  # Whisper's 30 s window, in samples


def test_train_repeats_serve_each_copy_once_per_epoch(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(steermoe.train, "utterance_generator",
                        lambda seed, step, utterance_id: seen.append((step, utterance_id)) or None)
    train(tiny_config(tmp_path, extra=["data.train_repeats=[2]"], batch_size=4, max_steps=2, **SPEC))
    originals = sorted(i for _, i in seen if "~" not in i)
    assert len(originals) == 4 and sorted(i for _, i in seen) == sorted(originals + [f"{i}~1" for i in originals])


def test_per_group_lrs_and_schedule_reach_the_optimizer(tmp_path):
    train(tiny_config(tmp_path, batch_size=2, max_steps=4, warmup_steps=2, min_lr_ratio=0.2,
                      aux_loss_weight=0.5))
    records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    for r in records:
        mult = lr_lambda(r["step"] - 1, warmup_steps=2, max_steps=4, min_lr_ratio=0.2)
        assert r["lr/router"] == pytest.approx(3e-3 * mult)
        assert r["lr/vectors"] == pytest.approx(2e-3 * mult)
        assert r["lr/scales"] == pytest.approx(1e-2 * mult)
        assert r["lr/projector"] == pytest.approx(1e-3 * mult)
        assert 1.0 <= r["aux_loss"] <= 3.0            # Switch loss: 1 when balanced, E=3 when collapsed
    state = load_training_state(latest_checkpoint(str(tmp_path)))
    assert {g["name"] for g in state["optimizer"]["param_groups"]} == {"router", "vectors", "scales", "projector"}


def test_router_health_and_z_loss_are_logged_from_the_steps_gates(tmp_path, monkeypatch):
    from steermoe.analysis import router_z_loss
    from steermoe.model import SteerMoEModel

    seen = []          # per forward: (gating, mask, router logits, target tokens), detached
    real_forward = SteerMoEModel.forward

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        detach = (lambda t: None if t is None else tuple(g.detach().clone() for g in t))
        seen.append((detach(out.gating), out.gating_mask, detach(out.router_logits), int(out.num_tokens)))
        return out

    monkeypatch.setattr(SteerMoEModel, "forward", forward)
    cfg = tiny_config(tmp_path, data="rows5", batch_size=2, grad_accum=2, max_steps=4, log_every=2,
                      z_loss_weight=0.01, eval_utterances=2)
    cfg.data.eval = [tiny_assets()["rows4"]]
    train(cfg)
    records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    evals = [r for r in records if "eval/wer" in r]
    records = [r for r in records if "loss" in r]
    assert len(evals) == 1 and len(evals[0]["eval/router/usage_entropy"]) == len(evals[0]["eval/router/top_share"]) == 2
    assert all(0 <= e <= math.log(3) + 1e-6 for e in evals[0]["eval/router/usage_entropy"])
    assert [("router/usage_entropy" in r, "router/top_share" in r) for r in records] == [(False, False), (True, True)] * 2
    assert [seen[i][0] is None for i in range(8)] == [True, True, False, False] * 2   # gates asked for on log steps
    seen = seen[:8]                                               # the rest: the final evaluation's forwards
    for step in (2, 4):
        record, micro = records[step - 1], seen[2 * (step - 1): 2 * step]
        for layer, (entropy, top) in enumerate(zip(record["router/usage_entropy"], record["router/top_share"])):
            # the mean gate over every real encoder frame of the step's two micro-batches, by plain loops
            rows = [g[layer][b, t].double() for g, mask, _, _ in micro
                    for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
            usage = torch.stack(rows).mean(0)
            assert entropy == pytest.approx(-float((usage * usage.log()).sum()), abs=1e-5)
            assert top == pytest.approx(float(usage.max()), abs=1e-5)
        assert len(record["router/usage_entropy"]) == 2            # the tiny Whisper's two steered layers
    assert any(bool((mask == 0).any()) for _, mask, _, _ in seen)    # padded frames were there to leave out
    for step, record in enumerate(records, 1):                    # z-loss: token-weighted over micro-batches
        micro = seen[2 * (step - 1): 2 * step]
        want = sum(float(router_z_loss(z, mask)) * tokens for _, mask, z, tokens in micro) / record["tokens"]
        assert record["z_loss"] == pytest.approx(want, rel=1e-5)


def test_resume_with_more_steps_follows_the_new_schedule_from_the_first_resumed_step(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run(), out)                  # two steps of a max_steps=2 schedule (warmup 1)
    train(tiny_config(out, batch_size=2, max_steps=5), resume=True)
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    min_lr_ratio = TrainConfig().min_lr_ratio
    for r in records:
        mult = lr_lambda(r["step"] - 1, warmup_steps=1, max_steps=2 if r["step"] <= 2 else 5,
                         min_lr_ratio=min_lr_ratio)
        assert (r["step"], r["lr/vectors"], r["lr/router"]) == (r["step"], pytest.approx(2e-3 * mult),
                                                                pytest.approx(3e-3 * mult))


class Killed(Exception):
    pass


def kill_after_saving(monkeypatch, at_step: int) -> None:
    """Make the loop raise Killed right after it saved the step-``at_step`` checkpoint."""
    real_save = steermoe.train.save_checkpoint

    def save_then_die(output_dir, step, *args, **kwargs):
        path = real_save(output_dir, step, *args, **kwargs)
        if step == at_step:
            raise Killed
        return path

    monkeypatch.setattr(steermoe.train, "save_checkpoint", save_then_die)


def signal_during_step(monkeypatch, at_step: int, signum: int) -> None:
    """Make the process send itself ``signum`` during the forward of optimizer step ``at_step`` (one micro-batch a
    step)."""
    from steermoe.model import SteerMoEModel

    calls = {"n": 0}
    real_forward = SteerMoEModel.forward

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_step:
            os.kill(os.getpid(), signum)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(SteerMoEModel, "forward", forward)


def train_straight_and_killed(tmp_path, monkeypatch, kill_at: int, signum=None, **kw) -> None:
    """The same run twice: ``tmp_path/straight`` uninterrupted, ``tmp_path/killed`` killed right after its
    step-``kill_at`` checkpoint (or sent ``signum`` during step ``kill_at``, which it finishes and checkpoints before
    it returns) and resumed."""
    train(tiny_config(tmp_path / "straight", **kw))
    if signum is None:
        kill_after_saving(monkeypatch, kill_at)
        with pytest.raises(Killed):
            train(tiny_config(tmp_path / "killed", **kw))
    else:
        signal_during_step(monkeypatch, kill_at, signum)
        result = train(tiny_config(tmp_path / "killed", **kw))
        assert result["interrupted"] and result["step"] == kill_at
        assert result["checkpoint"] == step_dir(str(tmp_path / "killed"), kill_at)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(tiny_config(tmp_path / "killed", **kw))
    train(tiny_config(tmp_path / "killed", **kw), resume=True)


def assert_same_trained_weights(output_dir, other_dir) -> None:
    ours, theirs = trained_weights(output_dir), trained_weights(other_dir)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_killed_run_resumed_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    # 5 utterances in batches of 2: three batches an epoch; killed mid-epoch, the resumed run crosses an epoch
    train_straight_and_killed(tmp_path, monkeypatch, 2, data="rows5", batch_size=2, max_steps=6, save_every=2,
                              keep_checkpoints=2)
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 6
    assert_same_trained_weights(tmp_path / "straight", tmp_path / "killed")
    assert [s for s, _ in list_checkpoints(str(tmp_path / "killed"))] == [4, 6]      # keep_checkpoints=2


@pytest.mark.parametrize("augment", [SPEC, SPEED], ids=["spec_augment", "speed"])
def test_augmentation_changes_the_steps_and_a_resumed_run_augments_as_the_uninterrupted_one(tmp_path, monkeypatch,
                                                                                            augment):
    train(tiny_config(tmp_path / "plain", data="rows5", batch_size=2, max_steps=4))
    train_straight_and_killed(tmp_path, monkeypatch, 2, data="rows5", batch_size=2, max_steps=4, save_every=2,
                              **augment)
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert_same_trained_weights(tmp_path / "straight", tmp_path / "killed")
    plain, masked = losses(tmp_path / "plain"), losses(tmp_path / "straight")
    assert all(a != b for a, b in zip(plain, masked))


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_checkpoints_after_the_step_and_the_resumed_run_is_the_uninterrupted_one(tmp_path, monkeypatch,
                                                                                              capfd, signum):
    import signal

    train_straight_and_killed(tmp_path, monkeypatch, 3, signum=getattr(signal, signum), data="rows5", batch_size=2,
                              max_steps=5)
    out = capfd.readouterr().out
    assert (f"interrupted at step 3 ({signum}); last checkpoint step 3 ({step_dir(str(tmp_path / 'killed'), 3)}); "
            "--resume continues from it") in out
    assert f"resuming from step 3 (checkpoint {step_dir(str(tmp_path / 'killed'), 3)})" in out
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert_same_trained_weights(tmp_path / "straight", tmp_path / "killed")
    assert signal.getsignal(getattr(signal, signum)) is signal.SIG_DFL     # the handler is gone after the run


def test_non_finite_losses_skip_the_step_and_repeated_ones_stop(tmp_path, monkeypatch, capfd, recwarn):
    from steermoe.model import SteerMoEModel

    poisoned = {2, 4, 5}                              # forward calls (one per step here) that return NaN
    calls = {"n": 0}
    real_forward = SteerMoEModel.forward

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in poisoned:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(SteerMoEModel, "forward", forward)
    with pytest.raises(TrainingError, match="stopped at step 5: 2 steps in a row had a non-finite loss"):
        train(tiny_config(tmp_path, batch_size=4, max_steps=8, save_every=1, max_nonfinite_steps=2))
    records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["skipped"] for r in records] == [0, 1, 1, 2, 3]
    out = capfd.readouterr().out
    assert "step 2: non-finite loss nan; step skipped (1 in a row, 1 in total)" in out
    assert "step 5: non-finite loss nan; step skipped (2 in a row, 3 in total)" in out
    cfg = tiny_config(tmp_path, max_steps=8).train    # skipped steps move the schedule on like the others
    assert [r["lr/router"] for r in records] == [3e-3 * lr_lambda(i, warmup_steps=1, max_steps=8,
                                                                  min_lr_ratio=cfg.min_lr_ratio) for i in range(5)]
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]
    assert math.isnan(records[1]["loss"]) and math.isfinite(records[2]["loss"])
    w1, w2, w3, w4 = (trained_weights(tmp_path, s) for s in (1, 2, 3, 4))
    for key in w1:
        assert torch.equal(w1[key], w2[key]) and torch.equal(w3[key], w4[key]), key   # skipped steps: no change
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)
    assert latest_checkpoint(str(tmp_path)) == step_dir(str(tmp_path), 4)       # the stop saves nothing
    poisoned.add(6)       # resumed at step 4 (one skip in a row), step 5 poisoned again: the count carries on
    with pytest.raises(TrainingError, match="stopped at step 5: 2 steps in a row"):
        train(tiny_config(tmp_path, batch_size=4, max_steps=8, save_every=1, max_nonfinite_steps=2), resume=True)


def test_float16_scales_the_loss_and_a_resumed_run_keeps_the_scale_and_the_skip_counts(tmp_path, monkeypatch, capfd,
                                                                                        recwarn):
    # the token-summed loss at the initial scale 2**16 overflows the float16 backward: the first steps are skipped
    # (counted, but not toward max_nonfinite_steps) while the scale halves; killed after step 1, the resumed run
    # must carry both on
    train_straight_and_killed(tmp_path, monkeypatch, 1, dtype="float16", batch_size=2, max_steps=4, save_every=1,
                              max_nonfinite_steps=1)

    def records(run):
        return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")}
                for r in read_metrics(os.path.join(tmp_path / run, "metrics.jsonl"))]

    straight = records("straight")
    assert records("killed") == straight
    out = capfd.readouterr().out          # the overflows are told as what they are, and nothing warns
    first = straight[0]
    assert (f"step 1: fp16 loss scale 65536 overflowed the gradients (the loss, {first['loss']:.4f}, is finite); "
            "step skipped, scale lowered to 32768 (1 skipped in total)") in out
    assert "non-finite" not in out
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]
    assert [r["skipped"] for r in straight][:2] == [1, 2]          # both sides of the kill skip
    assert straight[-1]["skipped"] < 4                              # and later steps update
    skipped = [r["skipped"] > before for r, before in zip(straight, [0] + [r["skipped"] for r in straight])]
    for r, after, overflowed in zip(straight, straight[1:], skipped):   # an overflow halves the scale, else it stays
        assert after["loss_scale"] == r["loss_scale"] / (2 if overflowed else 1)
    for r in straight:     # clipping and the log see the unscaled norm (~0.1 here; scaled it would be > 100)
        assert math.isnan(r["grad_norm"]) or r["grad_norm"] < 1.0
    for step in (2, 3, 4):
        a, b = (load_training_state(step_dir(str(tmp_path / run), step)) for run in ("straight", "killed"))
        assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] < 2.0 ** 16
        assert (a["nonfinite_total"], a["nonfinite_in_a_row"]) == (b["nonfinite_total"], b["nonfinite_in_a_row"])
    assert load_training_state(step_dir(str(tmp_path / "killed"), 2))["nonfinite_in_a_row"] == 0
    assert_same_trained_weights(tmp_path / "straight", tmp_path / "killed")


def test_resume_takes_a_run_config_older_than_a_key_as_that_keys_default(tmp_path):
    import yaml

    out = tmp_path / "run"
    shutil.copytree(tiny_run(), out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["data"]["train_repeats"], saved["train"]["spec_time_masks"]       # keys a newer version added
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    assert train(tiny_config(out, batch_size=2, max_steps=3), resume=True)["step"] == 3
    with pytest.raises(CheckpointError, match=r"data\.train_repeats: \[\] -> \[2\]"):
        train(tiny_config(out, extra=["data.train_repeats=[2]"], batch_size=2, max_steps=4), resume=True)


def test_resume_refuses_a_config_that_changes_the_run_and_takes_safe_changes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(tiny_run(), out)                  # batch_size 2, two steps; its config names another output_dir
    saved = (out / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"train\.lr_router: 0\.003 -> 0\.01; train\.seed: 0 -> 1\. "):
        train(tiny_config(out, batch_size=1, max_steps=3, lr_router=1e-2, seed=1), resume=True)
    assert (out / "config.yaml").read_text() == saved
    # batch_size, grad_accum and the process count may change only together, keeping the global batch
    with pytest.raises(CheckpointError, match=r"global batch is 2, this run's is 4 \(batch_size 1 × grad_accum 2 × 2 "
                                              r"processes\)"):
        monkeypatch.setattr(steermoe.train, "init_distributed", lambda device: Distributed(0, 2, torch.device("cpu")))
        train(tiny_config(out, batch_size=1, grad_accum=2, max_steps=2), resume=True)
    monkeypatch.undo()
    # more steps, other logging and saving intervals: fine, and the config on disk says so
    result = train(tiny_config(out, batch_size=2, max_steps=3, log_every=1, save_every=1), resume=True)
    assert result["step"] == 3 and [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2, 3]
    assert load_config(str(out / "config.yaml")).train.max_steps == 3


def test_a_moving_average_leaves_training_alone_and_checkpoints_the_average_of_the_trained_values(tmp_path):
    decay = 0.6
    kw = dict(data="rows5", batch_size=2, max_steps=4, save_every=1)
    train(tiny_config(tmp_path / "plain", **kw))
    train(tiny_config(tmp_path / "ema", ema_decay=decay, **kw))
    assert losses(tmp_path / "ema") == losses(tmp_path / "plain")
    for step in (2, 3, 4):           # average after step n = r · average after step n − 1 + (1 − r) · trained values
        keep = min(decay, step / (9 + step))
        before, trained = trained_weights(tmp_path / "ema", step - 1), trained_weights(tmp_path / "plain", step)
        after = trained_weights(tmp_path / "ema", step)
        for key in after:
            expected = keep * before[key].double() + (1 - keep) * trained[key].double()
            torch.testing.assert_close(after[key].double(), expected, rtol=1e-6, atol=1e-7)
        assert any(not torch.equal(after[key], trained[key]) for key in after)
        # the training state holds the trained values, for resuming
        held = load_training_state(step_dir(str(tmp_path / "ema"), step))["ema"]
        assert held["updates"] == step and len(held["trained"]) == len(trained)
        assert all(any(torch.equal(t, w) for w in trained.values()) for t in held["trained"])


def test_a_run_with_a_moving_average_resumed_reproduces_the_uninterrupted_one_and_evaluates_both(tmp_path,
                                                                                                 monkeypatch, capfd):
    train_straight_and_killed(tmp_path, monkeypatch, 2, data="rows5", batch_size=2, max_steps=4, save_every=2,
                              ema_decay=0.7, extra=[f"data.eval={tiny_assets()['rows4']}", "train.eval_every=2"])
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert_same_trained_weights(tmp_path / "straight", tmp_path / "killed")
    straight, killed = (load_training_state(latest_checkpoint(str(tmp_path / d)))["ema"] for d in ("straight", "killed"))
    assert straight["updates"] == killed["updates"] == 4
    assert all(torch.equal(a, b) for a, b in zip(straight["trained"], killed["trained"]))
    records = [r for r in read_metrics(str(tmp_path / "straight" / "metrics.jsonl")) if "eval/wer" in r]
    assert [r["step"] for r in records] == [2, 4]
    assert all({"eval_online/wer", "eval_online/cer", "eval_online/loss"} <= r.keys() for r in records)
    assert records[-1]["eval/loss"] != records[-1]["eval_online/loss"]
    assert "(moving average; trained values: WER " in capfd.readouterr().out
