"""What every ViL attention type shares: head layout, dropouts, and the global-token biases."""

from __future__ import annotations

import torch
from torch import nn

from vil_kernels.longformer import keys_inside

from ..configuration_vil import ViLConfig


def extent_mask(key_extents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, height, width) boolean: the token lies inside its image's extent (valid rows, cols per image)."""
    rows = torch.arange(height, device=key_extents.device)[:, None]
    cols = torch.arange(width, device=key_extents.device)[None]
    return keys_inside(rows, cols, key_extents)


class ViLAttentionBase(nn.Module):
    """Common state of ViL attention modules; subclasses add their projections and tables.

    With relative position bias (letter a0) and G global tokens, three learned biases join the
    position table: ``global_to_local_bias`` (H, G) on every global-query -> local-key score,
    ``local_to_global_bias`` (H, G) on every local-query -> global-key score, and
    ``global_to_global_bias`` (H, G, G).
    """

    # The original gives relative position bias only to its longformer and full attention; its
    # srformer, performer and linformer have none, whatever the stage's letter a says.
    supports_relative_bias = True
    # Whether forward takes ``key_extents`` (B, 2): the valid (rows, cols) of each image of a padded
    # batch, keys beyond which it masks, so that each image gets what it would get alone.
    supports_key_extents = False
    # Whether an image's output depends on the other images of its batch (the performer's key
    # stabiliser is a maximum over the whole batch).
    mixes_batch = False

    def __init__(self, config: ViLConfig, stage_index: int):
        super().__init__()
        self.dim = config.hidden_sizes[stage_index]
        self.num_heads = config.num_heads[stage_index]
        self.head_dim = self.dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.num_global_tokens = config.num_global_tokens[stage_index]
        self.attention_dropout = config.attention_probs_dropout_prob
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.use_relative_bias = self.supports_relative_bias and not config.use_absolute_embeddings[stage_index]
        if self.use_relative_bias and self.num_global_tokens:
            heads, g = self.num_heads, self.num_global_tokens
            self.global_to_local_bias = nn.Parameter(torch.zeros(heads, g))
            self.local_to_global_bias = nn.Parameter(torch.zeros(heads, g))
            self.global_to_global_bias = nn.Parameter(torch.zeros(heads, g, g))

    def bias_parameters(self) -> list[nn.Parameter]:
        """The learned bias tensors (position table and global biases) for initialisation."""
        if not self.use_relative_bias:
            return []
        tables = [self.relative_position_bias_table]
        if self.num_global_tokens:
            tables += [self.global_to_local_bias, self.local_to_global_bias, self.global_to_global_bias]
        return tables

    def dropout_probability(self) -> float:
        return self.attention_dropout if self.training else 0.0
