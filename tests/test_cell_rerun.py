"""A notebook cell run again closes the Explorer its earlier run made, once no name holds it.

Re-running ``ex = Explorer(...)`` cleared the cell's output and left the old Explorer open, out
of reach of any name, with its threads, its caches and its claim on a concepts file: with the
cell edited to show another split, unit concepts could never be added again ("shown for two
datasets ... close the Explorer of one"), and the advice could not be followed. When the run
ends, the earlier runs' Explorers that no name holds are closed; one still named (the cell
edited to ``ex_train = ...``, ``explorers[split] = ...``), or still named because the new one
failed, stays open.
"""
from __future__ import annotations

import threading
import types

import pytest

from multiviz_widgets import explorer as explorer_module
from multiviz_widgets.explorer import Explorer, RunningCell, running_cell

from .explorer_support import FakeKernels, tiny_vqa


class _Events:
    """IPython's event manager, as far as the Explorer uses it."""

    def __init__(self):
        self.callbacks = {"post_run_cell": []}

    def register(self, event, fn):
        self.callbacks[event].append(fn)

    def unregister(self, event, fn):
        self.callbacks[event].remove(fn)

    def trigger(self, event):
        for fn in list(self.callbacks[event]):
            fn(None)


class Notebook:
    """A kernel that says which cell runs: ``run(cell_id, code)`` runs ``code(namespace)`` as
    that cell's next execution, then ends the cell (post_run_cell)."""

    def __init__(self, monkeypatch):
        self.shell = types.SimpleNamespace(user_ns={}, user_ns_hidden={"Out": {}},
                                           events=_Events())
        self.count, self.now = 0, None
        monkeypatch.setattr(explorer_module, "running_cell", lambda: self.now)
        monkeypatch.setattr(explorer_module, "_MADE_BY_CELL", {})

    def run(self, cell_id, code):
        self.count += 1
        self.now = RunningCell(cell_id, self.count, self.shell)
        try:
            code(self.shell.user_ns)
        finally:
            self.shell.events.trigger("post_run_cell")
            self.now = None


@pytest.fixture
def notebook(monkeypatch):
    nb = Notebook(monkeypatch)
    yield nb
    for value in list(nb.shell.user_ns.values()):
        if type(value) is dict:
            for e in value.values():
                if type(e) is Explorer:
                    e.close()
        elif type(value) is Explorer:
            value.close()


def _open(adapter, ds, path=None, **kw):
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, annotations=path, **kw)
    assert ex.wait(60)
    return ex


def test_a_cell_run_again_closes_its_earlier_explorer_and_frees_the_concepts_file(
        notebook, tmp_path):
    path = tmp_path / "concepts.json"
    adapter, train = tiny_vqa(12)
    _, test = tiny_vqa(6)
    notebook.run("cell-a", lambda ns: ns.update(ex=_open(adapter, test, path)))  # by mistake
    first = notebook.shell.user_ns["ex"]
    notebook.run("cell-a", lambda ns: ns.update(ex=_open(adapter, train, path)))  # edited
    second = notebook.shell.user_ns["ex"]
    assert first.engine.closed and not second.engine.closed
    second.select(neuron=1, unit=("question", 1))
    assert second.wait(60)
    second.concepts_view.unit_tags.edit("add", "train word")
    assert "train word" in str(second.state()["concepts"]["unit"]), \
        second.concepts_view.message.value


def test_an_earlier_explorer_still_named_stays_open(notebook):
    adapter, ds = tiny_vqa(6)
    notebook.run("cell-a", lambda ns: ns.update(ex=_open(adapter, ds)))
    notebook.run("cell-a", lambda ns: ns.update(ex_train=_open(adapter, ds)))   # a new name
    notebook.run("cell-b", lambda ns: ns.update(explorers={"test": _open(adapter, ds)}))
    notebook.run("cell-b", lambda ns: ns["explorers"].update(train=_open(adapter, ds)))
    ns = notebook.shell.user_ns
    assert not any(e.engine.closed for e in (ns["ex"], ns["ex_train"],
                                             *ns["explorers"].values()))
    # the output history keeps what a cell displayed: no name of the user's
    old = ns["ex"]
    ns.update(_=old, _1=old, Out={1: old})
    notebook.run("cell-a", lambda ns: ns.update(ex=_open(adapter, ds), ex_train=None))
    assert old.engine.closed and not ns["ex"].engine.closed


def test_when_the_new_explorer_fails_the_old_one_stays_open(notebook):
    adapter, ds = tiny_vqa(6)
    notebook.run("cell-a", lambda ns: ns.update(ex=_open(adapter, ds)))
    old = notebook.shell.user_ns["ex"]
    with pytest.raises(ValueError):
        notebook.run("cell-a", lambda ns: ns.update(ex=_open(adapter, ds, pair=("no", "such"))))
    assert notebook.shell.user_ns["ex"] is old and not old.engine.closed


def test_explorers_of_one_run_and_of_other_cells_stay_open(notebook):
    adapter, ds = tiny_vqa(6)
    notebook.run("cell-a", lambda ns: ns.update(a1=_open(adapter, ds), a2=_open(adapter, ds)))
    notebook.run("cell-b", lambda ns: ns.update(b=_open(adapter, ds)))
    ns = notebook.shell.user_ns
    assert not any(ns[k].engine.closed for k in ("a1", "a2", "b"))
    first = dict(ns)
    ns["a1"].close()                             # closed by hand: closing again is harmless
    notebook.run("cell-a", lambda ns: ns.update(a1=_open(adapter, ds), a2=_open(adapter, ds)))
    assert first["a2"].engine.closed and not ns["b"].engine.closed
    assert not ns["a1"].engine.closed and not ns["a2"].engine.closed


def test_outside_a_notebook_nothing_is_closed(monkeypatch):
    monkeypatch.setattr(explorer_module, "running_cell", lambda: None)
    adapter, ds = tiny_vqa(6)
    first = _open(adapter, ds)
    second = _open(adapter, ds)
    try:
        assert not first.engine.closed and not second.engine.closed
    finally:
        first.close()
        second.close()


def test_running_cell_reads_the_cell_id_that_jupyter_sends(monkeypatch):
    import IPython
    parent = {"metadata": {"cellId": "5f2c"}}
    kernel = types.SimpleNamespace(get_parent=lambda channel="shell": parent)
    shell = types.SimpleNamespace(kernel=kernel, execution_count=7)
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    assert running_cell() == RunningCell("5f2c", 7, shell)
    # a thread that a cell started may run while another cell runs: it names no cell
    seen = []
    thread = threading.Thread(target=lambda: seen.append(running_cell()))
    thread.start()
    thread.join()
    assert seen == [None]
    parent["metadata"] = {}                         # a front end that does not send it
    assert running_cell() is None
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)     # not in IPython
    assert running_cell() is None
    monkeypatch.setattr(IPython, "get_ipython", lambda: types.SimpleNamespace(kernel=None))
    assert running_cell() is None                   # a terminal IPython: no kernel


class _Lazy:
    """A namespace value that raises when looked into (Django's unconfigured settings)."""

    @property
    def __class__(self):
        raise RuntimeError("settings are not configured")

    def __getattr__(self, name):
        raise RuntimeError("settings are not configured")


def test_an_explorer_held_deeper_or_by_a_name_with_an_underscore_stays_open(notebook):
    """A Tab the Explorer was put in, an object's dict of Explorers, nested dicts and a name
    of the user's starting with "_" hold it: they stayed open only as a top-level name or an
    item of one. A value that raises when looked into is passed over, with no traceback."""
    import ipywidgets as W
    adapter, ds = tiny_vqa(6)
    app = types.SimpleNamespace(explorers={})
    notebook.shell.user_ns.update(tabs=W.Tab(), app=app, by_model={"vqa": {}}, lazy=_Lazy())

    def cell_a(ns):
        ns["ex"] = _open(adapter, ds)
        ns["tabs"].children = (*ns["tabs"].children, ns["ex"])
    notebook.run("cell-a", cell_a)
    in_tab = notebook.shell.user_ns["ex"]
    notebook.run("cell-a", cell_a)
    notebook.run("cell-b", lambda ns: ns["app"].explorers.update(train=_open(adapter, ds)))
    notebook.run("cell-b", lambda ns: ns["app"].explorers.update(test=_open(adapter, ds)))
    notebook.run("cell-c", lambda ns: ns["by_model"]["vqa"].update(train=_open(adapter, ds)))
    notebook.run("cell-c", lambda ns: ns["by_model"]["vqa"].update(test=_open(adapter, ds)))
    notebook.run("cell-d", lambda ns: ns.update(_ex_train=_open(adapter, ds)))
    notebook.run("cell-d", lambda ns: ns.update(ex_test=_open(adapter, ds)))
    ns = notebook.shell.user_ns
    held = [in_tab, *app.explorers.values(), *ns["by_model"]["vqa"].values(), ns["_ex_train"]]
    try:
        assert not any(e.engine.closed for e in held)
    finally:
        for e in [*held, *ns["tabs"].children, ns["ex_test"]]:
            e.close()
        ns["tabs"].close()           # (a Tab left open holding closed Explorers breaks the
                                     # state of every widget read after it)
