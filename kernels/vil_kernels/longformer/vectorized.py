"""Chunked longformer attention by gathering, vectorised over chunks and key slots.

Queries are cut into W x W chunks; each chunk's keys (the 9, or 2 under random shifting,
surrounding chunks) are gathered with one index into the zero-padded key map, so there is no
Python loop over positions, chunks or neighbours. Memory is linear in the number of tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import beyond_extent_score, chunk_geometry, keys_inside, num_chunks


def _to_chunks(image: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, mx*W, my*W, M) -> (B, H, mx*my, W*W, M)."""
    b, h, rows, cols, m = image.shape
    mx, my = rows // window, cols // window
    image = image.view(b, h, mx, window, my, window, m).permute(0, 1, 2, 4, 3, 5, 6)
    return image.reshape(b, h, mx * my, window * window, m)


def _from_chunks(chunks: torch.Tensor, mx: int, my: int, window: int) -> torch.Tensor:
    """(B, H, mx*my, W*W, M) -> (B, H, mx*W, my*W, M)."""
    b, h, _, _, m = chunks.shape
    chunks = chunks.view(b, h, mx, my, window, window, m).permute(0, 1, 2, 4, 3, 5, 6)
    return chunks.reshape(b, h, mx * window, my * window, m)


def longformer_attention_vectorized(
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
    batch, heads, _, head_dim = local_queries.shape
    mx, my = num_chunks(height, width, window)
    pad_rows, pad_cols = mx * window - height, my * window - width
    key_address, valid, bias_index = chunk_geometry(height, width, window, exact, neighbor, local_queries.device)

    queries = local_queries.view(batch, heads, height, width, head_dim)
    queries = _to_chunks(F.pad(queries, (0, 0, 0, pad_cols, 0, pad_rows)), window)  # (B, H, C, W^2, M)

    def gather(local: torch.Tensor) -> torch.Tensor:
        image = local.view(batch, heads, height, width, head_dim)
        # one chunk of zeros on every side, plus the padding to whole chunks
        image = F.pad(image, (0, 0, window, window + pad_cols, window, window + pad_rows))
        flat = image.reshape(batch, heads, -1, head_dim)
        gathered = flat.index_select(2, key_address.reshape(-1))
        return gathered.view(batch, heads, *key_address.shape, head_dim)  # (B, H, C, S, M)

    keys, values = gather(local_keys), gather(local_values)
    scores = queries @ keys.transpose(-1, -2)  # (B, H, C, W^2, S)
    if relative_bias_table is not None:
        bias = relative_bias_table[bias_index].permute(2, 0, 1)  # (H, W^2, S)
        scores = scores + bias[None, :, None]
    if key_extents is not None:
        # gathered keys' map coordinates from their address in the padded map
        padded_width = (my + 2) * window
        key_rows, key_cols = key_address // padded_width - window, key_address % padded_width - window  # (C, S)
        inside = keys_inside(key_rows, key_cols, key_extents)  # (B, C, S)
        scores = scores.masked_fill(~inside[:, None, :, None], beyond_extent_score(scores.dtype))
    scores = scores.masked_fill(~valid, float("-inf"))

    num_global = global_keys.shape[-2]
    if num_global:
        global_scores = torch.einsum("bhcqm,bhgm->bhcqg", queries, global_keys)  # (B, H, C, W^2, G)
        if local_to_global_bias is not None:
            global_scores = global_scores + local_to_global_bias[None, :, None, None, :]
        scores = torch.cat([global_scores, scores], dim=-1)
    probs = scores.softmax(dim=-1)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)

    context = probs[..., num_global:] @ values  # (B, H, C, W^2, M)
    if num_global:
        context = context + torch.einsum("bhcqg,bhgm->bhcqm", probs[..., :num_global], global_values)
    context = _from_chunks(context, mx, my, window)[:, :, :height, :width]
    return context.reshape(batch, heads, height * width, head_dim)
