"""Vision Longformer (ViL) models: embeddings, blocks, stages, and the transformers model classes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, ImageClassifierOutput
from transformers.utils import ModelOutput

from vil_kernels.native import native_ops

from . import fused_linear
from .attention import (
    ATTENTION_CLASSES,
    ViLAttentionBase,
    ViLLinformerAttention,
    ViLLongformerAttention,
    ViLPerformerAttention,
)
from .attention.base import extent_mask
from .configuration_vil import ViLConfig


@dataclass
class ViLEncoderOutput(ModelOutput):
    """Outputs per entry of `config.stage_names`: the stem (stage 1's patch embedding), then each stage.

    last_hidden_state: (B, G + L, d) tokens of the last stage, global tokens first.
    feature_maps: the stem's tokens and each stage's local output tokens as NCHW maps (B, d, h, w).
    hidden_states: the stem's tokens (B, L, d) and each stage's output tokens (B, G + L, d), when asked for.
    """

    last_hidden_state: torch.FloatTensor | None = None
    feature_maps: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ViLModelOutput(ModelOutput):
    """
    last_hidden_state: (B, G + L, d) normalised tokens of the last stage.
    pooler_output: (B, d) the first global token, or the mean of all tokens (see `average_pool`).
    hidden_states: when asked for, one entry per `config.stage_names`, as in Swin: the patch embedding of
        stage 1 (B, L, d), then each stage's output tokens (B, G + L, d).
    reshaped_hidden_states: the same as NCHW maps of the local tokens (B, d, h, w).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.FloatTensor, ...] | None = None


def drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch, rescaling the survivors."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    keep = torch.empty(shape, dtype=hidden_states.dtype, device=hidden_states.device).bernoulli_(keep_prob)
    return hidden_states * keep / keep_prob


class ViLDropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return drop_path(hidden_states, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class ViLPatchProjection(nn.Conv2d):
    """The patch embedding's convolution (kernel = stride = patch size), run with a channels-last weight.

    A channels-last weight keeps the convolution on its NHWC path: the maps of later stages are already
    channels-last views of the tokens (no input copy), and the NHWC output flattens to (B, h*w, d) tokens
    without a copy either. About 4x faster on CPU than the NCHW path. Stage 1's projection is what
    `get_input_embeddings()` returns, so forward hooks on it (`enable_input_require_grads`) must fire.
    """

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        weight = self.weight.contiguous(memory_format=torch.channels_last)
        return F.conv2d(feature_map, weight, self.bias, stride=self.stride)


class ViLPatchEmbeddings(nn.Module):
    """Conv2d with kernel = stride = patch size, flattened to tokens, then LayerNorm."""

    def __init__(self, config: ViLConfig, stage_index: int):
        super().__init__()
        in_channels = config.num_channels if stage_index == 0 else config.hidden_sizes[stage_index - 1]
        dim, patch = config.hidden_sizes[stage_index], config.patch_sizes[stage_index]
        self.patch_size = patch
        self.projection = ViLPatchProjection(in_channels, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps) if config.patch_embed_norm else nn.Identity()

    def forward(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if feature_map.shape[-2] < self.patch_size or feature_map.shape[-1] < self.patch_size:
            raise ValueError(
                f"Input map {tuple(feature_map.shape[-2:])} is smaller than the patch size {self.patch_size}; "
                "ViL needs images of at least the total stride (32 px for the published models) on each side."
            )
        embeddings = self.projection(feature_map)  # (B, d, h, w)
        height, width = embeddings.shape[-2:]
        return self.norm(embeddings.flatten(2).transpose(1, 2)), height, width  # (B, h*w, d)


class ViLAbsolutePositionEmbeddings(nn.Module):
    """Factorised absolute embedding: token (i, j) gets cat(row[i], column[j]); globals their own.

    Maps no larger than the tables use their first rows/columns (as the original detection
    backbone does); larger maps get the 1-D tables linearly interpolated to their size.
    """

    def __init__(self, config: ViLConfig, stage_index: int):
        super().__init__()
        dim = config.hidden_sizes[stage_index]
        rows, cols = config.table_grid_sizes()[stage_index]
        self.row_embeddings = nn.Parameter(torch.zeros(1, rows, dim // 2))
        self.column_embeddings = nn.Parameter(torch.zeros(1, cols, dim // 2))
        self.global_embeddings = nn.Parameter(torch.zeros(1, config.num_global_tokens[stage_index], dim))

    @staticmethod
    def _fit(table: torch.Tensor, length: int) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return ViLAbsolutePositionEmbeddings._fit_without_branch(table, length)
        if length <= table.shape[1]:
            return table[:, :length]
        resized = F.interpolate(table.transpose(1, 2), size=length, mode="linear", align_corners=False)
        return resized.transpose(1, 2)

    @staticmethod
    def _fit_without_branch(table: torch.Tensor, length: int) -> torch.Tensor:
        """``_fit`` as one formula, for torch.compile / torch.export, where the length may be symbolic.

        Linear resizing (align_corners=False) reads entry i at source position
        (i + 1/2) * rows / length - 1/2; taking (i + 1/2) * min(1, rows / length) instead gives
        exactly i for maps no larger than the table (their first rows), the resized table otherwise.
        """
        rows = table.shape[1]
        half = torch.arange(length, device=table.device, dtype=torch.float32) + 0.5
        scale = rows / torch.full((), length, device=table.device, dtype=torch.float32)  # as F.interpolate rounds it
        source = (torch.minimum(half, half * scale) - 0.5).clamp(min=0)
        low = source.floor().long().clamp(max=rows - 1)
        high = (low + 1).clamp(max=rows - 1)
        weight = (source - low)[None, :, None].to(table.dtype)
        return table[:, low] * (1 - weight) + table[:, high] * weight

    def local_embeddings(self, height: int, width: int) -> torch.Tensor:
        """(1, h*w, d) embeddings of the local tokens, row-major."""
        rows = self._fit(self.row_embeddings, height)  # (1, h, d/2)
        cols = self._fit(self.column_embeddings, width)  # (1, w, d/2)
        grid = torch.cat([rows[:, :, None].expand(-1, -1, width, -1), cols[:, None].expand(-1, height, -1, -1)], dim=-1)
        return grid.flatten(1, 2)

    def forward(self, height: int, width: int) -> torch.Tensor:
        return torch.cat([self.global_embeddings, self.local_embeddings(height, width)], dim=1)  # (1, G + h*w, d)


class ViLMLP(nn.Module):
    def __init__(self, config: ViLConfig, dim: int):
        super().__init__()
        hidden = int(dim * config.mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.hidden_act = config.hidden_act
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.for_rows(hidden_states)(hidden_states)

    def for_rows(self, hidden_states: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """forward, for hidden_states or any chunk of its rows. In inference whose products run in bfloat16 on CPU
        they are oneDNN's, the bias and activation fused (``fused_linear``), the weights cast to bfloat16 once for
        all the chunks."""
        plain_layers = fused_linear.is_plain_linear(self.fc1) and fused_linear.is_plain_linear(self.fc2)
        if self.training or not plain_layers or not fused_linear.runs_fused(hidden_states, self.fc1.weight):
            return self._plain_forward
        fc1, fc2, narrow = self.fc1, self.fc2, torch.bfloat16
        weight1, weight2 = fc1.weight.to(narrow), fc2.weight.to(narrow)
        bias1, bias2 = (None if layer.bias is None else layer.bias.to(narrow) for layer in (fc1, fc2))
        fused_activation = self.hidden_act if fused_linear.fusable_activation(self.hidden_act) else None

        def fused_forward(rows: torch.Tensor) -> torch.Tensor:
            hidden = fused_linear.fused_product(rows, weight1, bias1, fused_activation)
            return fused_linear.fused_product(hidden if fused_activation else self.activation(hidden), weight2, bias2)

        return fused_forward

    def _plain_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.activation(self.fc1(hidden_states)))
        return self.dropout(self.fc2(hidden_states))


# On CPU the MLP is memory-bound: a stage-1 map's hidden activations (~90 MB at 800x1216) leave the
# cache between fc1, the activation and fc2. Chunks of this size ran ViL-Small's feed-forward at
# 800x1216 2.3x faster in stage 1, 1.5-1.7x in stages 2-3 and about as fast in stage 4 (a 2-core x86
# VM); GPUs take the whole sequence.
_CPU_FEED_FORWARD_CHUNK_BYTES = 8 * 2**20


class ViLLayer(GradientCheckpointingLayer):
    """One block: pre-norm attention then pre-norm MLP, both residual, sharing one drop-path rate."""

    def __init__(self, config: ViLConfig, stage_index: int, drop_path_rate: float):
        super().__init__()
        dim = config.hidden_sizes[stage_index]
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = ATTENTION_CLASSES[config.attention_types[stage_index]](config, stage_index)
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = ViLMLP(config, dim)
        self.drop_path = ViLDropPath(drop_path_rate)
        self.chunk_size_feed_forward = config.chunk_size_feed_forward

    def _feed_forward_chunk(self, hidden_states: torch.Tensor) -> int:
        """Tokens per chunk of the LayerNorm + MLP branch (see ``ViLConfig.chunk_size_feed_forward``)."""
        if torch.compiler.is_compiling():
            # chunks change speed only; a traced graph (torch.compile, torch.export) must not depend
            # on how many tokens a symbolic size holds, and the compiler schedules memory itself
            return hidden_states.shape[1]
        if self.chunk_size_feed_forward:
            return self.chunk_size_feed_forward
        if hidden_states.device.type != "cpu":
            return hidden_states.shape[1]
        batch = hidden_states.shape[0]
        hidden_bytes = batch * self.mlp.fc1.out_features * hidden_states.element_size()
        return max(1, _CPU_FEED_FORWARD_CHUNK_BYTES // hidden_bytes)

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        chunk = self._feed_forward_chunk(hidden_states)
        if chunk >= hidden_states.shape[1]:
            return self.mlp(self.layernorm_after(hidden_states))
        parts = hidden_states.split(chunk, dim=1)
        return torch.cat([self.mlp(self.layernorm_after(part)) for part in parts], dim=1)

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, key_extents: torch.Tensor | None = None
    ) -> torch.Tensor:
        extents = () if key_extents is None else (key_extents,)  # only attention types that mask keys get one
        if self._runs_in_place():
            return self._inference_forward(hidden_states, height, width, extents)
        attention_output = self.drop_path(self.attention(self.layernorm_before(hidden_states), height, width, *extents))
        hidden_states = _add_residual(attention_output, hidden_states)
        return _add_residual(self.drop_path(self.feed_forward(hidden_states)), hidden_states)

    def _runs_in_place(self) -> bool:
        """Inference in eager mode: no autograd to keep the overwritten tensors for, no dropout or drop-path draw
        per call; a traced graph keeps the plain form (the compiler plans memory itself)."""
        return not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling())

    def _inference_forward(
        self, hidden_states: torch.Tensor, height: int, width: int, extents: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """forward's result, bit for bit, with two map-sized tensors fewer per block.

        On CPU a fresh tensor of a large map is page-faulted in on its first write (ViL-Small's stage 1 at batch 32:
        38.5 MB of float32 stream per tensor), so each one saved is a pass and its faults: the attention's input is
        normalised chunk by chunk straight into autocast's dtype, which its projections would cast it to (the
        float32 normalised map never exists whole), and the feed-forward's output is added chunk by chunk into the
        stream that the attention's residual add has just made, which nothing else holds. Under CPU bfloat16
        autocast the C++ block steps (``_native_block_steps``) take the layer norms and the residual sums, one pass
        each; their layer norm is a bfloat16 step from bit for bit (another summation order).
        """
        chunk = self._feed_forward_chunk(hidden_states)
        steps = _native_block_steps(hidden_states)
        normed = self._normed_for_attention(hidden_states, chunk, steps)
        attention_output = self.attention(normed, height, width, *extents)
        if steps is not None and attention_output.dtype == torch.bfloat16:
            residual, hidden_states = hidden_states, torch.empty_like(hidden_states)
            steps.add_widened_(residual, attention_output, hidden_states)
        else:
            hidden_states = _add_residual(attention_output, hidden_states)
        mlp = self.mlp.for_rows(hidden_states)
        narrow_norm = steps is not None and _norms_natively(self.layernorm_after)
        for part in hidden_states.split(chunk, dim=1):
            if narrow_norm:
                rows = torch.empty(part.shape, dtype=torch.bfloat16)  # what the MLP's products take under autocast
                _layer_norm_bf16(steps, self.layernorm_after, part, rows)
            else:
                rows = self.layernorm_after(part)
            branch = mlp(rows)
            if steps is not None and branch.dtype == torch.bfloat16:
                steps.add_widened_(part, branch, part)
            else:
                # the stream is at least as wide as the attention's output, which comes out of linear layers of
                # the same dtype as the MLP's: widening into it is _add_residual's sum
                part.add_(branch.to(part.dtype))
        return hidden_states

    def _normed_for_attention(self, hidden_states: torch.Tensor, chunk: int, steps) -> torch.Tensor:
        """layernorm_before(hidden_states), in autocast's narrower dtype where autocast would cast it to that."""
        device = hidden_states.device.type
        narrow = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden_states.dtype
        native = steps is not None and _norms_natively(self.layernorm_before)
        if narrow.itemsize >= hidden_states.dtype.itemsize or (chunk >= hidden_states.shape[1] and not native):
            return self.layernorm_before(hidden_states)
        normed = torch.empty(hidden_states.shape, dtype=narrow, device=hidden_states.device)
        if native:  # the whole map in one call, its rows spread over the threads
            _layer_norm_bf16(steps, self.layernorm_before, hidden_states, normed)
            return normed
        for part, normed_part in zip(hidden_states.split(chunk, dim=1), normed.split(chunk, dim=1)):
            normed_part.copy_(self.layernorm_before(part))
        return normed


def _native_block_steps(hidden_states: torch.Tensor):
    """vil_kernels' C++ block steps (``layer_norm_bf16_``, ``add_widened_``; csrc/block_steps.cpp) where a float32
    stream on CPU meets bfloat16 autocast, and the C++ kernels are built; else None. Each is one pass over the stream
    where PyTorch ops take two and a fresh tensor: the layer norms written straight in bfloat16, the branches' sums
    widened as they are read."""
    if hidden_states.device.type != "cpu" or hidden_states.dtype != torch.float32:
        return None
    if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return None
    return native_ops()


def _norms_natively(layer_norm: nn.Module) -> bool:
    """A plain LayerNorm over the last dim with float32 weight and bias and no hooks, which the C++ step computes
    (a float32 LayerNorm rounded once to bfloat16; within a bfloat16 step of F.layer_norm's float32 result, cast)."""
    return (
        fused_linear.is_plain(layer_norm, nn.LayerNorm)
        and len(layer_norm.normalized_shape) == 1
        and layer_norm.weight is not None
        and layer_norm.bias is not None
        and layer_norm.weight.dtype == layer_norm.bias.dtype == torch.float32
    )


def _layer_norm_bf16(steps, layer_norm: nn.LayerNorm, rows: torch.Tensor, out: torch.Tensor) -> None:
    steps.layer_norm_bf16_(rows, layer_norm.weight, layer_norm.bias, layer_norm.eps, out)


def _add_residual(branch: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """branch + residual, never narrower than the residual stream.

    The sum goes in place into the branch's output, a fresh tensor that no backward needs (two (B, G + L, d)
    tensors fewer per block). Under autocast the branch comes out of a bfloat16 linear layer while the stream may
    be float32 (on CUDA, whose autocast runs layer norms in float32; on CPU where the float32 global tokens or
    position embeddings join it): an in-place add would round the stream to bfloat16 at its first block, so the
    branch is widened first, which keeps the stream's precision as ``residual + branch`` does in other models. A
    sum of mixed dtypes itself takes TensorIterator's unvectorized casting loop: widening, then adding in one
    dtype, ran ViL-Small's bfloat16 classifier forward (224x224, batch 32) 4% faster on a 2-core CPU.
    """
    wider = torch.promote_types(branch.dtype, residual.dtype)
    return (branch if branch.dtype == wider else branch.to(wider)).add_(residual)


class ViLStage(nn.Module):
    """Patch embedding, fresh global tokens, optional absolute embedding, then the blocks."""

    def __init__(self, config: ViLConfig, stage_index: int, drop_path_rates: list[float]):
        super().__init__()
        dim = config.hidden_sizes[stage_index]
        self.num_global_tokens = config.num_global_tokens[stage_index]
        self.patch_embeddings = ViLPatchEmbeddings(config, stage_index)
        self.global_tokens = (
            nn.Parameter(torch.zeros(1, self.num_global_tokens, dim)) if self.num_global_tokens else None
        )
        self.position_embeddings = (
            ViLAbsolutePositionEmbeddings(config, stage_index) if config.use_absolute_embeddings[stage_index] else None
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(ViLLayer(config, stage_index, rate) for rate in drop_path_rates)

    def masks_keys(self, height: int, width: int) -> bool:
        """Whether masking keys beyond each image's extent gives every image of a padded batch, on a
        ``height`` x ``width`` map, exactly its result alone.

        Not where the attention has no such mask or mixes the images of a batch, nor where an
        absolute table would be stretched to the map (a map larger than the table is interpolated
        to its own size, so the batch's map and an image's own differ).
        """
        if not all(layer.attention.supports_key_extents and not layer.attention.mixes_batch for layer in self.layers):
            return False
        if self.position_embeddings is not None:
            rows, cols = (
                self.position_embeddings.row_embeddings.shape[1],
                self.position_embeddings.column_embeddings.shape[1],
            )
            return height <= rows and width <= cols
        return True

    @property
    def mixes_batch(self) -> bool:
        return any(layer.attention.mixes_batch for layer in self.layers)

    def forward(
        self, feature_map: torch.Tensor, key_extents: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The patch-embedded local tokens (B, L, d), the stage's output tokens (B, G + L, d), and its
        local output tokens as an NCHW map (B, d, h, w).

        key_extents: (B, 2) valid (rows, cols) of each image on this stage's map, or None (see masks_keys).
        """
        local_tokens, height, width = self.patch_embeddings(feature_map)  # (B, L, d)
        batch = local_tokens.shape[0]
        hidden_states, global_tokens = local_tokens, self.global_tokens
        if self.position_embeddings is not None:
            hidden_states = local_tokens + self.position_embeddings.local_embeddings(height, width)
            if global_tokens is not None:
                # Summed apart from the local tokens: one sum over the whole (B, G + L, d) sequence hands
                # the two global parameters views of one gradient buffer at batch 1, and autograd keeps
                # both as their .grad, so a second backward without zero_grad added into it twice.
                global_tokens = global_tokens + self.position_embeddings.global_embeddings
        if global_tokens is not None:
            hidden_states = torch.cat([global_tokens.expand(batch, -1, -1), hidden_states], dim=1)  # (B, G + L, d)
        hidden_states = self.dropout(hidden_states)
        extents = () if key_extents is None else (key_extents,)
        for layer in self.layers:
            hidden_states = layer(hidden_states, height, width, *extents)
        # the next stage starts from the local tokens only: global tokens are never carried over
        local_map = tokens_to_map(hidden_states[:, self.num_global_tokens :], height, width)
        return local_tokens, hidden_states, local_map


def tokens_to_map(local_tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h*w, d) row-major tokens -> (B, d, h, w), a view."""
    return local_tokens.transpose(1, 2).reshape(local_tokens.shape[0], -1, height, width)


class ViLEncoder(nn.Module):
    def __init__(self, config: ViLConfig):
        super().__init__()
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        stages, start = [], 0
        for index, depth in enumerate(config.depths):
            stages.append(ViLStage(config, index, rates[start : start + depth]))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.num_channels = config.num_channels
        # The performer's random projections are redrawn in training on the original's schedule,
        # counted by a buffer that the original stores in its checkpoints too.
        self.performer_redraw_interval = config.performer_redraw_interval
        self.has_performer = "performer" in config.attention_types
        if self.has_performer:
            self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    @torch.no_grad()
    def check_redraw_projections(self) -> None:
        """The original's rule, checked at each training forward: redraw and restart the count once
        it has reached the interval, otherwise count this call."""
        if self.calls_since_last_redraw >= self.performer_redraw_interval:
            for module in self.modules():
                if isinstance(module, ViLPerformerAttention):
                    module.redraw_projection()
            self.calls_since_last_redraw.zero_()
        else:
            self.calls_since_last_redraw += 1

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        output_stem: bool = False,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> ViLEncoderOutput:
        """`feature_maps` (and `hidden_states`) follow `stage_names`; the stem's entry is None unless it is asked
        for (`output_stem` or `output_hidden_states`), so that inference does not keep stage 1's embedding.
        With `image_sizes`, a padded batch (see `_forward_padded_batch`)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.num_channels}, height, width), got {tuple(pixel_values.shape)}."
            )
        if self.has_performer and self.training and self.performer_redraw_interval is not None:
            self.check_redraw_projections()
        output_stem = output_stem or output_hidden_states
        if image_sizes is not None:
            return self._forward_padded_batch(pixel_values, image_sizes, output_stem)
        feature_map, feature_maps, hidden_states = pixel_values, (), ()
        tokens = None
        for stage in self.stages:
            embedded, tokens, feature_map = stage(feature_map)
            if not feature_maps:  # the stem: stage 1's patch embedding
                feature_maps += (tokens_to_map(embedded, *feature_map.shape[-2:]) if output_stem else None,)
                hidden_states += (embedded if output_stem else None,)
            feature_maps += (feature_map,)
            hidden_states += (tokens,)
        return ViLEncoderOutput(
            last_hidden_state=tokens,
            feature_maps=feature_maps,
            hidden_states=hidden_states if output_hidden_states else None,
        )

    def _forward_padded_batch(
        self, pixel_values: torch.Tensor, image_sizes: list[tuple[int, int]], output_stem: bool = False
    ) -> ViLEncoderOutput:
        """Feature maps of a padded batch: image b fills the top-left ``image_sizes[b]`` of the input.

        Each image's maps equal, within its extent, those of the image cropped and run alone; beyond
        it they are zero. Per stage: where every image fills the map, the plain stage; where masking
        keys beyond each image's extent suffices (``ViLStage.masks_keys``), one masked run; else the
        images of each extent (each image alone where the attention mixes the batch) run on their
        cropped maps. Only the feature maps are returned (tokens beyond an extent are not defined); the
        stem's is None unless ``output_stem``.
        """
        full_size = tuple(pixel_values.shape[-2:])
        # nothing beyond the largest extent reaches any image's maps: crop to it, pad back at the end
        feature_map = pixel_values[:, :, : max(r for r, _ in image_sizes), : max(c for _, c in image_sizes)]
        sizes, feature_maps = list(image_sizes), (None,)
        if output_stem:
            # the patch embedding is per position: one run gives every image's own, zeroed beyond it
            first = self.stages[0].patch_embeddings
            embedded, height, width = first(feature_map)
            extents = torch.tensor([(r // first.patch_size, c // first.patch_size) for r, c in sizes])
            stem = tokens_to_map(embedded, height, width)
            feature_maps = (stem.masked_fill(~extent_mask(extents.to(stem.device), height, width)[:, None], 0.0),)
        for index, stage in enumerate(self.stages):
            patch = stage.patch_embeddings.patch_size
            for b, (rows, cols) in enumerate(sizes):
                if rows < patch or cols < patch:
                    raise ValueError(
                        f"Image {b} of the batch ({image_sizes[b][0]}x{image_sizes[b][1]} pixels by pixel_mask) has a "
                        f"{rows}x{cols} map before stage {index + 1}, smaller than its patch size {patch}; ViL needs "
                        "images of at least the total stride (32 px for the published models) on each side."
                    )
            sizes = [(rows // patch, cols // patch) for rows, cols in sizes]
            height, width = feature_map.shape[-2] // patch, feature_map.shape[-1] // patch  # the batch's map
            if all(size == (height, width) for size in sizes):
                _, _, feature_map = stage(feature_map)
            elif stage.masks_keys(height, width):
                key_extents = torch.tensor(sizes, device=feature_map.device)  # (B, 2)
                _, _, feature_map = stage(feature_map, key_extents)
                # tokens beyond an extent hold don't-care values: zero them, as the contract says
                feature_map = feature_map.masked_fill(~extent_mask(key_extents, height, width)[:, None], 0.0)
            else:
                feature_map = self._stage_per_image_size(stage, feature_map, sizes, height, width)
            feature_maps += (feature_map,)

        # back to the maps of the whole input
        full_sizes, (full_height, full_width) = [], full_size
        for stage in self.stages:
            full_height //= stage.patch_embeddings.patch_size
            full_width //= stage.patch_embeddings.patch_size
            full_sizes.append((full_height, full_width))
        padded_maps = ()
        for feature_map, (full_height, full_width) in zip(
            feature_maps, [full_sizes[0], *full_sizes]
        ):  # stem: stage 1's size
            if feature_map is not None:
                pad = (0, full_width - feature_map.shape[-1], 0, full_height - feature_map.shape[-2])
                feature_map = F.pad(feature_map, pad) if any(pad) else feature_map
            padded_maps += (feature_map,)
        return ViLEncoderOutput(feature_maps=padded_maps)

    @staticmethod
    def _stage_per_image_size(
        stage: "ViLStage", feature_map: torch.Tensor, sizes: list[tuple[int, int]], height: int, width: int
    ) -> torch.Tensor:
        """The stage on each group of images of one extent, cropped, zero-padded back to (B, d, height, width)."""
        patch = stage.patch_embeddings.patch_size
        groups: dict[object, list[int]] = {}
        for b, size in enumerate(sizes):
            groups.setdefault(b if stage.mixes_batch else size, []).append(b)
        output = None
        for images in groups.values():
            rows, cols = sizes[images[0]]
            _, _, group_map = stage(feature_map[images, :, : rows * patch, : cols * patch])  # (n, d, rows, cols)
            if output is None:
                output = group_map.new_zeros(len(sizes), group_map.shape[1], height, width)
            output[images, :, :rows, :cols] = group_map
        return output


class ViLPreTrainedModel(PreTrainedModel):
    config_class = ViLConfig
    config: ViLConfig
    base_model_prefix = "vil"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViLLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # PyTorch's default, as the original leaves its convolutions
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
                bound = 1 / math.sqrt(fan_in)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, ViLStage):
            if module.global_tokens is not None:
                init.trunc_normal_(module.global_tokens, std=std)
        elif isinstance(module, ViLAbsolutePositionEmbeddings):
            for table in (module.row_embeddings, module.column_embeddings, module.global_embeddings):
                init.trunc_normal_(table, std=std)
        elif isinstance(module, ViLAttentionBase):
            for table in module.bias_parameters():
                init.trunc_normal_(table, std=std)
            if isinstance(module, ViLPerformerAttention):
                init.copy_(module.projection_matrix, module.draw_projection())
            elif isinstance(module, ViLLinformerAttention):
                module.init_sequence_projections(init.uniform_)
        elif isinstance(module, ViLEncoder) and module.has_performer:
            init.zeros_(module.calls_since_last_redraw)

    def get_input_embeddings(self) -> ViLPatchProjection:
        """Stage 1's patch projection, the first layer the pixels meet (as Swin and ViT return theirs).

        Its output is a tensor, so `enable_input_require_grads()` can make the activations require grad
        when the embedding is frozen and the blocks are checkpointed with `use_reentrant=True`.
        """
        return self.base_model.encoder.stages[0].patch_embeddings.projection

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.base_model.encoder.stages[0].patch_embeddings.projection = value

    def _check_output_attentions(self, output_attentions: bool | None) -> None:
        if output_attentions if output_attentions is not None else self.config.output_attentions:
            raise ValueError(
                f"{type(self).__name__} cannot return attention weights: ViL's longformer attention never builds "
                "the (query, key) matrix. Leave output_attentions unset (also in the config); use "
                "output_hidden_states=True for each stage's tokens."
            )

    def set_random_shift(self, enabled: bool) -> None:
        """Switch training-time random shifting on or off (the original turns it off late in training)."""
        if enabled and self.config.exact_window:
            raise ValueError("Random shifting cannot be used with exact_window=True (it samples whole chunks).")
        self.config.random_shift = bool(enabled)
        for module in self.modules():
            if isinstance(module, ViLLongformerAttention):
                module.random_shift = bool(enabled)


class ViLModel(ViLPreTrainedModel):
    """ViL encoder with the final LayerNorm and pooling of the classification model."""

    def __init__(self, config: ViLConfig):
        super().__init__(config)
        self.encoder = ViLEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps)
        self.post_init()

    # No **kwargs: a misspelt argument is an error, not ignored. (transformers' Trainer then also knows that
    # the loss is not normalised by `num_items_in_batch`, and scales it for gradient accumulation itself.)
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> ViLModelOutput | tuple:
        self._check_output_attentions(output_attentions)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        encoded = self.encoder(pixel_values, output_hidden_states=output_hidden_states)
        sequence_output = self.layernorm(encoded.last_hidden_state)
        if self.config.num_global_tokens[-1] > 0 and not self.config.average_pool:
            pooled_output = sequence_output[:, 0]
        else:
            pooled_output = sequence_output.mean(dim=1)
        output = ViLModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=encoded.hidden_states,
            reshaped_hidden_states=encoded.feature_maps if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()


class ViLForImageClassification(ViLPreTrainedModel):
    def __init__(self, config: ViLConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vil = ViLModel(config)
        self.classifier = (
            nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        self._check_output_attentions(output_attentions)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.vil(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()


def image_sizes_from_pixel_mask(pixel_mask: torch.Tensor, pixel_values: torch.Tensor) -> list[tuple[int, int]]:
    """(rows, cols) of each image of a padded batch, from its (B, H, W) ``pixel_mask``.

    The mask is 1 on each image's top-left-anchored rectangle, as image processors pad; anything
    else is an error, since the maps could not be those of the image alone.
    """
    batch, height, width = pixel_values.shape[0], *pixel_values.shape[-2:]
    if pixel_mask.shape != (batch, height, width):
        raise ValueError(
            f"pixel_mask must have shape (batch, height, width) = {(batch, height, width)} to match pixel_values "
            f"{tuple(pixel_values.shape)}, got {tuple(pixel_mask.shape)}."
        )
    mask = pixel_mask.bool()
    rows, cols = mask.any(2).sum(1), mask.any(1).sum(1)  # (B,) each
    rectangles = extent_mask(torch.stack([rows, cols], dim=1), height, width)
    if not torch.equal(rectangles, mask):
        bad = int((rectangles != mask).flatten(1).any(1).nonzero()[0])
        raise ValueError(
            f"pixel_mask of image {bad} is not a top-left-anchored rectangle of ones; ViL takes images padded at the "
            "bottom and right (as the image processors pad), with pixel_mask 1 on the image and 0 on the padding."
        )
    sizes = list(zip(rows.tolist(), cols.tolist()))
    empty = [b for b, (r, c) in enumerate(sizes) if r == 0 or c == 0]
    if empty:
        raise ValueError(f"pixel_mask of image {empty[0]} is all zeros: the image has no pixels.")
    return sizes


class ViLBackbone(BackboneMixin, ViLPreTrainedModel):
    """ViL as a feature extractor: NCHW maps of the requested `stage_names` ("stem", "stage1", ...).

    As in the original detection backbone, the maps carry no extra normalisation. The stem is stage 1's
    patch embedding (the tokens before stage 1's blocks); each stage's map holds its local output tokens.

    Padded batches: with ``pixel_mask`` (B, H, W), 1 on each image's top-left rectangle, each
    image's maps equal, within its extent, the maps of the image cropped to its rectangle and run
    alone (stage extents follow the patch embeddings: floor division by each patch size), and are
    zero beyond it. Attention masks the keys beyond each image's extent where that suffices
    (longformer and global attention; full attention and absolute tables as long as the map needs
    no resizing), and runs the images of each extent on their own, cropped, elsewhere.
    """

    has_attentions = False
    # The detectors give their padded batches with pixel_mask and rely on the contract above.
    supports_pixel_mask = True
    _keys_to_ignore_on_load_unexpected = [r"^layernorm\.", r"^classifier\."]

    def __init__(self, config: ViLConfig):
        super().__init__(config)
        # channels per stage name: the stem has stage 1's width (as ConvNeXt's stem has its first stage's)
        self.num_features = [config.hidden_sizes[0]] + list(config.hidden_sizes)
        self.encoder = ViLEncoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BackboneOutput | tuple:
        self._check_output_attentions(output_attentions)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        image_sizes = None
        if pixel_mask is not None:
            image_sizes = image_sizes_from_pixel_mask(pixel_mask, pixel_values)
            if all(size == tuple(pixel_values.shape[-2:]) for size in image_sizes):
                image_sizes = None  # every image fills the input: the plain computation
        encoded = self.encoder(
            pixel_values,
            output_hidden_states=False,
            output_stem=output_hidden_states or "stem" in self.out_features,
            image_sizes=image_sizes,
        )
        feature_maps = tuple(
            feature_map
            for name, feature_map in zip(self.stage_names, encoded.feature_maps)
            if name in self.out_features
        )
        output = BackboneOutput(
            feature_maps=feature_maps, hidden_states=encoded.feature_maps if output_hidden_states else None
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "ViLBackbone",
    "ViLForImageClassification",
    "ViLModel",
    "ViLPreTrainedModel",
    "image_sizes_from_pixel_mask",
]
