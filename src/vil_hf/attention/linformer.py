"""Linformer attention: keys and values projected along the sequence axis (a paper ablation)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration_vil import ViLConfig
from .base import ViLAttentionBase


class ViLLinformerAttention(ViLAttentionBase):
    """Every token attends to k (letter f) learned mixtures of all tokens.

    Keys and values (B, N, d) are projected along the sequence axis by ``key_projection`` and
    ``value_projection`` of shape (N, k) (the original ``proj_k``/``proj_v``), giving (B, k, d),
    before the usual head split and softmax attention with head_size^-0.5 scaling. N = G + h*w is
    fixed at construction from ``config.image_size``; any other input size is an error. With
    ``linformer_share_kv`` one projection serves both. No relative position bias.
    """

    supports_relative_bias = False

    def __init__(self, config: ViLConfig, stage_index: int):
        super().__init__(config, stage_index)
        dim = self.dim
        self.stage = stage_index + 1
        self.grid_size = config.table_grid_sizes()[stage_index]
        self.sequence_length = self.num_global_tokens + self.grid_size[0] * self.grid_size[1]
        self.projected_length = config.window_sizes[stage_index]
        self.image_size = config.image_size
        self.query = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=config.qkv_bias)  # rows [keys; values]
        self.proj = nn.Linear(dim, dim)
        shape = (self.sequence_length, self.projected_length)
        self.share_kv = config.linformer_share_kv
        self.key_projection = nn.Parameter(torch.zeros(shape))
        self.value_projection = None if self.share_kv else nn.Parameter(torch.zeros(shape))

    def sequence_projections(self) -> list[nn.Parameter]:
        return [self.key_projection] + ([] if self.share_kv else [self.value_projection])

    def init_sequence_projections(self, init_fn) -> None:
        """Uniform in +-1/sqrt(k), as the original initialises proj_k/proj_v."""
        bound = 1 / math.sqrt(self.projected_length)
        for projection in self.sequence_projections():
            init_fn(projection, -bound, bound)

    def forward(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, length, dim = hidden_states.shape
        if isinstance(length, torch.SymInt):  # a size that torch.export / torch.compile keeps symbolic
            raise ValueError(
                f"linformer stage {self.stage} projects a fixed sequence of {self.sequence_length} tokens (built for "
                f"image_size={self.image_size!r}), so it cannot be traced for varying image sizes. Export or compile "
                "it with static shapes (no torch.export.Dim for height/width; torch.compile(..., dynamic=False))."
            )
        if length != self.sequence_length:
            rows, cols = self.grid_size
            raise ValueError(
                f"linformer stage {self.stage} projects a fixed sequence of {self.sequence_length} tokens "
                f"({self.num_global_tokens} global + a {rows}x{cols} map, built for image_size={self.image_size!r}), "
                f"but got {length} ({height}x{width} map). Resize the images to that size, or build the model with "
                "the image_size of your inputs (the projections then no longer match a converted checkpoint)."
            )
        heads, head_dim = self.num_heads, self.head_dim
        queries = (self.query(hidden_states) * self.scale).view(batch, length, heads, head_dim).transpose(1, 2)
        keys, values = self.kv(hidden_states).view(batch, length, 2, dim).unbind(2)  # (B, N, d) each
        value_projection = self.key_projection if self.share_kv else self.value_projection
        keys = torch.einsum("bnd,nk->bkd", keys, self.key_projection)  # (B, k, d)
        values = torch.einsum("bnd,nk->bkd", values, value_projection)
        keys, values = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (keys, values))  # (B, H, k, M)
        context = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            dropout_p=self.dropout_probability(),
            scale=1.0,  # queries already scaled
        )
        return self.proj_dropout(self.proj(context.transpose(1, 2).reshape(batch, length, dim)))
