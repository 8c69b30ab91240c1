"""Every notebook in notebooks/ runs top to bottom without an error (marker ``notebook``).

Notebooks are executed in memory with nbclient (kernel python3 of this interpreter); nothing is
written back, so the repository's notebooks stay free of outputs.
"""
from __future__ import annotations

import os
import pathlib

import pytest

pytestmark = pytest.mark.notebook

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "synthetic.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_without_errors(path, tmp_path, monkeypatch):
    import nbclient
    import nbformat

    # The kernel imports this checkout even when the package is not pip-installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    nb = nbformat.read(str(path), as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{path.name} is committed with outputs; clear them"
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=900,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the traceback on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    # The Explorer's widget was displayed (a widget view in the first code cell's outputs).
    first = next(c for c in nb.cells if c.cell_type == "code")
    mimes = {k for o in first.outputs for k in o.get("data", {})}
    assert "application/vnd.jupyter.widget-view+json" in mimes, mimes


def test_the_quickstart_interaction_cell_prints_the_same_when_run_again(tmp_path, monkeypatch):
    """A student re-running the "driving from code" cell after the concepts cell (which selects
    a neuron) got the neuron's interactions instead, under the same words."""
    import copy

    import nbclient
    import nbformat

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    nb = nbformat.read(str(REPO / "notebooks" / "quickstart.ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    opening, driving, concepts = code[0], code[1], code[2]
    assert "explorer.select(instance=0" in driving.source and "neuron=j" in concepts.source
    nb.cells = [opening, driving, concepts, copy.deepcopy(driving)]
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=900,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    def printed(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    first, again = printed(nb.cells[1]), printed(nb.cells[3])
    assert "for class" in first and again == first, (first, again)
