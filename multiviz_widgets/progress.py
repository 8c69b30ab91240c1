"""Progress reporting and cancellation shared by kernels and the engine.

A kernel takes ``progress``: None or a callable ``progress(done, total, message)``. It calls it
between batches. The engine's callback raises ``Cancelled`` when the user pressed cancel (or a
newer selection made the job stale), which unwinds the kernel cleanly.
"""
from __future__ import annotations

from typing import Callable, Optional

ProgressFn = Optional[Callable[[int, int, str], None]]


class Cancelled(Exception):
    """Raised inside a kernel (through its progress callback) when its job was cancelled."""


def check_progress(progress, where: str = "progress") -> ProgressFn:
    """progress as it is when it is None or callable, else a TypeError that says what it must be
    (calling it later gave "'int' object is not callable", from inside a kernel). Kernels'
    entry points call it before any work; ``report`` calls it too, for every other kernel."""
    if progress is None or callable(progress):
        return progress
    raise TypeError(
        f"{where}: progress must be None or a callable progress(done, total, message), got "
        f"{progress!r} ({type(progress).__name__}). Pass a function, e.g. "
        "progress=lambda done, total, message: print(done, total, message), or leave it out.")


def report(progress: ProgressFn, done: int, total: int, message: str = "") -> None:
    """Call the progress callback if there is one (a TypeError when it is not callable)."""
    if progress is not None:
        if not callable(progress):
            check_progress(progress)
        progress(int(done), int(total), message)


def duration_words(seconds: float) -> str:
    """A duration in words: "40 s", "12 min", "3.5 h" (a warning's estimate of a cost)."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
