"""The layers import only downward (kernels <- engine <- views, the design's rule): a kernel never
reaches up to the engine, the doctor, the views or the Explorer; the modules under the kernels
(the adapter, the modalities, the results, ...) reach none of them. Read from the source, so an
import hidden inside a function counts too."""
import ast
import io
import pathlib

import pytest
from pyflakes.api import checkRecursive
from pyflakes.reporter import Reporter

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "multiviz_widgets"

ABOVE_KERNELS = {"engine", "explorer", "views", "doctor", "demos", "annotations", "selection"}
#: what each layer may not import: the modules of the package by their first name under it
FORBIDDEN = {
    "kernels": ABOVE_KERNELS,
    "engine": {"explorer", "views", "doctor", "demos"},
    "views": {"explorer", "demos"},
    "foundation": ABOVE_KERNELS | {"kernels"},
}
FOUNDATION = {"adapter", "atomic_file", "checks", "data", "display_text", "modalities", "notices",
              "precision", "progress", "results"}


def _layer(path: pathlib.Path) -> str | None:
    first = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    return "foundation" if first in FOUNDATION else first if first in FORBIDDEN else None


def _imported(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> set[str]:
    """The first names, under the package at ``root``, of every module ``path`` imports."""
    depth = len(path.relative_to(root).parts) - 1         # packages between it and the root
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:                                  # relative: from the package root
                parts = (node.module or "").split(".") if node.level == depth + 1 else None
                if node.level <= depth:
                    inside = path.relative_to(root).parts[:depth - node.level + 1]
                    parts = [*inside, *(node.module or "").split(".")]
                parts = [p for p in parts if p]
                if parts:
                    names.add(parts[0])
                else:                                       # from . import x (at the root)
                    names.update(a.name for a in node.names)
            elif (node.module or "").startswith("multiviz_widgets."):
                names.add(node.module.split(".")[1])
            elif node.module == "multiviz_widgets":              # from multiviz_widgets import x
                names.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("multiviz_widgets."))
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _layer(p) is not None)


def test_every_layer_has_modules():
    assert {_layer(p) for p in MODULES} == set(FORBIDDEN)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_nothing_from_a_layer_above_it(path):
    wrong = _imported(path) & FORBIDDEN[_layer(path)]
    assert not wrong, (f"{path.relative_to(PACKAGE)} ({_layer(path)}) imports "
                       f"{sorted(wrong)}, which sit above it")


def test_the_check_resolves_relative_imports_and_sees_those_inside_functions(tmp_path):
    probe = tmp_path / "kernels" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("from . import common\nfrom .unimodal import attribute\n"
                     "from .. import engine\nimport multiviz_widgets.views.controls\n"
                     "from multiviz_widgets import explorer\n"
                     "def f():\n    from ..doctor import check\n")
    assert _imported(probe, tmp_path) == {"kernels", "engine", "views", "doctor", "explorer"}
    top = tmp_path / "adapter.py"
    top.write_text("from .checks import is_integer\nfrom . import data\n")
    assert _imported(top, tmp_path) == {"checks", "data"}


def test_the_sources_have_no_unused_imports_or_undefined_names():
    """pyflakes over the package, the tests and the benchmarks: an unused import left by a
    move, or a name that no longer exists on a path the tests miss, fails here."""
    out, err = io.StringIO(), io.StringIO()
    root = PACKAGE.parent
    found = checkRecursive([str(root / d) for d in ("multiviz_widgets", "tests",
                                                       "benchmarks")], Reporter(out, err))
    assert found == 0, out.getvalue() + err.getvalue()


def _calls_warnings_warn(path: pathlib.Path) -> list[int]:
    """Lines of ``path`` that call warnings.warn (or a name imported from warnings as warn)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    direct = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              and node.module == "warnings" for a in node.names if a.name == "warn"}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr == "warn" and isinstance(f.value, ast.Name)
                and f.value.id == "warnings") or (isinstance(f, ast.Name) and f.id in direct):
            lines.append(node.lineno)
    return lines


def test_the_package_warns_through_notices_only():
    """Every caveat of the package goes through ``notices.warn``: on the Explorer's workers a
    Python warning reaches no cell, so a direct ``warnings.warn`` would be lost there."""
    found = {str(p.relative_to(PACKAGE)): _calls_warnings_warn(p)
             for p in sorted(PACKAGE.rglob("*.py")) if p.name != "notices.py"}
    assert not {k: v for k, v in found.items() if v}
    probe = "import warnings\nfrom warnings import warn as w\nwarnings.warn('a')\nw('b')\n"
    path = pathlib.Path(__file__).parent / "__probe_warns.py"
    try:
        path.write_text(probe)
        assert _calls_warnings_warn(path) == [3, 4]
    finally:
        path.unlink()
