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


@pytest.fixture(autouse=True, scope="session")
def _image_check_cache(tmp_path_factory):
    """Image-check caches go to a folder of the test session, not the user's ~/.cache (subprocesses inherit it)."""
    old = os.environ.get("VIL_HF_CACHE")
    os.environ["VIL_HF_CACHE"] = str(tmp_path_factory.mktemp("vil-hf-cache"))
    yield
    if old is None:
        os.environ.pop("VIL_HF_CACHE", None)
    else:
        os.environ["VIL_HF_CACHE"] = old
