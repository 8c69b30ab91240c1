"""Fixtures shared by several test modules."""
import os
import shutil

import pytest

from multiviz_widgets.demos import easy_vqa

from .explorer_support import vqa

__all__ = ["vqa", "weights_copy"]


@pytest.fixture(scope="session", autouse=True)
def session_feature_cache(tmp_path_factory):
    """The decision-feature cache ($MULTIVIZ_CACHE) in a folder of this test session (kernels
    and the notebooks' kernels inherit it): tests share what they cache with each other, never
    with the user's ~/.cache, nor with earlier sessions whose code wrote other entries."""
    before = os.environ.get("MULTIVIZ_CACHE")
    os.environ["MULTIVIZ_CACHE"] = str(tmp_path_factory.mktemp("feature-cache"))
    yield
    if before is None:
        os.environ.pop("MULTIVIZ_CACHE", None)
    else:
        os.environ["MULTIVIZ_CACHE"] = before


@pytest.fixture
def weights_copy(tmp_path):
    """(weights, description): copies of the shipped easy-VQA files in a temporary folder."""
    shutil.copy(easy_vqa.WEIGHTS_FILE, tmp_path / "easy_vqa.safetensors")
    shutil.copy(easy_vqa.META_FILE, tmp_path / "easy_vqa.json")
    return tmp_path / "easy_vqa.safetensors", tmp_path / "easy_vqa.json"
