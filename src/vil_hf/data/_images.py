"""Shared image checks: which listed files exist, decode in full and have the size their annotation
says, reported with one warning; results cached by (path, file size, mtime) so a second run is instant.

Every image is decoded with PIL `load()`: `verify()` reads the file without decoding the pixel data,
so a truncated JPEG passes it and then stops training when the loader decodes it. Decoding is the
cost of the check; it runs on a thread pool (PIL releases the GIL while it decodes), one thread per
CPU core.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

from ..console import progress_bar
from ..io_utils import atomic_write_text
from .errors import DataError

logger = logging.getLogger("vil_hf.data")

# The skip warning names at most this many files.
_NAMED_IN_WARNING = 10
_CACHE_VERSION = 1
# EXIF orientations that turn the picture by 90 degrees: open_rgb's exif_transpose swaps width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


def cache_dir() -> Path:
    """Where image checks are cached: $VIL_HF_CACHE, else $XDG_CACHE_HOME/vil-hf, else ~/.cache/vil-hf."""
    if os.environ.get("VIL_HF_CACHE"):
        return Path(os.environ["VIL_HF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vil-hf"


def decoded_size(path: str) -> tuple[int, int]:
    """(width, height) of the image at `path` as `open_rgb` returns it, after decoding every pixel."""
    with Image.open(path) as image:
        image.load()
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def _check_one(path: str) -> tuple[list | None, str | None]:
    """(cache entry [file size, mtime_ns, width, height, error], problem) for one file."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None, "missing"
    except OSError as error:
        return None, f"unreadable: {type(error).__name__}: {error}"
    try:
        width, height = decoded_size(path)
        error = None
    except Exception as failure:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        width = height = 0
        error = f"unreadable: {type(failure).__name__}: {failure}"
    return [stat.st_size, stat.st_mtime_ns, width, height, error], error


class _CheckCache:
    """Decode results of the files under one folder, in one JSON file of the cache folder."""

    def __init__(self, base_dir: str, root: Path | None = None) -> None:
        digest = hashlib.sha256(os.path.abspath(base_dir).encode("utf-8")).hexdigest()[:20]
        self.path = (root or cache_dir()) / "image-checks" / f"{digest}.json"
        self.base_dir = os.path.abspath(base_dir)
        self.entries: dict[str, list] = {}
        self.changed = False
        try:
            content = json.loads(self.path.read_text())
            if content.get("version") == _CACHE_VERSION and content.get("base_dir") == self.base_dir:
                self.entries = content["entries"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # no cache yet, or an unreadable one: everything is checked again

    def lookup(self, path: str) -> list | None:
        """The cached entry when the file's size and mtime are still those it was checked with."""
        entry = self.entries.get(path)
        if entry is None:
            return None
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return entry if (entry[0], entry[1]) == (stat.st_size, stat.st_mtime_ns) else None

    def store(self, path: str, entry: list) -> None:
        self.entries[path] = entry
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        content = {"version": _CACHE_VERSION, "base_dir": self.base_dir, "entries": self.entries}
        try:
            atomic_write_text(self.path, json.dumps(content, separators=(",", ":")))
        except OSError as error:
            logger.warning("could not write the image-check cache %s (%s); the next run checks again", self.path, error)


def _num_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(32, cores))


