"""Files written whole or not at all: a temporary name in the same folder, then an atomic rename.

`tempfile` creates its files 0600 and its folders 0700, which would leave every file we write
readable by its owner only; they are given the modes a plain `open`/`mkdir` would have had under the
user's umask (0666 & ~umask, 0777 & ~umask) before they are renamed into place.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
from pathlib import Path

from PIL import Image

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # elsewhere the only way to read it is to set it and put it back
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    return 0o777 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
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


def make_temporary_folder(parent: str | os.PathLike, prefix: str) -> Path:
    """A new uniquely named folder in `parent` (for writing a folder whole before renaming it into
    place), with the mode `mkdir` would give it rather than tempfile's 0700."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, folder_mode())
    return folder
