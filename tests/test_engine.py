"""The engine: worker thread, stale results dropped, LRU cache, cancellation, errors, progress."""
import threading
import time

import pytest

from multiviz_widgets.engine import Engine
from multiviz_widgets.progress import Cancelled


@pytest.fixture
def engine():
    e = Engine(cache_size=3, delay=0.05)
    yield e
    e.close()


def _until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_jobs_run_off_the_calling_thread_and_apply_results(engine):
    ran_on, got = [], []
    engine.submit("a", ("k", 1), lambda p: ran_on.append(threading.current_thread()) or 41 + 1,
                  got.append)
    assert engine.wait(10)
    assert got == [42]
    assert ran_on[0] is not threading.current_thread()


def test_identical_request_is_served_from_the_cache(engine):
    calls, got = [], []
    fn = lambda p: calls.append(1) or "value"  # noqa: E731
    engine.submit("a", ("k", 1), fn, got.append)
    engine.wait(10)
    assert engine.submit("a", ("k", 1), fn, got.append) == "cached"
    assert calls == [1] and got == ["value", "value"]


def test_lru_evicts_the_least_recently_used(engine):
    for k in range(3):
        engine.store(k, k)
    engine.cached(0)                 # 0 is now the most recent
    engine.store(3, 3)
    assert engine.has(0) and not engine.has(1) and engine.has(3)
    engine.store("big", 1, pin=True)
    for k in range(10, 20):
        engine.store(k, k)
    assert engine.cached("big") == 1


def test_memo_computes_once(engine):
    calls = []
    for _ in range(3):
        assert engine.memo(("m",), lambda: calls.append(1) or 7) == 7
    assert calls == [1]


def test_latest_submit_wins_and_the_stale_job_is_cancelled(engine):
    release, started = threading.Event(), threading.Event()
    applied, stale_progress = [], []

    def slow(progress):
        started.set()
        while not release.wait(0.01):
            try:
                progress(0, 1, "waiting")
            except Cancelled:
                stale_progress.append("cancelled")
                raise
        return "old"

    engine.submit("input", ("old",), slow, applied.append)
    assert started.wait(10)
    engine.submit("input", ("new",), lambda p: "new", applied.append)
    assert engine.wait(10)
    release.set()
    assert applied == ["new"]
    assert stale_progress == ["cancelled"]


def test_stale_result_without_progress_calls_is_dropped(engine):
    release, started = threading.Event(), threading.Event()
    applied = []
    engine.submit("s", ("old",), lambda p: started.set() or release.wait(10) and "old",
                  applied.append)
    assert started.wait(10)
    engine.submit("s", ("new",), lambda p: "new", applied.append)
    release.set()
    assert engine.wait(10)
    assert applied == ["new"]
    assert engine.has(("old",))      # the result is still valid for its own key: cached


def test_slots_are_independent(engine):
    got = []
    engine.submit("a", None, lambda p: "a", got.append)
    engine.submit("b", None, lambda p: "b", got.append)
    engine.wait(10)
    assert sorted(got) == ["a", "b"]


def test_cancel_stops_the_running_job_and_reports_it(engine):
    started, errors, done = threading.Event(), [], []

    def forever(progress):
        started.set()
        while True:
            progress(1, 2, "spinning")
            time.sleep(0.005)

    engine.submit("x", ("x",), forever, done.append, errors.append)
    queued = []
    engine.submit("y", ("y",), lambda p: "y", done.append, queued.append)
    assert started.wait(10)
    engine.cancel()
    assert engine.wait(10)
    assert done == [] and any(isinstance(e, Cancelled) for e in errors)
    assert any(isinstance(e, Cancelled) for e in queued)
    assert not engine.busy and not engine.show_progress and engine.error == ""
    assert not engine.has(("x",))
    engine.submit("x", ("z",), lambda p: "after", done.append)
    engine.wait(10)
    assert done == ["after"]


