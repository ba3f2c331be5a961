"""The run configuration: YAML + dotted overrides, type checks, unknown keys named."""
import os
import re

import pytest
import yaml

from steermoe.config import Config, ConfigError, load_config, parse_overrides, save_config

BASE = {"model": {"whisper": "w", "llm": "l"}, "data": {"train": ["t.parquet"]}}


def write_yaml(tmp_path, values, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_then_overrides(tmp_path):
    values = {**BASE, "train": {"batch_size": 3, "lr_router": 0.01}, "output_dir": str(tmp_path / "out")}
    cfg = load_config(write_yaml(tmp_path, values),
                      ["train.lr_router=2e-3", "train.grad_accum=5", "model.layers=[0, 2]",
                       "data.eval=e.parquet", "model.prompt=Say it: now", "train.gradient_checkpointing=true",
                       "data.prompt_column=question", "data.max_seconds=20", "data.min_seconds=1"])
    assert cfg.train.batch_size == 3                   # from the file
    assert cfg.train.lr_router == pytest.approx(2e-3)  # override wins
    assert cfg.train.grad_accum == 5
    assert cfg.model.layers == [0, 2]
    assert cfg.data.eval == ["e.parquet"]              # a single string becomes a one-item list
    assert cfg.model.prompt == "Say it: now"           # '=' and ':' inside the value survive
    assert cfg.train.gradient_checkpointing is True
    assert cfg.data.prompt_column == "question" and (cfg.data.min_seconds, cfg.data.max_seconds) == (1.0, 20.0)
    assert load_config(write_yaml(tmp_path, values), ["data.prompt_column=null"]).data.prompt_column is None
    assert cfg.train.lr_vectors == Config().train.lr_vectors  # untouched keys keep defaults


def test_ints_widen_to_float_but_not_the_reverse(tmp_path):
    cfg = load_config(write_yaml(tmp_path, BASE), ["train.lr_scales=1", "train.grad_clip=0"])
    assert isinstance(cfg.train.lr_scales, float) and cfg.train.lr_scales == 1.0
    with pytest.raises(ConfigError, match="train.batch_size.*int"):
        load_config(write_yaml(tmp_path, BASE), ["train.batch_size=2.5"])
    with pytest.raises(ConfigError, match="train.max_steps.*int"):
        load_config(write_yaml(tmp_path, BASE), ["train.max_steps=true"])


@pytest.mark.parametrize("values, overrides, key", [
    ({**BASE, "train": {"lr_routr": 1e-3}}, [], "train.lr_routr"),
    (BASE, ["train.lr_routr=1e-3"], "train.lr_routr"),
    (BASE, ["modle.whisper=x"], "modle"),
    ({**BASE, "extra": 1}, [], "extra"),
])
def test_unknown_keys_are_named(tmp_path, values, overrides, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(write_yaml(tmp_path, values), overrides)


@pytest.mark.parametrize("values, overrides, suggestion", [
    (BASE, ["train.lr_routr=1e-3"], "train.lr_router"),
    ({**BASE, "data": {"train": ["t.parquet"], "bucketsize": 64}}, [], "data.bucket_size"),
    (BASE, ["modle.whisper=x"], "model"),
    (BASE, ["outputdir=x"], "output_dir"),
    (BASE, ["train.max_seconds=20"], "data.max_seconds"),     # a key of another section
    (BASE, ["max_steps=3"], "train.max_steps"),
])
def test_unknown_keys_suggest_the_nearest_known_key(tmp_path, values, overrides, suggestion):
    with pytest.raises(ConfigError, match=rf"unknown config key '[^']+': did you mean '{re.escape(suggestion)}'\?"):
        load_config(write_yaml(tmp_path, values), overrides)


def test_unknown_key_without_a_near_one_suggests_nothing(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tmp_path, BASE), ["train.qqqq=1"])
    assert "did you mean" not in str(err.value) and "known keys in 'train': batch_size" in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=0", "train.batch_size"),
    ("model.dtype=fp8", "model.dtype"),
    ("model.projector=conv", "model.projector"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio"),
    ("data.train=[]", "data.train"),
    ("data.train_repeats=[0]", "data.train_repeats"),
    ("train.speed_perturb=0.5", "train.speed_perturb"),
    ("train.speed_perturb=-0.1", "train.speed_perturb"),
    ("data.train_repeats=[1, 2]", "data.train_repeats"),  # BASE names one training file
    ("model.whisper=", "model.whisper"),
    ("model.steering_scale=.nan", "model.steering_scale"),
    ("model.steering_scale=.inf", "model.steering_scale"),
    ("model.layers=[0, -1]", "model.layers"),
    ("model.layers=[]", "model.layers"),
    ("data.max_seconds=45", "data.max_seconds"),      # Whisper takes 30 s at most
    ("data.max_seconds=0", "data.max_seconds"),
    ("data.max_seconds=null", "data.max_seconds"),
    ("data.min_seconds=31", "data.min_seconds"),      # above max_seconds: every row filtered
    ("data.max_text_tokens=0", "data.max_text_tokens"),
    ("data.bucket_size=4", "data.bucket_size"),       # under batch_size (8)
    ("train.parallel=zero3", "train.parallel"),
    ("train.z_loss_weight=-0.1", "train.z_loss_weight"),
    ("train.z_loss_weight=.nan", "train.z_loss_weight"),
    ("train.ema_decay=1", "train.ema_decay"),
    ("train.ema_decay=-0.5", "train.ema_decay"),
    ("train.ema_decay=.nan", "train.ema_decay"),
    ("model.max_tokens_per_second=0", "model.max_tokens_per_second"),
    ("model.max_tokens_per_second=.nan", "model.max_tokens_per_second"),
])
def test_bad_values_are_named(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write_yaml(tmp_path, BASE), [override])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["train.batch_size"])
    with pytest.raises(ConfigError, match="'train.batch_size'.*not a section"):
        load_config(write_yaml(tmp_path, BASE), ["train.batch_size=2", "train.batch_size.x=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_save_round_trips(tmp_path):
    cfg = load_config(write_yaml(tmp_path, BASE), ["train.lr_projector=3e-5", "model.layers=[1]"])
    path = tmp_path / "saved.yaml"
    save_config(cfg, str(path))
    assert load_config(str(path)) == cfg
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("path", ["configs/whisper-large-v3-qwen2.5-1.5b.yaml", "configs/whisper-base-smollm2-cpu.yaml",
                                  "steermoe/demo/demo.yaml"])
def test_shipped_configs_load(path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fill = ["model.whisper=w", "model.llm=l", "data.train=t.parquet"] if "demo" in path else []
    cfg = load_config(os.path.join(root, path), fill)
    assert cfg.train.max_steps > cfg.train.warmup_steps


def test_cpu_recipe_evaluates_on_a_set_it_never_trains_on():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs/whisper-base-smollm2-cpu.yaml"))
    assert cfg.data.eval == ["real/speech/asterisk_dev.parquet"]
    assert not {os.path.basename(p) for p in cfg.data.train} & {os.path.basename(p) for p in cfg.data.eval}
    assert cfg.model.system_prompt == "" and cfg.model.dtype == "float32" and cfg.train.device == "cpu"
    assert 0 < cfg.train.eval_every < cfg.train.max_steps
