"""GPU path: PyTorch FlexAttention with a block mask (the window rule) and a score_mod (the biases).

Token order. FlexAttention skips whole (128 queries, 128 keys) tiles that the block mask marks
empty. In row-major order 128 consecutive queries lie on one or two map rows and reach keys along
the whole width of the map rows around them, so most tiles near the diagonal band are computed.
This path therefore runs in *chunk-major* order: the map is padded to whole W x W chunks and the
queries, keys and values are permuted so that each chunk's W^2 tokens are contiguous (chunk rows,
then chunk columns; row-major inside a chunk); the G global keys come first among the keys. A query
tile then spans two or three chunks and reaches only the keys of their neighbour chunks. Tiles
computed (``block_mask_tiles``) on a 200x304 map, W=7, G=1, row-major vs chunk-major (the latter
on the grid padded to 30x44 chunks): sliding chunks 21358 of 226100 (9.4%) vs 4941 of 256036
(1.9%), 4.3 times fewer; exact window 14900 vs 4941 (3.0 times); random shifting (neighbor=4)
7676 vs 2000 (3.8 times). Command: ``python -c "from vil_kernels.longformer.flex import
block_mask_tiles as t; print(t(200, 304, 7, order='row-major'), t(200, 304, 7))"`` (and with
``exact=True`` or ``neighbor=4``).

Sizes. Detection feeds maps of many sizes. FlexAttention is compiled once with dynamic shapes
(``torch.compile(flex_attention, dynamic=True)``): nothing in the compiled call depends on the map
size as a Python number, since token coordinates reach ``mask_mod`` and ``score_mod`` through
index tables (tensors) and the real map size through the per-image key extents (a tensor), so new
sizes reuse the compiled kernels. (``dynamic=False`` recompiled for every token count, and past
torch._dynamo's recompile limit a call falls back to FlexAttention's unfused eager mode. With
dynamic shapes, a batch of 1 or 0/1 global tokens still gets graphs of its own: dynamo
specializes sizes 0 and 1.) Should a backend fail to build the dynamic graph (inductor's CPU
template does, with a C++ error, in torch 2.13), the call warns once and compiles per size instead.
The numbers the mods use (window, G, bias spans, the neighbour's offset) are 0-d tensors, so one
compilation serves all eight neighbours of random shifting and no symbolic expression reaches the
kernel. The chunk grid is bucketed (``bucket_chunks``: exact up to 16 chunks, then rounded up to 4
significant bits, at most 1/8 more per side), and the block mask and index tables are cached per
bucket, so maps of similar size share them. Padding keys are masked as keys beyond the image's extent; padding queries' outputs are
dropped.

The block mask is built from the chunk structure (``chunk_major_block_mask``), without the dense
(L, G + L) mask that ``create_block_mask`` would evaluate. ``score_mod`` adds the relative-position
bias and the local-to-global bias and gives keys beyond an image's extent the lowest finite score.
Forward and backward are FlexAttention's own fused kernels (Triton on CUDA); nothing of size
(L, keys) is stored.

FlexAttention has no backward on CPU, and its compiled CPU forward takes tens of seconds to build,
so this path runs on CUDA only. Its mask, bias, token order and compile count are checked on CPU
through FlexAttention's eager mode (``compiled=False``) or a non-inductor torch.compile backend
(``compiled="eager"`` or a backend callable).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache

import torch

from .geometry import (
    ALL_CHUNK_OFFSETS,
    NEIGHBOR_OFFSETS,
    beyond_extent_score,
    cached_tensors,
    chunk_offsets,
    num_chunks,
)

logger = logging.getLogger(__name__)

TILE = 128  # FlexAttention's block size (queries and keys per tile)


def flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:  # torch < 2.5
        return False
    return True


@lru_cache(maxsize=4)
def _compiled_flex_attention(backend="inductor"):
    from torch.fx.experimental import _config as shape_config
    from torch.nn.attention.flex_attention import flex_attention

    compiled = {"dynamic": torch.compile(flex_attention, dynamic=True, backend=backend)}

    def attend(*args, **kwargs):
        if "static" in compiled:
            return compiled["static"](*args, **kwargs)
        try:
            # No duck sizing: it gives equal sizes one symbol, and the head count is static in
            # FlexAttention's graph, so a map whose tile count equalled it was compiled for it alone.
            with shape_config.patch(use_duck_shape=False):
                return compiled["dynamic"](*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - a compile failure; an input error recurs below
            # (inductor's CPU template fails to build these mods with dynamic shapes in torch 2.13.)
            # Compiling per size beats no attention; the compile-count tests then fail, visibly.
            logger.warning("FlexAttention with dynamic shapes failed to compile (%s); compiling per map size", error)
            compiled["static"] = torch.compile(flex_attention, dynamic=False, backend=backend)
            return compiled["static"](*args, **kwargs)

    return attend


def bucket_chunks(count: int) -> int:
    """Chunk count rounded up to at most 4 significant bits: exact up to 16, then at most 1/8 more."""
    extra_bits = max(count.bit_length() - 4, 0)
    step = 1 << extra_bits
    return -(-count // step) * step


@cached_tensors(maxsize=64)
def _scalars(values: tuple[int, ...], device: str) -> tuple[torch.Tensor, ...]:
    """0-d int32 tensors for the numbers that mask_mod and score_mod use, one distinct tensor each.

    Not Python ints: with dynamic shapes torch.compile makes a mod's closure ints symbolic, and
    expressions of them (-span) reach the kernel templates, which inductor's CPU template rejects;
    as tensors they are plain inputs, whatever the window, G or neighbour. Distinct tensors, even
    for equal values: torch.compile guards on which inputs alias.
    """
    return tuple(torch.tensor(value, dtype=torch.int32, device=device) for value in values)


@cached_tensors(maxsize=32)
def _chunk_major_coordinates(chunk_rows: int, chunk_cols: int, window: int, device: str):
    """(row, col) on the padded map of every token in chunk-major order, two (L_padded,) int32 tensors."""
    chunk = torch.arange(chunk_rows * chunk_cols).repeat_interleave(window * window)
    inner = torch.arange(window * window).repeat(chunk_rows * chunk_cols)
    rows = chunk // chunk_cols * window + inner // window
    cols = chunk % chunk_cols * window + inner % window
    return rows.to(device, torch.int32), cols.to(device, torch.int32)


def _allowed(query_rows, query_cols, key_rows, key_cols, window: int, exact: bool, neighbor_offset):
    """The window rule on map coordinates (the reference's rule, any broadcastable shapes).

    ``neighbor_offset``: None (all nine chunks) or the (row, col) chunk offset of random shifting,
    as ints or 0-d tensors.
    """
    if exact:
        return ((query_rows - key_rows).abs() <= window) & ((query_cols - key_cols).abs() <= window)
    chunk_rows = key_rows // window - query_rows // window
    chunk_cols = key_cols // window - query_cols // window
    if neighbor_offset is None:
        return (chunk_rows.abs() <= 1) & (chunk_cols.abs() <= 1)
    drow, dcol = neighbor_offset
    own = (chunk_rows == 0) & (chunk_cols == 0)
    return own | ((chunk_rows == drow) & (chunk_cols == dcol))


def _neighbor_offset(neighbor: int | None):
    return None if neighbor is None else NEIGHBOR_OFFSETS[neighbor]


def _mask_mod(token_rows, token_cols, window: int, exact: bool, neighbor: int | None, num_global: int):
    make = _scalars.__wrapped__ if torch.compiler.is_compiling() else _scalars
    offset = _neighbor_offset(neighbor)
    window, num_global, *offset = make((window, num_global, *(offset or ())), str(token_rows.device))
    offset = tuple(offset) or None

    def mask_mod(batch, head, query_index, key_index):
        key_token = (key_index - num_global).clamp(min=0)
        local = _allowed(
            token_rows[query_index], token_cols[query_index], token_rows[key_token], token_cols[key_token],
            window, exact, offset,
        )  # fmt: skip
        return (key_index < num_global) | local

    return mask_mod


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query tiles, key tiles) boolean -> FlexAttention's (count, key tile indices, used ones first)."""
    counts = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None].contiguous(), indices[None, None].contiguous()


