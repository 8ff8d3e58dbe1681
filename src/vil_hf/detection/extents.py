"""Each image's extent in a padded batch, so that a batched image is detected as it would be alone.

Alone, the detector pads an image to a multiple of `size_divisibility`: that padded rectangle, anchored at the
top-left corner, is the image's extent. In a batch padded to the largest image, the maps beyond an image's extent
hold values that the image alone would not have (the backbone's and the convolutions' responses to the padding,
or to nothing at all), and the heads see anchors that the image alone would not have. The helpers here give the
extents at each map's resolution and cut the maps and the per-anchor rows back to them.
"""

from __future__ import annotations

import torch


def image_extents(image_sizes: torch.Tensor, size_divisibility: int) -> torch.Tensor:
    """(B, 2) heights and widths -> (B, 2) the sizes each image is padded to alone."""
    divisor = max(int(size_divisibility), 1)
    return (image_sizes + divisor - 1) // divisor * divisor


def extents_at_stride(extents: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, 2) extents in input pixels -> (B, 2) extents on a map of `stride`.

    Exact for strides dividing the extents; otherwise rounded up, which is what a stride-2 3x3 convolution with
    padding 1 (RetinaNet's P6, P7) or a 1x1 stride-2 max-pool (Mask R-CNN's P6) makes of an odd size alone.
    """
    return (extents + stride - 1) // stride


def extent_mask(extents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, height, width) bool: True inside each image's extent rectangle."""
    rows = torch.arange(height, device=extents.device)
    columns = torch.arange(width, device=extents.device)
    inside_rows = rows[None, :] < extents[:, 0, None]  # (B, H)
    inside_columns = columns[None, :] < extents[:, 1, None]  # (B, W)
    return inside_rows[:, :, None] & inside_columns[:, None, :]


def zero_beyond_extents(feature_map: torch.Tensor, extents: torch.Tensor | None) -> torch.Tensor:
    """(B, C, H, W) map with zeros beyond each image's extent (given on this map, (B, 2)); unchanged for None.

    A convolution that reads across the extent's border then sees the zeros it pads with when the image is alone.
    """
    if extents is None:
        return feature_map
    mask = extent_mask(extents, feature_map.shape[-2], feature_map.shape[-1])[:, None]  # (B, 1, H, W)
    return torch.where(mask, feature_map, torch.zeros((), dtype=feature_map.dtype, device=feature_map.device))


def crop_anchor_rows(rows: torch.Tensor, dim: int, map_size: tuple[int, int], extent: tuple[int, int]) -> torch.Tensor:
    """Keeps the entries of the cells inside `extent` from per-anchor rows laid out location-major.

    `rows` has H*W*A entries along `dim` ordered (row, column, anchor), as the anchors and the heads' outputs are;
    the result has eh*ew*A entries in the same order, which is the order the image alone would have.
    """
    height, width = map_size
    extent_height, extent_width = extent
    shape = rows.shape
    grid = rows.reshape(*shape[:dim], height, width, -1, *shape[dim + 1 :])
    grid = grid[(slice(None),) * dim + (slice(0, extent_height), slice(0, extent_width))]
    return grid.reshape(*shape[:dim], -1, *shape[dim + 1 :])


def anchors_and_outputs_of_image(
    image: int,
    anchors: list[torch.Tensor],
    outputs: list[list[torch.Tensor]],
    map_sizes: list[tuple[int, int]],
    extents: list[torch.Tensor],
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """One image's anchors and head outputs, per level, cut to its extent: what its heads would give alone.

    anchors: per level (H*W*A, 4); outputs: per kind (logits, deltas...), per level (N, H*W*A, ...);
    extents: per level (N, 2). -> anchors per level (eh*ew*A, 4) and per kind, per level (1, eh*ew*A, ...).
    """
    image_anchors, image_outputs = [], [[] for _ in outputs]
    for level, (map_size, level_extents) in enumerate(zip(map_sizes, extents)):
        extent = tuple(level_extents[image].tolist())
        image_anchors.append(crop_anchor_rows(anchors[level], 0, map_size, extent))
        for kind, output in enumerate(outputs):
            image_outputs[kind].append(crop_anchor_rows(output[level][image : image + 1], 1, map_size, extent))
    return image_anchors, image_outputs
