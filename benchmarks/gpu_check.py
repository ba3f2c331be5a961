"""The GPU check: one call of at most 9 minutes, the most important evidence first (``bash benchmarks/gpu_check.sh``).

    python -m benchmarks.gpu_check [STAGE ...]      # default: the stages below, in that order

Default stages, with their predicted time on an H100/H200 (16 cores), timeout and start deadline (seconds since
the check started; a stage not started by then is skipped, recorded as such, and so is one that would run past
the check's budget of 540 s):

    stage            predicted  timeout  start by  what
    triton-headline       60      150        60    headline correctness of the Triton backend (float64 oracle)
    triton-tests         120      240       240    tests/test_ops.py and tests/test_timing.py on the GPU (Triton)
    cuda-headline         40      120       330    the same check of the CUDA extension (waits for its build)
    cuda-tests            60      100       400    tests/test_cuda.py and test_ops.py's cuda cases, graph capture
    bench                 90      120       420    the headline shape: every implementation, fwd / bwd / fwd+bwd
    memory                30       60       450    saved activations and peak CUDA memory
    tune                  45       75       465    a small launch-configuration tune (neighbours of the shipped)
                         445

The CUDA extension is built in the background from the start (``setup.py build_ext``, for the visible GPU's
architecture only, ``cuda-build.log``; moved into ``steermoe/`` once built) while the Triton stages run; a stage
that needs it waits for it only when it is reached, within its own timeout. Named stages for longer leases:
``op`` (the full op sweep), ``op:EXPR`` (its cases pytest's ``-k EXPR`` selects), ``models`` (memory, overhead,
encoder, train step).

Everything lands in ``$OUT`` (default ``./benchmark-results``) as produced: one log per stage, the stages'
JSON, ``gpu_check.json`` (every stage's status, times and deadlines, rewritten after each stage) and
``summary.txt``. Exits 0 when every stage passed, 1 when one failed, timed out or was skipped for time,
2 on an unknown stage name (checked before anything runs).

``GPU_CHECK_ON_CPU=1`` runs every stage on CPU at small shapes (the CUDA stages against the ``torch`` backend,
no build), to check this script. ``GPU_CHECK_TIMEOUT`` / ``GPU_CHECK_START_BY`` (``stage=seconds,...``) and
``GPU_CHECK_BUDGET_S`` replace the limits above.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 540.0
NAMED = ("op", "models")


@dataclass
class Stage:
    """One stage: its command (an argv), limits in seconds, and what it needs of the CUDA build: "" nothing,
    "wait" (it uses the extension when built), "require" (it checks the extension)."""
    name: str
    command: List[str]
    predicted_s: float
    timeout_s: float
    start_by_s: float
    build: str = ""
    status: str = "pending"        # passed, failed, timeout, skipped
    reason: str = ""
    started_s: Optional[float] = None
    seconds: Optional[float] = None
    cpu_s: Optional[float] = None  # CPU time of its processes (user + system)
    log: str = ""


@dataclass
class Build:
    """The CUDA extension's background build (or why there is none). It builds into ``lib_dir``; once it has
    succeeded the extension is moved into the package (an atomic rename: no process sees half a file)."""
    proc: Optional[subprocess.Popen] = None
    reason: str = ""               # why there is no build; empty while one runs or ran
    status: str = "none"           # running, passed, failed, none
    seconds: Optional[float] = None
    lib_dir: Optional[str] = None
    package_dir: str = os.path.join(ROOT, "steermoe")
    started: float = field(default_factory=time.monotonic)

    def wait(self, deadline: float) -> str:
        """"" once the extension is built, else why not (failed, or not done by ``deadline``, monotonic s)."""
        if self.proc is None:
            return self.reason
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.proc.poll() is None:
            return "the CUDA extension's build is still running"
        if self.status == "running":
            self.seconds = time.monotonic() - self.started
            built = glob.glob(os.path.join(self.lib_dir, "steermoe", "_C*")) if self.lib_dir else []
            self.status = "passed" if self.proc.returncode == 0 and (built or not self.lib_dir) else "failed"
            for path in built:
                os.replace(path, os.path.join(self.package_dir, os.path.basename(path)))
        return "" if self.status == "passed" else "the CUDA extension did not build (cuda-build.log)"


def _py(*args: str) -> List[str]:
    return [sys.executable, *args]


def _pytest(*args: str) -> List[str]:
    """pytest, quiet, with the 15 slowest tests listed (to size the stages from a run's log)."""
    return _py("-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=15", *args)


def _bench(out: str, name: str, *args: str) -> List[str]:
    return _pytest(*args, "--bench-out", out, "--bench-name", name, "--benchmark-quiet",
                   "--benchmark-json", os.path.join(out, f"{name}-pytest-benchmark.json"))


# small shapes on CPU: the check of this script, not of the kernels
CPU_HEADLINE = ("--batch", "1", "--frames", "400", "--dim", "32", "--experts", "4", "--dtype", "bf16")
CPU_TUNE = ("--rows", "37", "--dim", "33", "--experts", "3", "--dtype", "fp32", "--grid",
            '{"BLOCK_M": [16, 32], "BLOCK_D": [16], "num_warps": [4], "num_stages": [1], "programs_per_sm": [1]}')
# test ids naming the cuda backend run in cuda-tests; torch.compile's tests run CPU tensors only
TRITON_TESTS = "(not cuda or triton) and not compile"
CPU_TRITON_TESTS = f"({TRITON_TESTS}) and (gradient_through_gating or double or timing)"


def default_stages(out: str, on_cpu: bool) -> List[Stage]:
    """The default stages in order (small shapes and the torch backend for the CUDA ones on CPU)."""
    headline = CPU_HEADLINE if on_cpu else ()
    cuda = "wait" if on_cpu else "require"  # on CPU the CUDA stages run the torch backend
    return [
        Stage("triton-headline", _py("-m", "benchmarks.headline_check", "--backend", "triton", *headline,
                                     "--out", os.path.join(out, "headline-triton.json")), 60, 150, 60),
        Stage("triton-tests", _pytest("tests/test_ops.py", "tests/test_timing.py",
                                      "-k", CPU_TRITON_TESTS if on_cpu else TRITON_TESTS), 120, 240, 240),
        Stage("cuda-headline", _py("-m", "benchmarks.headline_check", "--backend", "torch" if on_cpu else "cuda",
                                   *headline, "--out", os.path.join(out, "headline-cuda.json")), 40, 120, 330,
              build=cuda),
        Stage("cuda-tests", _pytest("tests/test_cuda.py", "tests/test_ops.py", "-m", "not slow",
                                    "-k", "missing_extension or graph_capture" if on_cpu else "cuda"),
              60, 100, 400, build=cuda),
        Stage("bench", _bench(out, "bench", "benchmarks/test_op.py", "--bench-sweep", "small" if on_cpu else "headline",
                              *(("-k", "384x384-E8-fp32 or 64x64") if on_cpu else ())), 90, 120, 420, build="wait"),
        Stage("memory", _bench(out, "memory", "benchmarks/test_memory.py"), 30, 60, 450, build="wait"),
        Stage("tune", _py("-m", "benchmarks.tune", *(CPU_TUNE if on_cpu else ("--budget-s", "15")),
                          "--compile-top", "2", "--out", os.path.join(out, "tune.json")), 45, 75, 465),
    ]


def named_stage(name: str, out: str, on_cpu: bool) -> Stage:
    """``op``, ``op:EXPR`` or ``models``: the sweeps for longer leases (no start deadline: named on purpose)."""
    sweep = "small" if on_cpu else "full"
    if name == "models":
        return Stage(name, _bench(out, "models", "benchmarks/test_memory.py", "benchmarks/test_overhead.py",
                                  "benchmarks/test_encoder.py", "benchmarks/test_train_step.py",
                                  "--bench-sweep", sweep), 300, 600, BUDGET_S, build="wait")
    expr = name[3:]
    file_name = "op" if not expr else "op-" + "".join(c if c.isalnum() or c == "." else "_" for c in expr)
    return Stage(name, _bench(out, file_name, "benchmarks/test_op.py", "--bench-sweep", sweep,
                              *(("-k", expr) if expr else ())), 600, 600, BUDGET_S, build="wait")


def select(names: Sequence[str], out: str, on_cpu: bool) -> List[Stage]:
    """The stages named (default: all of :func:`default_stages`); ValueError on an unknown name."""
    defaults = {s.name: s for s in default_stages(out, on_cpu)}
    stages = []
    for name in names or list(defaults):
        if name in defaults:
            stages.append(defaults[name])
        elif name in NAMED or (name.startswith("op:") and len(name) > 3):
            stages.append(named_stage(name, out, on_cpu))
        else:
            raise ValueError(f"unknown stage '{name}': expected {', '.join(defaults)}, op, op:EXPR or models")
    return stages


def _overrides(env_name: str) -> Dict[str, float]:
    """``stage=seconds,...`` from the environment variable ``env_name``."""
    raw = os.environ.get(env_name, "")
    try:
        return {k.strip(): float(v) for k, v in (p.split("=", 1) for p in raw.split(",") if p.strip())}
    except ValueError:
        raise ValueError(f"{env_name} must read stage=seconds[,stage=seconds...]; got {raw!r}") from None


def apply_overrides(stages: List[Stage]) -> None:
    """GPU_CHECK_TIMEOUT and GPU_CHECK_START_BY replace those stages' limits; ValueError on a stage not selected."""
    by_name = {s.name: s for s in stages}
    for attr, env_name in (("timeout_s", "GPU_CHECK_TIMEOUT"), ("start_by_s", "GPU_CHECK_START_BY")):
        for name, seconds in _overrides(env_name).items():
            if name not in by_name:
                raise ValueError(f"{env_name} names stage '{name}', which is not among {', '.join(by_name)}")
            setattr(by_name[name], attr, seconds)


def run_command(argv: List[str], log_path: str, timeout_s: float, env: Dict[str, str]) -> tuple:
    """Run ``argv`` in its own process group, output to the screen and appended to ``log_path``;
    (exit code or None on timeout, CPU seconds of it and its children)."""
    before = os.times()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)

        def copy():
            for line in iter(proc.stdout.readline, b""):
                text = line.decode(errors="replace")
                sys.stdout.write(text)
                sys.stdout.flush()
                log.write(text)
                log.flush()

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=max(timeout_s, 0.0))
        except subprocess.TimeoutExpired:
            _kill(proc)
            code = None
        reader.join(timeout=5)
    after = os.times()
    return code, after.children_user + after.children_system - before.children_user - before.children_system


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL 5 s later if still alive."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stages(stages: List[Stage], out: str, build: Build, env: Dict[str, str], budget_s: float = BUDGET_S,
               on_update: Callable[[List[Stage]], None] = lambda stages: None,
               clock: Callable[[], float] = time.monotonic) -> List[Stage]:
    """Run ``stages`` in order under their limits and the overall budget; a stage that cannot start in time,
    or whose build is missing, is skipped; one over its timeout is killed. Never raises for a stage."""
    start = clock()
    for stage in stages:
        now = clock() - start
        stage.log = f"{stage.name}.log"
        if now > stage.start_by_s:
            stage.status = "skipped"
            stage.reason = f"not started by its deadline ({stage.start_by_s:.0f} s; now {now:.0f} s)"
        elif now >= budget_s:
            stage.status, stage.reason = "skipped", f"the check's budget ({budget_s:.0f} s) is spent"
        else:
            stage.started_s = now
            _run_stage(stage, out, build, env, min(stage.timeout_s, budget_s - now), clock)
            stage.seconds = clock() - start - now
        print(f"== {stage.name}: {stage.status}{' (' + stage.reason + ')' if stage.reason else ''}"
              f"{f', {stage.seconds:.0f} s' if stage.seconds is not None else ''}", flush=True)
        on_update(stages)
    return stages


