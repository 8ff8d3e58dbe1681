"""Multi-level RoIAlign: each box is pooled from the FPN level that suits its size."""

from __future__ import annotations

import math

import torch
from torch import nn

from vil_kernels.ops import roi_align_maps


def boxes_to_rois(boxes: list[torch.Tensor]) -> torch.Tensor:
    """Per-image (K_i, 4) boxes -> (sum K_i, 5) rows of (image index, x1, y1, x2, y2)."""
    rois = [torch.cat((box.new_full((box.shape[0], 1), float(index)), box), dim=1) for index, box in enumerate(boxes)]
    return torch.cat(rois, dim=0) if rois else torch.zeros(0, 5)


def assign_boxes_to_levels(
    boxes: torch.Tensor, min_level: int, max_level: int, canonical_box_size: float, canonical_level: int
) -> torch.Tensor:
    """FPN paper's eq. 1: level k0 + log2(sqrt(area) / 224), floored and clamped; returned relative to min_level."""
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size + 1e-8))
    return (levels.clamp(min=min_level, max=max_level) - min_level).to(torch.int64)


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign (aligned, half-pixel) of boxes over several feature levels, output in the input box order."""

    def __init__(
        self,
        output_size: int,
        sampling_ratio: int = 0,
        canonical_box_size: float = 224,
        canonical_level: int = 4,
        aligned: bool = True,
    ):
        super().__init__()
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        self.aligned = aligned

    @torch.compiler.disable  # boxes per level and per extent are data-dependent: runs eagerly inside compiled code
    def forward(
        self,
        features: list[torch.Tensor],
        strides: list[int],
        boxes: list[torch.Tensor],
        extents: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """features: per level (N, C, H_l, W_l); boxes: per image (K_i, 4) -> (sum K_i, C, S, S).

        extents: per level, (N, 2) each image's extent on that map, or None when every image fills the batch;
        each image's boxes are then pooled from its map cut to its extent, whose border the bilinear sampling
        clamps to as it does alone. All levels in one RoIAlign call (one reduction forward and backward).
        """
        rois = boxes_to_rois(boxes).to(features[0])
        levels = [int(round(math.log2(stride))) for stride in strides]
        level_of_box = assign_boxes_to_levels(
            rois[:, 1:], levels[0], levels[-1], self.canonical_box_size, self.canonical_level
        )
        scales = [1.0 / stride for stride in strides]
        return roi_align_maps(
            features, rois, level_of_box, self.output_size, scales, self.sampling_ratio, self.aligned, extents
        )
