"""Feature pyramid network (Lin et al., 2017) with the two top blocks of the published detectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import CheckpointedModule
from .extents import zero_beyond_extents


def channels_last_on_cpu(feature_map: torch.Tensor) -> torch.Tensor:
    """The map in channels-last (NHWC) memory on CPU; unchanged on other devices and while torch.export traces.

    oneDNN's CPU convolutions run NHWC maps faster than NCHW ones, and their outputs stay NHWC, so one
    conversion at the input of a stack of convolutions speeds up all of them (measured at the demo's sizes:
    a 3x3 conv of 64 channels on 8 maps of 32x32, forward 1.7 against 3.5 ms; the 2x deconvolution of the
    mask head, 0.49 against 4.8 ms). torch.compile keeps it (compiled and eager then round alike); torch.export
    does not, as the conversion's stride checks on symbolic sizes add guards that break dynamic-shape export.
    """
    if feature_map.device.type != "cpu" or torch.compiler.is_exporting():
        return feature_map
    return feature_map.contiguous(memory_format=torch.channels_last)


class LastLevelMaxPool(nn.Module):
    """Mask R-CNN's extra level: P6 is P5 subsampled by 2 (a 1x1 max-pool with stride 2)."""

    num_levels = 1
    uses_backbone_feature = False

    def forward(self, top_pyramid_level: torch.Tensor, extents: torch.Tensor | None = None) -> list[torch.Tensor]:
        # A 1x1 window reads no neighbour: nothing beyond an extent reaches the cells inside it.
        return [F.max_pool2d(top_pyramid_level, kernel_size=1, stride=2, padding=0)]


class LastLevelP6P7(nn.Module):
    """RetinaNet's extra levels: P6 by a stride-2 3x3 conv on the raw last backbone map, P7 on ReLU(P6)."""

    num_levels = 2
    uses_backbone_feature = True

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1)

    def forward(self, last_backbone_feature: torch.Tensor, extents: torch.Tensor | None = None) -> list[torch.Tensor]:
        """`extents`: (B, 2) each image's extent on the input map, or None when every image fills the batch."""
        p6 = self.p6(zero_beyond_extents(last_backbone_feature, extents))
        p6_extents = None if extents is None else (extents + 1) // 2  # the stride-2 conv's output size alone
        return [p6, self.p7(zero_beyond_extents(F.relu(p6), p6_extents))]


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

    def forward(
        self, backbone_features: list[torch.Tensor], extents: list[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """`extents`: per backbone map, (B, 2) each image's extent on it, or None when every image fills the batch;
        the 3x3 convolutions then see zeros beyond each extent, as they would pad the image alone."""
        if len(backbone_features) != len(self.lateral_convs):
            raise ValueError(f"FPN expects {len(self.lateral_convs)} backbone maps, got {len(backbone_features)}")
        extents = extents or [None] * len(backbone_features)
        # ViL's maps are channels-last already; most other backbones give NCHW
        backbone_features = [channels_last_on_cpu(feature) for feature in backbone_features]
        top_down = self.lateral_convs[-1](backbone_features[-1])
        pyramid = [self.output_convs[-1](zero_beyond_extents(top_down, extents[-1]))]
        for feature, level_extents, lateral_conv, output_conv in zip(
            backbone_features[-2::-1], extents[-2::-1], self.lateral_convs[-2::-1], self.output_convs[-2::-1]
        ):
            lateral = lateral_conv(feature)
            # Sizes are exactly 2x for inputs padded to the largest stride; naming the size keeps odd ones working.
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            pyramid.insert(0, output_conv(zero_beyond_extents(top_down, level_extents)))
        if self.top_block is not None:
            source = backbone_features[-1] if self.top_block.uses_backbone_feature else pyramid[-1]
            pyramid.extend(self.top_block(source, extents[-1]))
        return pyramid
