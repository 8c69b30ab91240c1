"""Small helpers shared by the views: closing the widgets a view replaces, instance titles."""
from __future__ import annotations

from typing import Iterable

import ipywidgets as W


def widget_tree(roots: Iterable[W.Widget]) -> list[W.Widget]:
    """Every widget reachable from ``roots`` through their synced traits (children, layout,
    style, a figure's marks, axes and scales, ...), each once, roots included."""
    seen: dict[int, W.Widget] = {}
    stack = [w for w in roots if isinstance(w, W.Widget)]
    while stack:
        w = stack.pop()
        if id(w) in seen:
            continue
        seen[id(w)] = w
        for name in w.keys:
            try:
                value = getattr(w, name)
            except Exception:  # noqa: BLE001 - a trait that cannot be read holds no widget
                continue
            if isinstance(value, W.Widget):
                stack.append(value)
            elif isinstance(value, (list, tuple)):
                stack.extend(v for v in value if isinstance(v, W.Widget))
            elif isinstance(value, dict):
                stack.extend(v for v in value.values() if isinstance(v, W.Widget))
    return list(seen.values())


def close_widgets(roots: Iterable[W.Widget]) -> None:
    """Close ``roots`` and every widget they hold (so no comm of them stays open in the
    kernel). Only for widgets that nothing else shows: a widget shared with a view that
    stays open must not be reachable from ``roots``."""
    for w in widget_tree(roots):
        w.close()


def instance_title(index: int, description) -> str:
    """"#4 a red circle", or just "#4" when the description is empty or is "#4" itself
    (a dataset without descriptions)."""
    desc = "" if description is None else str(description)
    return f"#{index}" if desc in ("", f"#{index}") else f"#{index} {desc}"
