"""The package's warnings, said where the person will see them.

Called from a notebook cell, a kernel's caveat (integrated gradients that miss completeness, a
LIME fit with fewer samples than units, a feature cache that could not be written) is a Python
warning, shown under the cell. Inside the Explorer the kernels run on the engine's worker
threads, where a warning has no cell: ipykernel sends it to whichever cell ran last, or, when a
click in a view started the work, to no cell at all (JupyterLab drops output whose parent is a
widget's message), and Python's registry says a repeated one only once. So the engine collects
the caveats of each job (``collecting``) and the Explorer shows them beside its views, per job,
every time that job's result is shown.

``warn`` is what the package calls instead of ``warnings.warn``: it hands the caveat to the
collector of the current thread when there is one, else to ``warnings.warn`` (same category and
stacklevel, so filters and ``pytest.warns`` see it as before). A thread-local collector, not
``warnings.catch_warnings``: that one swaps the process's filters and ``showwarning``, so on a
worker it would also swallow, or let through, the warnings of the person's own cells meanwhile.
Warnings from other libraries (torch, shapiq) keep Python's own path.
"""
from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

__all__ = ["Notice", "collecting", "is_collecting", "replay", "warn"]


@dataclass(frozen=True)
class Notice:
    """One caveat: the warning's category name and its text."""

    category: str
    text: str

    def as_dict(self) -> dict:
        return {"category": self.category, "text": self.text}


_local = threading.local()


def _sinks() -> list[list[Notice]]:
    """This thread's collections, outermost first (``collecting`` nests)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def warn(message, category: type[Warning] = UserWarning, stacklevel: int = 1) -> None:
    """``warnings.warn(message, category, stacklevel)``, or, inside ``collecting()`` on this
    thread, the caveat added to its list and every list around it at once (every time: no
    once-per-place registry): a job sees a caveat given inside a memo while the memo runs."""
    stack = _sinks()
    if not stack:
        warnings.warn(message, category, stacklevel=stacklevel + 1)
        return
    notice = [Notice(category.__name__, str(message))]
    for sink in stack:
        _add(sink, notice)


def is_collecting() -> bool:
    """Whether this thread is inside ``collecting()``."""
    return bool(_sinks())


def replay(notices) -> None:
    """Add ``notices`` (kept with a cached value) to this thread's collections, if any: a later
    caller that takes the value from the cache is told its caveats too."""
    for sink in _sinks():
        _add(sink, notices)


def _add(sink: list, notices) -> None:
    for notice in notices:
        if notice not in sink:
            sink.append(notice)


@contextmanager
def collecting() -> Iterator[list[Notice]]:
    """Collect the caveats ``warn`` is given on this thread meanwhile, in a list (yielded), in
    place of Python warnings. Nested: a caveat reaches the inner collection and the outer ones
    at once, so a value computed for one caller (a cached memo) keeps its own, and the job
    around it sees it as it comes."""
    stack = _sinks()
    sink: list[Notice] = []
    stack.append(sink)
    try:
        yield sink
    finally:
        stack.pop()
