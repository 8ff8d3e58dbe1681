"""Global-only attention (the original's longformer with ONLY_GLOBAL): a paper ablation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..configuration_vil import ViLConfig
from .longformer import ViLLongformerAttention


class ViLGlobalOnlyAttention(ViLLongformerAttention):
    """Local queries attend only to the G global tokens; global queries attend to every token.

    The weights are the longformer's (``query``/``kv``/``proj``, optional global copies, and with
    letter a0 the same bias tables), so original ONLY_GLOBAL checkpoints load unchanged. As in
    the original, local-query scores get no bias at all in this mode: the local position table
    and the local->global bias exist (the checkpoints hold them) but are unused; global queries
    get the global->global and global->local biases as in the longformer. No random shifting or
    exact window applies (there is no window).
    """

    def __init__(self, config: ViLConfig, stage_index: int):
        super().__init__(config, stage_index)
        if self.num_global_tokens < 1:
            raise ValueError(f"Global-only attention needs global tokens; stage {stage_index + 1} has none.")

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, key_extents: torch.Tensor | None = None
    ) -> torch.Tensor:
        # hidden_states: (B, G + h*w, d), global tokens first; local queries see no local key, so
        # key_extents (a padded batch) only masks the global queries' keys
        batch, length, dim = hidden_states.shape
        num_global = self.num_global_tokens
        # (B, H, G + L, M) each, queries scaled
        queries, keys, values = self._split_heads(self._query_key_value_projection(hidden_states), 3)
        local_context = F.scaled_dot_product_attention(
            queries[:, :, num_global:],
            keys[:, :, :num_global],
            values[:, :, :num_global],
            dropout_p=self.dropout_probability(),
            scale=1.0,
        )  # (B, H, L, M): G keys per query, no bias
        local_output = self.proj(local_context.transpose(1, 2).reshape(batch, length - num_global, dim))

        global_output = self._global_attention(hidden_states, queries, keys, values, height, width, key_extents)
        return self.proj_dropout(torch.cat([global_output, local_output], dim=1))
