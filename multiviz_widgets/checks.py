"""Argument checks shared by every layer (modalities, datasets, kernels): plain Python, no torch."""
from __future__ import annotations

import operator

import numpy as np


def positive_int(value, what: str, minimum: int = 1) -> int:
    """value, checked to be an integer of at least ``minimum`` (``what`` names it in the error).
    Floats, strings and bools are refused rather than truncated; integers of any kind that
    ``is_integer`` takes (numpy's, a one-element integer tensor or array) are accepted."""
    if not is_integer(value) or operator.index(value) < minimum:
        raise ValueError(f"{what} must be an integer of at least {minimum}, got {value!r}.")
    return operator.index(value)


def is_integer(value) -> bool:
    """An integer (Python's, numpy's, an integer tensor of one element: anything
    ``operator.index`` takes), not a bool, a float or a float tensor."""
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
