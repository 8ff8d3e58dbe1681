"""The one exception type of `vil_hf.data`."""

from __future__ import annotations


class DataError(ValueError):
    """A data set cannot be used as given; the message names the file or folder and the fix."""


__all__ = ["DataError"]
