"""ViL's 2-D longformer attention: local tokens see a window, global tokens see everything."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vil_kernels import NEIGHBOR_OFFSETS, longformer_attention, relative_bias_table_size

from ..configuration_vil import ViLConfig
from .base import ViLAttentionBase, extent_mask


def _global_scores(global_queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(H, G, M) global queries against (H, N, M) keys (strided views of the projection) -> (H, G, N) scores.

    In bfloat16 a CPU ``bmm`` first copies a transposed strided operand to contiguous memory: with the
    keys transposed that is every key of the map for a product of G = 1 or 2 rows. With the keys as the
    left operand only the queries are transposed (measured: scores, softmax and context of ViL-Small's
    stage 1 at 800x1216, 12.0 -> 2.4 ms; stage 3, 2.0 -> 0.65 ms; same values). float32 BLAS reads either
    layout in place, and there the usual form measured as fast or faster.
    """
    if keys.device.type == "cpu" and keys.dtype.itemsize < 4:
        return torch.bmm(keys, global_queries.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(global_queries, keys.transpose(1, 2))


class ViLLongformerAttention(ViLAttentionBase):
    """Multi-head attention of one ViL block with a longformer pattern.

    Local queries attend to their window (see ``vil_kernels.longformer_attention``) and to every
    global token; global queries attend to all tokens. With relative position bias (letter a0),
    a ((4W-1)^2, H) table indexed by query-minus-key offset biases local-local scores.

    With ``key_extents`` (a padded batch), local keys beyond each image's extent are masked for its
    local and global queries, so that each image gets what it would get alone.
    """

    supports_key_extents = True

    def __init__(self, config: ViLConfig, stage_index: int):
        super().__init__(config, stage_index)
        dim = self.dim
        self.window = config.window_sizes[stage_index]
        self.exact_window = config.exact_window
        self.random_shift = config.random_shift
        self.implementation = config.longformer_implementation

        self.query = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=config.qkv_bias)  # rows [keys; values]
        self.proj = nn.Linear(dim, dim)
        # Every published model shares these weights between local and global queries; the
        # original files still store both copies, which conversion checks and folds.
        self.has_global_weights = self.num_global_tokens > 0 and not config.share_global_weights
        if self.has_global_weights:
            self.global_query = nn.Linear(dim, dim, bias=config.qkv_bias)
            self.global_kv = nn.Linear(dim, 2 * dim, bias=config.qkv_bias)
            self.global_proj = nn.Linear(dim, dim)
        if self.use_relative_bias:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(relative_bias_table_size(self.window), self.num_heads)
            )

    def _query_key_value_projection(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """One product for queries, keys and values: (B, N, 3d), queries already scaled."""
        # the scale folded into the weights: one pass less over the queries
        weight = torch.cat([self.query.weight * self.scale, self.kv.weight])
        bias = None if self.query.bias is None else torch.cat([self.query.bias * self.scale, self.kv.bias])
        return F.linear(hidden_states, weight, bias)

    def _split_heads(self, tokens: torch.Tensor, parts: int) -> torch.Tensor:
        batch, length, _ = tokens.shape
        return tokens.view(batch, length, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def _global_attention(
        self,
        hidden_states: torch.Tensor,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        height: int,
        width: int,
        key_extents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Global queries attend to every token (ordinary dense attention over G queries) -> (B, G, d).

        queries, keys, values: (B, H, G + L, M) from the local projections (queries scaled); where
        the global weights differ, the global queries, keys and values come from their own. With
        ``key_extents``, only the local keys inside each image's extent count.
        """
        batch, _, dim = hidden_states.shape
        num_global = self.num_global_tokens
        global_queries = queries[:, :, :num_global]  # (B, H, G, M)
        global_proj = self.proj
        if self.has_global_weights:
            global_queries = self._split_heads(self.global_query(hidden_states[:, :num_global]) * self.scale, 1)[0]
            keys, values = self._split_heads(self.global_kv(hidden_states), 2)
            global_proj = self.global_proj
        # Plain products over the strided key/value views of the projection: with G = 1 or 2
        # queries, SDPA would take its math path and copy the (scaled) keys of the whole map.
        beyond = None if key_extents is None else ~extent_mask(key_extents, height, width).flatten(1)  # (B, L)
        # One image at a time, through unbind: indexing [b] instead gives each image's view a backward that
        # writes a zero tensor the size of the whole projection, summed over the batch (96 such tensors per
        # block of ViL-Small's classifier at batch 32).
        contexts = []
        for b, (image_queries, image_keys, image_values) in enumerate(
            zip(global_queries.unbind(0), keys.unbind(0), values.unbind(0))
        ):
            scores = _global_scores(image_queries, image_keys)  # (H, G, G + L)
            if self.use_relative_bias:
                scores[..., :num_global] += self.global_to_global_bias
                scores[..., num_global:] += self.global_to_local_bias[:, :, None]
            if beyond is not None:
                scores[..., num_global:].masked_fill_(beyond[b], float("-inf"))
            probs = F.dropout(scores.softmax(dim=-1), p=self.dropout_probability(), training=self.training)
            contexts.append(torch.bmm(probs, image_values))  # (H, G, M)
        global_context = torch.stack(contexts).transpose(1, 2).reshape(batch, num_global, dim)
        return global_proj(global_context)

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, key_extents: torch.Tensor | None = None
    ) -> torch.Tensor:
        # hidden_states: (B, G + height*width, d), global tokens first; key_extents: (B, 2) or None
        batch, length, dim = hidden_states.shape
        num_global = self.num_global_tokens
        # (B, H, G + L, M) each, strided views of one projection
        queries, keys, values = self._split_heads(self._query_key_value_projection(hidden_states), 3)

        neighbor = None
        if self.random_shift and self.training:
            # torch's generator, so gradient checkpointing replays the same draw
            neighbor = int(torch.randint(len(NEIGHBOR_OFFSETS), ()).item())
        local_context = longformer_attention(
            queries[:, :, num_global:],
            keys[:, :, num_global:],
            values[:, :, num_global:],
            keys[:, :, :num_global],
            values[:, :, :num_global],
            height,
            width,
            self.window,
            exact=self.exact_window,
            neighbor=neighbor,
            relative_bias_table=self.relative_position_bias_table if self.use_relative_bias else None,
            local_to_global_bias=self.local_to_global_bias if self.use_relative_bias and num_global else None,
            dropout_p=self.dropout_probability(),
            implementation=self.implementation,
            key_extents=key_extents,
        )
        local_output = self.proj(local_context.transpose(1, 2).reshape(batch, length - num_global, dim))
        if num_global == 0:
            return self.proj_dropout(local_output)

        global_output = self._global_attention(hidden_states, queries, keys, values, height, width, key_extents)
        return self.proj_dropout(torch.cat([global_output, local_output], dim=1))
