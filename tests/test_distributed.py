"""Several CPU processes (torchrun, gloo, float32) train the same model as one process with the same global batch,
however the global batch is split between processes and accumulation steps."""
import os
import re
import shutil
import socket
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from test_train import SPEECH, losses, tiny_assets, tiny_config, trained_weights

from steermoe.checkpoint import list_checkpoints, step_dir
import steermoe.train
from steermoe.config import ConfigError, save_config
from steermoe.distributed import check_parallel
from steermoe.train import read_metrics, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config, *args: str, nproc: int = 2, script=None, env=()) -> subprocess.CompletedProcess:
    """``steermoe.train`` (or ``script``) on ``nproc`` CPU processes with the saved ``config``; fails the test when
    it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **dict(env)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *([str(script)] if script else
                                                                         ["-m", "steermoe.train"]),
           "--config", str(config), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def buckets_data() -> str:
    """19 utterances in row groups of 5: with buckets of 8 rows and global batches of 4, three buckets and five
    steps an epoch (the last bucket's one batch of 3 leaves a slice empty when cut in 4)."""
    path = os.path.join(tiny_assets()["root"], "rows19.parquet")
    if not os.path.exists(path):
        pq.write_table(pq.read_table(SPEECH).slice(20, 19), path, row_group_size=5)
    return path


STEPS = 6                                       # one epoch and one step into the next


def buckets_config(output_dir, **train_keys):
    cfg = tiny_config(output_dir, max_steps=STEPS, save_every=4, **train_keys)
    cfg.data.train, cfg.data.bucket_size = [buckets_data()], 8
    return cfg


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The reference: one process, the whole global batch of 4 in one micro-batch."""
    out = tmp_path_factory.mktemp("whole")
    train(buckets_config(out, batch_size=4))
    return out


def test_one_process_accumulation_and_two_processes_ddp_and_fsdp_train_the_same_model(tmp_path, whole):
    steps = STEPS
    shutil.copytree(whole, tmp_path / "whole")
    train(buckets_config(tmp_path / "accumulated", batch_size=2, grad_accum=2))
    save_config(buckets_config(tmp_path / "ddp", batch_size=2), str(tmp_path / "ddp.yaml"))
    torchrun(tmp_path / "ddp.yaml")
    # fsdp, with gradient checkpointing through the sharded encoder layers; in step 5 rank 1's second micro-batch
    # is empty, and it must still join the gathers of rank 0's; greedy evaluation at the end on both processes
    cfg = buckets_config(tmp_path / "fsdp", batch_size=1, grad_accum=2, parallel="fsdp", gradient_checkpointing=True,
                         eval_utterances=2)
    cfg.data.eval = [tiny_assets()["rows4"]]
    save_config(cfg, str(tmp_path / "fsdp.yaml"))
    held = re.findall(r"fsdp: rank (\d) holds (\d+) of the (\d+) bytes of the sharded layers' weights, and (\d+)",
                      torchrun(tmp_path / "fsdp.yaml").stdout)
    print("fsdp, bytes held per rank (rank, shard, sharded layers whole, kept whole):", held)
    assert sorted(rank for rank, *_ in held) == ["0", "1"]
    total = int(held[0][2])
    assert sum(int(local) for _, local, *_ in held) == total > 0
    assert all(0.45 * total <= int(local) <= 0.55 * total for _, local, *_ in held)

    whole = read_metrics(os.path.join(tmp_path / "whole", "metrics.jsonl"))
    assert [r["samples"] for r in whole] == [4, 4, 4, 4, 3, 4]
    for name in ("accumulated", "ddp", "fsdp"):
        records = [r for r in read_metrics(os.path.join(tmp_path / name, "metrics.jsonl")) if "loss" in r]
        assert [r["step"] for r in records] == list(range(1, steps + 1))    # one log, written by rank 0 only
        assert [r["tokens"] for r in records] == [r["tokens"] for r in whole], name
        assert [r["samples"] for r in records] == [r["samples"] for r in whole], name
        assert losses(tmp_path / name) == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
        # the gradient norm is scale-sensitive where Adam's update is not: it checks the global-token normalisation
        assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in whole], rel=1e-4)
        weights, reference = trained_weights(tmp_path / name), trained_weights(tmp_path / "whole")
        assert weights.keys() == reference.keys()                   # same layout, no "module." prefixes
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-5)
    evals = [r for r in read_metrics(os.path.join(tmp_path / "fsdp", "metrics.jsonl")) if "eval/wer" in r]
    assert [(r["step"], r["eval/utterances"]) for r in evals] == [(steps, 2)]
    for name in ("ddp", "fsdp"):
        assert [s for s, _ in list_checkpoints(str(tmp_path / name))] == [4, 6]
        assert all(type(t) is torch.Tensor for t in trained_weights(tmp_path / name).values())


SIGNAL_ON_RANK_1 = """
import os, signal, sys
from steermoe.model import SteerMoEModel
from steermoe.train import main

calls, real_forward = [0], SteerMoEModel.forward

def forward(self, *args, **kwargs):     # rank 1 alone is sent SIGTERM during its forward of step 3
    calls[0] += 1
    if calls[0] == 3 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return real_forward(self, *args, **kwargs)

SteerMoEModel.forward = forward
sys.exit(main())
"""


def test_sigterm_on_one_rank_stops_all_after_the_step_and_one_process_resumes_the_same_sequence(tmp_path, whole):
    (tmp_path / "sigterm_rank1.py").write_text(SIGNAL_ON_RANK_1)
    save_config(buckets_config(tmp_path / "run", batch_size=2), str(tmp_path / "ddp.yaml"))
    proc = torchrun(tmp_path / "ddp.yaml", script=tmp_path / "sigterm_rank1.py")
    assert (f"interrupted at step 3 (stop signal on another process); last checkpoint step 3 "
            f"({step_dir(str(tmp_path / 'run'), 3)})") in proc.stdout
    assert [s for s, _ in list_checkpoints(str(tmp_path / "run"))] == [3]
    # the same global batch of 4 on one process with accumulation continues the same sequence of batches
    result = train(buckets_config(tmp_path / "run", batch_size=2, grad_accum=2), resume=True)
    assert result["step"] == STEPS and not result["interrupted"]
    records = read_metrics(os.path.join(tmp_path / "run", "metrics.jsonl"))
    reference = read_metrics(os.path.join(whole, "metrics.jsonl"))
    assert [r["tokens"] for r in records] == [r["tokens"] for r in reference]
    assert losses(tmp_path / "run") == pytest.approx(losses(whole), rel=1e-5)
    weights, expected = trained_weights(tmp_path / "run"), trained_weights(whole)
    for key, value in expected.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-5)


def test_fsdp_on_one_process_or_an_old_torch_is_an_error_before_any_model_loads(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(steermoe.train, "build_model", lambda *args: loaded.append(args))
    with pytest.raises(ConfigError, match=r"train\.parallel=fsdp shards .* needs at least 2; this run has 1"):
        train(tiny_config(tmp_path, parallel="fsdp"))
    assert not loaded
    check_parallel("fsdp", 2)
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    with pytest.raises(ValueError, match=r"fsdp needs torch >= 2\.6 \(FSDP2's fully_shard\); this is torch 2\.5\.1"):
        check_parallel("fsdp", 2)
    check_parallel("ddp", 1)


def test_a_second_stop_signal_ends_the_process_at_once():
    code = ("import os, signal, time\nfrom steermoe.distributed import StopSignals\n"
            "with StopSignals() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)\n"
            "    assert stop.received == signal.SIGTERM\n"
            "    print('recorded', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
            "print('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout == "recorded\n" and proc.returncode == -15, (proc.stdout, proc.stderr)


def test_fsdp_with_bfloat16_bases_and_gradient_checkpointing_matches_ddp(tmp_path):
    for parallel in ("ddp", "fsdp"):
        save_config(tiny_config(tmp_path / parallel, dtype="bfloat16", batch_size=2, max_steps=2, parallel=parallel,
                                gradient_checkpointing=True), str(tmp_path / f"{parallel}.yaml"))
        torchrun(tmp_path / f"{parallel}.yaml")
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5)
    ddp, fsdp = trained_weights(tmp_path / "ddp"), trained_weights(tmp_path / "fsdp")
    for key, value in ddp.items():
        torch.testing.assert_close(fsdp[key], value, rtol=0, atol=1e-5)