def test_an_error_sets_the_banner_and_the_engine_keeps_working(engine):
    errors, got = [], []

    def boom(progress):
        raise ValueError("bad input <script>")

    engine.submit("a", ("boom",), boom, got.append, errors.append, label="attribution")
    engine.wait(10)
    assert "ValueError" in engine.error and "bad input <script>" in engine.error
    assert len(errors) == 1 and not engine.has(("boom",))
    engine.submit("a", ("ok",), lambda p: 1, got.append)
    engine.wait(10)
    assert got == [1]


def test_an_error_while_applying_is_reported_too(engine):
    def bad_view(value):
        raise KeyError("view broke")

    engine.submit("a", None, lambda p: 1, bad_view)
    engine.wait(10)
    assert "view broke" in engine.error


def test_progress_shows_only_for_longer_jobs(engine):
    release = threading.Event()

    def slow(progress):
        while not release.wait(0.01):
            progress(1, 4, "step")
        return 1

    engine.submit("a", None, slow)
    assert _until(lambda: engine.show_progress)
    assert engine.busy and engine.progress == pytest.approx(0.25) and "step" in engine.message
    release.set()
    engine.wait(10)
    assert not engine.show_progress and not engine.busy


def test_the_same_pending_request_is_not_queued_twice(engine):
    release, calls = threading.Event(), []

    def slow(progress):
        calls.append(1)
        release.wait(10)
        return 1

    j1 = engine.submit("a", ("k",), slow)
    j2 = engine.submit("a", ("k",), slow)
    assert j1 is j2
    release.set()
    engine.wait(10)
    assert calls == [1]


def test_priorities_order_the_queue(engine):
    release, order = threading.Event(), []
    engine.submit("block", None, lambda p: release.wait(10))
    engine.submit("low", None, lambda p: order.append("low"), priority=9)
    engine.submit("high", None, lambda p: order.append("high"), priority=0)
    release.set()
    engine.wait(10)
    assert order == ["high", "low"]


def test_a_background_job_does_not_hold_up_a_click(engine):
    release, started, got = threading.Event(), threading.Event(), []
    engine.submit("features", ("f",), lambda p: started.set() or release.wait(10) and "f",
                  got.append, lane="background")
    assert started.wait(10)
    engine.submit("input", ("i",), lambda p: "i", got.append)
    assert _until(lambda: got == ["i"])
    assert engine.busy                   # the background job still runs
    release.set()
    engine.wait(10)
    assert got == ["i", "f"]
    with pytest.raises(ValueError, match="lane"):
        engine.submit("x", None, lambda p: 1, lane="gpu")


def test_a_quick_job_never_shows_the_progress_bar():
    e = Engine(delay=30.0)
    seen = []
    e.observe(lambda c: seen.append(c["new"]), names="show_progress")
    try:
        e.submit("a", None, lambda p: p(1, 1, "done") or 1)
        assert e.wait(10)
        assert True not in seen and not e.show_progress
    finally:
        e.close()


