"""Fixtures shared by several test modules."""
import shutil

import pytest

from multiviz_widgets.demos import easy_vqa

from .explorer_support import vqa

__all__ = ["vqa", "weights_copy"]


@pytest.fixture
def weights_copy(tmp_path):
    """(weights, description): copies of the shipped easy-VQA files in a temporary folder."""
    shutil.copy(easy_vqa.WEIGHTS_FILE, tmp_path / "easy_vqa.safetensors")
    shutil.copy(easy_vqa.META_FILE, tmp_path / "easy_vqa.json")
    return tmp_path / "easy_vqa.safetensors", tmp_path / "easy_vqa.json"
