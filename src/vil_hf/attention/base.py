"""What every ViL attention type shares: head layout, dropouts, and the global-token biases."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vil_kernels.longformer import keys_inside

from .. import fused_linear
from ..configuration_vil import ViLConfig


def extent_mask(key_extents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, height, width) boolean: the token lies inside its image's extent (valid rows, cols per image)."""
    rows = torch.arange(height, device=key_extents.device)[:, None]
    cols = torch.arange(width, device=key_extents.device)[None]
    return keys_inside(rows, cols, key_extents)


def project_with_scaled_queries(
    hidden_states: torch.Tensor,
    query_weight: torch.Tensor,
    query_bias: torch.Tensor | None,
    key_value_weight: torch.Tensor,
    key_value_bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One product for queries, keys and values, (B, N, 3d), the queries' rows scaled: the scale folded into the
    weights spares a pass over the queries (or, with a trained full-attention bias, over every score)."""
    weight = torch.cat([query_weight * scale, key_value_weight])
    bias = None if query_bias is None else torch.cat([query_bias * scale, key_value_bias])
    return fused_linear.linear(hidden_states, weight, bias)


def _global_scores(global_queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(P, G, M) global queries against (P, N, M) keys (strided views of the projection) -> (P, G, N) scores.

    In bfloat16 a CPU ``bmm`` first copies a transposed strided operand to contiguous memory: with the
    keys transposed that is every key of the map for a product of G = 1 or 2 rows. With the keys as the
    left operand only the queries are transposed (measured: scores, softmax and context of ViL-Small's
    stage 1 at 800x1216, 12.0 -> 2.4 ms; stage 3, 2.0 -> 0.65 ms; same values). float32 BLAS reads either
    layout in place, and there the usual form measured as fast or faster.
    """
    if keys.device.type == "cpu" and keys.dtype.itemsize < 4:
        return torch.bmm(keys, global_queries.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(global_queries, keys.transpose(1, 2))


def attend_from_global_queries(
    global_queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None = None,
    hidden_keys: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T + bias) v of G global queries (B, H, G, M), scaled, over every token -> (B, H, G, M).

    keys, values: (B, H, N, M), strided views of a projection; bias: (H, G, N) or None; hidden_keys: (B, N)
    boolean, True for keys a query may not see, or None.

    With G = 1 or 2 rows SDPA takes its math path or splits nothing, and a product over the batch and heads at
    once would copy the strided keys and values first: one small product per image or per head instead,
    whichever is fewer. At batch 32 per head rather than per image ran ViL-Small's global rows 2-3x faster in
    bfloat16 (stage 1, 3 heads over 56x56 + 1 tokens: 8.4 against 17.1 ms; stage 3, 6 heads over 14x14 + 1:
    3.0 against 7.7 ms, where SDPA took 6.3 ms), per image at batch 1 (one product). The scores are widened to
    the bias's float32 before the softmax.
    """
    batch, heads = global_queries.shape[:2]
    per_head = heads < batch
    # each product's scores take its head's bias and every image's hidden keys, or its image's hidden keys and
    # every head's bias; unbind, as an index [i] would give each view a backward writing a zero tensor its size
    if per_head:
        dim, biases = 1, [None] * heads if bias is None else bias.unbind(0)
        hidden = [None if hidden_keys is None else hidden_keys[:, None]] * heads
    else:
        dim, biases = 0, [bias] * batch
        hidden = [None] * batch if hidden_keys is None else hidden_keys[:, None, None].unbind(0)
    contexts = []
    for queries, part_keys, part_values, part_bias, part_hidden in zip(
        global_queries.unbind(dim), keys.unbind(dim), values.unbind(dim), biases, hidden
    ):
        scores = _global_scores(queries, part_keys)  # (B or H, G, N)
        if part_bias is not None:
            scores = scores + part_bias
        if part_hidden is not None:
            scores = scores.masked_fill(part_hidden, float("-inf"))
        probabilities = F.dropout(scores.softmax(dim=-1), p=dropout_p) if dropout_p else scores.softmax(dim=-1)
        contexts.append(torch.bmm(probabilities.to(part_values.dtype), part_values))  # (B or H, G, M)
    return torch.stack(contexts, dim)


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

    def global_query_bias(self, num_local: int) -> torch.Tensor:
        """(H, G, G + L): the global queries' bias over the global keys, then over every local one."""
        to_local = self.global_to_local_bias[:, :, None].expand(-1, -1, num_local)
        return torch.cat([self.global_to_global_bias, to_local], dim=-1)

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
