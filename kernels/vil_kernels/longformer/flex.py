"""GPU path: PyTorch FlexAttention with a block mask (the window rule) and a score_mod (the biases).

Keys are the G global tokens followed by the L local tokens in row-major order. ``mask_mod`` states
the window rule on token coordinates (as the reference does) and ``create_block_mask`` turns it into
a block-sparse pattern, so only tiles that hold some allowed pair are computed; ``score_mod`` adds the
relative-position bias and the local-to-global bias, and per-image key extents (a key beyond its
image's extent gets the lowest finite score; the block mask stays the map's, so it is built once
per map size, not per batch). Forward and backward are FlexAttention's own
fused kernels (compiled with Triton on CUDA); nothing of size (L, keys) is stored.

FlexAttention has no backward on CPU, and its compiled CPU forward takes tens of seconds to build,
so this path runs on CUDA only. Its mask and bias functions are checked against the reference on
CPU through FlexAttention's eager (uncompiled, forward-only) mode, ``compiled=False``.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .geometry import NEIGHBOR_OFFSETS, beyond_extent_score, chunk_offsets


def flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:  # torch < 2.5
        return False
    return True


@lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _mask_mod(height: int, width: int, window: int, exact: bool, neighbor: int | None, num_global: int):
    drow, dcol = NEIGHBOR_OFFSETS[neighbor] if neighbor is not None else (0, 0)

    def mask_mod(batch, head, query_index, key_index):
        key_token = key_index - num_global
        query_row, query_col = query_index // width, query_index % width
        key_row, key_col = key_token // width, key_token % width
        if exact:
            local = ((query_row - key_row).abs() <= window) & ((query_col - key_col).abs() <= window)
        else:
            chunk_rows = key_row // window - query_row // window
            chunk_cols = key_col // window - query_col // window
            if neighbor is None:
                local = (chunk_rows.abs() <= 1) & (chunk_cols.abs() <= 1)
            else:
                own = (chunk_rows == 0) & (chunk_cols == 0)
                local = own | ((chunk_rows == drow) & (chunk_cols == dcol))
        return (key_index < num_global) | local

    return mask_mod


@lru_cache(maxsize=32)
def _block_mask(height, width, window, exact, neighbor, num_global, device):
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = _mask_mod(height, width, window, exact, neighbor, num_global)
    length = height * width
    return create_block_mask(mask_mod, None, None, length, num_global + length, device=device)


def _score_mod(width, window, num_global, relative_bias_table, local_to_global_bias, key_extents=None):
    span, side = 2 * window - 1, 4 * window - 1

    def score_mod(score, batch, head, query_index, key_index):
        key_token = (key_index - num_global).clamp(min=0)
        delta_row = (query_index // width - key_token // width).clamp(-span, span)
        delta_col = (query_index % width - key_token % width).clamp(-span, span)
        is_global = key_index < num_global
        bias = torch.zeros_like(score)
        if relative_bias_table is not None:
            local = relative_bias_table[(delta_row + span) * side + delta_col + span, head].to(score.dtype)
            bias = torch.where(is_global, bias, local)
        if local_to_global_bias is not None:
            to_global = local_to_global_bias[head, key_index.clamp(max=num_global - 1)].to(score.dtype)
            bias = torch.where(is_global, to_global, bias)
        if key_extents is not None:
            inside = (key_token // width < key_extents[batch, 0]) & (key_token % width < key_extents[batch, 1])
            return torch.where(is_global | inside, score + bias, beyond_extent_score(score.dtype))
        return score + bias

    return score_mod


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
    compiled: bool = True,
) -> torch.Tensor:
    """FlexAttention path (CUDA). Shapes as in :func:`vil_kernels.longformer_attention`."""
    if not flex_available():
        raise RuntimeError(
            "The 'flex' longformer implementation needs torch >= 2.5 (torch.nn.attention.flex_attention)."
        )
    if compiled and local_queries.device.type != "cuda":
        raise ValueError(
            f"The 'flex' longformer implementation runs on CUDA tensors only, got {local_queries.device.type} "
            "tensors; use implementation='auto' or 'blocked' on CPU."
        )
    if dropout_p > 0:
        raise ValueError("The 'flex' longformer implementation has no attention dropout; use 'vectorized'.")
    chunk_offsets(neighbor)  # validates neighbor
    from torch.nn.attention.flex_attention import flex_attention

    num_global = global_keys.shape[-2]
    if local_to_global_bias is not None and num_global == 0:
        local_to_global_bias = None
    keys = torch.cat([global_keys, local_keys], dim=2)  # (B, H, G + L, M)
    values = torch.cat([global_values, local_values], dim=2)
    make_block_mask = _block_mask.__wrapped__ if torch.compiler.is_compiling() else _block_mask
    block_mask = make_block_mask(height, width, window, bool(exact), neighbor, num_global, str(local_queries.device))
    if key_extents is not None:
        key_extents = key_extents.to(local_queries.device)
    score_mod = _score_mod(width, window, num_global, relative_bias_table, local_to_global_bias, key_extents)
    attend = _compiled_flex_attention() if compiled else flex_attention
    # queries are already scaled
    return attend(local_queries, keys, values, score_mod=score_mod, block_mask=block_mask, scale=1.0)


__all__ = ["flex_available", "longformer_attention_flex"]
