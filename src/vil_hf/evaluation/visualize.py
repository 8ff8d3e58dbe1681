"""Drawing detections on images (pure PIL + numpy): mask contours, box outlines, "label 0.93" captions.

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

# Masks get a light tint and an opaque contour, boxes an outline: the image stays visible under every detection.
MASK_ALPHA = 0.2
BOX_WIDTH = 2
FONT_SIZE = 12
# Captions that do not fit are tried once more at this fraction of the size (not below MIN_FONT_SIZE), then skipped.
_SHRUNK_FONT = 0.75
MIN_FONT_SIZE = 9
# On larger pictures outlines and captions grow with the shorter side, so that they stay readable.
_PIXELS_PER_FONT_POINT = 28
_PIXELS_PER_LINE_WIDTH = 300

Rect = tuple[int, int, int, int]  # x1, y1, x2, y2 (inclusive) in pixels


def class_colour(label: int) -> tuple[int, int, int]:
    """A saturated RGB colour for class ``label``; neighbouring labels get far-apart hues."""
    hue = (0.61803398875 * (int(label) + 1)) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(red * 255), int(green * 255), int(blue * 255)


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light caption backgrounds (yellow, green), white on dark ones."""
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else (255, 255, 255)


def _caption(label: int, score: float, id2label: Mapping[int, str] | None) -> str:
    name = str(label)
    if id2label is not None:
        name = str(id2label.get(int(label), id2label.get(str(int(label)), label)))  # type: ignore[arg-type]
    return f"{name} {score:.2f}"


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def place_label(
    box: Sequence[float], size: tuple[int, int], image_size: tuple[int, int], taken: list[Rect], inset: int = 1
) -> Rect | None:
    """Where a ``size`` = (w, h) caption of ``box`` (x1, y1, x2, y2) goes: the first of above the box, inside its
    top edge (``inset`` pixels down: the outline's width), below it (each at the box's left edge, then at its
    right edge) that lies in the image and overlaps no rectangle of ``taken``; None when none does.
    -> inclusive (x1, y1, x2, y2)."""
    width, height = image_size
    text_w, text_h = size
    if text_w > width or text_h > height:
        return None
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    lefts = [min(max(x1, 0), width - text_w), min(max(x2 + 1 - text_w, 0), width - text_w)]
    for top in (y1 - text_h, y1 + inset, y2 + 1):
        if top < 0 or top + text_h > height:
            continue
        for left in dict.fromkeys(lefts):
            rect = (left, top, left + text_w - 1, top + text_h - 1)
            if not any(_overlaps(rect, other) for other in taken):
                return rect
    return None


def _mask_contour(mask: np.ndarray, thickness: int) -> np.ndarray:
    """The mask's pixels within ``thickness`` (4-neighbour steps) of its outside: a bool (H, W) band."""
    inner = mask.copy()
    for _ in range(thickness):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


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

    Boxes are outlines, masks a light tint with an opaque contour, so the image shows through; every pixel
    away from the detections keeps its colour. Captions ("label 0.93") never cover one another: the most
    confident detections place theirs first (see :func:`place_label`), a caption that fits nowhere is tried
    smaller, then left out.

    Args:
        image: the original image (any PIL mode; drawn on an RGB copy).
        boxes: (N, 4) ``x1, y1, x2, y2`` in the image's pixels.
        labels: (N,) class labels; ``id2label`` names them in the captions.
        scores: (N,) confidences.
        masks: optional (N, H, W) masks at the image size (bool, 0/1 or probabilities, cut at 0.5).
        font_size / line_width: caption size and outline width in pixels; by default 12 and 2, more on
            images whose shorter side exceeds 336 / 600 pixels.
        min_side: draw an image whose shorter side is smaller on a copy enlarged by the smallest whole
            factor that reaches it (nearest neighbour, so masks stay pixel-exact): captions stay readable.
    """
    return _draw_detections(
        image, boxes, labels, scores, masks, id2label, score_threshold, font_size, line_width, min_side
    )[0]


def _draw_detections(
    image, boxes, labels, scores, masks, id2label, score_threshold, font_size, line_width, min_side
) -> tuple[Image.Image, list[Rect]]:
    """:func:`draw_detections`, also returning the caption rectangles it drew."""
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
    shorter = min(width, height)
    line_width = line_width or max(BOX_WIDTH, round(shorter / _PIXELS_PER_LINE_WIDTH))
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
            canvas[_mask_contour(mask, line_width)] = colour

    result = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(result)
    size = font_size or max(FONT_SIZE, round(shorter / _PIXELS_PER_FONT_POINT))
    fonts = [ImageFont.load_default(size=size)]
    if round(size * _SHRUNK_FONT) >= MIN_FONT_SIZE:
        fonts.append(ImageFont.load_default(size=round(size * _SHRUNK_FONT)))
    clipped = {}
    for index in keep:
        x1, y1, x2, y2 = boxes_np[index].tolist()
        x1, x2 = sorted((min(max(x1, 0.0), width - 1.0), min(max(x2, 0.0), width - 1.0)))
        y1, y2 = sorted((min(max(y1, 0.0), height - 1.0), min(max(y2, 0.0), height - 1.0)))
        clipped[index] = (x1, y1, x2, y2)
        draw.rectangle((x1, y1, x2, y2), outline=class_colour(int(labels_np[index])), width=line_width)
    # Captions after every outline, so none is crossed by a line; the most confident choose their place first.
    taken: list[Rect] = []
    for index in keep[::-1]:
        colour = class_colour(int(labels_np[index]))
        text = _caption(int(labels_np[index]), float(scores_np[index]), id2label)
        for font in fonts:
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            text_size = (right - left + 4, bottom - top + 4)
            rect = place_label(clipped[index], text_size, (width, height), taken, inset=line_width)
            if rect is not None:
                taken.append(rect)
                draw.rectangle(rect, fill=colour)
                draw.text((rect[0] + 2 - left, rect[1] + 2 - top), text, fill=_text_colour(colour), font=font)
                break
    return result, taken


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


__all__ = ["class_colour", "draw_detections", "place_label", "save_detection_grid"]
