"""The fetch of transformers' common tests (tests/transformers_common): one download for parallel runs, an
unpack that is never seen half-done, a skip only when the package index cannot be reached, and a clear error
otherwise. The download itself is replaced by a small local sdist here; the real one runs in the common tests."""

from __future__ import annotations

import io
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
from transformers import PreTrainedConfig

from . import transformers_common
from .transformers_common import standins


def fake_sdist(directory: Path, version: str) -> Path:
    """A transformers sdist with only what the unpack looks at, plus a file outside tests/."""
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / f"transformers-{version}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in {
            "tests/test_modeling_common.py": "class ModelTesterMixin:\n    pass\n",
            "tests/test_backbone_common.py": "class BackboneTesterMixin:\n    pass\n",
            "src/transformers/__init__.py": "raise RuntimeError('not to be unpacked')\n",
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(f"transformers-{version}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIL_TRANSFORMERS_TESTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers_common, "_unreachable_reason", lambda index_url: None)
    return tmp_path / "cache"


def test_parallel_fetches_download_once_and_see_a_complete_folder(cache, monkeypatch):
    downloads = []

    def slow_download(version, into):
        downloads.append(version)
        time.sleep(0.5)  # the others arrive while this one holds the lock
        return fake_sdist(into, version)

    monkeypatch.setattr(transformers_common, "_download_sdist", slow_download)
    results, errors = [], []

    def fetch():
        try:
            results.append(transformers_common.fetch_common_tests("9.9.9"))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and downloads == ["9.9.9"]
    target = cache / "transformers-9.9.9-tests" / "transformers_tests"
    assert results == [target] * 4
    assert sorted(path.name for path in target.iterdir()) == [
        ".vil-hf-complete",
        "__init__.py",
        "test_backbone_common.py",
        "test_modeling_common.py",
    ]
    # no staging folder is left behind, and a second fetch finds the folder without downloading
    assert [path.name for path in target.parent.iterdir() if path.name.startswith(".staging")] == []
    assert transformers_common.fetch_common_tests("9.9.9") == target and downloads == ["9.9.9"]


def test_a_torn_folder_without_the_marker_is_replaced(cache, monkeypatch):
    target = cache / "transformers-9.9.9-tests" / "transformers_tests"
    target.mkdir(parents=True)
    (target / "test_modeling_common.py").write_text("half")
    monkeypatch.setattr(transformers_common, "_download_sdist", lambda version, into: fake_sdist(into, version))
    transformers_common.fetch_common_tests("9.9.9")
    assert (target / "test_modeling_common.py").read_text().startswith("class ModelTesterMixin")


def test_an_unreachable_index_skips_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("VIL_TRANSFORMERS_TESTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # the discard port: nothing listens
    with pytest.raises(pytest.skip.Exception, match=r"cannot be reached .*run wherever the package index"):
        transformers_common.fetch_common_tests("9.9.9")


def test_a_failed_download_from_a_reachable_index_is_an_error(cache, monkeypatch):
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(
            command, 1, "", "ERROR: No matching distribution found for transformers==9.9.9"
        )

    monkeypatch.setattr(transformers_common.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match=r"(?s)although .* answers.*No matching distribution"):
        transformers_common.fetch_common_tests("9.9.9")
    assert not (cache / "transformers-9.9.9-tests" / "transformers_tests").exists()


def test_config_standin_covers_every_common_config_field():
    """Our stand-in for config_common_kwargs gives a non-default value to each field of the installed
    PreTrainedConfig (transformers' own test of its table asks the same)."""
    default = PreTrainedConfig()
    fields = {name for name in vars(default) if not name.startswith("_")} - set(standins.CONFIG_FIELDS_NOT_COMMON)
    assert fields <= set(standins.config_common_kwargs)
    for name, value in standins.config_common_kwargs.items():
        if name != "dtype":
            assert getattr(default, name) != value, name