def test_a_process_exits_cleanly_while_a_job_runs():
    """A worker inside a torch op at interpreter exit must not abort the process."""
    import subprocess
    import sys
    code = """
import time, torch
from multiviz_widgets.engine import Engine
e = Engine()
def job(progress):
    x = torch.randn(256, 256)
    for i in range(10_000):
        x = torch.tanh(x @ x.T / 256)
        progress(i, 10_000, "spinning")
e.submit("s", ("k",), job, lambda r: None, lambda err: None)
time.sleep(0.3)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "terminate called" not in r.stderr


def test_cancel_stops_the_click_first_and_the_background_work_only_when_alone(engine):
    click, background, errors = threading.Event(), threading.Event(), []

    def spin(started):
        def fn(progress):
            started.set()
            while True:
                progress(1, 2, "spinning")
                time.sleep(0.005)
        return fn

    engine.submit("features", ("f",), spin(background), None, errors.append, lane="background")
    assert background.wait(10)
    engine.submit("input", ("i",), spin(click), None, errors.append)
    assert click.wait(10)
    assert _until(lambda: engine.message.startswith("input"))   # the bar shows the click
    engine.cancel()
    assert len(errors) == 1                     # the click's view is told at the cancel
    assert _until(lambda: engine._running["main"] is None) and engine.busy  # features still run
    assert engine._running["background"] is not None and engine._running["main"] is None
    engine.cancel()                                               # now they are what is shown
    assert engine.wait(10) and len(errors) == 2
    assert all(isinstance(e, Cancelled) for e in errors)
    with pytest.raises(ValueError, match="lanes"):
        engine.cancel(lanes=("gpu",))


def test_no_callback_runs_after_close():
    """A job still running when the engine closes (the Explorer was closed) calls neither its
    result nor its error callback: the views it would write to are closed."""
    e = Engine(cache_size=3, delay=0.05)
    started, release, called = threading.Event(), threading.Event(), []

    def job(progress):
        started.set()
        release.wait(5)
        return 1

    e.submit("s", ("k",), job, lambda v: called.append(("done", v)),
             lambda err: called.append(("error", err)))
    assert started.wait(5)
    closer = threading.Thread(target=e.close)
    closer.start()
    time.sleep(0.05)
    e.cancel()                      # a cancel after the close does not tell the view either
    release.set()
    closer.join(5)
    time.sleep(0.1)
    assert called == []


def test_snapshot_says_what_runs_what_waits_and_what_failed(engine):
    release, started = threading.Event(), threading.Event()

    def slow(progress):
        started.set()
        while not release.wait(0.005):
            progress(0, 1, "waiting")
        return "slow"

    engine.submit("a", ("slow", 1), slow, label="slow job")
    engine.submit("b", ("queued", 2), lambda p: 2, priority=7, label="second")
    assert started.wait(10)
    snap = engine.snapshot()
    main = snap["lanes"]["main"]
    assert snap["busy"] and snap["pending"] == 2 and not snap["closed"]
    assert main["thread_alive"] and snap["lanes"]["background"]["thread_alive"]
    assert main["running"]["label"] == "slow job" and main["running"]["state"] == "running"
    assert main["running"]["key"] == "('slow', 1)" and main["running"]["current"]
    assert [j["label"] for j in main["queued"]] == ["second"]
    assert set(snap["slots"]) == {"a", "b"}
    release.set()
    assert engine.wait(10)

    def boom(progress):
        raise ValueError("no good")

    engine.submit("a", ("boom",), boom, label="boom")
    assert engine.wait(10)
    snap = engine.snapshot()
    last = snap["lanes"]["main"]["last_finished"]
    assert last["label"] == "boom" and last["state"] == "error" and last["seconds_ago"] >= 0
    assert "no good" in snap["error"] and "ValueError: no good" in snap["last_traceback"]
    assert snap["lanes"]["main"]["running"] is None and snap["slots"] == {}
    assert snap["stats"]["errors"] == 1 and not snap["busy"]
    engine.close(join_timeout=5)
    snap = engine.snapshot()
    assert snap["closed"] and not snap["lanes"]["main"]["thread_alive"]


def test_cached_results_are_read_only_so_one_caller_cannot_change_anothers(engine):
    """A cached value is handed to every later caller (and to the views): an in-place edit of
    its arrays is an error at once rather than a silent change of what the others get."""
    import numpy as np

    from multiviz_widgets.adapter import Class
    from multiviz_widgets.results import Attribution
    made = Attribution(method="gradient", target=Class(0), scores={"a": np.arange(3.0)},
                       maps={"a": np.ones((2, 2))}, labels={"a": ["x", "y", "z"]})
    got = engine.memo(("attribution", 1), lambda: made)
    again = engine.memo(("attribution", 1), lambda: pytest.fail("computed twice"))
    assert again is got
    with pytest.raises(ValueError, match="read-only"):
        got.scores["a"] /= 2
    with pytest.raises(ValueError, match="read-only"):
        got.maps["a"][0, 0] = 5.0
    np.testing.assert_array_equal(again.scores["a"], [0.0, 1.0, 2.0])
    edited = got.scores["a"].copy()            # the way to an array one may edit
    edited /= 2
    nested = engine.memo(("rows", 1), lambda: (np.zeros(2), [np.zeros(2)], {"m": np.zeros(2)}))
    assert not any(a.flags.writeable for a in (nested[0], nested[1][0], nested[2]["m"]))


def test_a_value_the_user_gives_keeps_its_arrays_writable(engine):
    import numpy as np
    mine = {"h": np.zeros((2, 3))}
    engine.store(("features",), mine, pin=True, freeze=False)
    mine["h"][0, 0] = 1.0                        # still the user's to edit
    assert engine.cached(("features",))["h"][0, 0] == 1.0


@pytest.mark.parametrize("observed", ["error", "message", "busy"])
def test_an_observer_that_raises_never_kills_a_lanes_worker(engine, observed):
    """An exception from an observer of the engine's own traits escaped the worker loop: the
    lane's thread died and every later job of the lane waited for ever."""
    def bad_observer(change):
        if change["new"]:
            raise RuntimeError("observer bug")
    engine.observe(bad_observer, names=observed)
    failures = []
    engine.submit("a", ("k", 1), lambda p: 1 / 0, lambda v: None, failures.append)
    assert engine.wait(10)
    got = []
    engine.submit("b", ("k", 2), lambda p: 42, got.append)
    assert engine.wait(10) and got == [42]
    assert all(t.is_alive() for t in engine._threads.values())
    assert not engine.busy
    if observed == "error":
        assert [type(f) for f in failures] == [ZeroDivisionError]


