"""A small synthetic COCO instance-segmentation set of circles, triangles and squares.

Every image is drawn from its own generator seeded by (seed, split, index), so the files depend only
on the parameters. Shapes are polygons (a circle is a 48-gon) rasterised by pycocotools, so each
annotation's mask is exactly the painted pixels. Later shapes cover earlier ones; annotations describe
the visible part (mask and tight box); shapes less than `min_visible` visible are left out of the
image altogether. A fully visible shape is annotated with its polygon, an occluded one with the
compressed RLE of its visible pixels (counts as str).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..io_utils import atomic_save_image, atomic_write_bytes
from .errors import DataError

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "triangle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
]
MANIFEST = "shapes.json"
_GENERATOR = "vil-hf make-shapes"
_FORMAT_VERSION = 1
_SPLITS = {"train": 0, "val": 1}
_CIRCLE_VERTICES = 48


def _mask_util():
    import pycocotools.mask as mask_util

    return mask_util


def _decode(rle) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.ascontiguousarray(_mask_util().decode(rle), dtype=bool)


def _rasterize(polygon: list[float], height: int, width: int) -> np.ndarray:
    mask_util = _mask_util()
    return _decode(mask_util.merge(mask_util.frPyObjects([polygon], height, width)))


def _encode(mask: np.ndarray) -> dict:
    rle = _mask_util().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _shape_polygon(kind: int, cx: float, cy: float, radius: float, angle: float, rng) -> list[float]:
    """Flat [x1, y1, ...] polygon (rounded to 0.01 px) of a shape inscribed in a circle of `radius`."""
    if kind == 1:
        angles = angle + np.arange(_CIRCLE_VERTICES) * (2 * math.pi / _CIRCLE_VERTICES)
    elif kind == 2:  # near-equilateral triangle
        angles = angle + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.15, 0.15, 3)
    else:  # square, or a mildly oblong rectangle
        half = math.pi / 4 * rng.uniform(0.85, 1.0)  # half of the angle a side subtends: pi/4 for a square
        angles = angle + np.array([half, math.pi - half, math.pi + half, 2 * math.pi - half])
    xy = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    return [round(float(v), 2) for v in xy.reshape(-1)]


def _background(rng, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float background: flat, linear gradient, or smooth noise (one third each)."""
    style = int(rng.integers(3))
    base = rng.uniform(30, 225, 3)
    if style == 0:
        return np.broadcast_to(base, (height, width, 3)).copy()
    if style == 1:
        other = rng.uniform(30, 225, 3)
        theta = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        t = (xs * math.cos(theta) + ys * math.sin(theta)).astype(np.float64)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        return base * (1 - t[..., None]) + other * t[..., None]
    cell = int(rng.integers(4, 17))
    coarse = rng.normal(0, 35, (height // cell + 2, width // cell + 2, 3))
    smooth = np.asarray(
        Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
            (width + 2 * cell, height + 2 * cell), Image.BILINEAR
        ),
        dtype=np.float64,
    )[cell : cell + height, cell : cell + width]
    return base + (smooth - 128) + rng.normal(0, 6, (height, width, 3))


def _pick_colour(rng, avoid: list[np.ndarray]) -> np.ndarray:
    """A colour far from every colour in `avoid` (the background under the shape, overlapped shapes)."""
    best, best_distance = None, -1.0
    for _ in range(64):
        colour = rng.uniform(0, 255, 3)
        distance = min((float(np.linalg.norm(colour - other)) for other in avoid), default=1e9)
        if distance >= 110:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _draw_image(rng, height: int, width: int, min_size: float, max_size: float, min_visible: float, max_objects: int):
    """One image (H, W, 3) uint8 and its objects: list of (category_id, polygon, visible mask, fully visible)."""
    side = min(height, width)
    background = _background(rng, height, width)
    shapes = []  # (kind, polygon, full mask)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        kind = int(rng.integers(1, 4))
        extent = rng.uniform(min_size, max_size) * side  # extent of the shape's box side
        radius = extent / 2 if kind == 1 else extent / (2 * 0.9)
        radius = min(radius, side / 2 - 1)
        cx = rng.uniform(radius, width - radius)
        cy = rng.uniform(radius, height - radius)
        polygon = _shape_polygon(kind, cx, cy, radius, rng.uniform(0, 2 * math.pi), rng)
        mask = _rasterize(polygon, height, width)
        if mask.sum() < 16:
            continue
        shapes.append((kind, polygon, mask))

    # Visible part of each shape (later shapes are on top); drop the mostly hidden ones entirely.
    kept = []
    for number, (kind, polygon, mask) in enumerate(shapes):
        covered = np.zeros_like(mask)
        for _, _, later in shapes[number + 1 :]:
            covered |= later
        visible = mask & ~covered
        if visible.sum() >= min_visible * mask.sum():
            kept.append((kind, polygon, mask))

    image = background
    objects = []  # (kind, polygon, visible mask, fully visible)
    colours: list[np.ndarray] = []
    xs = np.arange(width, dtype=np.float64)[None, :].repeat(height, 0)
    for number, (kind, polygon, mask) in enumerate(kept):
        # Far from the background under the shape and from the shapes it overlaps.
        avoid = [background[mask].mean(axis=0)]
        avoid += [colours[other] for other in range(number) if (kept[other][2] & mask).any()]
        colour = _pick_colour(rng, avoid)
        colours.append(colour)
        shade = rng.uniform(-0.12, 0.12)  # a soft left-to-right brightness ramp across the shape
        ramp = 1 + shade * (xs - xs[mask].mean()) / max(side / 2, 1)
        image = np.where(mask[..., None], colour * ramp[..., None], image)
        covered = np.zeros_like(mask)
        for _, _, later in kept[number + 1 :]:
            covered |= later
        objects.append((kind, polygon, mask & ~covered, not (covered & mask).any()))
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return pixels, objects


def _annotation(ann_id: int, image_id: int, kind: int, polygon, visible: np.ndarray, full: bool) -> dict:
    ys, xs = np.nonzero(visible)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": kind,
        "segmentation": [polygon] if full else _encode(visible),
        "area": int(visible.sum()),
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "iscrowd": 0,
    }


