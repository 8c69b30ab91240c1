"""Fixtures shared by several test modules."""
from .explorer_support import vqa

__all__ = ["vqa"]
