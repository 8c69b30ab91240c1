"""The engine: jobs on worker threads, an LRU cache, progress, cancellation, errors.

Views never compute. They ``submit`` a job to a *slot* ("input", "heatmap", "gallery", ...)
with a cache key, a function and a callback. The engine

* runs the function on a worker thread (a daemon), so the front-end's message thread is free;
  two lanes, one thread each: "main" for what a click asks about the selected instance and
  "background" for dataset-wide work (features, galleries), which never delays a click;
* keeps a generation counter per slot: a newer submit to the same slot makes the older job
  stale, so it is dropped from the queue, cancelled at its next progress report, and its result
  is never applied (the latest click wins); a dataset-wide pass that other jobs reuse runs on
  under a newer click (the job's ``progress.shared``), and stops at a cancel or a recompute;
* caches results in an LRU (``OrderedDict``) keyed by what produced them; a cache hit applies
  at once, without calling the kernel;
* turns the kernels' ``progress(done, total, message)`` calls into traits (``progress``,
  ``message``) and raises ``Cancelled`` inside the kernel when the job is cancelled or stale;
* reveals a progress bar (``show_progress``) only when it has been busy for more than
  ``delay`` seconds (0.3 s), and reports a failure in ``error`` (the banner) without stopping;
* collects the caveats a job's kernels give (``notices.warn``: completeness missed, a LIME fit
  with fewer samples than units, a cache not written) and shows them in ``notices`` beside the
  job's result, again whenever the result comes from the cache: on a worker thread a Python
  warning reaches no cell (see ``multiviz_widgets.notices``).

Results are applied by calling ``on_done`` on the worker thread (or on the submitting thread
for a cache hit), always under the engine's lock, after checking that the job is still current.
ipywidgets syncs trait changes made from any thread.

``Analyses`` (below) is what the Explorer asks for: memoised calls of the kernels on dataset
instances (attributions, interactions, features, neuron extremes, projections, paths).
"""
from __future__ import annotations

import atexit
import dataclasses
import heapq
import inspect
import itertools
import threading
import time
import traceback
import weakref
from collections import Counter, OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping

import numpy as np
import torch
import traitlets

from .adapter import (AdapterError, Class, ModelAdapter, Neuron, Prepared, Target,
                      _outside_stacklevel, mark_worker_thread, masked_logits_hint)
from .checks import positive_int
from .data import MultimodalDataset
from .display_text import quoted
from .notices import Notice, collecting, is_collecting, replay, warn
from .progress import Cancelled, report

__all__ = ["Engine", "Job", "Analyses", "Kernels", "Cancelled"]


class _GiveWay(Cancelled):
    """Raised at a progress report of a job that ``yields`` when a job of its lane that would
    run before it waits: the kernels stop on it as on a cancel, and the worker puts the job
    back in its queue, behind that one (no callback is called)."""


@dataclass(eq=False)
class Job:
    """One submitted computation (see ``Engine.submit``)."""

    slot: str
    key: Hashable | None
    fn: Callable = field(repr=False)
    on_done: Callable | None = field(repr=False)
    on_error: Callable | None = field(repr=False)
    priority: int
    generation: int
    label: str
    lane: str = "main"
    seq: int = 0
    yields: bool = False           # gives way to a job of its lane that would run before it
    cancelled: bool = False
    told: bool = False             # on_error(Cancelled) called already (at the cancel)
    state: str = "queued"          # queued, running, done, error, cancelled, dropped
    value: Any = field(default=None, repr=False)
    error: BaseException | None = None
    started: float = 0.0
    cache_epoch: int = 0           # the engine's cache_epoch when the job was submitted
    #: the caveats its kernels gave so far (shown while it runs, at its progress reports: a
    #: pairwise ablation's "about 3 h" is worth knowing at its start, not its end)
    said: list = field(default_factory=list, repr=False)
    said_shown: int = 0


def read_only(value, depth: int = 3):
    """value, with the numpy arrays in it made read-only (in place): those of results
    (dataclasses), tuples, lists and dict values, ``depth`` levels down. A cached value is
    handed to every later caller, so an in-place edit by one (``r.scores["image"] /= 2``) would
    change what the others and the views get: with read-only arrays it is an error at once
    ("assignment destination is read-only"); ``.copy()`` gives an array to edit."""
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    elif depth > 0:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            items = [getattr(value, f.name) for f in dataclasses.fields(value)]
        elif isinstance(value, dict):
            items = list(value.values())
        elif isinstance(value, (tuple, list)):
            items = value
        else:
            return value
        for item in items:
            read_only(item, depth - 1)
    return value


def short_repr(value, limit: int = 200) -> str | None:
    """repr(value) cut to ``limit`` characters (None stays None): job keys in a snapshot."""
    if value is None:
        return None
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _close_at_exit(ref) -> None:
    engine = ref()
    if engine is not None:
        engine.close(join_timeout=5.0)


class _Flight:
    """A memo being computed (``Engine.memo``): who computes it, and, once ``event`` is set,
    its value (``ok``) and caveats or a failure (not ``ok``: a waiting caller computes it
    itself)."""

    __slots__ = ("thread", "event", "value", "ok", "notices")

    def __init__(self, thread: threading.Thread):
        self.thread = thread
        self.event = threading.Event()
        self.value = None
        self.ok = False
        self.notices: tuple = ()


