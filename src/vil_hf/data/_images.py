"""Shared image checks: which listed files exist and decode, reported with one warning."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from PIL import Image, ImageOps

from .errors import DataError

logger = logging.getLogger("vil_hf.data")

# Above this many files the decode check shows a tqdm progress bar.
PROGRESS_THRESHOLD = 500
# The skip warning names at most this many files.
_NAMED_IN_WARNING = 10


def check_image_files(
    paths: Sequence[str], *, verify: bool, what: str, progress_threshold: int = PROGRESS_THRESHOLD
) -> list[tuple[str, str]]:
    """(path, reason) for every path that is missing or (with `verify`) does not decode, in input order.

    Decoding is checked with PIL `open` + `verify`, which reads the whole file without decoding pixels.
    """
    problems: list[tuple[str, str]] = []
    iterator = paths
    if verify and len(paths) > progress_threshold:
        from tqdm.auto import tqdm

        iterator = tqdm(paths, desc=f"checking {what} images", unit="img", leave=False)
    for path in iterator:
        if not os.path.isfile(path):
            problems.append((path, "missing"))
            continue
        if verify:
            try:
                with Image.open(path) as image:
                    image.verify()
            except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                problems.append((path, f"unreadable: {type(error).__name__}: {error}"))
    return problems


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
    logger.warning("skipped %d of %d images (%s) from %s: %s", len(problems), total, kinds_text, source, named)
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
            f"cannot read image {path} ({type(error).__name__}: {error}); replace the file, or reload the data "
            "with verify_images=True and skip_corrupt_images=True to leave it out"
        ) from error
