"""The paper's attention ablations (vil-reference section 6): ViL-Small, absolute embeddings.

One table, reused by tests, configs and scripts: each row holds the original detection
config's MODEL.TRANSFORMER.MSVIT options (ARCH, ATTN_TYPE, ONLY_GLOBAL; files
``configs/msvit_maskrcnn_fpn_1x_*_small*.yaml`` of the original detection code) and the
published Mask R-CNN 1x results. The strings omit letter a, so every stage has absolute
embeddings (the original's default a1). "Partial X" is X in stages 1-2 and full attention in 3-4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .configuration_vil import ViLConfig


@dataclass(frozen=True)
class Ablation:
    name: str
    arch: str  # the original MSVIT.ARCH string
    attn_type: str  # the original MSVIT.ATTN_TYPE
    only_global: bool  # the original MSVIT.ONLY_GLOBAL
    original_config: str  # file name in the original detection repository's configs/
    box_ap: float
    mask_ap: float
    published_params_m: float  # Mask R-CNN with 80 classes, plus the unused 1000-class head
    note: str = ""

    @property
    def attention_type(self) -> str:
        """Our ``ViLConfig.attention_type`` for this row."""
        if self.only_global:
            return "global"
        return {"longformerhand": "longformer"}.get(self.attn_type, self.attn_type)

    def config(self, **kwargs: Any) -> ViLConfig:
        """A ViLConfig of this ablation; global-only rows average-pool, as the original's gformer."""
        kwargs.setdefault("average_pool", self.only_global)
        return ViLConfig(arch=self.arch, attention_type=self.attention_type, **kwargs)


def _small(per_stage: list[str]) -> str:
    dims = ("h3,d96,n1", "h3,d192,n2", "h6,d384,n8", "h12,d768,n1")
    patches = ("p4", "p2", "p2", "p2")
    return "_".join(f"l{i + 1},{dims[i]},{per_stage[i].replace('P', patches[i])}" for i in range(4))


ABLATIONS: dict[str, Ablation] = {
    row.name: row
    for row in (
        Ablation(
            "srformer/64",
            _small(["s1,g1,P,f16", "s1,g1,P,f8", "s1,g1,P,f4", "s1,g0,P,f2"]),
            "srformer",
            False,
            "msvit_maskrcnn_fpn_1x_srformer64_small_sparse.yaml",
            36.4,
            34.6,
            73.3,
        ),
        Ablation(
            "srformer/32",
            _small(["s1,g1,P,f8", "s1,g1,P,f4", "s1,g1,P,f2", "s0,g0,P,f1"]),
            "srformer",
            False,
            "msvit_maskrcnn_fpn_1x_srformer32_small_sparse.yaml",
            39.9,
            37.3,
            51.5,
        ),
        Ablation(
            "Partial srformer/32",
            _small(["s1,g1,P,f8", "s1,g1,P,f4", "s0,g1,P,f2", "s0,g0,P,f1"]),
            "srformer",
            False,
            "msvit_maskrcnn_fpn_1x_srformer32_small.yaml",
            42.4,
            39.0,
            46.8,
        ),
        Ablation(
            "global",
            _small(["s1,g256,P,f7", "s1,g256,P,f7", "s1,g64,P,f7", "s1,g16,P,f7"]),
            "longformerhand",
            True,
            "msvit_maskrcnn_fpn_1x_gformer_small_sparse.yaml",
            34.8,
            33.4,
            45.2,
        ),
        Ablation(
            "Partial global",
            _small(["s1,g256,P,f7", "s1,g256,P,f7", "s0,g1,P,f7", "s0,g0,P,f7"]),
            "longformerhand",
            True,
            "msvit_maskrcnn_fpn_1x_gformer_small.yaml",
            42.5,
            39.2,
            45.1,
            note="the original file says h6,d384 in stage 4, a typo: the published 45.1M needs h12,d768",
        ),
        Ablation(
            "performer",
            _small(["s1,g1,P,f256", "s1,g1,P,f256", "s1,g1,P,f256", "s1,g0,P,f256"]),
            "performer",
            False,
            "msvit_maskrcnn_fpn_1x_performer_small_sparse.yaml",
            36.1,
            34.3,
            45.0,
        ),
        Ablation(
            "Partial performer",
            _small(["s1,g1,P,f256", "s1,g1,P,f256", "s0,g1,P,f256", "s0,g0,P,f256"]),
            "performer",
            False,
            "msvit_maskrcnn_fpn_1x_performer_small.yaml",
            42.3,
            39.1,
            45.0,
        ),
        Ablation(
            "ViL",
            _small(["s1,g1,P,f7", "s1,g1,P,f7", "s1,g1,P,f7", "s1,g0,P,f7"]),
            "longformerhand",
            False,
            "msvit_maskrcnn_fpn_1x_small_sparse.yaml (with a1)",
            42.9,
            39.6,
            45.0,
        ),
        Ablation(
            "Partial ViL",
            _small(["s1,g1,P,f7", "s1,g1,P,f7", "s0,g1,P,f7", "s0,g0,P,f7"]),
            "longformerhand",
            False,
            "msvit_maskrcnn_fpn_1x_small.yaml",
            43.3,
            39.8,
            45.0,
        ),
    )
}

# The unused classification head (768 -> 1000) that the published detection counts include.
CLASSIFICATION_HEAD_PARAMS = 768 * 1000 + 1000


__all__ = ["ABLATIONS", "Ablation", "CLASSIFICATION_HEAD_PARAMS"]
