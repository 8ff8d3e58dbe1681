"""ViL's 2-D longformer attention: local tokens see a window, global tokens see everything."""

from __future__ import annotations

import torch
from torch import nn

from vil_kernels import NEIGHBOR_OFFSETS, longformer_attention, relative_bias_table_size

from .. import fused_linear
from ..configuration_vil import ViLConfig
from .base import ViLAttentionBase, attend_from_global_queries, extent_mask, project_with_scaled_queries


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
        query, kv = self.query, self.kv
        return project_with_scaled_queries(hidden_states, query.weight, query.bias, kv.weight, kv.bias, self.scale)

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
        hidden_keys = None
        if key_extents is not None:
            beyond = ~extent_mask(key_extents, height, width).flatten(1)  # (B, L)
            hidden_keys = torch.cat([beyond.new_zeros(batch, num_global), beyond], dim=1)  # (B, G + L)
        bias = self.global_query_bias(height * width) if self.use_relative_bias else None
        global_context = attend_from_global_queries(
            global_queries, keys, values, bias, hidden_keys, self.dropout_probability()
        )  # (B, H, G, M)
        global_context = global_context.transpose(1, 2).reshape(batch, num_global, dim)
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
        local_context = local_context.transpose(1, 2).reshape(batch, length - num_global, dim)
        local_output = fused_linear.layer_forward(self.proj, local_context)
        if num_global == 0:
            return self.proj_dropout(local_output)

        global_output = self._global_attention(hidden_states, queries, keys, values, height, width, key_extents)
        return self.proj_dropout(torch.cat([global_output, local_output], dim=1))