def test_a_slot_that_is_not_text_still_labels_its_job(engine):
    got = []
    engine.submit(7, None, lambda p: 1, got.append)      # no label: the slot names it
    assert engine.wait(10) and got == [1]
    assert all(t.is_alive() for t in engine._threads.values())


def test_an_error_whose_message_cannot_be_read_is_still_reported(engine):
    class Opaque(Exception):
        def __str__(self):
            raise ValueError("no message")
    failures = []

    def fail(p):
        raise Opaque()
    engine.submit("a", None, fail, None, failures.append, label="opaque")
    assert engine.wait(10)
    assert [type(f) for f in failures] == [Opaque]
    assert engine.error == "opaque failed: Opaque: (its message could not be read)"
    got = []
    engine.submit("b", None, lambda p: 2, got.append)
    assert engine.wait(10) and got == [2]


def test_a_request_made_after_a_clear_is_computed_anew_not_joined_to_the_old_one(engine):
    """A submit of the same key while a job from before clear_cache() ran got that job back,
    and its result (from the data before the clear) was shown."""
    gate, got = threading.Event(), []

    def old(progress):
        gate.wait(10)
        return "before the clear"
    engine.submit("s", ("k",), old, got.append)
    assert _until(lambda: engine.busy)
    engine.clear_cache()
    again = engine.submit("s", ("k",), lambda p: "after the clear", got.append)
    assert again != "cached" and again.fn is not old
    gate.set()
    assert engine.wait(10)
    assert got == ["after the clear"] and engine.cached(("k",)) == "after the clear"


def test_a_job_whose_shared_pass_a_cache_clear_stopped_tells_its_view():
    """Analyses.forget() alone (no newer job for the slot): the job's view is told, instead of
    showing 'computing' for ever."""
    engine = Engine(delay=0.01)
    heard = []

    def job(progress):
        for k in range(200):
            progress.shared(k, 200, "features")
            time.sleep(0.01)
        return "value"
    try:
        engine.submit("embedding", ("embedding",), job, lambda v: heard.append("done"),
                      lambda err: heard.append(type(err).__name__), lane="background")
        time.sleep(0.2)
        engine.clear_cache()
        assert engine.wait(10)
        assert heard == ["Cancelled"]
    finally:
        engine.close()