def _tile_pair_counts(chunk_rows, chunk_cols, window, exact, neighbor, num_global, device, batch_tiles=32):
    """(query tiles, key tiles) count of allowed (query, key) pairs in each tile, chunk-major order.

    A query tile spans a few consecutive chunks; only the keys of their neighbour chunks can be
    allowed, so the rule is evaluated on those alone (not on every key of the map).
    """
    w2 = window * window
    length = chunk_rows * chunk_cols * w2
    kv_length = num_global + length
    query_tiles, key_tiles = -(-length // TILE), -(-kv_length // TILE)
    rows, cols = _chunk_major_coordinates(chunk_rows, chunk_cols, window, device)
    counts = torch.zeros(query_tiles, key_tiles + 1, dtype=torch.int64, device=device)  # last column: sink
    span = (TILE - 1) // w2 + 2  # chunks one query tile touches, at most
    offsets = torch.tensor(ALL_CHUNK_OFFSETS, device=device)  # (9, 2)
    for first in range(0, query_tiles, batch_tiles):
        tile = torch.arange(first, min(first + batch_tiles, query_tiles), device=device)  # (T,)
        queries = tile[:, None] * TILE + torch.arange(TILE, device=device)  # (T, TILE)
        query_valid = queries < length
        queries = queries.clamp(max=length - 1)
        query_chunks = tile[:, None] * TILE // w2 + torch.arange(span, device=device)  # (T, span)
        last_chunk = (torch.clamp((tile + 1) * TILE, max=length) - 1) // w2
        chunk_valid = query_chunks <= last_chunk[:, None]
        key_chunk_row = (query_chunks // chunk_cols)[..., None] + offsets[:, 0]  # (T, span, 9)
        key_chunk_col = (query_chunks % chunk_cols)[..., None] + offsets[:, 1]
        inside = (key_chunk_row >= 0) & (key_chunk_row < chunk_rows) & (key_chunk_col >= 0)
        inside &= (key_chunk_col < chunk_cols) & chunk_valid[..., None]
        key_chunks = torch.where(inside, key_chunk_row * chunk_cols + key_chunk_col, -1).flatten(1)
        # each candidate chunk once: sort, then drop repeats
        key_chunks = key_chunks.sort(dim=1).values
        repeat = torch.zeros_like(key_chunks, dtype=torch.bool)
        repeat[:, 1:] = key_chunks[:, 1:] == key_chunks[:, :-1]
        key_chunks = torch.where(repeat, -1, key_chunks)
        keys = key_chunks[..., None] * w2 + torch.arange(w2, device=device)  # (T, K, W^2) local tokens
        key_valid = (key_chunks >= 0)[..., None].expand_as(keys).flatten(1)
        keys = keys.flatten(1).clamp(min=0)
        allowed = _allowed(
            rows[queries][..., None], cols[queries][..., None], rows[keys][:, None], cols[keys][:, None],
            window, exact, _neighbor_offset(neighbor),
        )  # fmt: skip
        allowed &= query_valid[..., None] & key_valid[:, None]  # (T, TILE, K * W^2)
        per_key = allowed.sum(1)  # (T, K * W^2)
        key_tile = torch.where(key_valid, (keys + num_global) // TILE, key_tiles)
        counts[first : first + len(tile)].scatter_add_(1, key_tile, per_key)
        counts[first : first + len(tile), 0] += query_valid.sum(1) * num_global  # globals: key tile 0
    counts = counts[:, :key_tiles]
    query_sizes = (length - torch.arange(query_tiles, device=device) * TILE).clamp(max=TILE)
    key_sizes = (kv_length - torch.arange(key_tiles, device=device) * TILE).clamp(max=TILE)
    return counts, query_sizes, key_sizes


def chunk_major_block_mask(chunk_rows, chunk_cols, window, exact, neighbor, num_global, device="cpu"):
    """FlexAttention BlockMask of the window rule for a chunk_rows x chunk_cols grid in chunk-major order.

    Like ``create_block_mask(mask_mod, ...)`` on the same rule (a tile is full when every pair of it
    is allowed; a partial last tile never is), but built from the chunk structure.
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = str(torch.device(device))
    counts, query_sizes, key_sizes = _tile_pair_counts(
        chunk_rows, chunk_cols, window, exact, neighbor, num_global, device
    )
    full = (counts == TILE * TILE) & (query_sizes[:, None] == TILE) & (key_sizes[None] == TILE)
    partial = (counts > 0) & ~full
    rows, cols = _chunk_major_coordinates(chunk_rows, chunk_cols, window, device)
    length = chunk_rows * chunk_cols * window * window
    return BlockMask.from_kv_blocks(
        *_ordered(partial),
        *_ordered(full),
        BLOCK_SIZE=TILE,
        mask_mod=_mask_mod(rows, cols, window, exact, neighbor, num_global),
        seq_lengths=(length, num_global + length),
    )


_cached_block_mask = cached_tensors(maxsize=32)(chunk_major_block_mask)


def block_mask_tiles(height, width, window, exact=False, neighbor=None, num_global=1, order="chunk-major"):
    """(tiles computed, tiles in all): the (128, 128) tiles of (queries, keys) that FlexAttention computes.

    ``order="chunk-major"`` is this path (the bucketed, padded chunk grid). ``order="row-major"``
    counts the tiles of the same rule with tokens in row-major order on the unpadded map (as this
    path ran before), query tile by query tile against the map rows within reach.
    """
    if order == "chunk-major":
        chunk_rows, chunk_cols = num_chunks(height, width, window)
        counts, _, _ = _tile_pair_counts(
            bucket_chunks(chunk_rows), bucket_chunks(chunk_cols), window, exact, neighbor, num_global, "cpu"
        )
        return int((counts > 0).sum()), counts.numel()
    if order != "row-major":
        raise ValueError(f"order must be 'chunk-major' or 'row-major', got {order!r}")
    length = height * width
    key_tiles = -(-(num_global + length) // TILE)
    used = 0
    for first in range(0, length, TILE):
        queries = torch.arange(first, min(first + TILE, length))
        # every rule reaches at most one chunk row away
        first_row = max(0, (first // width // window - 1) * window)
        last_row = min(height, (int(queries[-1]) // width // window + 2) * window)
        keys = torch.arange(first_row * width, last_row * width)
        allowed = _allowed(
            queries[:, None] // width, queries[:, None] % width, keys // width, keys % width,
            window, exact, _neighbor_offset(neighbor),
        ).any(0)  # fmt: skip
        key_tile_used = torch.zeros(key_tiles, dtype=torch.bool)
        key_tile_used[(keys[allowed] + num_global) // TILE] = True
        key_tile_used[0] |= num_global > 0
        used += int(key_tile_used.sum())
    return used, -(-length // TILE) * key_tiles


def _score_mod(token_rows, token_cols, window, num_global, relative_bias_table, local_to_global_bias, key_extents):
    make = _scalars.__wrapped__ if torch.compiler.is_compiling() else _scalars
    span, side, num_global = make((2 * window - 1, 4 * window - 1, num_global), str(token_rows.device))

    def score_mod(score, batch, head, query_index, key_index):
        key_token = (key_index - num_global).clamp(min=0)
        query_row, query_col = token_rows[query_index], token_cols[query_index]
        key_row, key_col = token_rows[key_token], token_cols[key_token]
        is_global = key_index < num_global
        bias = torch.zeros_like(score)
        if relative_bias_table is not None:
            delta_row = torch.clamp(query_row - key_row, -span, span)
            delta_col = torch.clamp(query_col - key_col, -span, span)
            local = relative_bias_table[(delta_row + span) * side + delta_col + span, head].to(score.dtype)
            bias = torch.where(is_global, bias, local)
        if local_to_global_bias is not None:
            to_global = local_to_global_bias[head, torch.minimum(key_index, num_global - 1)].to(score.dtype)
            bias = torch.where(is_global, to_global, bias)
        # keys beyond the image's extent, the map's padding included
        inside = (key_row < key_extents[batch, 0]) & (key_col < key_extents[batch, 1])
        return torch.where(is_global | inside, score + bias, beyond_extent_score(score.dtype))

    return score_mod


def to_chunk_major(tokens: torch.Tensor, height: int, width: int, window: int, chunk_rows: int, chunk_cols: int):
    """(B, H, height * width, M) row-major -> (B, H, chunk_rows * chunk_cols * W^2, M) chunk-major, zero-padded."""
    batch, heads, _, dim = tokens.shape
    grid = tokens.reshape(batch, heads, height, width, dim)
    grid = torch.nn.functional.pad(grid, (0, 0, 0, chunk_cols * window - width, 0, chunk_rows * window - height))
    grid = grid.reshape(batch, heads, chunk_rows, window, chunk_cols, window, dim).transpose(3, 4)
    return grid.reshape(batch, heads, -1, dim)


def from_chunk_major(tokens: torch.Tensor, height: int, width: int, window: int, chunk_rows: int, chunk_cols: int):
    """Inverse of :func:`to_chunk_major`: the padding tokens are dropped."""
    batch, heads, _, dim = tokens.shape
    grid = tokens.reshape(batch, heads, chunk_rows, chunk_cols, window, window, dim).transpose(3, 4)
    grid = grid.reshape(batch, heads, chunk_rows * window, chunk_cols * window, dim)
    return grid[:, :, :height, :width].reshape(batch, heads, height * width, dim)


def longformer_attention_flex(
    local_queries: torch.Tensor,
    local_keys: torch.Tensor,
    local_values: torch.Tensor,
    global_keys: torch.Tensor,
    global_values: torch.Tensor,
    height: int,
    width: int,
    window: int,
    exact: bool = False,
    neighbor: int | None = None,
    relative_bias_table: torch.Tensor | None = None,
    local_to_global_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    key_extents: torch.Tensor | None = None,
    compiled: bool | str | Callable = True,
) -> torch.Tensor:
    """FlexAttention path (CUDA). Shapes as in :func:`vil_kernels.longformer_attention`.

    ``compiled``: True compiles FlexAttention with inductor (CUDA only); False runs its eager
    (forward-only) mode; a torch.compile backend (a name such as ``"eager"``, or a callable) compiles
    with it, which runs on CPU too: the tests count compilations that way.
    """
    if not flex_available():
        raise RuntimeError(
            "The 'flex' longformer implementation needs torch >= 2.5 (torch.nn.attention.flex_attention)."
        )
    if compiled is True and local_queries.device.type != "cuda":
        raise ValueError(
            f"The 'flex' longformer implementation runs on CUDA tensors only, got {local_queries.device.type} "
            "tensors; use implementation='auto' or 'blocked' on CPU."
        )
    if dropout_p > 0:
        raise ValueError("The 'flex' longformer implementation has no attention dropout; use 'vectorized'.")
    chunk_offsets(neighbor)  # validates neighbor
    from torch.nn.attention.flex_attention import flex_attention

    device = local_queries.device
    num_global = global_keys.shape[-2]
    if local_to_global_bias is not None and num_global == 0:
        local_to_global_bias = None
    real_rows, real_cols = num_chunks(height, width, window)
    chunk_rows, chunk_cols = bucket_chunks(real_rows), bucket_chunks(real_cols)
    tokens = height, width, window, chunk_rows, chunk_cols
    queries = to_chunk_major(local_queries, *tokens)  # (B, H, Lp, M)
    keys = torch.cat([global_keys, to_chunk_major(local_keys, *tokens)], dim=2)  # (B, H, G + Lp, M)
    values = torch.cat([global_values, to_chunk_major(local_values, *tokens)], dim=2)

    cached = not torch.compiler.is_compiling()  # under an outer torch.compile, built in the graph
    geometry = (chunk_rows, chunk_cols, window, bool(exact), neighbor, num_global, str(device))
    block_mask = (_cached_block_mask if cached else chunk_major_block_mask)(*geometry)
    coordinates = _chunk_major_coordinates if cached else _chunk_major_coordinates.__wrapped__
    token_rows, token_cols = coordinates(chunk_rows, chunk_cols, window, str(device))
    if key_extents is None:  # the padding is beyond every image's extent
        key_extents = torch.tensor([[height, width]], device=device).expand(local_queries.shape[0], 2)
    # one layout whether given or not: a different stride would be a recompilation
    key_extents = key_extents.to(device=device, dtype=torch.int32).contiguous()
    score_mod = _score_mod(
        token_rows, token_cols, window, num_global, relative_bias_table, local_to_global_bias, key_extents
    )
    if compiled is False or torch.compiler.is_compiling():  # inside an outer torch.compile: compiled by it
        attend = flex_attention
    else:
        attend = _compiled_flex_attention("inductor" if compiled is True else compiled)
    # queries are already scaled
    context = attend(queries, keys, values, score_mod=score_mod, block_mask=block_mask, scale=1.0)
    return from_chunk_major(context, *tokens)


__all__ = [
    "block_mask_tiles",
    "bucket_chunks",
    "chunk_major_block_mask",
    "flex_available",
    "from_chunk_major",
    "longformer_attention_flex",
    "to_chunk_major",
]