def _write_png(path: Path, pixels: np.ndarray) -> None:
    atomic_save_image(path, Image.fromarray(pixels))


def _write_json(path: Path, content: dict) -> None:
    atomic_write_bytes(path, (json.dumps(content, indent=None, separators=(",", ":")) + "\n").encode("utf-8"))


def _is_shapes_set(out_dir: Path) -> bool:
    try:
        return json.loads((out_dir / MANIFEST).read_text()).get("generator") == _GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def make_shapes(
    out_dir: str | os.PathLike,
    *,
    num_train: int = 600,
    num_val: int = 100,
    image_size: tuple[int, int] = (128, 128),
    seed: int = 0,
    min_size: float = 0.15,
    max_size: float = 0.6,
    max_objects: int = 6,
    min_visible: float = 0.5,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write a synthetic COCO instance-segmentation set and return its paths.

    Layout: `out_dir/train/*.png`, `out_dir/val/*.png`, `out_dir/annotations/instances_{train,val}.json`
    and `out_dir/shapes.json` (the parameters). Returns `{"root", "train_images", "val_images",
    "train_annotations", "val_annotations"}`. `min_size` / `max_size` bound each shape's extent as a
    fraction of the shorter image side; each image gets 1 to `max_objects` shapes before those less
    than `min_visible` visible are dropped. Same arguments -> byte-identical files. A non-empty
    `out_dir` is refused unless it holds a previous shapes set or `overwrite=True`.
    """
    height, width = (int(v) for v in image_size)
    if height < 32 or width < 32:
        raise DataError(f"image_size must be at least 32x32 pixels; got {height}x{width}")
    if num_train < 1 or num_val < 1:
        raise DataError(f"num_train and num_val must be at least 1; got {num_train} and {num_val}")
    if not 0 < min_size <= max_size <= 1:
        raise DataError(f"need 0 < min_size <= max_size <= 1 (fractions of the image side); got {min_size}, {max_size}")
    if max_objects < 1:
        raise DataError(f"max_objects must be at least 1; got {max_objects}")
    if not 0 <= min_visible <= 1:
        raise DataError(f"min_visible must be in [0, 1]; got {min_visible}")
    root = Path(out_dir).absolute()
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} exists and is not a folder; choose another output folder")
    if root.is_dir() and any(root.iterdir()) and not _is_shapes_set(root) and not overwrite:
        raise DataError(
            f"{root} is not empty and does not hold a previous shapes set; choose an empty folder or pass "
            "overwrite=True (--overwrite)"
        )
    parameters = {
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": [height, width],
        "seed": int(seed),
        "min_size": float(min_size),
        "max_size": float(max_size),
        "max_objects": int(max_objects),
        "min_visible": float(min_visible),
    }
    root.mkdir(parents=True, exist_ok=True)
    # The manifest comes first, so an interrupted run leaves a folder that the next run may overwrite.
    _write_json(root / MANIFEST, {"generator": _GENERATOR, "version": _FORMAT_VERSION, "parameters": parameters})
    (root / "annotations").mkdir(exist_ok=True)
    paths = {"root": str(root)}
    for split, count in (("train", num_train), ("val", num_val)):
        split_dir = root / split
        split_dir.mkdir(exist_ok=True)
        names = {f"{index:06d}.png" for index in range(count)}
        for stale in split_dir.glob("*.png"):  # images of an earlier, larger set
            if stale.name not in names:
                stale.unlink()
        images, annotations = [], []
        for index in range(count):
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), _SPLITS[split], index])))
            pixels, objects = _draw_image(rng, height, width, min_size, max_size, min_visible, max_objects)
            image_id = index + 1
            file_name = f"{index:06d}.png"
            _write_png(split_dir / file_name, pixels)
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            for kind, polygon, visible, full in objects:
                annotations.append(_annotation(len(annotations) + 1, image_id, kind, polygon, visible, full))
        annotation_file = root / "annotations" / f"instances_{split}.json"
        _write_json(
            annotation_file,
            {
                "info": {"description": f"vil-hf synthetic shapes ({split})", "version": str(_FORMAT_VERSION)},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": CATEGORIES,
            },
        )
        paths[f"{split}_images"] = str(split_dir)
        paths[f"{split}_annotations"] = str(annotation_file)
    return paths


__all__ = ["CATEGORIES", "make_shapes"]