# -- single-flight memos: one computation per key, even asked for by two lanes at once ---------
def test_a_key_two_threads_ask_for_at_once_is_computed_once(engine):
    """The click's lane and the gallery's asked for the same attribution at once and both
    computed it (seconds of LIME or KernelSHAP twice): the second now waits for the first."""
    gate, calls, got = threading.Event(), [], []

    def slow():
        calls.append(threading.current_thread().name)
        gate.wait(10)
        return {"scores": 1}
    threads = [threading.Thread(target=lambda: got.append(engine.memo(("attr",), slow)))
               for _ in range(2)]
    threads[0].start()
    assert _until(lambda: len(calls) == 1)
    threads[1].start()
    time.sleep(0.2)                          # the second caller is waiting by now
    gate.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1 and len(got) == 2 and got[0] is got[1]
    assert engine.cached(("attr",)) is got[0]


def test_a_waiting_caller_computes_the_value_itself_when_the_first_computation_fails(engine):
    """One job's Cancelled (or error) is not the other's: the waiter computes the value."""
    started, gate, calls, got = threading.Event(), threading.Event(), [], {}

    def first():
        started.set()
        gate.wait(10)
        raise Cancelled("the first job was cancelled")

    def run(name, fn):
        try:
            got[name] = engine.memo(("attr",), fn)
        except Cancelled as e:
            got[name] = e
    owner = threading.Thread(target=run, args=("first", first))
    owner.start()
    assert started.wait(10)
    waiter = threading.Thread(target=run, args=("second", lambda: calls.append(1) or "mine"))
    waiter.start()
    time.sleep(0.2)
    assert calls == []                       # it waits for the first computation
    gate.set()
    owner.join(10)
    waiter.join(10)
    assert isinstance(got["first"], Cancelled) and got["second"] == "mine" and calls == [1]
    assert engine.memo(("attr",), lambda: "again") == "mine"


def test_a_caller_holding_the_engines_lock_computes_the_value_instead_of_waiting():
    """Waiting under the lock would deadlock: the computation needs the lock to store."""
    engine = Engine(delay=0.05)
    started, gate, got = threading.Event(), threading.Event(), []

    def slow():
        started.set()
        gate.wait(10)
        return "theirs"
    owner = threading.Thread(target=lambda: got.append(engine.memo(("k",), slow)), daemon=True)
    owner.start()
    assert started.wait(10)

    def holder():
        with engine.lock:
            gate.set()
            time.sleep(0.1)                  # the owner now waits for the lock to store
            got.append(engine.memo(("k",), lambda: "mine"))
    t = threading.Thread(target=holder, daemon=True)
    t.start()
    t.join(5)
    owner.join(5)
    assert not t.is_alive() and not owner.is_alive(), "deadlock"   # (left unclosed then)
    engine.close()
    assert sorted(got) == ["mine", "theirs"]


@pytest.mark.parametrize("how", ["cancel", "newer click"])
def test_a_job_waiting_for_anothers_computation_still_stops_when_cancelled_or_stale(engine, how):
    """A job waiting for a value another thread computes must not wait for ever: a cancel or a
    newer job of its slot stops it (while the computation it waited for goes on)."""
    started, gate, heard, got = threading.Event(), threading.Event(), [], []

    def slow():
        started.set()
        gate.wait(10)
        return "value"
    owner = threading.Thread(target=lambda: engine.memo(("attr",), slow))
    owner.start()
    assert started.wait(10)
    engine.submit("s", None, lambda p: engine.memo(("attr",), slow), got.append,
                  lambda err: heard.append(type(err).__name__))
    assert _until(lambda: engine.snapshot()["lanes"]["main"]["running"] is not None)
    time.sleep(0.1)
    try:
        if how == "cancel":
            engine.cancel()
        else:
            engine.submit("s", None, lambda p: "newer", got.append)
        assert engine.wait(2), "the waiting job did not stop"
        assert got == ([] if how == "cancel" else ["newer"])
        assert heard == (["Cancelled"] if how == "cancel" else [])
        assert owner.is_alive()              # the other computation goes on
    finally:
        gate.set()
        owner.join(10)
    assert engine.cached(("attr",)) == "value"


