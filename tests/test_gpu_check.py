"""The GPU check (benchmarks/gpu_check.sh → benchmarks/gpu_check.py): stage order, limits, skips and timeouts that
are not fatal, the results it leaves; the whole default run on CPU (GPU_CHECK_ON_CPU=1)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import gpu_check
from benchmarks.gpu_check import Build, Stage, run_stages

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["triton-headline", "triton-tests", "cuda-headline", "cuda-tests", "bench", "memory", "tune"]


def _gpu_check(tmp_path, *stages, **env):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_ON_CPU": "1", "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", *stages], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def _header_table():
    """{stage: (predicted, timeout, start by)} from the table in gpu_check.py's docstring."""
    rows = re.findall(r"^    ([a-z-]+) +(\d+) +(\d+) +(\d+) ", gpu_check.__doc__, re.M)
    return {name: tuple(float(v) for v in values) for name, *values in rows}


def test_default_stages_in_order_with_the_limits_the_header_states():
    for on_cpu in (False, True):
        stages = gpu_check.select([], "/out", on_cpu)
        assert [s.name for s in stages] == DEFAULT
        assert {s.name: (s.predicted_s, s.timeout_s, s.start_by_s) for s in stages} == _header_table()
    starts = [s.start_by_s for s in stages]
    assert starts == sorted(starts) and starts[-1] < gpu_check.BUDGET_S
    assert sum(s.predicted_s for s in stages) <= gpu_check.BUDGET_S - 60   # a minute's slack in 9 minutes
    assert stages[0].command[1:5] == ["-m", "benchmarks.headline_check", "--backend", "triton"]


def _stage(name, seconds, timeout=60.0, start_by=1e9, build=""):
    return Stage(name, [sys.executable, "-c", f"import time; time.sleep({seconds}); print('{name} done')"],
                 predicted_s=seconds, timeout_s=timeout, start_by_s=start_by, build=build)


def test_a_slow_stage_is_killed_and_a_late_one_skipped_not_fatal(tmp_path):
    stages = [_stage("fast", 0), _stage("slow", 60, timeout=1.5), _stage("late", 0, start_by=1.0),
              _stage("after", 0)]
    seen = []
    begin = time.monotonic()
    run_stages(stages, str(tmp_path), Build(reason="none here"), dict(os.environ),
               on_update=lambda s: seen.append([x.status for x in s]))
    assert time.monotonic() - begin < 20
    assert [s.status for s in stages] == ["passed", "timeout", "skipped", "passed"]
    assert "not started by its deadline (1 s" in stages[2].reason
    assert "fast done" in (tmp_path / "fast.log").read_text() and (tmp_path / "after.log").exists()
    assert seen[0] == ["passed", "pending", "pending", "pending"] and len(seen) == 4   # written after each stage


def test_the_budget_caps_a_stage_and_skips_the_rest(tmp_path):
    stages = [_stage("long", 60, timeout=300), _stage("next", 0)]
    begin = time.monotonic()
    run_stages(stages, str(tmp_path), Build(reason="none here"), dict(os.environ), budget_s=1.5)
    assert time.monotonic() - begin < 20
    assert [s.status for s in stages] == ["timeout", "skipped"]
    assert "budget" in stages[1].reason


def test_stages_wait_for_the_background_build_only_when_reached(tmp_path):
    """The build runs while an earlier stage does; a stage requiring it waits within its own timeout, and fails
    (without running) when the build failed; a stage that only uses it runs anyway."""
    env = dict(os.environ)
    build = Build(proc=subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"]), status="running")
    stages = [_stage("first", 0), _stage("needs", 0, build="require")]
    run_stages(stages, str(tmp_path), build, env)
    assert [s.status for s in stages] == ["passed", "passed"] and build.status == "passed"

    late = Build(proc=subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]), status="running")
    stages = [_stage("needs", 0, timeout=1, build="require"), _stage("uses", 0, build="wait")]
    try:
        run_stages(stages, str(tmp_path), late, env)
    finally:
        late.proc.kill()
        late.proc.wait()
    assert stages[0].status == "timeout" and "still running" in stages[0].reason

    failed = Build(proc=subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"]), status="running")
    stages = [_stage("needs", 0, build="require"), _stage("uses", 0, build="wait")]
    run_stages(stages, str(tmp_path), failed, env)
    assert [s.status for s in stages] == ["failed", "passed"] and "did not build" in stages[0].reason


def test_a_finished_build_is_moved_into_the_package_and_an_empty_one_fails(tmp_path):
    lib, package = tmp_path / "lib", tmp_path / "package"
    (lib / "steermoe").mkdir(parents=True)
    package.mkdir()
    (lib / "steermoe" / "_C.abi3.so").write_text("extension")
    done = Build(proc=subprocess.Popen([sys.executable, "-c", "pass"]), status="running", lib_dir=str(lib),
                 package_dir=str(package))
    assert done.wait(time.monotonic() + 60) == "" and done.status == "passed"
    assert (package / "_C.abi3.so").read_text() == "extension" and not (lib / "steermoe" / "_C.abi3.so").exists()
    empty = Build(proc=subprocess.Popen([sys.executable, "-c", "pass"]), status="running", lib_dir=str(lib),
                  package_dir=str(package))
    assert "did not build" in empty.wait(time.monotonic() + 60) and empty.status == "failed"


def test_a_misspelt_stage_or_override_stops_before_anything_runs(tmp_path):
    proc = _gpu_check(tmp_path, "bench", "modles")
    assert proc.returncode == 2
    assert "unknown stage 'modles'" in proc.stdout
    proc = _gpu_check(tmp_path, "bench", GPU_CHECK_TIMEOUT="memory=1")
    assert proc.returncode == 2 and "GPU_CHECK_TIMEOUT names stage 'memory'" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_every_default_stage_runs_on_cpu(tmp_path):
    """The whole default check on CPU; one stage forced past its start deadline (skipped) and one over its
    timeout (killed): neither stops the stages after it. The other limits are widened for a loaded machine."""
    limits = ",".join(f"{name}=600" for name in DEFAULT if name != "memory")
    proc = _gpu_check(tmp_path, GPU_CHECK_START_BY="cuda-tests=0", GPU_CHECK_TIMEOUT=limits + ",memory=0.5",
                      GPU_CHECK_BUDGET_S="3000")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {s["name"]: s["status"] for s in result["stages"]}
    assert list(status) == DEFAULT
    assert status == {**{name: "passed" for name in DEFAULT}, "cuda-tests": "skipped", "memory": "timeout"}
    assert "GPU check FAILED: cuda-tests skipped; memory timeout" in proc.stdout
    for name in ("headline-triton.json", "headline-cuda.json", "bench.json", "tune.json", "summary.txt",
                 "triton-tests.log", "tune.log"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "headline-triton.json").read_text())["passed"]
    bench = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["mode"] for r in bench} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["impl"] for r in bench} >= {"eager", "compile", "original", "torch", "triton"}
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.index("triton-headline") < summary.index("tune") and "Headline check, triton" in summary
    assert "Measured copy bandwidth" in summary and "Tune, backward:" in summary
