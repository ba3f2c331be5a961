"""Two CPU processes (torchrun, gloo, float32) train exactly like one process with the same global batch."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from test_train import losses, tiny_config, trained_weights

from steermoe.checkpoint import list_checkpoints
from steermoe.config import save_config
from steermoe.train import read_metrics, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    steps = 3
    train(tiny_config(tmp_path / "single", batch_size=4, max_steps=steps))

    config = tmp_path / "ddp.yaml"
    save_config(tiny_config(tmp_path / "ddp", batch_size=2, max_steps=steps, save_every=2), str(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "steermoe.train", "--config", str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = read_metrics(os.path.join(tmp_path / "single", "metrics.jsonl"))
    ddp = read_metrics(os.path.join(tmp_path / "ddp", "metrics.jsonl"))
    assert [r["step"] for r in ddp] == list(range(1, steps + 1))     # one log, written by rank 0 only
    assert [r["samples"] for r in ddp] == [4] * steps
    assert [r["tokens"] for r in ddp] == [r["tokens"] for r in single]
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    # the gradient norm is scale-sensitive where Adam's update is not: it checks the global-token normalisation
    assert [r["grad_norm"] for r in ddp] == pytest.approx([r["grad_norm"] for r in single], rel=1e-4)

    assert [s for s, _ in list_checkpoints(str(tmp_path / "ddp"))] == [2, 3]
    ddp_weights, single_weights = trained_weights(tmp_path / "ddp"), trained_weights(tmp_path / "single")
    assert ddp_weights.keys() == single_weights.keys()                # same layout, no "module." prefixes
    assert not [k for k in ddp_weights if k.startswith("module.")]
    for key, value in single_weights.items():
        torch.testing.assert_close(ddp_weights[key], value, rtol=0, atol=1e-4)