# -- busy ends with the last pending job, however it ends --------------------------------------
@pytest.mark.parametrize("how", ["cache hit", "drop"])
def test_the_engine_is_not_busy_once_wait_returns_after_a_queued_job_is_superseded(engine,
                                                                                   how):
    """A queued job replaced by a cache hit (or dropped) left busy True with nothing pending:
    wait() said done while the Explorer's state still said busy."""
    engine.store(("k", 2), "cached")
    got = []
    with engine.lock:                        # the worker cannot take the first job meanwhile
        engine.submit("s", ("k", 1), lambda p: "computed")
        if how == "cache hit":
            assert engine.submit("s", ("k", 2), lambda p: "x", got.append) == "cached"
        else:
            engine.drop("s")
        assert engine.wait(0) and not engine.busy and engine.pending() == 0
    assert got == (["cached"] if how == "cache hit" else [])


# -- the kernels' caveats (notices) ------------------------------------------------------------
def _warning_job(text, category=UserWarning):
    from multiviz_widgets.notices import warn

    def fn(progress):
        warn(text, category)
        return text.upper()
    return fn


def test_a_jobs_warnings_are_shown_beside_its_result_and_reach_no_stream(engine, recwarn):
    """A caveat a kernel gives on the worker is the slot's notice (not a Python warning, which
    on a worker thread reaches no cell); each of its later results replaces it."""
    got = []
    engine.submit("heatmap", ("k", 1), _warning_job("completeness missed by 3%"), got.append,
                  label="integrated gradients")
    assert engine.wait(10) and got == ["COMPLETENESS MISSED BY 3%"]
    assert engine.notices == {"heatmap": [{"category": "UserWarning", "label":
                                           "integrated gradients",
                                           "text": "completeness missed by 3%"}]}
    assert not [w for w in recwarn if "completeness" in str(w.message)]
    engine.submit("heatmap", ("k", 2), lambda p: "clean", got.append)
    assert engine.wait(10) and got[-1] == "clean"
    assert engine.notices == {}                        # the slot's new result has none


def test_a_cached_result_brings_its_warnings_back(engine):
    """The same request again comes from the cache, without running the kernel: its caveat is
    shown again (Python's registry would have said it only once)."""
    got = []
    for k in (1, 2, 1):
        engine.submit("heatmap", ("k", k), _warning_job(f"caveat {k}"), got.append)
        assert engine.wait(10)
    assert engine.stats["hits"] == 1
    assert [n["text"] for n in engine.notices["heatmap"]] == ["caveat 1"]
    engine.clear_notices()
    assert engine.notices == {}


def test_a_memos_warnings_are_told_to_every_job_that_takes_it(engine):
    """A dataset-wide value computed once (a memo) keeps its caveats: the second job that
    takes it from the cache shows them too, beside its own."""
    from multiviz_widgets.notices import warn

    def features():
        warn("2 of 12 instances could not be prepared", RuntimeWarning)
        return "features"

    def job(own):
        def fn(progress):
            value = engine.memo(("features",), features)
            warn(own)
            return value
        return fn
    engine.submit("embedding", ("e",), job("embedding caveat"), None, label="embedding")
    engine.submit("path", ("p",), job("path caveat"), None, label="path")
    assert engine.wait(10)
    texts = {slot: [n["text"] for n in shown] for slot, shown in engine.notices.items()}
    assert texts == {"embedding": ["2 of 12 instances could not be prepared", "embedding caveat"],
                     "path": ["2 of 12 instances could not be prepared", "path caveat"]}
    assert engine.notices_of(("features",))[0].category == "RuntimeWarning"


