"""Spatial-reduction attention (PVT-style "srformer"), one of the paper's attention ablations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from ..configuration_vil import ViLConfig
from .base import ViLAttentionBase

logger = logging.get_logger(__name__)


class ViLSRAttention(ViLAttentionBase):
    """Every token (global and local) attends to the global tokens plus a spatially reduced map.

    The local map is reduced by a Conv2d with kernel = stride = r (letter f, no bias) followed by a
    non-affine InstanceNorm2d; keys and values are computed from [globals; reduced map]. Queries
    are all tokens, scaled by head_size^-0.5. No relative position bias (the original has none).

    As in the original, a map that is not a multiple of r loses its last rows/columns in the
    reduction (the strided convolution floors); a map smaller than r is an error.
    """

    supports_relative_bias = False

    def __init__(self, config: ViLConfig, stage_index: int):
        super().__init__(config, stage_index)
        dim = self.dim
        self.stage = stage_index + 1
        self.reduction_ratio = config.window_sizes[stage_index]
        self.query = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=config.qkv_bias)  # rows [keys; values]
        self.proj = nn.Linear(dim, dim)
        r = self.reduction_ratio
        self.spatial_reduction = nn.Conv2d(dim, dim, kernel_size=r, stride=r, bias=False)
        # non-affine and without running statistics: always normalises with the map's own statistics
        self.reduction_norm = nn.InstanceNorm2d(dim)
        self._warned_sizes: set[tuple[int, int]] = set()

    def reduce(self, local_tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, h*w, d) local tokens -> (B, (h//r)*(w//r), d) reduced, normalised tokens."""
        r = self.reduction_ratio
        if height < r or width < r:
            raise ValueError(
                f"srformer stage {self.stage}: the {height}x{width} map is smaller than the reduction ratio r={r} "
                "(letter f), so nothing is left to attend to. Use larger images or a smaller r for this stage."
            )
        # a note for the user, not part of the computation: left out of traced graphs (torch.compile,
        # torch.export), where the sizes may be symbolic
        warn = not torch.compiler.is_compiling() and (height % r or width % r)
        if warn and (height, width) not in self._warned_sizes:
            self._warned_sizes.add((height, width))
            logger.warning(
                f"srformer stage {self.stage}: the {height}x{width} map is not a multiple of the reduction ratio r={r}; "
                f"as in the original, its last {height % r} rows and {width % r} columns are left out of the keys and "
                "values. Use image sizes that are multiples of the total stride times r to avoid it."
            )
        batch, _, dim = local_tokens.shape
        local_map = local_tokens.transpose(1, 2).reshape(batch, dim, height, width)
        reduced = self.reduction_norm(self.spatial_reduction(local_map))  # (B, d, h//r, w//r)
        return reduced.flatten(2).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # hidden_states: (B, G + h*w, d), global tokens first
        batch, length, dim = hidden_states.shape
        heads, head_dim = self.num_heads, self.head_dim
        num_global = length - height * width
        queries = (self.query(hidden_states) * self.scale).view(batch, length, heads, head_dim).transpose(1, 2)
        reduced = self.reduce(hidden_states[:, num_global:], height, width)
        key_tokens = torch.cat([hidden_states[:, :num_global], reduced], dim=1)  # (B, G + K, d)
        keys, values = self.kv(key_tokens).view(batch, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            dropout_p=self.dropout_probability(),
            scale=1.0,  # queries already scaled
        )  # (B, H, N, M)
        return self.proj_dropout(self.proj(context.transpose(1, 2).reshape(batch, length, dim)))
