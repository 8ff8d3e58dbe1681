"""Drawing detections on images (pure PIL + numpy): translucent masks, boxes, "label 0.93" captions.

Each class keeps one colour (golden-ratio hues), so the same class looks the same across a grid.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..io_utils import atomic_save_image
from .coco_eval import detection_arrays

MASK_ALPHA = 0.45
BOX_WIDTH = 2
FONT_SIZE = 10
# On larger pictures outlines and captions grow with the shorter side, so that they stay readable.
_PIXELS_PER_FONT_POINT = 40
_PIXELS_PER_LINE_WIDTH = 300


def class_colour(label: int) -> tuple[int, int, int]:
    """A saturated RGB colour for class ``label``; neighbouring labels get far-apart hues."""
    hue = (0.61803398875 * (int(label) + 1)) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(red * 255), int(green * 255), int(blue * 255)


def _caption(label: int, score: float, id2label: Mapping[int, str] | None) -> str:
    name = str(label)
    if id2label is not None:
        name = str(id2label.get(int(label), id2label.get(str(int(label)), label)))  # type: ignore[arg-type]
    return f"{name} {score:.2f}"


def draw_detections(
    image: Image.Image,
    boxes: Any,
    labels: Any,
    scores: Any,
    masks: Any = None,
    id2label: Mapping[int, str] | None = None,
    score_threshold: float = 0.5,
    *,
    font_size: int | None = None,
    line_width: int | None = None,
    min_side: int | None = None,
) -> Image.Image:
    """A copy of ``image`` (RGB) with the detections scoring at least ``score_threshold`` drawn on it.

    Args:
        image: the original image (any PIL mode; drawn on an RGB copy).
        boxes: (N, 4) ``x1, y1, x2, y2`` in the image's pixels.
        labels: (N,) class labels; ``id2label`` names them in the captions.
        scores: (N,) confidences.
        masks: optional (N, H, W) masks at the image size (bool, 0/1 or probabilities, cut at 0.5).
        font_size / line_width: caption size and outline width in pixels; by default 10 and 2, more on
            images whose shorter side exceeds 400 / 600 pixels.
        min_side: draw an image whose shorter side is smaller on a copy enlarged by the smallest whole
            factor that reaches it (nearest neighbour, so masks stay pixel-exact): captions stay readable.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
    boxes_np, scores_np, labels_np = detection_arrays(boxes, scores, labels)
    count = boxes_np.shape[0]
    factor = 1
    if min_side and min(image.size) < min_side:
        factor = -(-int(min_side) // min(image.size))
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
        boxes_np = boxes_np * factor
    canvas = np.array(image.convert("RGB"), dtype=np.float32)
    height, width = canvas.shape[:2]
    keep = np.nonzero(scores_np >= score_threshold)[0]
    # Lowest scores first, so the most confident detection ends on top.
    keep = keep[np.argsort(scores_np[keep], kind="stable")]

    if masks is not None:
        masks_np = np.asarray(masks.detach().cpu() if hasattr(masks, "detach") else masks)
        if masks_np.ndim == 4 and masks_np.shape[1] == 1:
            masks_np = masks_np[:, 0]
        if factor > 1 and masks_np.ndim == 3:
            masks_np = masks_np.repeat(factor, axis=1).repeat(factor, axis=2)
        if masks_np.ndim != 3 or masks_np.shape[0] != count or masks_np.shape[1:] != (height, width):
            raise ValueError(
                f"masks must be (N, H, W) = ({count}, {height}, {width}) to match the boxes and the image; "
                f"got shape {masks_np.shape}"
            )
        for index in keep:
            mask = masks_np[index]
            mask = mask >= 0.5 if np.issubdtype(mask.dtype, np.floating) else mask.astype(bool)
            colour = np.array(class_colour(int(labels_np[index])), dtype=np.float32)
            canvas[mask] = canvas[mask] * (1 - MASK_ALPHA) + colour * MASK_ALPHA

    result = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(result)
    shorter = min(width, height)
    line_width = line_width or max(BOX_WIDTH, round(shorter / _PIXELS_PER_LINE_WIDTH))
    font = ImageFont.load_default(size=font_size or max(FONT_SIZE, round(shorter / _PIXELS_PER_FONT_POINT)))
    for index in keep:
        colour = class_colour(int(labels_np[index]))
        x1, y1, x2, y2 = boxes_np[index].tolist()
        x1, x2 = sorted((min(max(x1, 0.0), width - 1.0), min(max(x2, 0.0), width - 1.0)))
        y1, y2 = sorted((min(max(y1, 0.0), height - 1.0), min(max(y2, 0.0), height - 1.0)))
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line_width)
        text = _caption(int(labels_np[index]), float(scores_np[index]), id2label)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left, bottom - top
        tx = min(x1, max(width - text_w - 2, 0))
        ty = y1 - text_h - 2 if y1 - text_h - 2 >= 0 else y1
        draw.rectangle((tx, ty, tx + text_w + 2, ty + text_h + 2), fill=colour)
        draw.text((tx + 1 - left, ty + 1 - top), text, fill=(255, 255, 255), font=font)
    return result


def _render(item: Any, id2label: Mapping[int, str] | None, score_threshold: float) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], Image.Image):
        image, prediction = item
        if not isinstance(prediction, Mapping) or not {"boxes", "labels", "scores"} <= set(prediction):
            raise ValueError("a prediction must be a dict with 'boxes', 'labels', 'scores' (and optional 'masks')")
        return draw_detections(
            image,
            prediction["boxes"],
            prediction["labels"],
            prediction["scores"],
            masks=prediction.get("masks"),
            id2label=id2label,
            score_threshold=score_threshold,
        )
    raise TypeError(
        "each item of images_with_preds must be a PIL image (already drawn) or a pair "
        f"(PIL image, {{'boxes', 'labels', 'scores', 'masks'?}}); got {type(item).__name__}"
    )


def save_detection_grid(
    images_with_preds: Sequence[Any],
    path: str | os.PathLike,
    columns: int = 2,
    *,
    id2label: Mapping[int, str] | None = None,
    score_threshold: float = 0.5,
    gap: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Path:
    """Draw each (image, prediction) pair (or take already drawn images) and save one PNG grid.

    Cells are as large as the largest image; the file is written to a temporary name and renamed.
    """
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    tiles = [_render(item, id2label, score_threshold) for item in images_with_preds]
    if not tiles:
        raise ValueError("images_with_preds is empty: nothing to draw")
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    cell_w = max(tile.width for tile in tiles)
    cell_h = max(tile.height for tile in tiles)
    grid = Image.new("RGB", (columns * cell_w + (columns - 1) * gap, rows * cell_h + (rows - 1) * gap), background)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        grid.paste(tile, (column * (cell_w + gap), row * (cell_h + gap)))
    return atomic_save_image(path, grid)


__all__ = ["class_colour", "draw_detections", "save_detection_grid"]