def test_a_failed_job_shows_its_warnings_beside_the_error(engine):
    from multiviz_widgets.notices import warn

    def fn(progress):
        warn("only 10 samples for 40 units")
        raise ValueError("the fit failed")
    engine.submit("heatmap", None, fn, None, label="LIME")
    assert engine.wait(10)
    assert "the fit failed" in engine.error
    assert [n["text"] for n in engine.notices["heatmap"]] == ["only 10 samples for 40 units"]


def test_warnings_outside_a_job_stay_python_warnings(engine):
    """Called from a cell (no job), the package's warnings are Python warnings as always, and
    a memo computed there keeps none."""
    from multiviz_widgets.notices import warn

    def fn():
        warn("said in a cell", RuntimeWarning)
        return 1
    with pytest.warns(RuntimeWarning, match="said in a cell"):
        assert engine.memo(("m",), fn) == 1
    assert engine.notices_of(("m",)) == ()


def test_the_collector_is_per_thread():
    """A worker's collection never takes the warnings of another thread (the person's cell)."""
    from multiviz_widgets.notices import collecting, warn
    inside, started, go = [], threading.Event(), threading.Event()

    def worker():
        with collecting() as said:
            started.set()
            go.wait(5)
            warn("from the worker")
        inside.extend(said)
    t = threading.Thread(target=worker)
    t.start()
    assert started.wait(5)
    with pytest.warns(UserWarning, match="from the cell"):
        warn("from the cell")
    go.set()
    t.join(5)
    assert [n.text for n in inside] == ["from the worker"]


def test_the_notices_banner_names_each_caveat_once_with_its_views_and_not_its_method_twice(engine):
    from multiviz_widgets.views.controls import NoticeBanner
    banner = NoticeBanner(engine)
    engine.submit("input", ("i",), _warning_job("integrated_gradients: missed by 12%"), None,
                  label="integrated gradients + second-order gradients")
    engine.submit("path", ("p",), _warning_job("lime: only 500 samples"), None,
                  label="prediction path")
    engine.submit("gallery", ("g",), _warning_job("lime: only 500 samples"), None,
                  label="LIME")
    assert engine.wait(10)
    assert banner.lines == ["integrated gradients + second-order gradients: missed by 12%",
                            "prediction path, LIME: only 500 samples"]
    assert banner.visible and len(banner.text.children) == 2
    engine.clear_notices()
    assert banner.lines == [] and not banner.visible and banner.text.children == ()


def test_a_slots_caveats_go_when_its_view_blanks_a_cancelled_or_dropped_job(engine):
    """The gallery emptied (its slot dropped) or the heatmap blanked after a cancel kept the
    caveat of what they no longer show."""
    got = []
    engine.submit("gallery", ("g", 1), _warning_job("caveat of h1"), got.append)
    assert engine.wait(10) and "gallery" in engine.notices
    engine.drop("gallery")
    assert "gallery" not in engine.notices
    engine.submit("heatmap", ("h", 0), _warning_job("caveat of #0"), got.append)
    assert engine.wait(10) and "heatmap" in engine.notices
    go, told = threading.Event(), []

    def slow(progress):
        while not go.wait(0.01):
            progress(0, 1, "slow")
        return "late"
    engine.submit("heatmap", ("h", 1), slow, got.append, told.append)
    assert _until(lambda: engine.snapshot()["lanes"]["main"]["running"] is not None)
    engine.cancel()
    go.set()
    assert engine.wait(10)
    assert told and "heatmap" not in engine.notices


