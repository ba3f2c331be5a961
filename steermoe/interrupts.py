"""Stop signals outside the training loop: SIGTERM and SIGUSR1 (what job schedulers send ahead of a kill) end a
command the way Ctrl-C does, with a line saying so, instead of killing it silently.

The training loop records them instead and stops after the current step (:class:`steermoe.distributed.StopSignals`).
Imports nothing heavy: the command line installs this before it loads torch.
"""
import signal
import threading
from typing import Callable

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class SignalInterrupt(KeyboardInterrupt):
    """A stop signal turned into an interrupt; ``signum`` is its number, ``name`` its name (e.g. ``SIGTERM``)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.name = signum, signal.Signals(signum).name


def _raise(signum, frame):
    raise SignalInterrupt(signum)


def interrupt_on_stop_signals() -> Callable[[], None]:
    """Make the stop signals raise :class:`SignalInterrupt` (main thread only: elsewhere Python cannot handle
    signals, and nothing changes); returns the function that puts the previous handlers back."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, _raise) for s in STOP_SIGNALS}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return restore
