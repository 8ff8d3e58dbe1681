"""Full (dense) attention of the ViL stages marked `s0`, with its Swin-style relative bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vil_kernels.native import bf16_forward

from .. import fused_linear
from ..configuration_vil import ViLConfig
from .base import ViLAttentionBase, attend_from_global_queries, extent_mask, project_with_scaled_queries


def full_relative_bias_index(height: int, width: int, device=None) -> torch.Tensor:
    """(L, L) index into a ((2h-1)(2w-1))-row table for every pair of tokens, query minus key."""
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    delta_rows = rows[:, None] - rows[None] + height - 1  # (h, h), query row minus key row, shifted
    delta_cols = cols[:, None] - cols[None] + width - 1  # (w, w)
    # (query row, query col, key row, key col), made from the 1-D offsets rather than from token
    # numbers by // and %, which torch.compile's dynamic shapes handle badly
    index = delta_rows[:, None, :, None] * (2 * width - 1) + delta_cols[None, :, None, :]
    return index.reshape(height * width, height * width)


# The longest map side whose full attention runs on the bfloat16 engine (see ViLFullAttention._bfloat16_engine):
# the classifier's stage 3 is 14 at 224x224 and 24 at 384x384; at 32 the chunk's bias is 4 MiB per head.
_ENGINE_MAX_WINDOW = 32


class ViLFullAttention(ViLAttentionBase):
    """Dense multi-head attention over global and local tokens, with a fused `qkv` projection.

    The relative bias table is built for the grid of ``config.image_size``; other map sizes get
    the table resized bicubically to their offsets, as Swin resizes its tables (the original
    only ran at the construction size).

    Without that table (letter a1) an image's result does not depend on the map size, and
    ``key_extents`` (a padded batch) masks the local keys beyond each image's extent; with it, the
    table fits the map, so a padded batch must run each image size on its own.
    """

    def __init__(self, config: ViLConfig, stage_index: int):
        super().__init__(config, stage_index)
        self.grid_size = config.table_grid_sizes()[stage_index]
        self.qkv = nn.Linear(self.dim, 3 * self.dim, bias=config.qkv_bias)  # rows [q; k; v]
        self.proj = nn.Linear(self.dim, self.dim)
        if self.use_relative_bias:
            rows, cols = self.grid_size
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * rows - 1) * (2 * cols - 1), self.num_heads)
            )

    @property
    def supports_key_extents(self) -> bool:
        return not self.use_relative_bias

    def _local_bias_table(self, height: int, width: int) -> torch.Tensor:
        """The table for a height x width map, ((2h-1)(2w-1), H)."""
        rows, cols = self.grid_size
        table = self.relative_position_bias_table
        # Under torch.compile / torch.export the map size may be symbolic: no branch on it there.
        # Bicubic resizing to the same size weighs each entry by exactly 1 and its neighbours by 0.
        if not torch.compiler.is_compiling() and (height, width) == (rows, cols):
            return table
        grid = table.t().reshape(1, self.num_heads, 2 * rows - 1, 2 * cols - 1)
        grid = F.interpolate(grid, size=(2 * height - 1, 2 * width - 1), mode="bicubic", align_corners=False)
        return grid.reshape(self.num_heads, -1).t()

    def relative_bias(self, height: int, width: int) -> torch.Tensor:
        """(H, G + L, G + L) additive bias, globals first."""
        index = full_relative_bias_index(height, width, self.relative_position_bias_table.device)
        local = self._local_bias_table(height, width)[index].permute(2, 0, 1)  # (H, L, L)
        if not self.num_global_tokens:
            return local
        num_local = height * width
        global_rows = self.global_query_bias(num_local)  # (H, G, G + L)
        local_rows = torch.cat([self.local_to_global_bias[:, None, :].expand(-1, num_local, -1), local], dim=-1)
        return torch.cat([global_rows, local_rows], dim=1)

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, key_extents: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, length, dim = hidden_states.shape
        qkv = self._query_key_value_projection(hidden_states)
        qkv = qkv.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        queries, keys, values = qkv.unbind(0)  # (B, H, N, M), queries scaled; one backward for the three
        if key_extents is not None and self.use_relative_bias:
            raise ValueError("Full attention with relative position bias cannot mask keys: run each image size alone.")
        if self.use_relative_bias:
            relative_bias = self.relative_bias(height, width)  # (H, N, N)
            if relative_bias.requires_grad and queries.device.type == "cpu":
                context = self._attend_with_bias_gradient(queries, keys, values, relative_bias)
            elif (engine := self._bfloat16_engine(queries, keys, values, height, width)) is not None:
                context = self._attend_on_bfloat16_engine(engine, queries, keys, values, relative_bias, height, width)
            else:
                # 4-D and in the queries' dtype (bfloat16 under autocast): on CPU a 3-D mask, or a float mask of
                # another dtype, sends SDPA to its unfused math path instead of the fused kernel
                context = self._sdpa(queries, keys, values, relative_bias.to(queries.dtype)[None])
        elif key_extents is not None:
            inside = extent_mask(key_extents, height, width).flatten(1)  # (B, L)
            globals_seen = inside.new_ones(batch, length - height * width)
            mask = torch.cat([globals_seen, inside], dim=1)[:, None, None]  # (B, 1, 1, G + L): True = attend
            context = self._sdpa(queries, keys, values, mask)
        else:
            context = self._sdpa(queries, keys, values, None)
        context = context.transpose(1, 2).reshape(batch, length, dim)
        return self.proj_dropout(fused_linear.layer_forward(self.proj, context))

    def _query_key_value_projection(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``qkv(hidden_states)`` with the queries' rows scaled, as the longformer's: (B, N, 3d). The bfloat16 engine
        reads the queries in place."""
        weight, bias, dim = self.qkv.weight, self.qkv.bias, self.dim
        query_bias, key_value_bias = (None, None) if bias is None else (bias[:dim], bias[dim:])
        return project_with_scaled_queries(
            hidden_states, weight[:dim], query_bias, weight[dim:], key_value_bias, self.scale
        )

    def _bfloat16_engine(self, queries, keys, values, height, width):
        """The longformer kernel's native bfloat16 forward ``(ops, engine)`` for this inference call, or None.

        Only where its tasks (one per image and head here) can fill the threads: at batch 1 on many cores SDPA,
        which also splits the queries, keeps them busy. And only on maps whose longer side is at most
        ``_ENGINE_MAX_WINDOW``: the one chunk holds that side squared slots, and the float32 bias it takes grows
        with its square (past the map's own size on a non-square map), where SDPA's mask is bfloat16 and N x N.
        """
        if (
            queries.device.type != "cpu"
            or queries.dtype != torch.bfloat16
            or queries.shape[-1] not in (32, 64)
            or any(t.requires_grad for t in (queries, keys, values))
            or self.dropout_probability()
            or torch.compiler.is_compiling()
            or queries.shape[0] * queries.shape[1] < 2 * torch.get_num_threads()
            or max(height, width) > _ENGINE_MAX_WINDOW
        ):
            return None
        return bf16_forward()

    def _attend_on_bfloat16_engine(self, engine, queries, keys, values, relative_bias, height, width):
        """Inference in bfloat16 on CPU by the longformer kernel's native forward (attention_fused.cpp), the map one
        chunk that sees itself and the global tokens: scores, bias and softmax in float32, (B, H, N, M).

        At ViL-Small's stage 3 (32 images, 6 heads of 64, 14x14 + 1 tokens) this took 13.8 against SDPA's 22.3 ms
        (2-core AMD EPYC with AVX512-BF16), as accurate: 2.3e-3 of the output's scale from a float32 reference on
        the same bfloat16 inputs against SDPA's 5.4e-3 there, 2.3e-3 to 4.1e-3 against 1.6e-3 to 3.0e-3 on small
        maps. The global queries' rows take their own small products.
        """
        ops, name = engine
        batch, heads, length, head_dim = queries.shape
        num_global = length - height * width
        window = max(height, width)
        # the chunk's window x window slots in row-major order; those off a non-square map are padding (their
        # outputs are not written, their keys never seen), any bias row or column does for them
        rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        slot_tokens = num_global + (rows * width + cols).flatten().clamp(max=height * width - 1)
        local_rows = relative_bias.float()[:, slot_tokens]  # (H, W^2, N)
        chunk_bias = torch.cat(
            [local_rows[:, :, slot_tokens], local_rows[:, :, :num_global]], dim=-1
        )  # (H, W^2, W^2 + G)
        context = queries.new_empty(batch, length, heads, head_dim).permute(0, 2, 1, 3)  # what proj reads: no copy
        local, globals_ = slice(num_global, None), slice(None, num_global)
        ops.longformer_forward_bf16_(
            queries[:, :, local],
            keys[:, :, local],
            values[:, :, local],
            keys[:, :, globals_],
            values[:, :, globals_],
            chunk_bias.contiguous(),
            torch.zeros(1, 2, dtype=torch.long),  # one block of one chunk: the map itself
            1,
            height,
            width,
            window,
            None,
            context[:, :, local],
            name == "amx",
        )
        if num_global:
            context[:, :, globals_] = attend_from_global_queries(
                queries[:, :, globals_], keys, values, relative_bias[:, globals_]
            )
        return context

    def _sdpa(self, queries, keys, values, mask):
        return F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, dropout_p=self.dropout_probability(), scale=1.0
        )

    def _attend_with_bias_gradient(self, queries, keys, values, relative_bias):
        """softmax(q k^T + bias) v (q scaled) where the bias needs a gradient, on CPU: (B, H, N, M).

        SDPA's fused CPU kernel gives no gradient for its mask, so with a trained bias it takes its unfused math
        path; these products, with the bias add and the softmax in float32 (as the blocked longformer kernel
        does), took 0.66x its forward+backward time at ViL-Small's stage 3 (32 images, 6 heads, 197 tokens) in
        bfloat16.
        """
        scores = torch.matmul(queries, keys.transpose(-1, -2))  # (B, H, N, N), in the products' dtype
        # widened only where narrower than float32 (a copy then); the in-place ops keep nothing for the backward
        logits = scores.to(torch.promote_types(scores.dtype, torch.float32)).add_(relative_bias)
        probabilities = torch.softmax(logits, dim=-1)
        if self.dropout_probability():
            probabilities = F.dropout(probabilities, self.dropout_probability())
        return torch.matmul(probabilities.to(values.dtype), values)
