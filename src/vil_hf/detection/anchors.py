"""Anchor boxes over the FPN levels."""

from __future__ import annotations

import math

import torch
from torch import nn


class AnchorGenerator(nn.Module):
    """Places `len(sizes[l]) * len(aspect_ratios)` anchors at every cell of level l.

    Anchors are centred on the cell's top-left corner (offset 0), ordered location-major, then size, then
    aspect ratio (h / w), so they line up with a head's (N, A*k, H, W) outputs permuted to (N, H, W, A, k).
    """

    def __init__(self, sizes: list[list[float]], aspect_ratios: list[float], offset: float = 0.0):
        super().__init__()
        self.sizes = [list(level_sizes) for level_sizes in sizes]
        self.aspect_ratios = list(aspect_ratios)
        self.offset = offset
        for level in range(len(self.sizes)):
            self.register_buffer(f"cell_anchors_{level}", self.cell_anchors(level), persistent=False)

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.sizes[0]) * len(self.aspect_ratios)

    def cell_anchors(self, level: int) -> torch.Tensor:
        """The anchors of one cell of `level`, centred on (0, 0): (A, 4)."""
        anchors = []
        for size in self.sizes[level]:
            area = size**2
            for ratio in self.aspect_ratios:
                width = math.sqrt(area / ratio)
                height = ratio * width
                anchors.append([-width / 2, -height / 2, width / 2, height / 2])
        return torch.tensor(anchors, dtype=torch.float32, device="cpu")  # (A, 4)

    def forward(self, feature_maps: list[torch.Tensor], strides: list[int]) -> list[torch.Tensor]:
        """One (H_l * W_l * A, 4) tensor of anchors per level, in input-image pixels."""
        if len(feature_maps) != len(self.sizes):
            raise ValueError(f"expected {len(self.sizes)} feature maps for the anchor levels, got {len(feature_maps)}")
        anchors = []
        for level, (feature_map, stride) in enumerate(zip(feature_maps, strides)):
            cell = getattr(self, f"cell_anchors_{level}").to(feature_map.device)
            height, width = feature_map.shape[-2:]
            shifts_x = torch.arange(width, dtype=torch.float32, device=cell.device) * stride + self.offset * stride
            shifts_y = torch.arange(height, dtype=torch.float32, device=cell.device) * stride + self.offset * stride
            grid_y, grid_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            grid_x, grid_y = grid_x.reshape(-1), grid_y.reshape(-1)
            shifts = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=1)  # (H*W, 4)
            anchors.append((shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4))
        return anchors
