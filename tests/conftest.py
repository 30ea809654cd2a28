import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout: required in CI, skipped (with the reason) elsewhere."""
    if not SHARED_DATA.is_dir():
        message = f"reference data folder {SHARED_DATA} is missing (it must sit beside the checkout)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA
