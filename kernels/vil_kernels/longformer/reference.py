"""Dense longformer attention with an explicit mask: slow, obviously correct.

Every fast path is tested against this. It states the rule of section 3 of the spec directly on
token coordinates, without chunk buffers or padding; queries only go in slabs of map rows, so that
memory stays bounded at detection sizes.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .geometry import NEIGHBOR_OFFSETS, beyond_extent_score, keys_inside, relative_bias_index


def _allowed(query_rows, query_cols, key_rows, key_cols, window: int, exact: bool, neighbor: int | None):
    """(Lq, Lk) boolean for the queries at rows x cols (row-major) and the keys at rows x cols.

    Every rule is a condition on the row offset and one on the column offset, so it is computed on
    the 1-D coordinates and broadcast once to the (query row, query col, key row, key col) grid.
    """
    query_rows, key_rows = query_rows[:, None, None, None], key_rows[None, None, :, None]
    query_cols, key_cols = query_cols[None, :, None, None], key_cols[None, None, None, :]
    if exact:
        # the (2W+1)^2 square centred on the query, clipped to the map
        allowed = ((query_rows - key_rows).abs() <= window) & ((query_cols - key_cols).abs() <= window)
    else:
        chunk_rows = key_rows // window - query_rows // window  # key chunk minus query chunk
        chunk_cols = key_cols // window - query_cols // window
        if neighbor is None:
            allowed = (chunk_rows.abs() <= 1) & (chunk_cols.abs() <= 1)
        else:
            drow, dcol = NEIGHBOR_OFFSETS[neighbor]
            own = (chunk_rows == 0) & (chunk_cols == 0)
            allowed = own | ((chunk_rows == drow) & (chunk_cols == dcol))
    return allowed.flatten(2).flatten(0, 1)


def allowed_keys(height: int, width: int, window: int, exact: bool, neighbor: int | None, device=None) -> torch.Tensor:
    """(L, L) boolean: may local query i (row-major) attend to local key j."""
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    return _allowed(rows, cols, rows, cols, window, exact, neighbor)


def _relative_bias(table, query_rows, key_rows, cols, window: int) -> torch.Tensor:
    """(H, Lq, Lk) bias of every (query, key) pair, queries and keys on full map rows."""
    span = 2 * window - 1
    # offsets of pairs that are masked anyway may fall outside the table: clamp, then mask
    delta_rows = (query_rows[:, None, None, None] - key_rows[None, None, :, None]).clamp(-span, span)
    delta_cols = (cols[None, :, None, None] - cols[None, None, None, :]).clamp(-span, span)
    index = relative_bias_index(delta_rows, delta_cols, window).flatten(2).flatten(0, 1)
    return table.t()[:, index]


def longformer_attention_reference(
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
) -> torch.Tensor:
    """Local-query part of the ViL attention. Shapes as in :func:`vil_kernels.longformer_attention`.

    With ``key_extents``, local keys at or beyond (rows, cols) of an image are masked for all of
    its queries, exactly as if the map ended there.

    Queries go one chunk row (W map rows) at a time, each against the keys of the map rows that
    could possibly be in reach: the chunk rows above and below (every rule reaches at most one
    chunk row, or W rows, away). That only bounds memory, so the reference runs at detection sizes;
    within a slab the attention is dense, with the rule applied as a mask. With gradients, each
    slab is recomputed in the backward instead of keeping its scores.
    """
    num_global = global_keys.shape[-2]
    device = local_queries.device

    def slab(
        queries, keys, values, global_keys, global_values, table, to_global_bias, extents, first_row, key_first_row
    ):
        # queries: (B, H, Lq, M) on map rows first_row...; keys, values: (B, H, Lk, M) from key_first_row
        query_rows = torch.arange(first_row, first_row + queries.shape[-2] // width, device=device)
        key_rows = torch.arange(key_first_row, key_first_row + keys.shape[-2] // width, device=device)
        cols = torch.arange(width, device=device)
        scores = queries @ keys.transpose(-1, -2)  # (B, H, Lq, Lk)
        if table is not None:
            scores = scores + _relative_bias(table, query_rows, key_rows, cols, window)
        if extents is not None:
            inside = keys_inside(key_rows[:, None], cols[None], extents).flatten(1)  # (B, Lk)
            scores = scores.masked_fill(~inside[:, None, None], beyond_extent_score(scores.dtype))
        scores = scores.masked_fill(~_allowed(query_rows, cols, key_rows, cols, window, exact, neighbor), float("-inf"))
        global_scores = queries @ global_keys.transpose(-1, -2)  # (B, H, Lq, G)
        if to_global_bias is not None:
            global_scores = global_scores + to_global_bias[None, :, None, :]
        probs = torch.cat([global_scores, scores], dim=-1).softmax(dim=-1)
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=dropout_p > 0)
        return probs[..., :num_global] @ global_values + probs[..., num_global:] @ values

    tensors = (local_queries, local_keys, local_values, global_keys, global_values)
    tensors += (relative_bias_table, local_to_global_bias)
    recompute = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    outputs = []
    for first_row in range(0, height, window):
        last_row = min(first_row + window, height)
        key_first_row, key_last_row = max(0, first_row - window), min(height, last_row + window)
        args = (
            local_queries[:, :, first_row * width : last_row * width],
            local_keys[:, :, key_first_row * width : key_last_row * width],
            local_values[:, :, key_first_row * width : key_last_row * width],
            global_keys,
            global_values,
            relative_bias_table,
            local_to_global_bias,
            key_extents,
            first_row,
            key_first_row,
        )
        # recomputation replays the dropout draw (checkpoint restores the RNG state)
        outputs.append(checkpoint(slab, *args, use_reentrant=False) if recompute else slab(*args))
    return torch.cat(outputs, dim=2)
