"""The local-query half of ViL's 2-D longformer attention, behind one entry point."""

from __future__ import annotations

import logging

import torch

from .blocked import longformer_attention_blocked
from .dense import longformer_attention_dense
from .flex import flex_available, longformer_attention_flex
from .geometry import (
    NEIGHBOR_OFFSETS,
    check_key_extents,
    chunk_geometry,
    keys_inside,
    relative_bias_index,
    relative_bias_table_size,
)
from .reference import allowed_keys, longformer_attention_reference
from .vectorized import longformer_attention_vectorized

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = {
    "reference": longformer_attention_reference,
    "vectorized": longformer_attention_vectorized,
    "blocked": longformer_attention_blocked,
    "dense": longformer_attention_dense,
    "flex": longformer_attention_flex,
}


# `auto` takes `dense` on CPU while the map has at most this fraction of the 9 W^2 key slots of a
# chunked window as tokens: dense scores every query against L keys, blocked against 9 W^2, but
# blocked pays Python overhead per group of maps and run of chunks. Measured dense/blocked time
# (forward + backward of one call, window 7, head_dim 32, one global token, 1 thread, interleaved
# in one process, medians of 5; blocked with runs of several chunk rows and maps):
#   map     B1 H2   B1 H12  B8 H2   B8 H12
#   16x16   0.32    0.39    0.27    0.51
#   18x18   0.41    0.62    0.43    0.91
#   20x20   0.64    0.94    0.63    1.33
#   24x24   0.87    1.36    1.13    1.46
# so up to 18x18 = 324 tokens at window 7 (0.75 x 441 = 330); the crossover measured the same with
# blocked's earlier one-chunk-row runs (21x21 near 1.0 there).
DENSE_MAX_TOKENS_PER_WINDOW = 0.75


def _dense_is_cheaper(height: int, width: int, window: int) -> bool:
    return height * width <= DENSE_MAX_TOKENS_PER_WINDOW * 9 * window**2


def resolve_implementation(
    name: str,
    device: torch.device | str = "cpu",
    dropout_p: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    window: int | None = None,
) -> tuple[str, str]:
    """Map a requested implementation (``auto`` or a name) to one that can run, and say why.

    ``auto`` picks ``flex`` on CUDA (where FlexAttention exists); on CPU, ``dense`` when the map
    (``height`` x ``width``, if given) has no more tokens than the 9 W^2 key slots of one chunked
    window, else ``blocked``, or ``vectorized`` when attention dropout is on (``blocked`` has none).
    While torch.compile / torch.export trace, ``auto`` keeps ``blocked`` (one custom operator, the
    same graph whatever the map size, no guard on possibly symbolic sizes). An explicit name that
    cannot run on these tensors is an error rather than a silent fallback.
    """
    device_type = torch.device(device).type
    if name == "auto":
        if device_type == "cuda" and flex_available() and dropout_p == 0:
            return "flex", "auto: CUDA tensors"
        small = (
            height is not None
            and device_type != "cuda"
            and not torch.compiler.is_compiling()
            and _dense_is_cheaper(height, width, window)
        )
        if small:
            return "dense", (
                f"auto: map {height}x{width} has at most {DENSE_MAX_TOKENS_PER_WINDOW:g} x 9W^2 = "
                f"{int(DENSE_MAX_TOKENS_PER_WINDOW * 9 * window**2)} tokens (window {window}), dense is cheaper"
            )
        if dropout_p > 0:
            return "vectorized", "auto: attention dropout is on and only 'vectorized', 'dense' and 'reference' have it"
        return "blocked", f"auto: {device_type} tensors"
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown longformer implementation {name!r}; choose 'auto' or one of {sorted(IMPLEMENTATIONS)}."
        )
    if name == "flex" and device_type != "cuda":
        raise ValueError(
            f"The 'flex' longformer implementation runs on CUDA tensors only, got {device_type} tensors; "
            "use implementation='auto' or 'blocked' on CPU."
        )
    if name in ("blocked", "flex") and dropout_p > 0:
        raise ValueError(
            f"The {name!r} longformer implementation has no attention dropout (got dropout_p={dropout_p}); use "
            "'vectorized', or 'auto', which picks it when attention dropout is on."
        )
    return name, "requested"


def longformer_attention(
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
    implementation: str = "auto",
    key_extents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every local query over its key window and all global tokens.

    Args:
        local_queries: (B, H, L, M), already scaled; L = height * width tokens in row-major order.
        local_keys, local_values: (B, H, L, M).
        global_keys, global_values: (B, H, G, M); G may be 0.
        window: chunk size W. A query sees the real tokens of the 3x3 chunks around its own
            (``exact=False``, the published "sliding chunk" mode) or the (2W+1)^2 square centred
            on it (``exact=True``); with ``neighbor`` set, only its own chunk and the neighbour
            chunk ``NEIGHBOR_OFFSETS[neighbor]`` (training-time random shifting).
        relative_bias_table: ((4W-1)^2, H) bias added to local-local scores, or None.
        local_to_global_bias: (H, G) bias added to local-global scores, or None.
        key_extents: (B, 2) integer tensor, or None: the valid (rows, cols) of each image of the
            batch, a top-left-anchored part of the map. Local keys beyond it are masked for all
            queries of that image, so that inside its extent each image gets what the attention
            gives on its map cropped to the extent. Outputs of queries beyond the extent are
            unspecified (finite); ignore them.

    Returns:
        (B, H, L, M) context of the local queries.
    """
    if exact and neighbor is not None:
        raise ValueError("The exact window and random shifting cannot be combined (the original rejects it too).")
    check_key_extents(key_extents, local_queries.shape[0], height, width)
    name, reason = resolve_implementation(implementation, local_queries.device, dropout_p, height, width, window)
    if not torch.compiler.is_compiling():  # no logging inside traced code
        logger.debug("longformer attention: %s (%s), map %dx%d, window %d", name, reason, height, width, window)
    return IMPLEMENTATIONS[name](
        local_queries,
        local_keys,
        local_values,
        global_keys,
        global_values,
        height,
        width,
        window,
        exact=exact,
        neighbor=neighbor,
        relative_bias_table=relative_bias_table,
        local_to_global_bias=local_to_global_bias,
        dropout_p=dropout_p,
        key_extents=key_extents,
    )


__all__ = [
    "IMPLEMENTATIONS",
    "NEIGHBOR_OFFSETS",
    "allowed_keys",
    "chunk_geometry",
    "flex_available",
    "keys_inside",
    "longformer_attention",
    "longformer_attention_blocked",
    "longformer_attention_dense",
    "longformer_attention_flex",
    "longformer_attention_reference",
    "longformer_attention_vectorized",
    "relative_bias_index",
    "relative_bias_table_size",
    "resolve_implementation",
]
