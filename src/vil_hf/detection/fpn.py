"""Feature pyramid network (Lin et al., 2017) with the two top blocks of the published detectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import CheckpointedModule


class LastLevelMaxPool(nn.Module):
    """Mask R-CNN's extra level: P6 is P5 subsampled by 2 (a 1x1 max-pool with stride 2)."""

    num_levels = 1
    uses_backbone_feature = False

    def forward(self, top_pyramid_level: torch.Tensor) -> list[torch.Tensor]:
        return [F.max_pool2d(top_pyramid_level, kernel_size=1, stride=2, padding=0)]


class LastLevelP6P7(nn.Module):
    """RetinaNet's extra levels: P6 by a stride-2 3x3 conv on the raw last backbone map, P7 on ReLU(P6)."""

    num_levels = 2
    uses_backbone_feature = True

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1)

    def forward(self, last_backbone_feature: torch.Tensor) -> list[torch.Tensor]:
        p6 = self.p6(last_backbone_feature)
        return [p6, self.p7(F.relu(p6))]


class FeaturePyramidNetwork(CheckpointedModule):
    """Lateral 1x1 convs, nearest-neighbour top-down sums, 3x3 output convs; no normalisation.

    Expects backbone maps of strides increasing by 2 (input padded to a multiple of the largest stride).
    """

    def __init__(self, in_channels: list[int], out_channels: int, top_block: nn.Module | None = None):
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, kernel_size=1) for c in in_channels)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1) for _ in in_channels
        )
        self.top_block = top_block

    def forward(self, backbone_features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(backbone_features) != len(self.lateral_convs):
            raise ValueError(f"FPN expects {len(self.lateral_convs)} backbone maps, got {len(backbone_features)}")
        top_down = self.lateral_convs[-1](backbone_features[-1])
        pyramid = [self.output_convs[-1](top_down)]
        for feature, lateral_conv, output_conv in zip(
            backbone_features[-2::-1], self.lateral_convs[-2::-1], self.output_convs[-2::-1]
        ):
            lateral = lateral_conv(feature)
            # Sizes are exactly 2x for inputs padded to the largest stride; naming the size keeps odd ones working.
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            pyramid.insert(0, output_conv(top_down))
        if self.top_block is not None:
            source = backbone_features[-1] if self.top_block.uses_backbone_feature else pyramid[-1]
            pyramid.extend(self.top_block(source))
        return pyramid