class Engine(traitlets.HasTraits):
    """Job queues with worker threads (two lanes), an LRU cache and progress/error traits.

    cache_size: how many results the LRU keeps (``pin=True`` memos, e.g. dataset features, are
    kept apart and never evicted); delay: seconds of work before the progress bar shows.
    """

    busy = traitlets.Bool(False)            # a job is queued or running
    show_progress = traitlets.Bool(False)   # busy for longer than ``delay``
    progress = traitlets.Float(0.0)         # fraction of the current job done, 0..1
    message = traitlets.Unicode("")         # what the current job is doing
    error = traitlets.Unicode("")           # the last failure (the banner); "" none
    status = traitlets.Unicode("")          # a short note ("cancelled", "ready")
    #: the caveats of the results shown now: per slot, a list of {"label", "category", "text"}
    #: (the kernels' warnings while computing them); a slot's result replaces its list
    notices = traitlets.Dict()

    #: Two lanes, one worker thread each: "main" for what a click asks about the instance,
    #: "background" for dataset-wide work (features, galleries), so a long background job
    #: never holds up the answer to a click (the adapter's lock interleaves their batches).
    LANES = ("main", "background")

    def __init__(self, cache_size: int = 256, delay: float = 0.3):
        super().__init__()
        if int(cache_size) < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}.")
        self.cache_size = int(cache_size)
        self.delay = float(delay)
        self._cache: OrderedDict = OrderedDict()
        self._pinned: dict = {}
        self._notes: dict = {}          # key -> the caveats of its cached value (tuple of Notice)
        #: slot -> the caveats of the result it shows (what ``notices`` goes back to when a
        #: running job showed its own early and then ends without a result shown)
        self._result_notices: dict = {}
        self._inflight: dict = {}       # key -> _Flight: a memo being computed now (see memo)
        #: counts clear_cache(): a value computed from what was there before a clear (a job or
        #: a memo that started earlier) is not cached after it
        self.cache_epoch = 0
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._queues: dict[str, list] = {lane: [] for lane in self.LANES}
        self._gen: dict[str, int] = {}
        self._current: dict[str, Job] = {}      # the latest job of every slot
        self._running: dict[str, Job | None] = {lane: None for lane in self.LANES}
        self._seq = itertools.count()
        self._busy_epoch = 0
        self._timer: threading.Timer | None = None
        self._closed = False
        self.stats = {"hits": 0, "misses": 0, "joined": 0, "runs": 0, "dropped": 0,
                      "cancelled": 0, "errors": 0}
        self.last_traceback = ""
        self._last: dict[str, tuple[Job, float]] = {}   # lane -> (last job finished, when)
        self._in_hand: dict[str, Job] = {}               # lane -> the job its worker took
        self._threads = {lane: threading.Thread(target=self._loop, args=(lane,), daemon=True,
                                                name=f"multiviz-engine-{lane}")
                         for lane in self.LANES}
        for t in self._threads.values():
            t.start()
        # stop the workers before the interpreter tears down: a worker still inside a torch op
        # during finalisation aborts the process ("terminate called without an active exception")
        atexit.register(_close_at_exit, weakref.ref(self))

    @property
    def lock(self) -> threading.RLock:
        """The lock under which results are applied (``on_done``, ``on_error``). A view holds it
        while it redraws on the kernel's thread (a highlight on a selection change), so that a
        result applied meanwhile on a worker never interleaves with that redraw."""
        return self._lock

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called: no job is taken any more (``submit`` raises)."""
        return self._closed

    # -- cache ---------------------------------------------------------------------------------
    def cached(self, key: Hashable, default=None):
        """The cached value for ``key`` (refreshing its LRU position), or ``default``."""
        with self._lock:
            if key in self._pinned:
                return self._pinned[key]
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        return default

    def has(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._pinned or key in self._cache

    def store(self, key: Hashable, value, pin: bool = False, freeze: bool = True,
              epoch: int | None = None, notices=()) -> None:
        """Put a value in the cache (``pin=True``: never evicted), its numpy arrays made
        read-only (``read_only``: it is shared by every later caller) unless ``freeze=False``
        (a value that holds what the user gave, whose arrays are theirs to edit, such as a
        view's job result built from the user's features). ``epoch``: the ``cache_epoch`` at
        which the value's computation started; after a ``clear_cache`` since, it is not kept.
        ``notices``: the caveats given while computing it, told again to each later taker."""
        if freeze:
            read_only(value)
        with self._lock:
            if epoch is not None and epoch != self.cache_epoch:
                return
            if notices:
                self._notes[key] = tuple(notices)
            else:
                self._notes.pop(key, None)
            if pin:
                self._pinned[key] = value
                return
            self._cache[key] = value
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                old, _ = self._cache.popitem(last=False)
                if old not in self._pinned:
                    self._notes.pop(old, None)

    def notices_of(self, key: Hashable) -> tuple[Notice, ...]:
        """The caveats kept with the cached value of ``key`` (empty when none or not cached)."""
        with self._lock:
            return self._notes.get(key, ())

    def memo(self, key: Hashable, fn: Callable[[], Any], pin: bool = False):
        """``fn()`` once per key: later calls return the cached value (call it inside jobs).

        Single-flight: a call for a key that another thread is computing now (the click's lane
        and the gallery's asking for the same attribution) waits for that result instead of
        computing it a second time. If that computation fails or is cancelled, the waiting
        caller computes the value itself (one job's error or ``Cancelled`` is not another's).
        The wait never hangs on a job that stops: it polls, and a worker's job raises
        ``Cancelled`` there once the job is cancelled or stale, or the engine closes."""
        held = self._holds_lock()        # (read before taking it: then it is always held)
        while True:
            with self._lock:
                if key in self._pinned or key in self._cache:
                    self.stats["hits"] += 1
                    replay(self._notes.get(key, ()))
                    return self.cached(key)
                flight = self._inflight.get(key)
                if flight is None:
                    flight = self._inflight[key] = _Flight(threading.current_thread())
                    self.stats["misses"] += 1
                    epoch = self.cache_epoch
                    break
                if flight.thread is threading.current_thread() or held:
                    # fn() asking for its own key, or a caller that holds the engine's lock
                    # (the owner needs it to store): computed here, as without the record
                    self.stats["misses"] += 1
                    epoch = self.cache_epoch
                    flight = None
                    break
            self._await_flight(flight)
            with self._lock:
                if flight.ok:
                    self.stats["joined"] += 1
                    replay(flight.notices)
                    return flight.value
            # it failed or was cancelled: look again (cached meanwhile? another's? else ours)
        try:
            # its own caveats, kept with it (and told upward), when a job collects them: called
            # outside one (a cell), they are Python warnings, said at once
            with collecting() if is_collecting() else nullcontext([]) as said:
                value = fn()
            self.store(key, value, pin=pin, epoch=epoch, notices=said)
        except BaseException:
            if flight is not None:
                self._land(key, flight, False)
            raise
        if flight is not None:
            self._land(key, flight, True, value, said)
        return value

    def _land(self, key: Hashable, flight: _Flight, ok: bool, value=None, notices=()) -> None:
        """End the computation of ``key`` that ``flight`` records: ``ok``, its waiters take
        ``value`` (and are told ``notices``); else (it failed) they compute the value
        themselves."""
        with self._lock:
            if ok:
                flight.value, flight.ok, flight.notices = value, True, tuple(notices)
            if self._inflight.get(key) is flight:
                del self._inflight[key]
            flight.event.set()

    def _holds_lock(self) -> bool:
        is_owned = getattr(self._lock, "_is_owned", None)
        return bool(is_owned()) if is_owned is not None else False

    def _await_flight(self, flight: _Flight) -> None:
        """Wait until ``flight`` ends; on a worker thread, raise ``Cancelled`` as soon as the
        worker's own job is cancelled or stale or the engine closes (as its progress would),
        so that a waiting job stops like a computing one. Outside the workers (no job) it
        waits for the computation, which ends (its job's progress raises at a cancel)."""
        me = threading.current_thread()
        lane = next((lane for lane, t in self._threads.items() if t is me), None)
        while not flight.event.wait(0.05):
            if lane is None:
                continue
            with self._lock:
                job = self._running[lane]
                if self._closed or (job is not None and not self._is_current(job)):
                    label = job.label if job is not None else lane
                    raise Cancelled(f"{label}: cancelled")

    def clear_cache(self) -> None:
        """Drop every cached value, pinned ones too; values being computed meanwhile (from what
        was there before) are not cached when they come."""
        with self._lock:
            self._cache.clear()
            self._pinned.clear()
            self._notes.clear()
            self.cache_epoch += 1
            # a value being computed now is not joined by a later call (it would be stale)
            self._inflight.clear()

    # -- jobs ----------------------------------------------------------------------------------
    def submit(self, slot: str, key: Hashable | None, fn: Callable, on_done: Callable | None = None,
               on_error: Callable | None = None, priority: int = 5, label: str | None = None,
               lane: str = "main", yields: bool = False):
        """Run ``fn(progress)`` on the worker and call ``on_done(value)`` if still current.

        A newer submit to the same ``slot`` supersedes this one. With a ``key`` the result is
        cached; a cached key calls ``on_done`` at once (returns "cached"). ``on_error(exc)`` is
        called on failure (and with ``Cancelled`` when the person cancels); failures also set
        ``error``. Lower ``priority`` runs first within a ``lane`` ("main" or "background").
        yields: a long job of low priority that, once running, gives way to a job of its lane
        submitted later that would run before it: it stops at its next progress report and is
        queued again behind it (it starts over). Returns the Job (or "cached").
        """
        if lane not in self._queues:
            raise ValueError(f"lane must be one of {self.LANES}, got {lane!r}.")
        if self._closed:
            raise RuntimeError("The engine is closed.")
        with self._lock:
            cur = self._current.get(slot)
            if (key is not None and cur is not None and cur.key == key and not cur.cancelled
                    and cur.state in ("queued", "running") and cur.cache_epoch == self.cache_epoch):
                return cur                       # the same request is already on its way
            # (one submitted before a clear_cache computes from what was there before: it is
            # superseded below, its result never shown)
            gen = self._gen[slot] = self._gen.get(slot, 0) + 1
            dropped = cur is not None and cur.state == "queued"
            if dropped:
                cur.state = "dropped"
                self.stats["dropped"] += 1
            if key is not None and (key in self._cache or key in self._pinned):
                self.stats["hits"] += 1
                value = self.cached(key)
                self._current.pop(slot, None)
                if dropped:            # nothing else pending: not busy once wait() returns
                    self._after_job()
                self._apply(on_done, on_error, value, str(label or slot))
                self._show_notices(slot, str(label or slot), self._notes.get(key, ()))
                return "cached"
            if key is not None:
                self.stats["misses"] += 1
            job = Job(slot, key, fn, on_done, on_error, int(priority), gen, str(label or slot),
                      lane=lane, seq=next(self._seq), yields=bool(yields),
                      cache_epoch=self.cache_epoch)
            self._current[slot] = job
            heapq.heappush(self._queues[lane], (job.priority, job.seq, job))
            self._set_busy()
            self._cond.notify_all()
            return job

    def slot_pending(self, slot: str) -> bool:
        """Whether the slot's current job is queued or running (its result not shown yet)."""
        with self._lock:
            cur = self._current.get(slot)
            return cur is not None and cur.state in ("queued", "running")

    def drop(self, slot: str) -> None:
        """Make the slot's pending job stale (its result will not be applied); the slot's
        caveats go (its view blanks, or forgets, what it showed)."""
        with self._lock:
            self._show_notices(slot, "", ())
            self._gen[slot] = self._gen.get(slot, 0) + 1
            cur = self._current.pop(slot, None)
            if cur is not None and cur.state == "queued":
                cur.state = "dropped"
                self.stats["dropped"] += 1
                self._after_job()      # nothing else pending: not busy once wait() returns

    def cancel(self, lanes: tuple[str, ...] | None = None) -> None:
        """Cancel the running and queued jobs of ``lanes`` (the cancel button).

        By default the jobs the person sees: the "main" lane's (what a click asked for) when it
        has any not cancelled yet, else every lane's (the dataset-wide work then shown in the
        progress bar). So cancelling a slow click leaves the dataset's features running for the
        3-D embedding, and a second cancel, while the first one waits for the click's job to
        reach its next step, stops them too. The progress bar says that it is cancelling.
        """
        with self._lock:
            if lanes is None:
                running = self._running["main"]
                main = (running is not None and not running.cancelled) or any(
                    j.state == "queued" for *_, j in self._queues["main"])
                lanes = ("main",) if main else self.LANES
            bad = [lane for lane in lanes if lane not in self._queues]
            if bad:
                raise ValueError(f"lanes must be among {self.LANES}, got {bad}.")
            dropped, stopping = [], []
            for lane in lanes:
                queue = self._queues[lane]
                for _, _, job in queue:
                    if job.state == "queued":
                        job.state = "cancelled"
                        job.cancelled = True
                        dropped.append(job)
                queue.clear()
                job = self._running[lane]
                if job is not None:
                    job.cancelled = True
                    stopping.append(job.label)
                    # its view is told now, not when the worker next reaches a progress report
                    # (seconds, in one slow call): a click meanwhile must find the request
                    # waiting to be asked again (RetryAfterCancel), not lose it
                    if (self._gen.get(job.slot) == job.generation and not job.told
                            and not self._closed):       # closed: its views may be too
                        job.told = True
                        self._call_error(job.on_error, Cancelled("cancelled"))
                        self._show_notices(job.slot, job.label, ())    # its view blanks
            for job in dropped:
                self.stats["cancelled"] += 1
                if self._current.get(job.slot) is job:
                    self._current.pop(job.slot, None)
                    self._call_error(job.on_error, Cancelled("cancelled"))
                    self._show_notices(job.slot, job.label, ())
            self.status = "cancelled"
            if not self._active():
                self._set_idle()
            elif stopping:      # said until the job stops, or a newer one reports progress
                self._assign(message=f"cancelling {', '.join(stopping)}: it stops at its next "
                                     f"step ...")
            self._cond.notify_all()

    def pending(self) -> int:
        with self._lock:
            return (sum(1 for q in self._queues.values() for *_, j in q if j.state == "queued")
                    + sum(j is not None for j in self._running.values()))

    def snapshot(self) -> dict:
        """What the engine is doing now, as plain values (for a bug report or a failing test):
        per lane whether its thread is alive, the job it runs, the jobs queued and the last job it
        finished (with how long ago); the latest job of every slot; the counters, the banner's
        error and the last traceback."""
        now = time.perf_counter()
        with self._lock:
            lanes = {}
            for lane in self.LANES:
                last = None
                if lane in self._last:
                    job, finished = self._last[lane]
                    last = dict(self._describe(job, finished),   # seconds: how long it ran
                                seconds_ago=round(now - finished, 3))
                lanes[lane] = {
                    "thread_alive": self._threads[lane].is_alive(),
                    "running": self._describe(self._running[lane], now),
                    "queued": [self._describe(j, now) for *_, j in sorted(self._queues[lane],
                                                                          key=lambda e: e[:2])
                               if j.state == "queued"],
                    "last_finished": last}
            return {"busy": self.busy, "pending": self.pending(), "closed": self._closed,
                    "lanes": lanes,
                    "slots": {slot: self._describe(j, now) for slot, j in self._current.items()},
                    "stats": dict(self.stats), "error": self.error, "status": self.status,
                    "message": self.message, "last_traceback": self.last_traceback[-4000:]}

    def _describe(self, job: Job | None, now: float) -> dict | None:
        if job is None:
            return None
        return {"slot": job.slot, "label": job.label, "key": short_repr(job.key),
                "state": job.state, "current": self._is_current(job), "cancelled": job.cancelled,
                "seconds": round(now - job.started, 3) if job.started else None}

    def _active(self) -> bool:
        return self.pending() > 0

    def wait(self, timeout: float | None = 60.0) -> bool:
        """Block until no job is queued or running; False if ``timeout`` passed first."""
        if threading.current_thread() in self._threads.values():
            raise RuntimeError("wait() cannot be called from the engine's own worker thread.")
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._active():
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
        return True

    def clear_error(self) -> None:
        self.error = ""

    def clear_notices(self) -> None:
        """Hide every caveat shown (the notices banner's dismiss)."""
        with self._lock:
            self._result_notices.clear()
            self._assign(notices={})

    def _show_notices(self, slot: str, label: str, said, live: bool = False) -> None:
        """The caveats of the result just shown in ``slot`` replace that slot's (none: the
        slot's are cleared). ``live``: those of a job still running, shown early, not its
        result's (``_restore_notices`` puts the result's back). Under the engine's lock."""
        with self._lock:
            entries = [dict(n.as_dict(), label=label) for n in said]
            if not live:
                if entries:
                    self._result_notices[slot] = entries
                else:
                    self._result_notices.pop(slot, None)
            self._set_slot_notices(slot, entries)

    def _restore_notices(self, job: Job) -> None:
        """A job that showed caveats while it ran ends without its result shown (superseded,
        cancelled): its slot shows its result's caveats again."""
        if job.said_shown:
            with self._lock:
                self._set_slot_notices(job.slot, self._result_notices.get(job.slot, []))

    def _set_slot_notices(self, slot: str, entries: list) -> None:
        shown = dict(self.notices)
        if entries:
            shown[slot] = entries
        elif slot not in shown:
            return
        else:
            del shown[slot]
        self._assign(notices=shown)

    def close(self, join_timeout: float = 0.0) -> None:
        """Stop the worker threads (queued jobs are dropped, the running ones cancelled at their
        next progress report); wait up to join_timeout seconds for them to finish."""
        with self._lock:
            self._closed = True
            for queue in self._queues.values():
                queue.clear()
            for job in self._running.values():
                if job is not None:
                    job.cancelled = True
            # the progress bar's timer thread holds the engine (and through its observers the
            # views) until it has woken to its cancel: joined below with the workers
            timer, self._timer = self._timer, None
            if timer is not None:
                timer.cancel()
            self._cond.notify_all()
        if join_timeout > 0:
            for t in [*self._threads.values(), *([timer] if timer is not None else [])]:
                if t is not threading.current_thread():
                    t.join(join_timeout)

    # -- worker --------------------------------------------------------------------------------
    def _is_current(self, job: Job) -> bool:
        return not job.cancelled and self._gen.get(job.slot) == job.generation

    def _shown(self, job: Job) -> bool:
        """Whether the progress bar shows this job: a click's job ("main" lane) goes first,
        the background's only while no click's job runs (what ``cancel()`` stops)."""
        return job.lane == "main" or self._running["main"] is None

    def _progress_fn(self, job: Job):
        """The job's ``progress(done, total, message)``: it raises ``Cancelled`` once the job is
        cancelled or stale. Its ``shared`` variant, for work that other jobs reuse (a
        dataset-wide pass, see ``Analyses.features``), raises only on a cancel or once the cache
        was cleared since the job began ("recompute": the pass would not be kept): a newer
        click does not throw away a pass that its own job would start again."""
        last = [0.0]

        def report(done, total, message, stops: Callable[[], bool]):
            if stops() or self._closed:
                raise Cancelled(f"{job.label}: cancelled")
            if len(job.said) > job.said_shown:          # new caveats: said while it runs
                with self._lock:
                    if self._is_current(job):
                        job.said_shown = len(job.said)
                        self._show_notices(job.slot, job.label, list(job.said), live=True)
            if not self._shown(job):
                return
            now = time.monotonic()      # at most 20 updates a second reach the front end
            if now - last[0] < 0.05 and done < total:
                return
            last[0] = now
            frac = float(done) / float(total) if total else 0.0
            self._assign(progress=min(1.0, max(0.0, frac)),
                         message=(f"{job.label}: {message} ({int(done)}/{int(total)})"
                                  if message else f"{job.label} ({int(done)}/{int(total)})"))

        def progress(done, total, message=""):
            report(done, total, message, lambda: not self._is_current(job))
            if job.yields and self._jumped(job):
                raise _GiveWay(f"{job.label}: gives way")

        def shared(done, total, message=""):
            report(done, total, message,
                   lambda: job.cancelled or job.cache_epoch != self.cache_epoch)
        progress.shared = shared
        return progress

    def _jumped(self, job: Job) -> bool:
        """Whether a current job waits in ``job``'s lane that would run before it."""
        with self._lock:
            return any((j.priority, j.seq) < (job.priority, job.seq) and j.state == "queued"
                       and self._is_current(j) for *_, j in self._queues[job.lane])

    def _loop(self, lane: str) -> None:
        """The lane's worker, until the engine closes. Nothing that a job, a callback or an
        observer of the engine's traits raises stops it: a dead worker would leave every later
        job of its lane waiting for ever, and the progress bar busy. A failure of the
        bookkeeping itself ends that job as an error (its view is told) and goes on."""
        mark_worker_thread(background=lane == "background")
        while True:
            try:
                if not self._run_next(lane):
                    return
            except BaseException as e:  # noqa: BLE001 - see above
                self.last_traceback = traceback.format_exc()
                with self._cond:
                    job = self._in_hand.pop(lane, None)
                    self._running[lane] = None
                    if job is not None and job.state in ("queued", "running"):
                        job.state, job.error = "error", e
                        if not job.told:                 # its view heard "cancelled" already
                            self._call_error(job.on_error, e)
                    try:
                        self._after_job()
                    except BaseException:  # noqa: BLE001 - an observer of busy/progress
                        self.last_traceback = traceback.format_exc()
                        self._cond.notify_all()

    def _run_next(self, lane: str) -> bool:
        """Run the lane's jobs, waiting for each: False once the engine is closed (a failure of
        the bookkeeping raises, see ``_loop``)."""
        queue = self._queues[lane]
        while True:
            with self._cond:
                self._in_hand.pop(lane, None)
                while not queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return False
                _, _, job = heapq.heappop(queue)
                self._in_hand[lane] = job
                if job.state != "queued" or not self._is_current(job):
                    if job.state == "queued":
                        job.state = "dropped"
                        self.stats["dropped"] += 1
                    self._after_job()
                    continue
                job.state = "running"
                job.started = time.perf_counter()
                self._running[lane] = job
            if self._shown(job):
                self._assign(message=job.label, progress=0.0)
            said: list[Notice] = []
            try:
                with collecting() as said:
                    job.said = said
                    value, err = job.fn(self._progress_fn(job)), None
            except _GiveWay:
                with self._cond:                  # back in the queue, behind the newer job
                    self._running[lane] = None
                    job.state, job.seq = "queued", next(self._seq)
                    heapq.heappush(queue, (job.priority, job.seq, job))
                    self._cond.notify_all()
                continue
            except Cancelled as e:
                value, err = None, e
            except BaseException as e:   # noqa: BLE001 - a kernel failure must not kill the worker
                value, err = None, e
                self.last_traceback = traceback.format_exc()
            with self._cond:
                self._running[lane] = None
                other = self._running["background"]
                if lane == "main" and other is not None:
                    # the bar shows the background job again, until its next report
                    self._assign(message=other.label, progress=0.0)
                self.stats["runs"] += 1
                if err is None and job.key is not None:
                    # not frozen: a job's value is made of the Analyses' memos (read-only
                    # already) and may hold what the user gave (their features=)
                    self.store(job.key, value, freeze=False, epoch=job.cache_epoch,
                               notices=said)
                current = self._is_current(job)
                if self._current.get(job.slot) is job:
                    self._current.pop(job.slot, None)
                if self._closed:                     # the views may be closed: no callbacks
                    job.state = "dropped"
                    self.stats["dropped"] += 1
                elif err is None and current:
                    job.state, job.value = "done", value
                    self._apply(job.on_done, job.on_error, value, job.label)
                    self._show_notices(job.slot, job.label, said)
                elif isinstance(err, Cancelled) or (err is None and job.cancelled):
                    job.state = "cancelled"
                    self.stats["cancelled"] += 1
                    latest = self._gen.get(job.slot) == job.generation
                    if job.cancelled and not job.told and latest:
                        self._call_error(job.on_error, err or Cancelled("cancelled"))
                        self._show_notices(job.slot, job.label, ())
                    elif not job.cancelled and latest:
                        # its shared pass stopped because the cache was cleared, and no newer
                        # job took its slot: its view is told (it asks again on the next click)
                        self._call_error(job.on_error, err)
                        self._show_notices(job.slot, job.label, ())
                    elif not latest:
                        self._restore_notices(job)
                elif err is not None and current:
                    job.state, job.error = "error", err
                    self._fail(job.on_error, err, job.label)
                    self._show_notices(job.slot, job.label, said)
                else:
                    job.state = "dropped"
                    self.stats["dropped"] += 1
                    self._restore_notices(job)
                self._last[lane] = (job, time.perf_counter())
                self._in_hand.pop(lane, None)
                self._after_job()

    def _apply(self, on_done, on_error, value, label) -> None:
        if on_done is None:
            return
        try:
            on_done(value)
        except Exception as e:  # noqa: BLE001 - a view failing to render is reported, not fatal
            self.last_traceback = traceback.format_exc()
            self._fail(on_error, e, label)

    def _fail(self, on_error, err: BaseException, label: str) -> None:
        self.stats["errors"] += 1
        try:
            said = str(err)
        except Exception:  # noqa: BLE001 - an exception whose message cannot be made
            said = "(its message could not be read)"
        self._assign(error=f"{label} failed: {type(err).__name__}: {said}")
        self._call_error(on_error, err)

    def _call_error(self, on_error, err) -> None:
        if on_error is None:
            return
        try:
            on_error(err)
        except Exception:  # noqa: BLE001
            self.last_traceback = traceback.format_exc()

    def _after_job(self) -> None:
        if not self._active():
            for queue in self._queues.values():
                queue.clear()
            self._set_idle()
        self._cond.notify_all()

    def _set_busy(self) -> None:
        if self.busy:
            return
        self._assign(busy=True, status="")
        self._busy_epoch += 1
        epoch = self._busy_epoch
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.delay, self._reveal, args=(epoch,))
        self._timer.daemon = True
        self._timer.start()

    def _reveal(self, epoch: int) -> None:
        with self._lock:
            if self.busy and epoch == self._busy_epoch:
                self._assign(show_progress=True)

    def _set_idle(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._busy_epoch += 1
        self._assign(busy=False, show_progress=False, progress=0.0, message="")

    def _assign(self, **traits) -> None:
        """Set the engine's traits, each even when an observer of one raises (the exception is
        kept in ``last_traceback``): the engine's state must not stop half-way."""
        for name, value in traits.items():
            try:
                setattr(self, name, value)
            except Exception:  # noqa: BLE001 - an observer's failure, not the engine's
                self.last_traceback = traceback.format_exc()


def params_key(params: Mapping) -> tuple:
    """A hashable, order-free form of keyword arguments for a cache key: dicts become sorted
    pairs and lists tuples, at any depth (``unimodal_params={"steps": 8}``, a list of
    modalities); other unhashable values by their repr."""
    def frozen(v):
        if isinstance(v, Mapping):
            return tuple(sorted(((str(k), frozen(x)) for k, x in v.items()), key=repr))
        if isinstance(v, (list, tuple)):
            return tuple(frozen(x) for x in v)
        if isinstance(v, (set, frozenset)):
            return tuple(sorted((frozen(x) for x in v), key=repr))
        try:
            hash(v)
        except TypeError:
            return repr(v)
        return v
    return frozen(dict(params))


def check_path_params(path_params, names: bool = True) -> dict:
    """``path_params`` as a dict, with (``names``) its names checked against
    ``prediction_path``'s parameters (a name it does not take is refused here, not in the
    first path the Explorer computes)."""
    if path_params is None:
        return {}
    if not isinstance(path_params, Mapping):
        raise TypeError(f"path_params must be a dict of prediction_path's parameters, got "
                        f"{type(path_params).__name__}.")
    if not names:
        return dict(path_params)
    from .kernels.prediction import prediction_path
    taken = set(inspect.signature(prediction_path).parameters) - {
        "adapter", "instance", "target", "sparse_model", "progress"}
    unknown = sorted(set(map(str, path_params)) - taken)
    if unknown:
        raise TypeError(f"path_params {unknown} are not parameters of prediction_path; it "
                        f"takes {sorted(taken)}.")
    # the counts checked here, not in the first path (a click later, in the banner)
    return {k: (positive_int(v, f"path_params[{k!r}]") if str(k).startswith("k_") else v)
            for k, v in path_params.items()}


def check_method_params(method_params) -> dict:
    """``method_params`` ({method: {parameter: value}}, e.g. {"lime": {"n_samples": 3000}}) as
    a dict of dicts, each method a stage-1 or stage-2 method and each parameter one it takes
    (a value it refuses is said by the method, in the banner, when it runs), or
    "interaction_type" with ``TYPE_PARAMS`` (the line on how the modalities combine), whose
    values are checked here."""
    if method_params is None:
        return {}
    if not isinstance(method_params, Mapping):
        raise TypeError(f"method_params must be a dict {{method: {{parameter: value}}}}, e.g. "
                        f"{{'lime': {{'n_samples': 3000}}}}, got {type(method_params).__name__}.")
    from .kernels.interactions import INTERACTION_METHODS, _method_params
    from .kernels.unimodal import METHODS
    out = {}
    for method, params in method_params.items():
        if method in METHODS:
            taken = sorted(set(METHODS[method].defaults) | {"modalities"})
        elif method in INTERACTION_METHODS:
            taken = _method_params(INTERACTION_METHODS[method])      # None: it takes any
        elif method == "interaction_type":
            taken = list(TYPE_PARAMS)
        else:
            raise ValueError(f"method_params names {method!r}, which is no method; the methods "
                             f"are {sorted(METHODS)} and {sorted(INTERACTION_METHODS)}, and "
                             "'interaction_type' (the line on how the modalities combine).")
        if not isinstance(params, Mapping):
            raise TypeError(f"method_params[{method!r}] must be a dict of its parameters, got "
                            f"{type(params).__name__}.")
        unknown = [] if taken is None else sorted(set(map(str, params)) - set(taken))
        if unknown:
            raise TypeError(f"method_params[{method!r}] names {unknown}, which {method} does "
                            f"not take; it takes {taken}.")
        out[str(method)] = dict(params)
    typed = out.get("interaction_type", {})
    what = "method_params['interaction_type'][{!r}]".format
    if "n_reference" in typed:
        said = what("n_reference") + " (0: no such line)"
        if positive_int(typed["n_reference"], said, 0) == 1:
            raise ValueError(f"{said} is 1, but EMAP averages over at least 2 instances: give "
                             "0 for no line, or 2 or more.")
    if typed.get("seed") is not None:
        positive_int(typed["seed"], what("seed") + " (None: fresh)", 0)
    if "batch_size" in typed:
        positive_int(typed["batch_size"], what("batch_size"))
    if "factorized" in typed:
        from .kernels.split_model import check_factorized
        check_factorized(typed["factorized"])
    return out


# ---------------------------------------------------------------------------------------------
#: How many instances of the dataset the Explorer's interaction type averages over (EMAP's
#: reference set: about TYPE_REFERENCES^2 pairs per instance, fused where the model splits)
TYPE_REFERENCES = 50
#: What ``method_params["interaction_type"]`` may set (``kernels.emap.interaction_type``'s own;
#: n_reference 0: no line)
TYPE_PARAMS = ("n_reference", "seed", "batch_size", "factorized")

#: why references of the interaction type were left out (``reference_left_out_why``)
LEFT_OUT = {"input": "{n} whose input the adapter refuses",
            "model": "{n} the model fails on",
            "output": "{n} for which the model gives no finite output"}


def left_out_text(why: dict[str, int]) -> str:
    """The references left out, by reason ("2 whose input the adapter refuses; 1 the model
    fails on"), from {reason: count} (``Analyses.interaction_type``'s)."""
    return "; ".join(LEFT_OUT[k].format(n=v) for k, v in why.items() if v)

#: How far below its fidelity when fit (a share of instances) the sparse model's agreement with
#: the model must fall for the Explorer to say that the model changed since
SPARSE_MODEL_DRIFT = 0.05


class Kernels:
    """The kernel calls the Explorer makes, in one place (tests swap in fakes).

    Each method takes the adapter and a Prepared instance and returns the kernel's result.
    """

    def attribute(self, adapter: ModelAdapter, prepared: Prepared, method: str, target: Target,
                  progress=None, **params):
        from .kernels.unimodal import attribute
        return attribute(adapter, prepared, method=method, target=target, progress=progress,
                         **params)

    def interaction(self, adapter: ModelAdapter, prepared: Prepared, method: str,
                    modalities: tuple[str, str], target: Target, progress=None, **params):
        from .kernels.interactions import interaction
        return interaction(adapter, prepared, method=method, modalities=modalities, target=target,
                           progress=progress, **params)

    def interaction_type(self, adapter: ModelAdapter, dataset: MultimodalDataset, index: int,
                         reference_indices, progress=None, **params) -> dict:
        """How the modalities combine at dataset instance ``index``: dominance, complement,
        conflict or undecided, from EMAP's averages over the instances ``reference_indices``
        of ``dataset`` (``kernels.emap.interaction_type``, which takes ``params``; about N^2
        fused pairs for N references, or full forward passes for a model that does not
        split)."""
        from .kernels.emap import interaction_type
        return interaction_type(adapter, index, reference=dataset,
                                reference_indices=reference_indices, progress=progress,
                                **params)

    def features(self, adapter: ModelAdapter, dataset: MultimodalDataset, progress=None,
                 refresh: bool = False):
        """refresh: compute again, not from the disk cache (a recompute)."""
        from .kernels.representations import extract_features
        return extract_features(adapter, dataset, progress=progress, refresh=refresh)

    def extremes(self, adapter: ModelAdapter, features, k: int, progress=None):
        from .kernels.representations import neuron_extremes
        return neuron_extremes(None, None, k=k, features=features, progress=progress)

    def contributions(self, adapter: ModelAdapter, prepared: Prepared, class_index: int,
                      sparse_model=None):
        """An object with ``h`` [d], ``contributions`` [d] and ``top(k, absolute)``."""
        from .kernels.representations import decision_contributions
        return decision_contributions(adapter, prepared, target=class_index,
                                      sparse_model=sparse_model)

    def prediction_path(self, adapter: ModelAdapter, prepared: Prepared, class_index: int,
                        sparse_model=None, progress=None, **params) -> dict:
        from .kernels.prediction import prediction_path
        path = prediction_path(adapter, prepared, target=class_index, sparse_model=sparse_model,
                               progress=progress, **params)
        return path.to_dict() if hasattr(path, "to_dict") else dict(path)

    def projection(self, h: np.ndarray) -> np.ndarray:
        from .kernels.projection import project_3d
        return project_3d(h)


def _takes(fn: Callable, name: str) -> bool:
    """Whether ``fn`` accepts the keyword argument ``name`` (by name or through **kwargs)."""
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD
                                 for p in params.values())


#: Rows of features checked for NaN or infinity at a time (``_finite_rows``).
FINITE_CHUNK = 4096


def _finite_rows(feats) -> np.ndarray | None:
    """None when every row of ``feats`` (h, and the logits where it has them) is finite, else
    the positions of the finite rows; a ValueError when there are none."""
    h = np.asarray(feats.h)
    logits = getattr(feats, "logits", None)
    logits = None if logits is None else np.asarray(logits)
    ok = np.empty(len(h), dtype=bool)
    for s in range(0, len(h), FINITE_CHUNK):        # no N x d array of flags at once
        ok[s:s + FINITE_CHUNK] = np.isfinite(h[s:s + FINITE_CHUNK]).all(1)
        if logits is not None:
            ok[s:s + FINITE_CHUNK] &= np.isfinite(logits[s:s + FINITE_CHUNK]).all(1)
    if ok.all():
        return None
    if not ok.any():
        raise ValueError(f"The decision-level features of all {len(h)} instances are not "
                         "finite (NaN or infinity): check the model's forward.")
    return np.nonzero(ok)[0]


def _feature_rows(feats, rows: np.ndarray):
    """The features of ``rows`` alone (h, logits and indices), as a Features object."""
    from .kernels.representations import Features
    idx = getattr(feats, "indices", None)
    idx = np.arange(len(feats.h)) if idx is None else np.asarray(idx)
    return Features(np.asarray(feats.h)[rows], np.asarray(feats.logits)[rows], idx[rows])


def check_features(features, n_instances: int, adapter: ModelAdapter | None = None) -> None:
    """Check that precomputed ``features`` (``extract_features(adapter, dataset)``) belong to a
    dataset of ``n_instances`` instances (and to the adapter's classes and decision layer)."""
    how = ("pass extract_features(adapter, dataset) of the dataset given to the Explorer "
           "(or leave features= out)")
    h = getattr(features, "h", None)
    logits = getattr(features, "logits", None)
    if h is None or logits is None:
        raise TypeError(f"features= must be the output of extract_features (with .h, .logits and "
                        f".indices), got {type(features).__name__}; {how}.")
    h, logits = np.asarray(h), np.asarray(logits)
    idx = getattr(features, "indices", None)
    idx = np.arange(len(h)) if idx is None else np.asarray(idx).reshape(-1)
    if h.ndim != 2 or logits.ndim != 2 or not len(h) == len(logits) == len(idx):
        raise ValueError(f"features= do not fit together: h {h.shape}, logits {logits.shape}, "
                         f"indices {idx.shape} (one row per instance); {how}.")
    values, counts = (np.unique(idx, return_counts=True)
                      if len(idx) and np.issubdtype(idx.dtype, np.integer) else (idx, None))
    if counts is not None and (counts > 1).any():
        twice = values[counts > 1]
        raise ValueError(f"features= have {len(idx) - len(values)} repeated rows (instances "
                         f"{twice[:5].tolist()} more than once): each instance is one point and "
                         f"one gallery entry; {how} (with indices listed once).")
    if len(idx) and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0
                     or idx.max() >= n_instances):
        raise ValueError(f"features= come from another dataset: they have {len(idx)} rows for "
                         f"instances {int(idx.min())}..{int(idx.max())}, but the dataset has "
                         f"{n_instances} instances (0..{n_instances - 1}); {how}.")
    if adapter is not None and logits.shape[1] != adapter.n_classes:
        raise ValueError(f"features= have {logits.shape[1]} logits per instance but the model has "
                         f"{adapter.n_classes} classes: they come from another model; {how}.")


