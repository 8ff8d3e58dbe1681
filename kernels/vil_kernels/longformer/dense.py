"""Longformer attention as one dense masked attention over the whole map: the fast path for small maps.

Every local query is scored against every key of the map (globals first, then the L local keys);
the window rule and the relative-position bias become one additive (H, L, G + L) bias, with -inf
where the rule forbids a key. That is L^2 work instead of the chunked paths' L * 9W^2, but it is
a handful of large matrix products with no Python loop, which wins while the map spans no more
than about three chunks per side (the demo's 128 px images: maps of 32x32 down to 4x4 tokens).
``resolve_implementation`` picks it there; see the crossover measured in ``__init__.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import (
    beyond_extent_score,
    cached_tensors,
    keys_inside,
    relative_bias_index,
    relative_bias_table_size,
)
from .reference import allowed_keys


@cached_tensors(maxsize=64)
def _dense_geometry(height: int, width: int, window: int, exact: bool, neighbor: int | None, device: str):
    device = torch.device(device)
    positions = torch.arange(height * width, device=device)
    rows, cols = positions // width, positions % width
    # offsets of pairs the rule forbids may fall outside the table: clamp (they point at the -inf row below)
    span = 2 * window - 1
    delta_rows = (rows[:, None] - rows[None]).clamp(-span, span)
    delta_cols = (cols[:, None] - cols[None]).clamp(-span, span)
    bias_index = relative_bias_index(delta_rows, delta_cols, window)  # (L, L)
    allowed = allowed_keys(height, width, window, exact, neighbor, device)  # (L, L)
    # one row past the table stands for "forbidden": a single gather gives bias and mask together
    bias_index = bias_index.masked_fill(~allowed, relative_bias_table_size(window))
    return bias_index, allowed


def dense_geometry(height: int, width: int, window: int, exact: bool, neighbor: int | None, device: torch.device):
    """``bias_index`` (L, L) into the bias table with one extra -inf row for forbidden pairs, and ``allowed`` (L, L).

    Cached per map size; under torch.compile / torch.export (possibly symbolic sizes) they are built
    in the traced graph instead, as :func:`geometry.chunk_geometry` does.
    """
    build = _dense_geometry.__wrapped__ if torch.compiler.is_compiling() else _dense_geometry
    return build(height, width, window, bool(exact), neighbor, str(torch.device(device)))


def _local_bias(
    relative_bias_table: torch.Tensor | None,
    bias_index: torch.Tensor,
    allowed: torch.Tensor,
    heads: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(H, L, L) additive bias of the local keys: the relative bias where allowed, -inf elsewhere."""
    if relative_bias_table is None:
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return zero.masked_fill(~allowed, float("-inf")).expand(heads, *allowed.shape)
    table = relative_bias_table.to(dtype)
    forbidden = table.new_full((1, table.shape[1]), float("-inf"))
    return torch.cat([table, forbidden]).t()[:, bias_index]


def longformer_attention_dense(
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
    """Shapes and semantics as :func:`vil_kernels.longformer_attention`.

    Products run in the input dtype; scores, bias and softmax in float32 when the inputs are half
    precision (bf16 or fp16), so that the masked softmax keeps its accuracy.
    """
    batch, heads, length, _ = local_queries.shape
    num_global = global_keys.shape[-2]
    score_dtype = torch.float32 if local_queries.dtype in (torch.float16, torch.bfloat16) else local_queries.dtype
    bias_index, allowed = dense_geometry(height, width, window, exact, neighbor, local_queries.device)

    bias = _local_bias(relative_bias_table, bias_index, allowed, heads, score_dtype)  # (H, L, L)
    if num_global:
        if local_to_global_bias is None:
            global_bias = bias.new_zeros(heads, length, num_global)
        else:
            global_bias = local_to_global_bias.to(score_dtype)[:, None, :].expand(heads, length, num_global)
        bias = torch.cat([global_bias, bias], dim=-1)  # (H, L, G + L)

    keys = torch.cat([global_keys, local_keys], dim=2)  # (B, H, G + L, M)
    values = torch.cat([global_values, local_values], dim=2)
    scores = (local_queries @ keys.transpose(-1, -2)).to(score_dtype)  # (B, H, L, G + L)
    if key_extents is not None:
        positions = torch.arange(length, device=local_queries.device)
        inside = keys_inside(positions // width, positions % width, key_extents)  # (B, L)
        # global keys are always inside; the -inf of forbidden keys in the bias still wins over this
        inside = F.pad(inside, (num_global, 0), value=True)
        scores = scores.masked_fill(~inside[:, None, None, :], beyond_extent_score(score_dtype))
    # Plain products and softmax rather than scaled_dot_product_attention with `bias` as a float
    # attn_mask: that gave the same results and bias-table gradients but measured ~1.3x slower
    # forward + backward on 16x16 and 8x8 maps (batch 8, 1 thread).
    probs = (scores + bias).softmax(dim=-1)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return probs.to(values.dtype) @ values  # (B, H, L, M)
