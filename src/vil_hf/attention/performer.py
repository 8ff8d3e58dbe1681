"""Performer attention (FAVOR+ with positive random features), one of the paper's ablations."""

from __future__ import annotations

import torch
from torch import nn

from ..configuration_vil import ViLConfig
from .base import ViLAttentionBase

# added to every random feature after the exponential, as in the original (keeps features > 0)
FEATURE_EPSILON = 1e-4


def gaussian_orthogonal_random_matrix(
    num_features: int, head_dim: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(num_features, head_dim) random projection drawn as the original draws it.

    Rows come in blocks of head_dim orthonormal rows, each block a Haar-random orthogonal matrix
    (the last block truncated); row i is then scaled by the norm of an independent standard
    Gaussian vector of length head_dim, so each row has the length distribution of a Gaussian
    row while the rows of a block stay orthogonal.
    """
    blocks = []
    for start in range(0, num_features, head_dim):
        gaussian = torch.randn(head_dim, head_dim, generator=generator)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r))  # sign fix: Haar-distributed orthogonal matrix
        blocks.append(q[: min(head_dim, num_features - start)])
    norms = torch.randn(num_features, head_dim, generator=generator).norm(dim=1)
    return norms[:, None] * torch.cat(blocks)


def softmax_random_features(data: torch.Tensor, projection: torch.Tensor, is_query: bool) -> torch.Tensor:
    """Positive random features phi(x) of FAVOR+, with the original's stabilisers.

    data (B, H, N, M), projection (F, M) -> (B, H, N, F):
    phi(x) = F^-1/2 (exp(w.x' - |x'|^2/2 - m) + 1e-4) with x' = x M^-1/4, where m is the
    maximum of w.x' over the features of each query row, and for keys the maximum over the whole
    key tensor (all samples, heads and tokens), exactly as the original. The M^-1/4 on both sides
    gives the softmax's head_size^-1/2 scaling, so queries are not scaled otherwise.
    """
    normalizer = data.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    projected = torch.einsum("bhnm,fm->bhnf", normalizer * data, projection.to(data.dtype))
    half_square_norm = (data**2).sum(dim=-1, keepdim=True) * (normalizer**2) / 2.0  # (B, H, N, 1)
    if is_query:
        stabiliser = projected.amax(dim=-1, keepdim=True)
    else:
        stabiliser = projected.amax()
    return ratio * (torch.exp(projected - half_square_norm - stabiliser) + FEATURE_EPSILON)


def linear_attention(query_features: torch.Tensor, key_features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention: out_i = sum_j (q_i.k_j) v_j / sum_j q_i.k_j, in O(N F M)."""
    key_sum = key_features.sum(dim=-2)  # (B, H, F)
    normaliser = 1.0 / torch.einsum("bhnf,bhf->bhn", query_features, key_sum)
    context = torch.einsum("bhnf,bhnm->bhfm", key_features, values)  # (B, H, F, M)
    return torch.einsum("bhnf,bhfm->bhnm", query_features, context) * normaliser[..., None]


class ViLPerformerAttention(ViLAttentionBase):
    """All tokens attend to all tokens through FAVOR+ (global tokens are ordinary tokens).

    A fused `qkv` projection (rows [q; k; v]) as in full attention; softmax(q.k/sqrt(M)) is
    approximated with ``num_random_features`` (letter f) positive random features drawn from
    ``projection_matrix`` (F, M), a buffer stored in the checkpoint. In training the model redraws
    it on the original's schedule (see ``ViLConfig.performer_redraw_interval``). As in the
    original, there is no attention-probability dropout and no relative position bias.
    """

    supports_relative_bias = False
    mixes_batch = True  # the key stabiliser is a maximum over the whole batch

    def __init__(self, config: ViLConfig, stage_index: int):
        super().__init__(config, stage_index)
        self.num_random_features = config.window_sizes[stage_index]
        self.qkv = nn.Linear(self.dim, 3 * self.dim, bias=config.qkv_bias)  # rows [q; k; v]
        self.proj = nn.Linear(self.dim, self.dim)
        self.register_buffer("projection_matrix", self.draw_projection())

    def draw_projection(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh (F, M) projection, drawn on the CPU (torch's generator, or ``generator``)."""
        return gaussian_orthogonal_random_matrix(self.num_random_features, self.head_dim, generator)

    @torch.no_grad()
    def redraw_projection(self, generator: torch.Generator | None = None) -> None:
        self.projection_matrix.copy_(self.draw_projection(generator))

    def forward(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, length, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        queries, keys, values = qkv.unbind(0)  # (B, H, N, M); one backward for the three
        query_features = softmax_random_features(queries, self.projection_matrix, is_query=True)
        key_features = softmax_random_features(keys, self.projection_matrix, is_query=False)
        context = linear_attention(query_features, key_features, values)  # (B, H, N, M)
        return self.proj_dropout(self.proj(context.transpose(1, 2).reshape(batch, length, dim)))
