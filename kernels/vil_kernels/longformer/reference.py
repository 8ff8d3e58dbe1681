"""Dense longformer attention with an explicit mask: slow, quadratic, obviously correct.

Every fast path is tested against this. It states the rule of section 3 of the spec directly on
token coordinates, without chunks or padding.
"""

from __future__ import annotations

import torch

from .geometry import NEIGHBOR_OFFSETS, relative_bias_index


def allowed_keys(height: int, width: int, window: int, exact: bool, neighbor: int | None, device=None) -> torch.Tensor:
    """(L, L) boolean: may local query i (row-major) attend to local key j."""
    tokens = torch.arange(height * width, device=device)
    rows, cols = tokens // width, tokens % width
    if exact:
        # the (2W+1)^2 square centred on the query, clipped to the map
        return ((rows[:, None] - rows[None]).abs() <= window) & ((cols[:, None] - cols[None]).abs() <= window)
    chunk_rows = rows[None] // window - rows[:, None] // window  # key chunk minus query chunk
    chunk_cols = cols[None] // window - cols[:, None] // window
    if neighbor is None:
        return (chunk_rows.abs() <= 1) & (chunk_cols.abs() <= 1)
    drow, dcol = NEIGHBOR_OFFSETS[neighbor]
    own = (chunk_rows == 0) & (chunk_cols == 0)
    return own | ((chunk_rows == drow) & (chunk_cols == dcol))


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
) -> torch.Tensor:
    """Local-query part of the ViL attention. Shapes as in :func:`vil_kernels.longformer_attention`."""
    allowed = allowed_keys(height, width, window, exact, neighbor, local_queries.device)
    scores = local_queries @ local_keys.transpose(-1, -2)  # (B, H, L, L)
    if relative_bias_table is not None:
        tokens = torch.arange(height * width, device=local_queries.device)
        rows, cols = tokens // width, tokens % width
        span = 2 * window - 1
        # offsets of pairs that are masked anyway may fall outside the table: clamp, then mask
        delta_rows = (rows[:, None] - rows[None]).clamp(-span, span)
        delta_cols = (cols[:, None] - cols[None]).clamp(-span, span)
        bias = relative_bias_table[relative_bias_index(delta_rows, delta_cols, window)]  # (L, L, H)
        scores = scores + bias.permute(2, 0, 1)
    scores = scores.masked_fill(~allowed, float("-inf"))

    global_scores = local_queries @ global_keys.transpose(-1, -2)  # (B, H, L, G)
    if local_to_global_bias is not None:
        global_scores = global_scores + local_to_global_bias[None, :, None, :]
    probs = torch.cat([global_scores, scores], dim=-1).softmax(dim=-1)
    probs = torch.nn.functional.dropout(probs, p=dropout_p, training=dropout_p > 0)
    num_global = global_keys.shape[-2]
    return probs[..., :num_global] @ global_values + probs[..., num_global:] @ local_values
