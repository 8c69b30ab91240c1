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


def report(progress: ProgressFn, done: int, total: int, message: str = "") -> None:
    """Call the progress callback if there is one."""
    if progress is not None:
        progress(int(done), int(total), message)
