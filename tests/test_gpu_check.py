"""benchmarks/gpu_check.sh runs its stages, names its files and summarises them (on CPU: GPU_CHECK_ON_CPU=1)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check(tmp_path, *stages):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_ON_CPU": "1", "PYTHON": sys.executable}
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", *stages], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_an_op_stage_writes_rows_and_the_summary(tmp_path):
    proc = _gpu_check(tmp_path, "op:eager and fwd and 384x384")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "GPU check passed" in proc.stdout
    rows = json.loads((tmp_path / "op-eager_and_fwd_and_384x384.json").read_text())["rows"]
    assert rows and all(r["impl"] == "eager" and r["shape"].startswith("384x384") for r in rows)
    assert (tmp_path / "op-eager_and_fwd_and_384x384-pytest-benchmark.json").is_file()
    summary = (tmp_path / "summary.txt").read_text()
    assert "torch" in summary and "Measured copy bandwidth" in summary
    assert "== pytest benchmarks/test_op.py -k eager and fwd and 384x384: exit 0" in proc.stdout


def test_a_misspelt_stage_stops_before_anything_runs(tmp_path):
    proc = _gpu_check(tmp_path, "op", "modles")
    assert proc.returncode == 2
    assert "unknown stage 'modles'" in proc.stdout
    assert list(tmp_path.iterdir()) == []