def check_image_files(
    paths: Sequence[str],
    *,
    verify: bool,
    what: str,
    base_dir: str,
    expected_sizes: Sequence[tuple[int, int]] | None = None,
    threads: int | None = None,
    cache_root: str | os.PathLike | None = None,
) -> list[tuple[str, str]]:
    """(path, reason) for every path that is missing or (with `verify`) does not decode in full or
    (given `expected_sizes`, (width, height) per path) has another size, in input order.

    Decode results are cached per `base_dir` under `cache_root` (default `cache_dir()`), keyed by
    path, file size and mtime. `threads`: decoding threads (default one per core, at most 32).
    """
    if not verify:
        return [(path, "missing") for path in paths if not os.path.isfile(path)]
    start = time.perf_counter()
    cache = _CheckCache(base_dir, None if cache_root is None else Path(cache_root))
    entries: list[list | None] = [None] * len(paths)
    problems: dict[int, str] = {}
    to_check = []
    for index, path in enumerate(paths):
        entry = cache.lookup(path)
        if entry is None:
            to_check.append(index)
        else:
            entries[index] = entry
    threads = threads or _num_threads()
    if to_check:
        if len(to_check) > 100:
            logger.info(
                "decoding %d %s images to check them (%d from the cache of an earlier run), %d threads",
                len(to_check), what, len(paths) - len(to_check), threads,
            )  # fmt: skip
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = pool.map(_check_one, [paths[index] for index in to_check], chunksize=16)
            bar = progress_bar(results, total=len(to_check), desc=f"checking {what} images", unit="img", leave=False)
            for index, (entry, problem) in zip(to_check, bar):
                if entry is not None:
                    entries[index] = entry
                    cache.store(paths[index], entry)
                if problem is not None:
                    problems[index] = problem
        cache.save()
    for index, entry in enumerate(entries):
        if entry is None or index in problems:
            continue
        if entry[4] is not None:
            problems[index] = entry[4]
        elif expected_sizes is not None and tuple(expected_sizes[index]) != (entry[2], entry[3]):
            want = expected_sizes[index]
            problems[index] = (
                f"wrong size: the file is {entry[2]}x{entry[3]} (width x height), the annotation says {want[0]}x{want[1]}"
            )
    if to_check and len(paths) > 100:
        seconds = time.perf_counter() - start
        logger.info(
            "checked %d %s images in %.1f s (%d decoded, %.0f images/s)",
            len(paths), what, seconds, len(to_check), len(to_check) / max(seconds, 1e-9),
        )  # fmt: skip
    return [(paths[index], problems[index]) for index in sorted(problems)]


def report_skipped(
    problems: list[tuple[str, str]], total: int, *, skip: bool, source: str, base_dir: str
) -> list[tuple[str, str]]:
    """Warn once about skipped images, or raise DataError when skipping is off or nothing is left."""
    if not problems:
        return []
    kinds: dict[str, int] = {}
    for _, reason in problems:
        kind = reason.split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    kinds_text = ", ".join(f"{count} {kind}" if len(kinds) > 1 else kind for kind, count in sorted(kinds.items()))
    names = [os.path.relpath(path, base_dir) for path, _ in problems]
    named = ", ".join(names[:_NAMED_IN_WARNING]) + (", ..." if len(names) > _NAMED_IN_WARNING else "")
    if not skip:
        first_path, first_reason = problems[0]
        raise DataError(
            f"{len(problems)} of {total} images listed in {source} cannot be used ({kinds_text}): {named}. "
            f"First: {first_path} ({first_reason}). Fix or remove these files (or their entries), "
            "or pass skip_corrupt_images=True to leave them out."
        )
    if len(problems) == total:
        raise DataError(
            f"none of the {total} images listed in {source} can be used ({kinds_text}), e.g. {problems[0][0]} "
            f"({problems[0][1]}). Check that the image folder {base_dir} is the one the annotations describe."
        )
    logger.warning(
        "skipped %d of %d images (%s) from %s: %s; first: %s (%s)",
        len(problems), total, kinds_text, source, named, names[0], problems[0][1],
    )  # fmt: skip
    return [(path, reason) for path, reason in problems]


def open_rgb(path: str) -> Image.Image:
    """The image at `path` as RGB with its EXIF orientation applied (as detectron2's read_image);
    a DataError naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise DataError(
            f"image {path} does not exist (it was there when the data set was loaded); restore it"
        ) from error
    except Exception as error:
        raise DataError(
            f"cannot read image {path} ({type(error).__name__}: {error}). Loading a data set decodes every image "
            "(verify_images=True, the default), so this file changed after that or cannot be read back from the "
            "disk: replace it"
        ) from error
