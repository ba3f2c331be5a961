"""The benchmark timer's CUDA path, driven on CPU through a recording stand-in for torch.cuda: each timed window
is preceded by the L2 flush and a device-side spin long enough to cover the host's launch of the call."""
import pytest
import torch

from benchmarks import timing


class _Recorder:
    """Stand-ins for the CUDA calls the timer makes; every call appends to ``log``."""

    def __init__(self, monkeypatch, launch_s: float = 0.0):
        self.log = []
        recorder = self

        class Event:
            count = 0

            def __init__(self, enable_timing=False):
                assert enable_timing
                Event.count += 1
                self.name = "start" if Event.count % 2 else "end"

            def record(self):
                recorder.log.append(self.name)

            def elapsed_time(self, other):
                return 0.5

        class Flush:
            def zero_(self):
                recorder.log.append("flush")

        clock = iter(range(10**6))
        monkeypatch.setattr(timing, "DEVICE", torch.device("cuda"))
        monkeypatch.setattr(timing, "_l2_flush_buffer", lambda: Flush())
        monkeypatch.setattr(timing, "_spin_cycles_per_ms", lambda: 1000.0)
        monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock) * launch_s)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: self.log.append(("sleep", cycles)))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: self.log.append("sync"))

    def fn(self, _):
        self.log.append("fn")


def test_each_window_holds_only_the_call_after_flush_and_spin(monkeypatch):
    rec = _Recorder(monkeypatch, launch_s=1e-3)  # the host takes 1 ms to launch each call
    assert timing.median_ms(rec.fn, warmup=2, min_reps=3, max_reps=3) == 0.5
    sync = rec.log.index("sync")
    warmup, timed = rec.log[:sync], rec.log[sync + 1:-1]
    assert rec.log[-1] == "sync"
    spin = ("sleep", int(timing._MAX_SPIN_MS * 1000))
    assert warmup == ["flush", spin, "start", "fn", "end"] * 2
    # timed: the spin is twice the host's launch time (1 ms, read off the clock) plus 50 µs, in clock cycles
    assert timed == ["flush", ("sleep", int(2.05 * 1000)), "start", "fn", "end"] * 3


def test_the_spin_is_capped(monkeypatch):
    rec = _Recorder(monkeypatch, launch_s=1.0)  # a 1 s launch: the spin stays at the cap
    timing.median_ms(rec.fn, warmup=1, min_reps=1, max_reps=1)
    assert [e for e in rec.log if isinstance(e, tuple)][-1] == ("sleep", int(timing._MAX_SPIN_MS * 1000))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_spin_rate_is_positive():
    assert timing._spin_cycles_per_ms() > 0
