"""Stop requests: a signal only sets a flag; the training loop acts at the next step boundary.

SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 (SLURM's preemption and time-limit warnings, submitit's
checkpoint hook) all land here. Before every micro-batch every rank asks `stop_requested()`; the
engine all-reduces the answer so that all ranks stop together, save collectively, then exit
(and, under SLURM, requeue). A main thread blocked waiting for data wakes up to look at the flag
and raises `StopRequested` (data/loader.py), so a stop never waits for a stalled loader.
"""

from __future__ import annotations

import signal
import threading

from side4video.logs import get_logger

log = get_logger(__name__)

_stop = threading.Event()
_reason = {"signal": ""}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class StopRequested(Exception):
    """A stop was requested while the main thread was waiting (for data): it waits no longer."""


def request_stop(reason: str = "requested") -> None:
    """Ask the training loop to save and stop at the next step boundary (safe in a signal handler)."""
    _reason["signal"] = _reason["signal"] or reason
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def stop_reason() -> str:
    return _reason["signal"]


def _handler(signum, frame) -> None:
    request_stop(signal.Signals(signum).name)


def install_handlers(signals=STOP_SIGNALS) -> None:
    """Route stop signals to the flag (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in signals:
        signal.signal(sig, _handler)
