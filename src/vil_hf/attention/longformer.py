"""ViL's 2-D longformer attention: local tokens see a window, global tokens see everything."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vil_kernels import NEIGHBOR_OFFSETS, longformer_attention, relative_bias_table_size

from ..configuration_vil import ViLConfig
from .base import ViLAttentionBase


class ViLLongformerAttention(ViLAttentionBase):
    """Multi-head attention of one ViL block with a longformer pattern.

    Local queries attend to their window (see ``vil_kernels.longformer_attention``) and to every
    global token; global queries attend to all tokens. With relative position bias (letter a0),
    a ((4W-1)^2, H) table indexed by query-minus-key offset biases local-local scores.
    """

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

    def _scaled_query_bias(self) -> torch.Tensor | None:
        return None if self.query.bias is None else self.query.bias * self.scale

    def _split_heads(self, tokens: torch.Tensor, parts: int) -> torch.Tensor:
        batch, length, _ = tokens.shape
        return tokens.view(batch, length, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def _global_attention(self, hidden_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Global queries attend to every token (ordinary dense attention over G queries) -> (B, G, d).

        keys, values: (B, H, G + L, M) from the local `kv`, replaced by `global_kv`'s where the weights differ.
        """
        batch, length, dim = hidden_states.shape
        num_global = self.num_global_tokens
        global_tokens = hidden_states[:, :num_global]
        if self.has_global_weights:
            global_queries = self.global_query(global_tokens)
            keys, values = self._split_heads(self.global_kv(hidden_states), 2)
            global_proj = self.global_proj
        else:
            global_queries = self.query(global_tokens)
            global_proj = self.proj
        global_queries = self._split_heads(global_queries * self.scale, 1)[0]  # (B, H, G, M)
        bias = None
        if self.use_relative_bias:
            to_local = self.global_to_local_bias[:, :, None].expand(-1, -1, length - num_global)
            bias = torch.cat([self.global_to_global_bias, to_local], dim=-1)  # (H, G, G + L)
        global_context = F.scaled_dot_product_attention(
            global_queries,
            keys,
            values,
            attn_mask=bias,
            dropout_p=self.dropout_probability(),
            scale=1.0,  # queries are already scaled
        )
        return global_proj(global_context.transpose(1, 2).reshape(batch, num_global, dim))

    def forward(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # hidden_states: (B, G + height*width, d), global tokens first
        batch, length, dim = hidden_states.shape
        num_global = self.num_global_tokens
        local_tokens = hidden_states[:, num_global:]

        # the scale folded into the projection: one pass less over the queries
        local_queries = F.linear(local_tokens, self.query.weight * self.scale, self._scaled_query_bias())
        local_queries = self._split_heads(local_queries, 1)[0]  # (B, H, L, M)
        keys, values = self._split_heads(self.kv(hidden_states), 2)  # (B, H, G + L, M) each

        neighbor = None
        if self.random_shift and self.training:
            # torch's generator, so gradient checkpointing replays the same draw
            neighbor = int(torch.randint(len(NEIGHBOR_OFFSETS), ()).item())
        local_context = longformer_attention(
            local_queries,
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
        )
        local_output = self.proj(local_context.transpose(1, 2).reshape(batch, length - num_global, dim))
        if num_global == 0:
            return self.proj_dropout(local_output)

        global_output = self._global_attention(hidden_states, keys, values)
        return self.proj_dropout(torch.cat([global_output, local_output], dim=1))
