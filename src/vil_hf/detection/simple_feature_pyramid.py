"""ViTDet's simple feature pyramid (Li et al., 2022, "Exploring Plain Vision Transformer Backbones for Object
Detection"): multi-stride maps for the FPN from the one stride-16 map of a plain (single-stride) backbone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import CheckpointedModule

# The pyramid's strides, made from the backbone's stride-16 map.
SIMPLE_PYRAMID_STRIDES = (4, 8, 16, 32)
SOURCE_STRIDE = 16


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map (at every position), as ViTDet normalises between deconvolutions."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        normalized = F.layer_norm(feature_map.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return normalized.permute(0, 3, 1, 2)


def _branch(channels: int, stride: int) -> tuple[nn.Module, int]:
    """The layers that bring a stride-16 map of `channels` to `stride`, and their output channels."""
    if stride == 4:  # two stride-2 deconvolutions, halving the channels each time
        return nn.Sequential(
            nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2),
            LayerNorm2d(channels // 2),
            nn.GELU(),
            nn.ConvTranspose2d(channels // 2, channels // 4, kernel_size=2, stride=2),
        ), channels // 4
    if stride == 8:
        return nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2), channels // 2
    if stride == 16:
        return nn.Identity(), channels
    if stride == 32:
        return nn.MaxPool2d(kernel_size=2, stride=2), channels
    raise ValueError(f"the simple feature pyramid makes strides {SIMPLE_PYRAMID_STRIDES}, not {stride}")


class SimpleFeaturePyramid(CheckpointedModule):
    """From the last stride-16 map: two stride-2 deconvolutions give stride 4, one gives 8, the map itself is 16,
    a 2x2 max-pool gives 32. The FPN's lateral and output convolutions then bring every level to its width.

    Each output cell depends on one input cell only (2x2 deconvolutions and pooling do not overlap), so a map
    that is zero beyond an image's extent stays confined to it.
    """

    def __init__(self, in_channels: int, strides: tuple[int, ...] = SIMPLE_PYRAMID_STRIDES):
        super().__init__()
        if in_channels % 4:
            raise ValueError(f"the simple feature pyramid needs backbone channels divisible by 4, got {in_channels}")
        self.strides = list(strides)
        branches, channels = zip(*(_branch(in_channels, stride) for stride in self.strides))
        self.branches = nn.ModuleList(branches)
        self.channels = list(channels)

    def forward(self, feature_map: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H/16, W/16) -> one map per stride, (B, C_s, H/s, W/s)."""
        return [branch(feature_map) for branch in self.branches]
