"""The one timer every benchmark uses, and the copy-bandwidth ceiling it is compared with.

On CUDA: CUDA events around each call, L2 flushed before each call, warm-up first, one synchronisation at
the end, median over the repetitions. On CPU the work is synchronous, so ``time.perf_counter`` per call.

The CUDA-event window holds GPU work only. After the flush the host still needs time to launch the timed call
(Python, autograd, the launches: tens of µs, more than a 30–60 µs kernel takes), and with nothing queued the
GPU would sit idle inside the window. So each repetition queues flush → a device-side spin
(``torch.cuda._sleep``) → start event → the call → end event: the spin keeps the GPU busy while the host
launches the call, and it ends before the start event. The spin lasts twice the host's launch time of the
call (measured during warm-up) plus 50 µs; it is outside the window and costs only wall time.
CUDA-graph replay would also hide the launches, but it times a different thing (no per-call launch work,
static inputs) and cannot capture every implementation compared here (torch.compile's first calls, autograd).
For calls too small to hide their Python and launch overhead, :func:`per_call_us` times calls back to back.
"""
import functools
import statistics
import time
from typing import Any, Callable, List, Optional, Tuple

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_L2_FLUSH_BYTES = 256 * 2**20


def median_ms(fn: Callable[[Any], Any], setup: Optional[Callable[[], Any]] = None, *, warmup: int = 2,
              budget_s: float = 0.05, min_reps: int = 5, max_reps: int = 200) -> float:
    """Median milliseconds of ``fn(setup())`` (``fn(None)`` without ``setup``); ``setup`` runs untimed.

    Repetitions: enough to fill ``budget_s`` of measured time, within [min_reps, max_reps].
    """
    prepare = setup if setup is not None else (lambda: None)
    times, launch_ms = _time_calls(fn, prepare, warmup, _MAX_SPIN_MS)
    reps = int(min(max_reps, max(min_reps, budget_s * 1e3 / max(min(times), 1e-3))))
    return statistics.median(_time_calls(fn, prepare, reps, 2 * launch_ms + 0.05)[0])


_MAX_SPIN_MS = 20.0  # the spin before a call whose launch time is not yet known (warm-up)


def _time_calls(fn: Callable[[Any], Any], prepare: Callable[[], Any], reps: int,
                spin_ms: float) -> Tuple[List[float], float]:
    """(milliseconds of ``fn(prepare())``, ``reps`` times; the host's time to launch the last call, ms).

    On CUDA each call's events are preceded by the L2 flush and a device-side spin of ``spin_ms``
    (at most :data:`_MAX_SPIN_MS`), see the module docstring."""
    if DEVICE.type != "cuda":
        times = []
        for _ in range(reps):
            arg = prepare()
            start = time.perf_counter()
            fn(arg)
            times.append((time.perf_counter() - start) * 1e3)
        return times, 0.0
    flush = _l2_flush_buffer()
    cycles = int(min(spin_ms, _MAX_SPIN_MS) * _spin_cycles_per_ms())
    events, launch_ms = [], 0.0
    for _ in range(reps):
        arg = prepare()
        flush.zero_()
        torch.cuda._sleep(cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        launched = time.perf_counter()
        start.record()
        fn(arg)
        end.record()
        launch_ms = (time.perf_counter() - launched) * 1e3
        events.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events], launch_ms


@functools.lru_cache(maxsize=1)
def _spin_cycles_per_ms() -> float:
    """GPU clock cycles ``torch.cuda._sleep`` spins per millisecond, measured once."""
    cycles = 10_000_000
    torch.cuda._sleep(cycles // 10)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / max(start.elapsed_time(end), 1e-3)


@functools.lru_cache(maxsize=1)
def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=DEVICE)


def per_call_us(fn: Callable[[Any], Any], *, calls: int = 200, rounds: int = 5, warmup: int = 20) -> float:
    """Microseconds per call of ``fn(None)`` called back to back, one synchronisation per round (best round):
    what a caller pays when the work is too small to hide Python and launch overhead."""
    for _ in range(warmup):
        fn(None)
    best = float("inf")
    for _ in range(rounds):
        _synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn(None)
        _synchronize()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth_gbps(nbytes: int) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda _: dst.copy_(src), min_reps=10)
    return 2 * nbytes / ms / 1e6


def measure(benchmark, fn: Callable[[Any], Any], setup: Optional[Callable[[], Any]] = None, *,
            rounds: int = 3, **timer_kw) -> float:
    """:func:`median_ms` of ``fn`` (the number reported), and pytest-benchmark's own record of it.

    pytest-benchmark times wall clock, so its target synchronises the device after each call.
    """
    ms = median_ms(fn, setup, **timer_kw)
    prepare = setup if setup is not None else (lambda: None)

    def target(arg):
        fn(arg)
        _synchronize()

    benchmark.pedantic(target, setup=lambda: ((prepare(),), {}), rounds=rounds, iterations=1)
    return ms
