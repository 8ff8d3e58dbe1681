import os
from pathlib import Path

import pytest

# ../shared/fixtures beside the checkout (read in place); VIL_FIXTURES points elsewhere.
FIXTURES = Path(os.environ.get("VIL_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (set VIL_FIXTURES)")
    return FIXTURES
