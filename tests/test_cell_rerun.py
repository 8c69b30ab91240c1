"""Running a notebook cell again closes the Explorer that its earlier run made.

Re-running ``ex = Explorer(...)`` cleared the cell's output and left the old Explorer open, out
of reach of any name, with its threads, its caches and its claim on a concepts file: with the
cell edited to show another split, unit concepts could never be added again ("shown for two
datasets ... close the Explorer of one"), and the advice could not be followed.
"""
from __future__ import annotations

import types

import pytest

from multiviz_widgets import explorer as explorer_module
from multiviz_widgets.explorer import Explorer, running_cell

from .explorer_support import FakeKernels, tiny_vqa


@pytest.fixture
def cell(monkeypatch):
    """Set which cell (id, execution count) the fake kernel says is running."""
    now = {"cell": None}
    monkeypatch.setattr(explorer_module, "running_cell", lambda: now["cell"])
    monkeypatch.setattr(explorer_module, "_MADE_BY_CELL", {})

    def run(cell_id, count):
        now["cell"] = (cell_id, count)
    return run


def _open(adapter, ds, path):
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, annotations=path)
    assert ex.wait(60)
    return ex


def test_running_a_cell_again_closes_its_earlier_explorer_and_frees_the_concepts_file(
        cell, tmp_path):
    path = tmp_path / "concepts.json"
    adapter, train = tiny_vqa(12)
    _, test = tiny_vqa(6)
    cell("cell-a", 1)
    first = _open(adapter, test, path)             # the test split, by mistake
    cell("cell-a", 2)
    second = _open(adapter, train, path)           # the cell edited and run again
    try:
        assert first.engine.closed and not second.engine.closed
        second.select(neuron=1, unit=("question", 1))
        assert second.wait(60)
        second.concepts_view.unit_tags.edit("add", "train word")
        assert "train word" in str(second.state()["concepts"]["unit"]), \
            second.concepts_view.message.value
    finally:
        second.close()


def test_explorers_of_one_run_and_of_other_cells_stay_open(cell, tmp_path):
    adapter, ds = tiny_vqa(6)
    cell("cell-a", 3)
    a1, a2 = _open(adapter, ds, None), _open(adapter, ds, None)   # two in one cell
    cell("cell-b", 4)
    b = _open(adapter, ds, None)
    try:
        assert not any(e.engine.closed for e in (a1, a2, b))
        a1.close()                                  # closed by hand: closing again is harmless
        cell("cell-a", 5)
        again = _open(adapter, ds, None)
        assert a2.engine.closed and not b.engine.closed and not again.engine.closed
        again.close()
    finally:
        for e in (a1, a2, b):
            e.close()


def test_outside_a_notebook_nothing_is_closed(cell, tmp_path):
    adapter, ds = tiny_vqa(6)
    first = _open(adapter, ds, None)                # running_cell() None: plain Python
    second = _open(adapter, ds, None)
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
    assert running_cell() == ("5f2c", 7)
    parent["metadata"] = {}                         # a front end that does not send it
    assert running_cell() is None
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)     # not in IPython
    assert running_cell() is None
    monkeypatch.setattr(IPython, "get_ipython", lambda: types.SimpleNamespace(kernel=None))
    assert running_cell() is None                   # a terminal IPython: no kernel
