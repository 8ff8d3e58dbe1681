"""Progress on a terminal, plain log lines elsewhere.

A tqdm bar redraws itself in place; written to a log file each redraw is a new line (a short run
wrote 127 KB of them), so bars are shown only when stderr, where tqdm writes, is a terminal. Code
that shows a bar logs what matters at its own pace when this says no.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def interactive() -> bool:
    """True when stderr is a terminal."""
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def progress_bar(iterable=None, *, total: int | None = None, desc: str, disable: bool = False, **kwargs) -> tqdm:
    """A tqdm bar, disabled (silent, but still iterable) unless stderr is a terminal."""
    return tqdm(iterable, total=total, desc=desc, disable=disable or not interactive(), **kwargs)


__all__ = ["interactive", "progress_bar"]
