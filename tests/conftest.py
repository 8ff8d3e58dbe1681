import os
from pathlib import Path

import pytest

# ../shared/fixtures beside the checkout (read in place); VIL_FIXTURES points elsewhere.
FIXTURES = Path(os.environ.get("VIL_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


def pytest_configure(config):
    # marks that transformers' common test mixins (tests/transformers_common) put on some of their tests
    for mark in ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test"):
        config.addinivalue_line("markers", f"{mark}: transformers' own mark on its common tests")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (set VIL_FIXTURES)")
    return FIXTURES
