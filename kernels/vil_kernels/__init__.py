"""Compute kernels of vil-hf: ViL's longformer attention (a plain reference and fast paths).

PyTorch, plus optional C++ kernels (the blocked kernel's softmax steps, RoIAlign) built on first use
(``vil_kernels.native``, with a PyTorch fallback);
nothing here depends on transformers, so the kernels can be tested and reused alone.
"""

from .longformer import (
    IMPLEMENTATIONS as LONGFORMER_IMPLEMENTATIONS,
    NEIGHBOR_OFFSETS,
    longformer_attention,
    longformer_attention_blocked,
    longformer_attention_dense,
    longformer_attention_flex,
    longformer_attention_reference,
    longformer_attention_vectorized,
    relative_bias_index,
    relative_bias_table_size,
)

__all__ = [
    "LONGFORMER_IMPLEMENTATIONS",
    "NEIGHBOR_OFFSETS",
    "longformer_attention",
    "longformer_attention_blocked",
    "longformer_attention_dense",
    "longformer_attention_flex",
    "longformer_attention_reference",
    "longformer_attention_vectorized",
    "relative_bias_index",
    "relative_bias_table_size",
]