def _run_stage(stage: Stage, out: str, build: Build, env: Dict[str, str], timeout_s: float,
               clock: Callable[[], float]) -> None:
    begin = clock()
    log_path = os.path.join(out, stage.log)
    if stage.build:
        why = build.wait(time.monotonic() + timeout_s)
        if why and stage.build == "require":
            stage.status = "skipped" if build.proc is None else "timeout" if "still running" in why else "failed"
            stage.reason = why
            return
        if why:
            print(f"{stage.name}: without the CUDA extension: {why}", flush=True)
    code, stage.cpu_s = run_command(stage.command, log_path, timeout_s - (clock() - begin), env)
    if code is None:
        stage.status, stage.reason = "timeout", f"killed after {timeout_s:.0f} s (its timeout or the budget's end)"
    elif code not in (0, 5):        # pytest's 5: nothing collected
        stage.status, stage.reason = "failed", f"exit {code}, see {stage.log}"
    else:
        stage.status = "passed"


def start_build(out: str, env: Dict[str, str], on_cpu: bool) -> Build:
    """The CUDA extension's build in the background, for the visible GPU only; or why there is none."""
    if on_cpu:
        return Build(reason="no CUDA on CPU (GPU_CHECK_ON_CPU=1): the CUDA stages run the torch backend")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return Build(reason="nvcc not found: the CUDA extension cannot be built")
    import torch

    arch = "%d.%d" % torch.cuda.get_device_capability()
    build_env = {**env, "STEERMOE_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": env.get("TORCH_CUDA_ARCH_LIST", arch),
                 "MAX_JOBS": env.get("MAX_JOBS", str(os.cpu_count() or 1))}
    log = open(os.path.join(out, "cuda-build.log"), "w")
    lib_dir = os.path.join(ROOT, "build", "gpu-check-lib")
    proc = subprocess.Popen(_py("setup.py", "-q", "build_ext", "--build-lib", lib_dir), cwd=ROOT, env=build_env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"CUDA extension: building for TORCH_CUDA_ARCH_LIST={build_env['TORCH_CUDA_ARCH_LIST']} in the background "
          f"(cuda-build.log)", flush=True)
    return Build(proc=proc, status="running", lib_dir=lib_dir)


