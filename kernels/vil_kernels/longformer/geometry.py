"""Which keys a local query of the 2-D longformer may see, and which bias entry each pair uses.

Shared vocabulary of the reference and the fast paths. The map (``height`` rows x ``width``
columns) is cut into ``window`` x ``window`` chunks anchored at the top-left corner; a query in
chunk (cr, cc) sees the real tokens of chunks (cr + dr, cc + dc) for the chunk offsets below.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, wraps

import torch


def cached_tensors(maxsize: int) -> Callable:
    """``lru_cache`` for functions that build tensors from sizes, always outside inference mode.

    A tensor made under ``torch.inference_mode()`` may not be saved for backward nor changed in place outside it:
    cached from a first call there, it would break every later training step (the geometry's index tensors feed
    ``index``, whose backward keeps them) and every later forward that writes into it (the blocked workspaces).
    """

    def decorate(build: Callable) -> Callable:
        @lru_cache(maxsize=maxsize)
        @wraps(build)
        def cached(*args, **kwargs):
            with torch.inference_mode(False):
                return build(*args, **kwargs)

        return cached

    return decorate


# The eight neighbour chunks, in the original's order (row offset, column offset). Random shifting
# ("MODE > 0" in the original) draws one of them per call; `neighbor` indexes this tuple.
NEIGHBOR_OFFSETS: tuple[tuple[int, int], ...] = (
    (-1, -1),
    (-1, 0),
    (-1, 1),
    (0, -1),
    (0, 1),
    (1, -1),
    (1, 0),
    (1, 1),
)
ALL_CHUNK_OFFSETS: tuple[tuple[int, int], ...] = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1))


def relative_bias_table_size(window: int) -> int:
    """Rows of the local relative-position bias table: every (dr, dc) in [-(2W-1), 2W-1]^2."""
    return (4 * window - 1) ** 2


def relative_bias_index(delta_rows: torch.Tensor, delta_cols: torch.Tensor, window: int) -> torch.Tensor:
    """Row of the bias table for query-minus-key offsets (the original's layout)."""
    span = 2 * window - 1
    return (delta_rows + span) * (4 * window - 1) + (delta_cols + span)


def chunk_offsets(neighbor: int | None) -> tuple[tuple[int, int], ...]:
    """Chunk offsets a query sees: all nine, or its own chunk and one drawn neighbour."""
    if neighbor is None:
        return ALL_CHUNK_OFFSETS
    if not 0 <= neighbor < len(NEIGHBOR_OFFSETS):
        raise ValueError(f"neighbor must be in [0, {len(NEIGHBOR_OFFSETS)}) or None, got {neighbor}")
    return ((0, 0), NEIGHBOR_OFFSETS[neighbor])


def num_chunks(height: int, width: int, window: int) -> tuple[int, int]:
    # integer ceiling: also right for the symbolic sizes of torch.compile / torch.export
    return -(-height // window), -(-width // window)


def check_key_extents(key_extents: torch.Tensor | None, batch: int, height: int, width: int) -> None:
    """Shape and range of per-image key extents: (B, 2) integers, rows in [1, height], cols in [1, width]."""
    if key_extents is None:
        return
    if key_extents.shape != (batch, 2) or key_extents.is_floating_point() or key_extents.is_complex():
        raise ValueError(
            f"key_extents must be a ({batch}, 2) integer tensor of valid (rows, cols) per image, got "
            f"{key_extents.dtype} of shape {tuple(key_extents.shape)}."
        )
    if torch.compiler.is_compiling():
        return  # the range check reads the values (a sync and a graph break): eager only
    rows, cols = key_extents[:, 0], key_extents[:, 1]
    if bool(((rows < 1) | (rows > height) | (cols < 1) | (cols > width)).any()):
        raise ValueError(
            f"key_extents must lie in [1, {height}] x [1, {width}] (the {height}x{width} map), got "
            f"{key_extents.tolist()}."
        )


def keys_inside(key_rows: torch.Tensor, key_cols: torch.Tensor, key_extents: torch.Tensor) -> torch.Tensor:
    """(B, *shape) boolean: key at (row, col) lies inside each image's extent; key_* of any one shape."""
    extents = key_extents.to(key_rows.device).view(-1, 2, *(1,) * key_rows.ndim)
    return (key_rows[None] < extents[:, 0]) & (key_cols[None] < extents[:, 1])


def beyond_extent_score(dtype: torch.dtype) -> float:
    """Score of keys beyond an image's extent, where the window rule uses -inf.

    exp() of it is exactly 0 next to any real score, yet it is finite: a query beyond the extent
    whose window holds no key of its image (possible only without global tokens) gets finite, if
    meaningless, weights rather than NaN. A quarter of the lowest value, so that kernels that
    scale scores (by log2(e) for exp2) stay finite too.
    """
    return torch.finfo(dtype).min / 4


@cached_tensors(maxsize=64)
def _chunk_geometry(height: int, width: int, window: int, exact: bool, neighbor: int | None, device: str):
    w = window
    chunks_x, chunks_y = num_chunks(height, width, w)
    offsets = torch.tensor(chunk_offsets(neighbor))  # (S_chunks, 2)

    # chunk origin of every chunk, (C, 1)
    chunk_row = (torch.arange(chunks_x) * w).repeat_interleave(chunks_y)[:, None]
    chunk_col = (torch.arange(chunks_y) * w).repeat(chunks_x)[:, None]
    # position inside a chunk, (W^2,)
    inner_row = torch.arange(w).repeat_interleave(w)
    inner_col = torch.arange(w).repeat(w)
    # key slots: every inner position of every visible chunk, relative to the query's chunk origin, (S,)
    slot_row = (offsets[:, 0:1] * w + inner_row[None]).reshape(-1)
    slot_col = (offsets[:, 1:2] * w + inner_col[None]).reshape(-1)

    key_row = chunk_row + slot_row[None]  # (C, S)
    key_col = chunk_col + slot_col[None]
    valid = (key_row >= 0) & (key_row < height) & (key_col >= 0) & (key_col < width)  # (C, S)
    valid = valid[:, None, :]  # (C, 1, S): the same for every query of a chunk
    if exact:
        query_row = chunk_row + inner_row[None]  # (C, W^2)
        query_col = chunk_col + inner_col[None]
        near = ((query_row[:, :, None] - key_row[:, None, :]).abs() <= w) & (
            (query_col[:, :, None] - key_col[:, None, :]).abs() <= w
        )
        valid = valid & near  # (C, W^2, S)

    # Keys are read from the map zero-padded by one chunk on every side (plus the bottom/right
    # padding to whole chunks), so every slot has an address, valid or not.
    padded_width = (chunks_y + 2) * w
    key_address = (key_row + w) * padded_width + (key_col + w)  # (C, S)

    bias_index = relative_bias_index(inner_row[:, None] - slot_row[None], inner_col[:, None] - slot_col[None], w)
    return key_address.to(device), valid.to(device), bias_index.to(device)


def chunk_geometry(height: int, width: int, window: int, exact: bool, neighbor: int | None, device: torch.device):
    """Index tensors of the chunked layout, built by index arithmetic and cached per map size.

    Returns ``key_address`` (C, S) into the flattened padded key map, ``valid`` (C, 1 or W^2, S)
    and ``bias_index`` (W^2, S), where C is the number of chunks and S the key slots per chunk.
    Under torch.compile / torch.export the sizes may be symbolic: the tensors are then built in
    the traced graph, not cached.
    """
    build = _chunk_geometry.__wrapped__ if torch.compiler.is_compiling() else _chunk_geometry
    return build(height, width, window, bool(exact), neighbor, str(torch.device(device)))