def test_a_running_jobs_caveat_is_shown_at_its_next_progress_report(engine):
    """A cost warning ("about 3 h") given at a job's start was shown only when it ended."""
    from multiviz_widgets.notices import warn
    go, seen = threading.Event(), []

    def long_job(progress):
        warn("pairwise_ablation: about 3 h at the rate of its first batches")
        while not go.wait(0.01):
            progress(0, 1, "pairs")
        return "done"
    engine.submit("heatmap", ("h",), long_job, seen.append, label="pairwise ablation")
    assert _until(lambda: "heatmap" in engine.notices)
    assert not seen                                   # still running
    assert engine.notices["heatmap"][0]["text"].endswith("about 3 h at the rate of its first "
                                                         "batches")
    go.set()
    assert engine.wait(10) and seen == ["done"]
    assert len(engine.notices["heatmap"]) == 1


def test_a_caveat_given_inside_a_memo_is_shown_while_the_job_runs(engine):
    """Every view computes through memos, each collecting its own caveats: a cost warning
    inside one reached the job only when the memo returned, so never early."""
    from multiviz_widgets.notices import warn
    go, seen = threading.Event(), []

    def inner():
        warn("pairwise_ablation: about 3 h")
        while not go.wait(0.01):
            progress(0, 1, "pairs")
        return 1
    progress = None

    def job(p):
        nonlocal progress
        progress = p
        return engine.memo(("pairs",), inner)
    engine.submit("heatmap", ("h",), job, seen.append, label="pairwise ablation")
    assert _until(lambda: "heatmap" in engine.notices)
    assert not seen
    go.set()
    assert engine.wait(10) and seen == [1]
    assert [n.text for n in engine.notices_of(("pairs",))] == ["pairwise_ablation: about 3 h"]


def test_a_superseded_jobs_early_caveats_give_way_to_the_shown_results(engine):
    """A job that showed its caveats while running, then was superseded, left them on screen
    in place of those of the result still shown."""
    from multiviz_widgets.notices import warn
    engine.submit("scores", ("a",), _warning_job("caveat of the result shown"), None,
                  label="shown")
    assert engine.wait(10)
    go = threading.Event()

    def slow(progress):
        warn("caveat of a result never shown")
        while not go.wait(0.01):
            progress(0, 1, "slow")
        return "stale"
    engine.submit("scores", ("b",), slow, None, label="superseded")
    assert _until(lambda: engine.notices["scores"][0]["label"] == "superseded")
    engine.submit("scores", ("a",), _warning_job("caveat of the result shown"), None,
                  label="shown")                       # from the cache, shown at once
    go.set()
    assert engine.wait(10)
    assert [n["text"] for n in engine.notices["scores"]] == ["caveat of the result shown"]


def test_the_model_lock_lets_a_waiting_click_go_before_the_background_lanes_next_batch():
    """The dataset's features pass (the background lane) takes the model for each batch; a
    click's passes waited behind its next batch every time (1.7 s to 17 s for views that take
    0.1 s alone). A background thread now takes the lock only when no other thread waits."""
    import time

    from multiviz_widgets.adapter import ModelLock, mark_worker_thread
    lock, order = ModelLock(), []
    holding, go = threading.Event(), threading.Event()

    def background():
        mark_worker_thread(background=True)
        with lock:
            with lock:                                   # reentrant
                holding.set()
                go.wait(10)
        with lock:                                       # its next batch: after the click
            order.append("background")

    def click():
        with lock:
            order.append("click")
    b = threading.Thread(target=background)
    b.start()
    assert holding.wait(10)
    c = threading.Thread(target=click)
    c.start()
    deadline = time.monotonic() + 10
    while lock._waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    go.set()
    b.join(10)
    c.join(10)
    assert order == ["click", "background"]
    # with no one waiting, the background thread takes it at once; misuse is an error
    assert lock.acquire(blocking=False)
    lock.release()
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()
