"""Argument checks shared by every layer (modalities, datasets, kernels): plain Python, no torch."""
from __future__ import annotations

import operator

import numpy as np


def positive_int(value, what: str, minimum: int = 1) -> int:
    """value, checked to be an integer of at least ``minimum`` (``what`` names it in the error).
    Floats, strings and bools are refused rather than truncated; integers of any kind that
    ``is_integer`` takes (numpy's, a 0-d integer array, a one-element integer tensor) are
    accepted."""
    if not is_integer(value) or operator.index(value) < minimum:
        hint = (" (an array of one element: pass the element, a[0] or a.item())"
                if isinstance(value, np.ndarray) and value.size == 1 and value.ndim else "")
        raise ValueError(f"{what} must be an integer of at least {minimum}, got {value!r}"
                         f"{hint}.")
    return operator.index(value)


def is_integer(value) -> bool:
    """An integer (Python's, numpy's, a 0-d integer array, an integer tensor of one element:
    anything ``operator.index`` takes), not a bool, a float or a float tensor.

    A numpy array of one element but one or more dimensions (``np.array([3])``) is not one:
    numpy itself refuses to read it as an integer (``int`` and ``operator.index`` raise
    TypeError since numpy 2), so the callers that read a value this accepts with ``int`` or
    ``operator.index`` could not use it; ``np.array([3])[0]`` or ``.item()`` is the integer.
    torch reads a one-element tensor of any shape as its integer, so ``torch.tensor([3])``
    is one."""
    if type(value) is int:                # the common case, without the lookups below
        return True
    if isinstance(value, (bool, np.bool_)) or str(getattr(value, "dtype", "")) in ("bool",
                                                                                  "torch.bool"):
        return False                      # a bool tensor or array too: True is not class 1
    try:
        operator.index(value)
    except TypeError:
        return False
    return True