#: rows of given features compared with the model's own outputs when an Explorer opens
CHECKED_FEATURE_ROWS = 3


def check_features_rows(features, dataset: MultimodalDataset, adapter: ModelAdapter) -> None:
    """A RuntimeWarning (said in the cell that opens the Explorer) unless a few rows of given
    ``features`` (the first, middle and last) hold the model's own logits on the dataset's
    instances of those indices: features of another dataset of the same size (or of another
    model, or of weights since changed) pass every check of their shapes, and the gallery and
    the 3-D view then show another dataset's numbers. A warning, not a refusal: features
    computed from padded batches differ as much for a model that pools over its padding. A row
    whose instance cannot be run here is not compared (the extraction would have left it out);
    the tolerance allows for the batch the features were computed in."""
    logits = np.asarray(features.logits)
    idx = getattr(features, "indices", None)
    idx = np.arange(len(logits)) if idx is None else np.asarray(idx).reshape(-1)
    if not len(idx):
        return
    for r in sorted({0, len(idx) // 2, len(idx) - 1})[:CHECKED_FEATURE_ROWS]:
        try:
            got = adapter.features(adapter.collate([dataset[int(idx[r])]]))[0]
        except Exception:  # noqa: BLE001 - an instance the model cannot run has no row to check
            continue
        own = got[0].detach().double().cpu().numpy()
        given = logits[r].astype(np.float64)
        if not np.isfinite(given).all():          # a row the Explorer leaves out anyway
            continue
        scale = max(1.0, float(np.abs(own).max()))
        if own.shape == given.shape and np.allclose(given, own, rtol=1e-3, atol=1e-3 * scale,
                                                    equal_nan=True):
            continue
        diff = float(np.abs(given - own).max()) if own.shape == given.shape else float("nan")
        warn(f"features= do not hold the model's outputs on this dataset: for instance "
             f"#{int(idx[r])} they give logits {np.round(given[:4], 3).tolist()}"
             f"{' ...' if len(given) > 4 else ''} where the model gives "
             f"{np.round(own[:4], 3).tolist()}{' ...' if len(own) > 4 else ''} (largest "
             f"difference {diff:.3g}). If they come from another dataset of the same size, "
             "another model, or weights changed since, the gallery and the 3-D view show "
             "numbers that are not this dataset's: pass extract_features(adapter, dataset) of "
             "the dataset given to the Explorer (or leave features= out). (Features computed "
             "from padded batches differ too, for a model that pools over its padding.)",
             RuntimeWarning, stacklevel=_outside_stacklevel())
        return


#: the adapter's errors about the model's output as a whole (not about one instance's inputs):
#: every view would fail with them
_OUTPUT_ERRORS = ("class-count", "output-shape", "output-type", "output-dtype")


def check_output_fits(adapter: ModelAdapter, dataset: MultimodalDataset, tries: int = 3) -> None:
    """Raise the adapter's error when the model's output does not fit its class names (a
    class_names list of another length, a model that returns a dict): one forward pass of the
    first instance that the adapter takes (of the first ``tries``). Every view failed with it,
    and only the prediction path's banner said so, as the path's failure. Any other error is
    left to the views, which say it for the instance they show."""
    for i in range(min(len(dataset), tries)):
        try:
            with torch.no_grad():
                adapter.predict(adapter.prepare(dataset[i], number=i).raw)
        except AdapterError as e:
            if getattr(e, "code", None) in _OUTPUT_ERRORS:
                raise
            continue
        except Exception:  # noqa: BLE001 -- an instance's or the model's error: the views say it
            continue
        return


class Analyses:
    """What the Explorer's views ask for, memoised in the engine's cache.

    Call these inside engine jobs (they compute on the calling thread). Keys follow
    (kind, prepared.key, method, target, params), so identical requests hit the cache.
    """

    def __init__(self, engine: Engine, adapter: ModelAdapter, dataset: MultimodalDataset,
                 kernels: Kernels | None = None, sparse_model=None, features=None,
                 gallery_k: int = 4, path_params: dict | None = None,
                 method_params: dict | None = None):
        if not isinstance(adapter, ModelAdapter):
            raise TypeError(f"The Explorer needs a ModelAdapter, got {type(adapter).__name__}.")
        if len(dataset) == 0:
            raise ValueError("The dataset is empty: the Explorer needs at least one instance.")
        training = adapter.training_mode()
        if training is not None:
            raise AdapterError(training, code="training-mode")
        check_output_fits(adapter, dataset)
        self.engine = engine
        self.adapter = adapter
        self.dataset = dataset
        self.kernels = kernels or Kernels()
        if (type(self.kernels).contributions is Kernels.contributions
                or type(self.kernels).prediction_path is Kernels.prediction_path):
            # refused here, not in the banner after the first click (a to_dict() read back)
            from .kernels.prediction import check_sparse_model
            check_sparse_model(sparse_model)
        if sparse_model is not None and hasattr(sparse_model, "weight"):
            # another model's (its classes, its features) refused here, not after the first
            # click with a cause that may not be it
            from .kernels.representations import check_sparse_model_fits
            layer = adapter.decision_layer
            check_sparse_model_fits(sparse_model, adapter, getattr(layer, "in_features", None))
        self.sparse_model = sparse_model
        # int() cut 2.7 to 2, and -1 failed only in the first gallery
        self.gallery_k = positive_int(gallery_k, "gallery_k (instances per gallery row)")
        # the names checked against prediction_path's, unless the kernels' own path is another
        self.path_params = check_path_params(
            path_params, names=type(self.kernels).prediction_path is Kernels.prediction_path)
        #: {method: {parameter: value}} for the views' stage-1 and stage-2 calls (and the
        #: path's, where it follows the menus)
        self.method_params = check_method_params(method_params)
        self._given_features = features
        #: counts forget(recompute_features=True): a features() asked for under a newer count
        #: than the last one computed computes them again, not from the disk cache
        self._forgotten = 0
        self._recomputed = 0
        if features is not None:
            check_features(features, len(dataset), adapter)
            check_features_rows(features, dataset, adapter)
            engine.store(("features",), features, pin=True, freeze=False)

    def forget(self, recompute_features: bool = True) -> None:
        """Drop every result computed so far (so that an edit of the dataset in place, or new
        weights of the model, are seen by the next requests); the features given at
        construction stay (they are the user's). recompute_features: the next features() are
        computed again, not read from the disk cache (whose key cannot see every change: a
        fault since fixed, an integer attribute of the model)."""
        if recompute_features:
            with self.engine.lock:
                self._forgotten += 1        # before the cache is cleared: the next job sees it
        self.engine.clear_cache()
        if self._given_features is not None:
            self.engine.store(("features",), self._given_features, pin=True, freeze=False)

    # -- instances -----------------------------------------------------------------------------
    def check_instance(self, i: int) -> int:
        n = len(self.dataset)
        if not 0 <= int(i) < n:
            raise IndexError(f"Instance {i} is out of range: the dataset has {n} instances "
                             f"(0..{n - 1}).")
        return int(i)

    def raw(self, i: int) -> dict:
        return self.dataset[self.check_instance(i)]

    def prepared(self, i: int) -> Prepared:
        i = self.check_instance(i)
        return self.engine.memo(("prepared", i), lambda: self.adapter.prepare(self.dataset[i]))

    def logits(self, i: int) -> np.ndarray:
        """The model's logits for instance i; a ValueError when they are not finite (no class
        is predicted then, and every explanation of the instance would be NaN)."""
        z = self._logits(i)
        if not np.isfinite(z).all():
            raise ValueError(
                f"The model's output for instance {i} is not finite: logits "
                f"{np.array2string(np.asarray(z), precision=3, threshold=8)} contain NaN or "
                "infinity, so there is no predicted class and nothing to explain; check the "
                "model's forward on this instance (e.g. a division by zero or log(0))."
                + masked_logits_hint(z))
        return z

    def _logits(self, i: int) -> np.ndarray:
        """The model's logits for instance i, finite or not (one forward pass, kept)."""
        p = self.prepared(i)

        def fn():
            z = self.adapter.predict(p.raw)[0].detach()
            # a float64 model's logits stay float64: rounded to float32, two classes 1e-9 apart
            # would tie and the Explorer could predict another class than the features say
            return (z if z.dtype == torch.float64 else z.float()).cpu().numpy()
        return self.engine.memo(("logits", p.key), fn)

    def class_index(self, i: int, target: int) -> int:
        """The class a selection explains: ``target``, or the predicted class when -1."""
        logits = self.logits(i)              # also checks that the model's output is finite
        if target is not None and int(target) >= 0:
            if int(target) >= self.adapter.n_classes:
                raise IndexError(f"Class {target} is out of range: the model has "
                                 f"{self.adapter.n_classes} classes.")
            return int(target)
        return int(np.argmax(logits))

    def top_classes(self, i: int, k: int = 3) -> list[tuple[int, str]]:
        """The k classes with the largest logits for instance i, as (index, name)."""
        order = np.argsort(-self.logits(i), kind="stable")[:k]
        return [(int(c), self.adapter.class_names[int(c)]) for c in order]

    def explained(self, i: int, target: int, neuron: int) -> Target:
        """Neuron(neuron) when a neuron is selected, else the class target."""
        if neuron is not None and int(neuron) >= 0:
            self.logits(i)                   # a non-finite output: say so, not NaN maps
            return Neuron(int(neuron))
        return Class(self.class_index(i, target))

    def target_text(self, t: Target, i: int | None = None) -> str:
        """A short name for a target: "class 'red'" or "neuron h5". With the instance ``i``, it
        also says what the target is there: a class other than the predicted one names the
        prediction ("class 'circle' (not the predicted 'yes')": the explained class stays when
        the instance changes), a neuron its activation ("neuron h5 (h = 0.031 here)": a map
        is coloured to its own largest score, so a nearly silent neuron's map looks as strong
        as any)."""
        if t.kind == "neuron":
            text = f"neuron h{t.index}"
            if i is not None:
                text += f" (h = {self.activation(i, t.index) + 0.0:.3g} here)"   # no "-0"
            return text
        names = self.adapter.class_names
        text = f"class {quoted(names[t.index])}"
        if i is not None:
            predicted = self.class_index(i, -1)
            if predicted != t.index:
                text += f" (not the predicted {quoted(names[predicted])})"
        return text

    def activations(self, i: int) -> np.ndarray:
        """h(x_i) [d]: the decision-level activations at instance i (float64, memoised)."""
        p = self.prepared(i)
        return self.engine.memo(("activations", p.key), lambda: self.adapter.features(p.raw)[1][0]
                                .detach().double().cpu().numpy())

    def activation(self, i: int, neuron: int) -> float:
        """h_neuron(x_i): the decision-level neuron's activation at instance i."""
        h = self.activations(i)
        if not 0 <= int(neuron) < h.shape[0]:
            raise IndexError(f"Neuron {neuron} is out of range: the decision layer has "
                             f"{h.shape[0]} neurons (0..{h.shape[0] - 1}).")
        return float(h[int(neuron)])

    def sparse_note_key(self) -> bool:
        """What a cached result holding ``sparse_model_note`` depends on besides its instance:
        whether the dataset's features are computed (the note is the dataset's agreement then,
        else the instance's answer). A view puts it in its key, and asks again when the
        features come (a caption cached before them kept the instance's note, which says
        nothing where the two happen to agree there)."""
        return self.sparse_model is not None and self.engine.has(("features",))

    def sparse_model_note(self, i: int) -> str:
        """What to say when the sparse linear model (the path's and the bars' weights) does
        not stand for the model: empty when it does. Once the dataset's features are computed,
        its agreement with the model over them against its fidelity when it was fit (far
        lower: the model changed since, say trained, and "recompute" keeps the sparse model);
        else, at instance i, its answer where the model's differs."""
        sm = self.sparse_model
        if sm is None or not all(callable(getattr(sm, f, None)) for f in ("predict", "fidelity")):
            return ""
        names = self.adapter.class_names
        feats = self.engine.cached(("features",))
        # fit to the labels (fit_to="labels"), its fidelity is its accuracy: no measure of
        # how well it stood for the model, so nothing to compare with
        if (feats is not None and len(getattr(feats, "h", ()))
                and getattr(sm, "fit_to", "predictions") == "predictions"):
            # once per features and sparse model (a dataset-wide product: 1 s at 50k x 1024)
            agree = self.engine.memo(("sparse agreement", id(feats), id(sm)),
                                     lambda: sm.fidelity(feats.h, feats.logits))
            fit = getattr(sm, "test_fidelity", None)
            fit = getattr(sm, "val_fidelity", float("nan")) if fit is None else fit
            if np.isfinite(fit) and agree < fit - SPARSE_MODEL_DRIFT:
                return (f"the sparse linear model agrees with the model on {agree:.1%} of the "
                        f"dataset, against {fit:.1%} when it was fit: the model changed since "
                        f"(new weights?), so its weights explain another model; fit it again "
                        f"(kernels.prediction.fit_sparse_model_for) and pass it to the Explorer")
            return ""
        h = self.activations(i)
        ours, theirs = int(np.argmax(self.logits(i))), int(sm.predict(h[None])[0])
        if ours == theirs:
            return ""
        return (f"here the sparse linear model answers {quoted(str(names[theirs]))} where the "
                f"model answers {quoted(str(names[ours]))}")

    def label(self, i: int):
        labels = self.dataset.labels
        return None if labels is None else int(labels[int(i)])

    # -- stage 1 and 2 -------------------------------------------------------------------------
    def attribution(self, i: int, target: Target, method: str, progress=None):
        p = self.prepared(i)
        params = self.method_params.get(method, {})      # (passed only when given: a
        return self.engine.memo(                         # Kernels of a test may not take them)
            ("attribution", p.key, method, target, params_key(params)),
            lambda: self.kernels.attribute(self.adapter, p, method, target, progress, **params))

    def interaction(self, i: int, target: Target, method: str, pair: tuple[str, str],
                    progress=None):
        p = self.prepared(i)
        params = self.method_params.get(method, {})
        return self.engine.memo(
            ("interaction", p.key, method, target, tuple(pair), params_key(params)),
            lambda: self.kernels.interaction(self.adapter, p, method, tuple(pair), target,
                                             progress, **params))

    def interaction_type_references(self) -> int:
        """How many instances the line on how the modalities combine averages over
        (``method_params["interaction_type"]["n_reference"]``, default TYPE_REFERENCES, at most
        the dataset's); 0 where no such line is wanted or says anything: one modality, one
        output, fewer than 2 references (n_reference 0 turns it off)."""
        wanted, applies = self._type_wanted()
        n = min(wanted, len(self.dataset))
        return n if applies and n >= 2 else 0

    def _type_wanted(self) -> tuple[int, bool]:
        """(n_reference asked for, whether an interaction type says anything of this model:
        two modalities or more, two outputs or more)."""
        a = self.adapter
        wanted = self.method_params.get("interaction_type", {}).get("n_reference",
                                                                     TYPE_REFERENCES)
        return int(wanted), len(a.names) >= 2 and a.n_classes >= 2

    def interaction_type(self, i: int, progress=None) -> dict | None:
        """How the modalities combine at instance i (``Kernels.interaction_type`` against
        ``interaction_type_references()`` instances of the dataset drawn with ``seed``,
        default 0, those without a finite output left out; ``method_params["interaction_type"]``
        may set its ``TYPE_PARAMS``); None where no line is wanted (see
        ``interaction_type_references``)."""
        n = self.interaction_type_references()
        if not n:
            return None
        params = dict(self.method_params.get("interaction_type", {}))
        params.pop("n_reference", None)
        seed = params.pop("seed", 0)
        key = ("interaction_type", int(i), n, seed, params_key(params))

        def fn():
            from .kernels.common import sample_indices
            drawn = sample_indices(len(self.dataset), n, seed)
            # an instance without a finite output (an input the adapter refuses, the model
            # failing on it, NaN logits) would make every average NaN, or fail: left out, and
            # why said (each reference's logits are computed once, and reused for every
            # instance's line)
            # (a pass each, which waits for the model while the dataset's features pass holds
            # it: the progress between them is where a click elsewhere stops this job, or
            # where it gives way; without it an instance left behind held the click lane for
            # 17 s during that pass)
            problems = {}
            for k, j in enumerate(drawn):
                report(progress, k, len(drawn), "checking the instances EMAP averages over")
                problems[int(j)] = self._reference_problem(int(j))
            kept = [j for j, problem in problems.items() if problem is None]
            why = dict(Counter(p for p in problems.values() if p is not None))
            if len(kept) < 2:
                raise ValueError(
                    f"Of the {n} instances drawn for EMAP's averages, {len(kept)} can be "
                    f"used, and at least 2 are needed; left out: {left_out_text(why)}. "
                    + self._references_fix(why, some_kept=bool(kept), drawn=n))
            kind = self.kernels.interaction_type(self.adapter, self.dataset, int(i), kept,
                                                 progress, seed=seed, **params)
            return {**kind, "reference_left_out": len(drawn) - len(kept),
                    "reference_left_out_why": why}
        return self.engine.memo(key, fn)

    def _references_fix(self, why: dict[str, int], some_kept: bool, drawn: int) -> str:
        """What to do when too few references could be used, by why they were left out;
        drawing others is offered only when some could be used and the dataset has more
        (a model that fails on every input fails on any draw)."""
        fixes = [text for reason, text in (
            ("input", "fix those inputs"),
            ("model", "fix what makes the model fail on them (the other views show its error "
                      "for this instance)"),
            ("output", "make the model's output finite on them")) if reason in why]
        if some_kept and len(self.dataset) > drawn:
            fixes.append("set method_params={'interaction_type': {'seed': ...}} to draw others")
        text = "; or ".join(fixes)
        return text[:1].upper() + text[1:] + "."

    def interaction_type_missing(self) -> str:
        """Why there is no line on how the modalities combine where one would say something
        (two modalities or more, two outputs or more, not turned off): the dataset has fewer
        than 2 instances to average over; "" otherwise."""
        wanted, applies = self._type_wanted()
        if not applies or not wanted or len(self.dataset) >= 2:
            return ""
        return (f"EMAP averages over instances of the dataset, and it has {len(self.dataset)}: "
                "at least 2 are needed")

    def _reference_problem(self, j: int) -> str | None:
        """Why instance j cannot be one of the interaction type's references: "input" (the
        adapter refuses its input: NaN, a shape its modalities do not take), "model" (the model
        fails on it) or "output" (its logits are not finite); None when it can."""
        try:
            self.prepared(j)
        except Cancelled:
            raise
        except Exception:  # noqa: BLE001 -- said as the reason it is left out
            return "input"
        try:
            return None if bool(np.isfinite(self._logits(j)).all()) else "output"
        except Cancelled:
            raise
        except Exception:  # noqa: BLE001 -- the model failing on it: no output to average
            return "model"

    # -- stage 3 -------------------------------------------------------------------------------
    def features(self, progress=None):
        """The decision-level features of the dataset (one pass, kept): computed under the
        job's ``shared`` progress, which a newer click does not stop (the next job would only
        start the pass again); a cancel or a recompute (the cache cleared) does."""
        progress = getattr(progress, "shared", progress)

        def fn():
            # after a recompute, not from the disk cache (see forget); a Kernels subclass's
            # features may not take it
            with self.engine.lock:
                wanted = self._forgotten
            refresh = wanted > self._recomputed and _takes(self.kernels.features, "refresh")
            feats = self.kernels.features(self.adapter, self.dataset, progress,
                                          **({"refresh": True} if refresh else {}))
            with self.engine.lock:
                self._recomputed = max(self._recomputed, wanted)
            return feats
        return self.engine.memo(("features",), fn, pin=True)

    def ranked_features(self, progress=None):
        """The rows of ``features()`` whose features and logits are finite, as a Features
        object (features given by the user may hold NaN rows, which cannot be ranked, and may
        be any object with ``h`` and ``logits``): what the extremes rank and the gallery
        shows."""
        progress = getattr(progress, "shared", progress)
        feats = self.features(progress)

        def fn():
            from .kernels.representations import Features
            rows = _finite_rows(feats)
            if rows is None and isinstance(feats, Features):
                return None           # the features themselves (not frozen: maybe the user's)
            return _feature_rows(feats, np.arange(len(feats.h)) if rows is None else rows)
        part = self.engine.memo(("ranked_features",), fn, pin=True)
        return feats if part is None else part

    def extremes(self, progress=None):
        """Every neuron's top and bottom instances among ``ranked_features()`` (as
        ``projection``, the rows whose features and logits are finite)."""
        progress = getattr(progress, "shared", progress)
        ranked = self.ranked_features(progress)
        return self.engine.memo(("extremes", self.gallery_k), lambda: self.kernels.extremes(
            self.adapter, ranked, self.gallery_k, progress), pin=True)

    def projection(self, progress=None) -> tuple[np.ndarray, np.ndarray]:
        """(rows, coords): the 3-D coordinates [M, 3] of the rows of ``features()`` whose
        features and logits are finite (their positions ``rows`` [M]); the others are left out
        (a model that gives NaN on some instances still shows the rest of the dataset)."""
        feats = self.features(progress)

        def fn():
            # the features as stored (project_3d converts them chunk by chunk): a float64 copy
            # and a copy of every row took 4.5 times their size (1.7 GB for 100,000 x 1,024)
            h = np.asarray(feats.h)
            rows = _finite_rows(feats)
            if rows is None:
                return np.arange(len(h)), np.asarray(self.kernels.projection(h))
            return rows, np.asarray(self.kernels.projection(h[rows]))
        return self.engine.memo(("projection",), fn, pin=True)

    def contributions(self, i: int, class_index: int):
        p = self.prepared(i)
        return self.engine.memo(("contributions", p.key, int(class_index), id(self.sparse_model)),
                                lambda: self.kernels.contributions(self.adapter, p,
                                                                   int(class_index),
                                                                   self.sparse_model))

    def n_neurons(self) -> int:
        """The decision layer's inputs d: a linear layer's, else those the sparse model reads
        (an ``nn.Identity`` on h with a sparse model, the README's way for an ``F.linear``
        head); an AdapterError for a layer that is not linear without a sparse model."""
        layer = self.adapter.decision_layer
        if isinstance(layer, torch.nn.Linear):
            return int(layer.in_features)
        weight = getattr(self.sparse_model, "weight", None)
        if weight is not None and np.ndim(weight) == 2:
            return int(np.shape(weight)[1])
        w, _ = self.adapter.decision_weights()       # raises, saying what to pass instead
        return int(w.shape[1])

    # -- stage 4 -------------------------------------------------------------------------------
    def path_takes(self, name: str) -> bool:
        """Whether the kernels' prediction path takes the parameter ``name`` (that of
        kernels.prediction does each of its own; one's own kernels, those it names)."""
        fn = self.kernels.prediction_path
        if type(self.kernels).prediction_path is Kernels.prediction_path:
            from .kernels.prediction import prediction_path as fn
        return _takes(fn, name)

    def path(self, i: int, class_index: int, progress=None, params: dict | None = None) -> dict:
        """The prediction path of instance i to a class, with ``params`` (default: the current
        ``path_params``; a view passes the dict it captured, so that the cache key and the
        computation read the same pairs even when a new pair comes meanwhile)."""
        params = self.path_params if params is None else params
        p = self.prepared(i)
        key = ("path", p.key, int(class_index), id(self.sparse_model), params_key(params))
        return self.engine.memo(key, lambda: self.kernels.prediction_path(
            self.adapter, p, int(class_index), self.sparse_model, progress, **params))
