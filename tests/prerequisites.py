"""What the tests need installed, and what a missing piece does: a skip when the tests run on
their own, a failure under `make test` (which sets MVZ_FULL_TEST=1 after installing every
prerequisite, so a skip there would hide a broken install step)."""
from __future__ import annotations

import os

import pytest

FULL_TEST = os.environ.get("MVZ_FULL_TEST") == "1"


def skip_or_fail(why: str) -> None:
    """Skip the test for ``why`` (a missing prerequisite), or fail it under `make test`."""
    if FULL_TEST:
        pytest.fail(f"{why}; `make test` installs it (MVZ_FULL_TEST=1 turns this skip into a "
                    f"failure)", pytrace=False)
    pytest.skip(why)
