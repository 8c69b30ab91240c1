"""Argument checks shared by every layer (modalities, datasets, kernels): plain Python, no torch."""
from __future__ import annotations

import operator

import numpy as np


def positive_int(value, what: str, minimum: int = 1) -> int:
    """value, checked to be an integer of at least ``minimum`` (``what`` names it in the error).
    Floats, strings and bools are refused rather than truncated."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer of at least {minimum}, got {value!r}.")
    return int(value)


def is_integer(value) -> bool:
    """An integer (Python's, numpy's, an integer tensor of one element: anything
    ``operator.index`` takes), not a bool, a float or a float tensor."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True
