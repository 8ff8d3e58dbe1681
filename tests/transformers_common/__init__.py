"""transformers' own common tests, run against our models and image processors.

The mixins (`tests/test_modeling_common.py`, `test_backbone_common.py`, `test_configuration_common.py`,
`test_image_processing_common.py`) ship in the transformers sdist, not in the wheel. On first use the sdist of the
*installed* transformers version is downloaded with pip, its `tests/` folder is unpacked into a cache outside the
repository and imported from there as the package ``transformers_tests``. Nothing of it is committed here.

Cache: ``$VIL_TRANSFORMERS_TESTS_CACHE``, else ``$XDG_CACHE_HOME/vil-hf``, else ``~/.cache/vil-hf``; one folder per
version, unpacked under a file lock into a temporary name and renamed, so parallel runs neither tear nor repeat it.
The tests skip (with the reason) only when the package index cannot be reached at all; any other failure of the
download is an error.

The sdist lacks a few modules that the mixins import; `standins.py` provides ours in their place.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest
from filelock import FileLock

from . import standins

PACKAGE = "transformers_tests"
# Written last into the staging folder: a folder without it is not a finished unpack.
COMPLETE_MARKER = ".vil-hf-complete"
DEFAULT_INDEX = "https://pypi.org/simple"
# Modules the mixins import that the sdist does not contain, and what stands in for them.
STANDIN_MODULES = {
    f"{PACKAGE}.exporters": standins,
    f"{PACKAGE}.exporters.test_export": standins,
    f"{PACKAGE}.generation": standins,
    f"{PACKAGE}.generation.test_utils": standins,
    f"{PACKAGE}.utils": standins,
    f"{PACKAGE}.utils.test_configuration_utils": standins,
    "fetch_hub_objects_for_ci": standins,
}


def installed_transformers_version() -> str:
    return importlib.metadata.version("transformers")


def cache_root() -> Path:
    if os.environ.get("VIL_TRANSFORMERS_TESTS_CACHE"):
        return Path(os.environ["VIL_TRANSFORMERS_TESTS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "vil-hf"


def _index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX).rstrip("/")


def _unreachable_reason(index_url: str) -> str | None:
    """Why the package index cannot be reached, or None when it answers (with any HTTP status)."""
    request = urllib.request.Request(f"{index_url}/transformers/", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=20):
            return None
    except urllib.error.HTTPError:
        return None  # the server answered; pip's own error will say what is wrong
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))


def _download_sdist(version: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    command += [f"transformers=={version}", "--dest", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(into.glob("transformers-*.tar.gz"))
    if result.returncode != 0 or len(archives) != 1:
        raise RuntimeError(
            f"`{' '.join(command)}` failed (exit {result.returncode}) although {_index_url()} answers, so "
            f"transformers' common tests cannot run (is transformers {version} a release with an sdist there?). "
            f"pip said:\n{result.stderr[-3000:]}"
        )
    return archives[0]


def _unpack_tests(archive: Path, into: Path) -> None:
    """Extracts the sdist's `tests/` folder (and nothing else) into `into`."""
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) > 2 and parts[1] == "tests" and (member.isfile() or member.isdir()):
                member.name = str(Path(*parts[2:]))
                members.append(member)
        if not any(member.name == "test_modeling_common.py" for member in members):
            raise RuntimeError(f"{archive.name} has no tests/test_modeling_common.py; its layout changed.")
        tar.extractall(into, members=members, filter="data")
    # direct_transformers_import() in test_configuration_common.py executes the package's __init__.py.
    (into / "__init__.py").touch()


def fetch_common_tests(version: str | None = None) -> Path:
    """The unpacked tests of transformers `version` (the installed one by default), fetched once."""
    version = version or installed_transformers_version()
    root = cache_root()
    target = root / f"transformers-{version}-tests" / PACKAGE
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / "unpack.lock"), timeout=900):
        if (target / COMPLETE_MARKER).is_file():  # another process finished it while we waited
            return target
        reason = _unreachable_reason(_index_url())
        if reason is not None:
            pytest.skip(
                f"transformers' common tests need the transformers {version} sdist from {_index_url()}, which "
                f"cannot be reached ({reason}); they run wherever the package index is reachable.",
                allow_module_level=True,
            )
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".staging-") as staging:
            archive = _download_sdist(version, Path(staging) / "download")
            unpacked = Path(staging) / PACKAGE
            _unpack_tests(archive, unpacked)
            (unpacked / COMPLETE_MARKER).write_text(f"{archive.name}\n")
            if target.exists():  # a torn folder from an older, unlocked layout
                shutil.rmtree(target)
            os.replace(unpacked, target)
    return target


def load_common_tests() -> ModuleType:
    """Imports the sdist's tests as the package `transformers_tests` (its mixins are its submodules)."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    package_dir = fetch_common_tests()
    for name, module in STANDIN_MODULES.items():
        sys.modules.setdefault(name, module)
    spec = importlib.util.spec_from_file_location(
        PACKAGE, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    return package


def common_test_module(name: str) -> ModuleType:
    """One module of transformers' tests folder, e.g. ``common_test_module("test_modeling_common")``."""
    load_common_tests()
    return importlib.import_module(f"{PACKAGE}.{name}")


@contextmanager
def listed_in_static_tables(tables: dict[str, dict[str, str]]):
    """Adds ``{table name: {model_type: class name}}`` to transformers' static ``*_MAPPING_NAMES`` while it runs.

    Several common tests choose inputs by looking a class name up in those tables (labels for image
    classification, which classes are base models), and `Auto*.register` does not fill them. The entries are
    removed again on exit, and the lazy Auto mappings stay untouched (they only list model types that are also
    in CONFIG_MAPPING_NAMES).
    """
    from transformers.models.auto import image_processing_auto, modeling_auto

    with ExitStack() as stack:
        for table_name, entries in tables.items():
            module = image_processing_auto if table_name.startswith("IMAGE_PROCESSOR") else modeling_auto
            stack.enter_context(mock.patch.dict(getattr(module, table_name), entries))
        yield


__all__ = [
    "cache_root",
    "common_test_module",
    "fetch_common_tests",
    "installed_transformers_version",
    "listed_in_static_tables",
    "load_common_tests",
]
