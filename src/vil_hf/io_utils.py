"""Files written whole or not at all: a temporary name in the same folder, then an atomic rename."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from PIL import Image


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_image(path: str | os.PathLike, image: Image.Image, format: str = "PNG") -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return atomic_write_bytes(path, buffer.getvalue())