def write_results(stages: List[Stage], out: str, build: Build, budget_s: float) -> None:
    """gpu_check.json and summary.txt, from what has been produced so far."""
    data = dict(budget_s=budget_s, build=dict(status=build.status, reason=build.reason, seconds=build.seconds),
                stages=[asdict(s) for s in stages])
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(data, f, indent=1)
    from .report import format_table

    lines = format_table(["stage", "status", "s", "predicted s", "timeout s", "start by s", "cpu s", "reason"],
                         [[s.name, s.status, s.seconds, s.predicted_s, s.timeout_s, s.start_by_s, s.cpu_s, s.reason]
                          for s in stages])
    lines.append(f"CUDA extension build: {build.status}{f' ({build.reason})' if build.reason else ''}"
                 f"{f', {build.seconds:.0f} s' if build.seconds else ''}")
    build_log = os.path.join(out, "cuda-build.log")
    if build.status == "failed" and os.path.exists(build_log):
        with open(build_log, errors="replace") as f:
            lines += ["The build's last lines:"] + f.read().splitlines()[-20:]
    lines += _stage_summaries(out)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _stage_summaries(out: str) -> List[str]:
    """The headline checks' tables, the benchmarks' summary and the tune's table, from the JSON present."""
    from . import headline_check, report, tune

    lines = []
    for backend in ("triton", "cuda"):
        path = os.path.join(out, f"headline-{backend}.json")
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            lines += ["", f"Headline check, {data['backend']} backend, {data['shape']['rows']}x{data['shape']['dim']}"
                      f" E={data['shape']['experts']}: {'passed' if data['passed'] else 'FAILED'}",
                      *headline_check.lines(data["rows"])]
    benches = sorted(os.path.join(out, f) for f in os.listdir(out)
                     if f.endswith(".json") and not f.endswith("-pytest-benchmark.json")
                     and (f in ("bench.json", "memory.json", "models.json", "op.json") or f.startswith("op-")))
    if benches:
        lines += [""] + report.summary_lines(report.read_json(benches), max_op_shapes=10**9)
    path = os.path.join(out, "tune.json")
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        for kernel in ("forward", "backward"):
            rows = [r for r in data["rows"] if r["kernel"] == kernel]
            if rows:
                lines += ["", f"Tune, {kernel}:"] + tune.lines(rows)
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv)
    if names[:1] in (["-h"], ["--help"], ["--help-stages"]):
        print(__doc__)
        return 0
    out = os.path.abspath(os.environ.get("OUT") or os.path.join(ROOT, "benchmark-results"))
    on_cpu = os.environ.get("GPU_CHECK_ON_CPU", "0") == "1"
    try:
        stages = select(names, out, on_cpu)
        apply_overrides(stages)
    except ValueError as err:
        print(err)
        return 2
    budget_s = float(os.environ.get("GPU_CHECK_BUDGET_S", BUDGET_S))
    import torch

    if not on_cpu and not torch.cuda.is_available():
        print("no CUDA device is visible (GPU_CHECK_ON_CPU=1 checks this script on CPU)")
        return 1
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    if on_cpu:  # the Triton kernels run in Triton's interpreter
        env.setdefault("TRITON_INTERPRET", "1")
    build = start_build(out, env, on_cpu) if any(s.build for s in stages) else Build(reason="not needed")
    print(f"GPU check: {', '.join(s.name for s in stages)} (budget {budget_s:.0f} s); results in {out}", flush=True)
    try:
        run_stages(stages, out, build, env, budget_s, on_update=lambda s: write_results(s, out, build, budget_s))
    finally:
        if build.proc is not None and build.proc.poll() is None:
            _kill(build.proc)
            build.status, build.reason = "failed", "killed: still running when the check ended"
        elif build.proc is not None:
            build.wait(time.monotonic())
        write_results(stages, out, build, budget_s)
    with open(os.path.join(out, "summary.txt")) as f:
        print(f.read())
    bad = [s for s in stages if s.status != "passed"]
    print(f"results: {out}")
    if bad:
        print("GPU check FAILED: " + "; ".join(f"{s.name} {s.status}" for s in bad))
        return 1
    print("GPU check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
