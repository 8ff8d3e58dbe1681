"""Image processor for the detectron2-style ViL detectors (Mask R-CNN and RetinaNet).

Pre-processing follows detectron2's default detection pipeline: ResizeShortestEdge (optionally
multi-scale for training), optional horizontal flip, normalisation with the 0-255 RGB pixel
mean/std, zero padding to a multiple of the backbone's size divisibility. COCO detection
annotations become detectron2-style training targets in the resized image's pixel frame.

Post-processing follows detectron2's `detector_postprocess`: boxes rescaled to the requested
size, clipped, empty boxes dropped, masks pasted with `paste_masks_in_image`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageInput,
    PILImageResampling,
    SizeDict,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import logging

from ..image_processing_vil import prepare_image_list

logger = logging.get_logger(__name__)

# detectron2's MODEL.PIXEL_MEAN / PIXEL_STD in 0-255 RGB are exactly ImageNet's mean/std times 255
# (123.675 = 0.485 * 255, ..., 58.395 = 0.229 * 255), so the transformers-style 0-1 values plus a
# 1/255 rescale give (pixel - mean255) / std255.
DETECTRON2_PIXEL_MEAN = (123.675, 116.28, 103.53)
DETECTRON2_PIXEL_STD = (58.395, 57.12, 57.375)

# detectron2's filter_empty_instances keeps boxes wider and taller than this after clipping.
_EMPTY_BOX_THRESHOLD = 1e-5

_TORCH_INTERPOLATION = {
    PILImageResampling.NEAREST: "nearest",
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
}


def _require_pycocotools(what: str):
    try:
        import pycocotools.mask as mask_util
    except ImportError as error:  # pragma: no cover - exercised only without the package
        raise ImportError(
            f"{what} needs pycocotools (COCO polygon/RLE rasterisation); install it with `pip install pycocotools`."
        ) from error
    return mask_util


# ------------------------------------------------------------------------------------------------
# resizing
# ------------------------------------------------------------------------------------------------


def get_resize_output_size(
    height: int, width: int, shortest_edge: int, longest_edge: int | None = None
) -> tuple[int, int]:
    """Output (height, width) of detectron2's ResizeShortestEdge for one image.

    The short side goes to `shortest_edge`, the aspect ratio is kept, and if the long side would then
    exceed `longest_edge` both sides shrink so that it equals `longest_edge`. Rounding is
    `int(x + 0.5)`. The arithmetic is done in the same order as detectron2 so that the rounding of
    borderline sizes agrees with it bit for bit.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot resize an empty image of size (height={height}, width={width})")
    target = float(shortest_edge)
    scale = target / min(height, width)
    if height < width:
        new_height, new_width = target, scale * width
    else:
        new_height, new_width = scale * height, target
    if longest_edge is not None and max(new_height, new_width) > longest_edge:
        shrink = float(longest_edge) / max(new_height, new_width)
        new_height, new_width = new_height * shrink, new_width * shrink
    return int(new_height + 0.5), int(new_width + 0.5)


def _resize_image(image: np.ndarray, new_size: tuple[int, int], resample: PILImageResampling) -> np.ndarray:
    """Resize a (C, H, W) image the way detectron2's ResizeTransform does.

    uint8 images go through PIL (whose bilinear filter antialiases when shrinking); other dtypes go
    through torch `interpolate` with `align_corners=False`, detectron2's path for non-uint8 arrays.
    """
    new_height, new_width = new_size
    if image.shape[1:] == (new_height, new_width):
        return image
    if image.dtype == np.uint8:
        pil_image = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))  # RGB, (H, W, 3)
        resized = np.asarray(pil_image.resize((new_width, new_height), resample=resample))
        return np.ascontiguousarray(resized.transpose(2, 0, 1))
    if resample not in _TORCH_INTERPOLATION:
        raise ValueError(
            f"resample={resample!r} is not supported for non-uint8 images; use NEAREST, BILINEAR or BICUBIC, "
            "or pass uint8 images"
        )
    mode = _TORCH_INTERPOLATION[resample]
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None]  # (1, C, H, W)
    align = None if mode == "nearest" else False
    resized = F.interpolate(tensor, size=(new_height, new_width), mode=mode, align_corners=align)
    return resized[0].numpy()


def _standardize_size(size: Any) -> SizeDict | None:
    """`size` as a SizeDict with `shortest_edge` (int or tuple of ints) and optional `longest_edge`."""
    if size is None:
        return None
    if isinstance(size, SizeDict):
        size = dict(size)
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = {"shortest_edge": int(size)}
    if not isinstance(size, dict):
        raise ValueError(
            f"size must be a dict like {{'shortest_edge': 800, 'longest_edge': 1333}} (or an int shortest edge); "
            f"got {size!r}"
        )
    unknown = set(size) - {"shortest_edge", "longest_edge"}
    if unknown or "shortest_edge" not in size:
        raise ValueError(
            "size must have the keys 'shortest_edge' (an int, or a list of ints for multi-scale training) and "
            f"optionally 'longest_edge'; got keys {sorted(size)}"
        )
    shortest = size["shortest_edge"]
    if isinstance(shortest, Sequence) and not isinstance(shortest, str):
        shortest = tuple(shortest)
        if not shortest:
            raise ValueError("size['shortest_edge'] is an empty list; give at least one size")
        values = shortest
    else:
        values = (shortest,)
    for value in values:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"size['shortest_edge'] must hold positive ints; got {size['shortest_edge']!r}")
    shortest = tuple(int(v) for v in shortest) if isinstance(shortest, tuple) else int(shortest)
    longest = size.get("longest_edge")
    if longest is not None and (not isinstance(longest, numbers.Integral) or isinstance(longest, bool) or longest <= 0):
        raise ValueError(f"size['longest_edge'] must be a positive int or None; got {longest!r}")
    return SizeDict(shortest_edge=shortest, longest_edge=None if longest is None else int(longest))


# ------------------------------------------------------------------------------------------------
# annotations
# ------------------------------------------------------------------------------------------------


def _check_annotation(obj: Any, where: str) -> None:
    """Raise a ValueError naming what is wrong with one COCO object annotation."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a dict with 'bbox' and 'category_id'; got {type(obj).__name__}")
    if "bbox" not in obj:
        raise ValueError(f"{where} has no 'bbox'; give [x, y, width, height] in original-image pixels")
    bbox = obj["bbox"]
    try:
        values = np.asarray(bbox, dtype=np.float64)
    except (TypeError, ValueError):
        values = None
    if values is None or values.shape != (4,) or not np.all(np.isfinite(values)) or isinstance(bbox, str):
        raise ValueError(f"{where}['bbox'] must be 4 finite numbers [x, y, width, height]; got {bbox!r}")
    if float(bbox[2]) < 0 or float(bbox[3]) < 0:
        raise ValueError(
            f"{where}['bbox'] has a negative width or height ({bbox!r}); COCO boxes are [x, y, width, height], "
            "not [x1, y1, x2, y2]"
        )
    if "category_id" not in obj:
        raise ValueError(f"{where} has no 'category_id'")
    category = obj["category_id"]
    if not isinstance(category, (numbers.Integral, np.integer)) or isinstance(category, bool) or category < 0:
        raise ValueError(
            f"{where}['category_id'] must be a non-negative int (already mapped to 0..num_labels-1); got {category!r}"
        )
    if obj.get("iscrowd", 0) not in (0, 1):
        raise ValueError(f"{where}['iscrowd'] must be 0 or 1; got {obj['iscrowd']!r}")


def _polygons(segmentation: list, where: str) -> list[np.ndarray]:
    """Validated polygons as float64 (2K,) arrays; polygons with fewer than 3 points are dropped
    (detectron2's COCO loader drops them too)."""
    polygons = []
    for index, polygon in enumerate(segmentation):
        if not isinstance(polygon, (Sequence, np.ndarray)) or isinstance(polygon, str):
            raise ValueError(
                f"{where}['segmentation'][{index}] must be a flat list [x1, y1, x2, y2, ...]; got {polygon!r}"
            )
        try:
            coords = np.asarray(polygon, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{where}['segmentation'][{index}] must hold numbers [x1, y1, x2, y2, ...]; got {polygon!r}"
            ) from error
        if coords.size % 2 != 0:
            raise ValueError(
                f"{where}['segmentation'][{index}] has an odd number of coordinates ({coords.size}); polygons are "
                "flat [x1, y1, x2, y2, ...] lists"
            )
        if not np.all(np.isfinite(coords)):
            raise ValueError(f"{where}['segmentation'][{index}] holds non-finite coordinates")
        if coords.size >= 6:
            polygons.append(coords)
    return polygons


def _check_rle(segmentation: dict, orig_size: tuple[int, int], where: str) -> None:
    if "counts" not in segmentation or "size" not in segmentation:
        raise ValueError(f"{where}['segmentation'] is an RLE dict but lacks 'counts' or 'size'")
    rle_size = tuple(int(v) for v in segmentation["size"])
    if rle_size != tuple(orig_size):
        raise ValueError(
            f"{where}['segmentation'] RLE size {list(rle_size)} does not match the image size "
            f"[height, width] = {list(orig_size)}"
        )


def _rasterize_polygons(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask of the union of polygons, rasterised by pycocotools as detectron2 does."""
    mask_util = _require_pycocotools("polygon segmentation")
    rles = mask_util.frPyObjects([p.tolist() for p in polygons], height, width)
    return _quiet_decode(mask_util, mask_util.merge(rles))


def _decode_rle(segmentation: dict) -> np.ndarray:
    """(H, W) uint8 mask of a compressed or uncompressed COCO RLE."""
    mask_util = _require_pycocotools("RLE segmentation")
    height, width = (int(v) for v in segmentation["size"])
    if isinstance(segmentation["counts"], list):  # uncompressed RLE (crowd annotations)
        segmentation = mask_util.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation["counts"], str):
        segmentation = {"size": [height, width], "counts": segmentation["counts"].encode("ascii")}
    return _quiet_decode(mask_util, segmentation)


def _quiet_decode(mask_util, rle: dict) -> np.ndarray:
    # pycocotools' Cython array wrapper predates NumPy 2's `copy=` protocol and warns on every decode.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.ascontiguousarray(mask_util.decode(rle), dtype=np.uint8)


def _encode_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of an (H, W) binary mask, with `counts` as str so it serialises to JSON."""
    mask_util = _require_pycocotools("return_coco_annotation=True")
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


# ------------------------------------------------------------------------------------------------
# mask pasting
# ------------------------------------------------------------------------------------------------


def paste_masks_in_image(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float | None = 0.5,
) -> torch.Tensor:
    """Paste box-relative masks into a full image, exactly as detectron2's `paste_masks_in_image` (CPU path).

    Args:
        masks: (N, M, M) or (N, 1, M, M) mask probabilities in each box's frame.
        boxes: (N, 4) absolute (x1, y1, x2, y2) boxes in the output image's pixels.
        image_size: (height, width) of the output image.
        threshold: pixels with pasted value `>= threshold` are on; None returns the float values.

    Returns:
        (N, height, width) bool (float when `threshold` is None).

    Each mask is bilinearly sampled (grid_sample, align_corners=False, zero padding) at the pixel
    centres of the box's region grown by one pixel and clipped to the image; pixels outside that
    region stay zero. Only the region is sampled, so memory is the output plus one box's region.
    Boxes with no width or height give empty masks (detectron2 would divide by zero).
    """
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"masks must be (N, M, M) or (N, 1, M, M); got shape {tuple(masks.shape)}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or boxes.shape[0] != masks.shape[0]:
        raise ValueError(
            f"boxes must be (N, 4) with N = {masks.shape[0]} (one per mask); got shape {tuple(boxes.shape)}"
        )
    height, width = int(image_size[0]), int(image_size[1])
    if not masks.is_floating_point():
        masks = masks.float()
    out_dtype = masks.dtype if threshold is None else torch.bool
    pasted = torch.zeros((masks.shape[0], height, width), dtype=out_dtype, device=masks.device)
    boxes = boxes.to(device=masks.device, dtype=torch.float32)

    for index in range(masks.shape[0]):
        x1, y1, x2, y2 = boxes[index]  # 0-dim float32 tensors, as detectron2 keeps them
        if not (x2 > x1 and y2 > y1):
            continue
        # Region: the box grown by one pixel, clipped to the image (detectron2's skip_empty bounds).
        x0_int = max(math.floor(x1.item()) - 1, 0)
        y0_int = max(math.floor(y1.item()) - 1, 0)
        x1_int = min(math.ceil(x2.item()) + 1, width)
        y1_int = min(math.ceil(y2.item()) + 1, height)
        if x1_int <= x0_int or y1_int <= y0_int:
            continue
        # Pixel centres mapped to [-1, 1] over the box; same op order as detectron2 for equal rounding.
        img_y = torch.arange(y0_int, y1_int, device=masks.device, dtype=torch.float32) + 0.5
        img_x = torch.arange(x0_int, x1_int, device=masks.device, dtype=torch.float32) + 0.5
        img_y = (img_y - y1) / (y2 - y1) * 2 - 1  # (h,)
        img_x = (img_x - x1) / (x2 - x1) * 2 - 1  # (w,)
        grid_x = img_x[None, :].expand(img_y.numel(), img_x.numel())
        grid_y = img_y[:, None].expand(img_y.numel(), img_x.numel())
        grid = torch.stack([grid_x, grid_y], dim=-1)[None].to(masks.dtype)  # (1, h, w, 2)
        sampled = F.grid_sample(
            masks[index][None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )[0, 0]  # (h, w)
        pasted[index, y0_int:y1_int, x0_int:x1_int] = sampled if threshold is None else sampled >= threshold
    return pasted


# ------------------------------------------------------------------------------------------------
# the processor
# ------------------------------------------------------------------------------------------------


class DetectionImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    size (`dict`, *optional*, defaults to `{"shortest_edge": 800, "longest_edge": 1333}`):
        detectron2 ResizeShortestEdge sizes. `shortest_edge` may be a list of ints (multi-scale
        training, one picked at random per image when `do_random_resize`); without random resizing
        the largest entry is used.
    size_divisibility (`int`, *optional*, defaults to 32):
        The padded batch height and width are rounded up to a multiple of this.
    do_random_resize (`bool`, *optional*, defaults to `False`):
        Pick the shortest edge at random from `size["shortest_edge"]` for each image.
    do_random_flip (`bool`, *optional*, defaults to `False`):
        Flip each image (and its boxes and masks) horizontally with probability `flip_probability`.
    flip_probability (`float`, *optional*, defaults to 0.5):
        Probability of a horizontal flip when `do_random_flip`.
    keep_crowd (`bool`, *optional*, defaults to `False`):
        Keep `iscrowd=1` annotations in the targets (detectron2 drops them for training).
    return_segmentation_masks (`bool`, *optional*, defaults to `False`):
        Add (N, h, w) uint8 instance masks to the targets (needs `segmentation` in every annotation).
    """

    # Overrides ImagesKwargs' `size`: `shortest_edge` may be a list for multi-scale training.
    size: dict | int | None
    size_divisibility: int
    do_random_resize: bool
    do_random_flip: bool
    flip_probability: float | int
    keep_crowd: bool
    return_segmentation_masks: bool


class DetectionImageProcessorPil(PilBackend):
    """Pre- and post-processing for the ViL Mask R-CNN and RetinaNet detectors, as detectron2 does it.

    Call: `processor(images, annotations=None, training=False, seed=None, generator=None,
    return_tensors="pt", **overrides)` returns `pixel_values` (B, 3, H, W) float32 and `pixel_mask`
    (B, H, W) int64 (1 on real pixels), plus `labels` (one dict per image) when annotations are
    given. `training=True` is shorthand for `do_random_resize=True, do_random_flip=True`; random
    draws use `generator` (a `torch.Generator`), else a generator seeded with `seed`, else torch's
    global generator.

    Annotations are COCO detection dicts per image: `{"image_id": int, "annotations": [{"bbox":
    [x, y, w, h], "category_id": int, "segmentation": polygons or RLE, "iscrowd": 0 or 1}, ...]}`.
    Each `labels` dict holds `boxes` (N, 4) float32 absolute (x1, y1, x2, y2) in the resized,
    unpadded image, `class_labels` (N,) int64 (the category ids, unchanged), `iscrowd` (N,) int64,
    `masks` (N, h, w) uint8 with `return_segmentation_masks=True`, `size` and `orig_size` (2,)
    int64 (height, width), and `image_id` when given. Boxes are clipped to the image; boxes with no
    width or height after clipping are dropped; crowd objects are dropped unless `keep_crowd`.
    """

    model_input_names = ["pixel_values", "pixel_mask"]
    valid_kwargs = DetectionImageProcessorKwargs

    resample = PILImageResampling.BILINEAR
    size = {"shortest_edge": 800, "longest_edge": 1333}
    default_to_square = False
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = IMAGENET_DEFAULT_MEAN  # = DETECTRON2_PIXEL_MEAN / 255
    image_std = IMAGENET_DEFAULT_STD  # = DETECTRON2_PIXEL_STD / 255
    do_convert_rgb = True
    do_center_crop = False
    do_pad = True
    size_divisibility = 32
    do_random_resize = False
    do_random_flip = False
    flip_probability = 0.5
    keep_crowd = False
    return_segmentation_masks = False

    def __init__(
        self,
        shortest_edge: int | Sequence[int] | None = None,
        longest_edge: int | None = None,
        **kwargs: Unpack[DetectionImageProcessorKwargs],
    ) -> None:
        # `shortest_edge` / `longest_edge` are shorthands that fold into `size`.
        if shortest_edge is not None or longest_edge is not None:
            size = dict(_standardize_size(kwargs.get("size", self.size)))
            if shortest_edge is not None:
                size["shortest_edge"] = shortest_edge
            if longest_edge is not None:
                size["longest_edge"] = longest_edge
            kwargs["size"] = size
        super().__init__(**kwargs)

    # -- argument handling --------------------------------------------------------------------

    def _standardize_kwargs(self, size: Any = None, **kwargs) -> dict:
        kwargs = super()._standardize_kwargs(size=None, **kwargs)
        kwargs["size"] = _standardize_size(size)
        return kwargs

    def _validate_preprocess_kwargs(self, **kwargs) -> None:
        super()._validate_preprocess_kwargs(**kwargs)
        divisibility = kwargs.get("size_divisibility")
        if divisibility is not None and (not isinstance(divisibility, int) or divisibility < 1):
            raise ValueError(f"size_divisibility must be a positive int (1 for no rounding); got {divisibility!r}")
        probability = kwargs.get("flip_probability")
        if probability is not None and not 0.0 <= float(probability) <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1]; got {probability!r}")

    def process_image(self, image: ImageInput, *args, **kwargs) -> np.ndarray:
        if image is None:
            raise ValueError("got None instead of an image; pass PIL images, (H, W, 3) arrays or (3, H, W) tensors")
        try:
            array = super().process_image(image, *args, **kwargs)
        except ValueError as error:
            shape = getattr(image, "shape", None)
            raise ValueError(
                f"cannot read an image of shape {tuple(shape) if shape is not None else type(image).__name__}: "
                f"{error}. Pass a PIL image, an (H, W, 3) / (3, H, W) array or tensor, or an (H, W) grayscale array."
            ) from error
        if array.ndim != 3 or array.shape[0] != 3 or array.shape[1] == 0 or array.shape[2] == 0:
            raise ValueError(
                f"expected an RGB image, got an array of shape {array.shape} after conversion (channels first); "
                "pass (H, W, 3) or (3, H, W) images, or keep do_convert_rgb=True for grayscale/RGBA inputs"
            )
        return array

    # -- pre-processing -----------------------------------------------------------------------

    def preprocess(
        self,
        images: ImageInput,
        annotations: dict | list[dict] | None = None,
        training: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Unpack[DetectionImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        annotations (`dict` or `list[dict]`, *optional*):
            COCO detection annotations, one dict per image (see the class docstring).
        training (`bool`, *optional*, defaults to `False`):
            Shorthand for `do_random_resize=True, do_random_flip=True` (explicit values win).
        seed (`int`, *optional*):
            Seed for the random resize and flip draws (ignored when `generator` is given).
        generator (`torch.Generator`, *optional*):
            Generator for the random draws; advanced by each call.
        """
        images = prepare_image_list(images)
        if training:
            kwargs.setdefault("do_random_resize", True)
            kwargs.setdefault("do_random_flip", True)
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        return super().preprocess(images, annotations, generator, **kwargs)

    def _preprocess(
        self,
        images: list[np.ndarray],
        annotations: dict | list[dict] | None,
        generator: torch.Generator | None,
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Sequence[float],
        image_std: float | Sequence[float],
        do_pad: bool,
        pad_size: SizeDict | None,
        size_divisibility: int,
        do_random_resize: bool,
        do_random_flip: bool,
        flip_probability: float,
        keep_crowd: bool,
        return_segmentation_masks: bool,
        return_tensors: str | None,
        **kwargs,
    ) -> BatchFeature:
        if isinstance(annotations, dict):
            annotations = [annotations]
        if annotations is not None and len(annotations) != len(images):
            raise ValueError(
                f"got {len(images)} images but {len(annotations)} annotation dicts; give one annotation dict per image"
            )

        shortest_edges = size.shortest_edge if isinstance(size.shortest_edge, tuple) else (size.shortest_edge,)
        # detectron2 normalises float32 pixels in 0-255 units: (pixel - mean255) / std255. Folding the
        # 1/255 rescale into mean and std reproduces that arithmetic exactly (float32(0.485 * 255) is
        # float32(123.675), and so on) in one pass over the image.
        unit = 1.0 / rescale_factor if do_rescale else 1.0
        offset = (np.asarray(image_mean, dtype=np.float64) * unit).astype(np.float32).reshape(-1, 1, 1)
        divisor = (np.asarray(image_std, dtype=np.float64) * unit).astype(np.float32).reshape(-1, 1, 1)

        processed, targets = [], []
        for index, image in enumerate(images):
            orig_size = (int(image.shape[1]), int(image.shape[2]))

            new_size = orig_size
            if do_resize:
                if do_random_resize and len(shortest_edges) > 1:
                    choice = int(torch.randint(len(shortest_edges), (1,), generator=generator).item())
                    shortest = shortest_edges[choice]
                else:
                    # Without random resizing a multi-scale list falls back to its largest size, which is
                    # detectron2's usual test size for the 640..800 training schedule.
                    shortest = max(shortest_edges)
                new_size = get_resize_output_size(*orig_size, shortest, size.longest_edge)
                image = _resize_image(image, new_size, resample)

            flip = False
            if do_random_flip and flip_probability > 0:
                flip = bool(torch.rand((), generator=generator).item() < flip_probability)
                if flip:
                    image = image[:, :, ::-1]

            if do_rescale and image.dtype != np.uint8 and image.size and float(image.max()) <= 1.0:
                logger.warning_once(
                    "The image looks already rescaled to [0, 1] but do_rescale=True divides it by 255 again; "
                    "pass uint8 / 0-255 images, or do_rescale=False."
                )
            pixels = image.astype(np.float32)
            if do_normalize:
                pixels = (pixels - offset) / divisor
            elif do_rescale:
                pixels = pixels * np.float32(rescale_factor)
            processed.append(pixels)

            if annotations is not None:
                targets.append(
                    self._prepare_target(
                        annotations[index],
                        index,
                        orig_size,
                        new_size,
                        flip,
                        keep_crowd=keep_crowd,
                        return_segmentation_masks=return_segmentation_masks,
                    )
                )

        data: dict[str, Any] = {}
        if do_pad:
            if pad_size is not None:
                pad_height, pad_width = pad_size.height, pad_size.width
            else:
                pad_height = max(image.shape[1] for image in processed)
                pad_width = max(image.shape[2] for image in processed)
                stride = max(int(size_divisibility or 1), 1)
                pad_height = -(-pad_height // stride) * stride
                pad_width = -(-pad_width // stride) * stride
            batch = np.zeros((len(processed), 3, pad_height, pad_width), dtype=np.float32)
            pixel_mask = np.zeros((len(processed), pad_height, pad_width), dtype=np.int64)
            for index, image in enumerate(processed):
                height, width = image.shape[1:]
                if height > pad_height or width > pad_width:
                    raise ValueError(
                        f"pad_size ({pad_height}, {pad_width}) is smaller than image {index} after resizing "
                        f"({height}, {width}); increase pad_size or leave it unset to pad to the batch maximum"
                    )
                batch[index, :, :height, :width] = image
                pixel_mask[index, :height, :width] = 1
            data["pixel_values"] = batch
            data["pixel_mask"] = pixel_mask
        else:
            data["pixel_values"] = processed
            data["pixel_mask"] = [np.ones(image.shape[1:], dtype=np.int64) for image in processed]

        encoded = BatchFeature(data=data, tensor_type=return_tensors)
        if annotations is not None:
            encoded["labels"] = [BatchFeature(target, tensor_type=return_tensors) for target in targets]
        return encoded

    def _prepare_target(
        self,
        annotation: dict,
        index: int,
        orig_size: tuple[int, int],
        new_size: tuple[int, int],
        flip: bool,
        keep_crowd: bool,
        return_segmentation_masks: bool,
    ) -> dict[str, np.ndarray]:
        """One image's COCO annotation dict as a detectron2-style target in the resized (flipped) frame."""
        where = f"annotations[{index}]"
        if not isinstance(annotation, dict) or "annotations" not in annotation:
            raise ValueError(
                f"{where} must be a dict {{'image_id': int, 'annotations': [...]}} in COCO detection format; "
                f"got {type(annotation).__name__}"
                + (f" with keys {sorted(annotation)}" if isinstance(annotation, dict) else "")
            )
        objects = annotation["annotations"]
        if not isinstance(objects, (list, tuple)):
            raise ValueError(f"{where}['annotations'] must be a list of object dicts; got {type(objects).__name__}")
        for number, obj in enumerate(objects):
            _check_annotation(obj, f"{where}['annotations'][{number}]")

        orig_height, orig_width = orig_size
        new_height, new_width = new_size
        scale_x, scale_y = new_width / orig_width, new_height / orig_height

        kept: list[tuple[int, dict, np.ndarray]] = []  # (position in the input list, object, (4,) box)
        for number, obj in enumerate(objects):
            if obj.get("iscrowd", 0) and not keep_crowd:
                continue
            x, y, w, h = (float(v) for v in obj["bbox"])
            # (x, y, w, h) -> (x1, y1, x2, y2), scaled per axis as detectron2's ResizeTransform.apply_coords.
            box = np.array([x * scale_x, y * scale_y, (x + w) * scale_x, (y + h) * scale_y], dtype=np.float64)
            if flip:
                box = np.array([new_width - box[2], box[1], new_width - box[0], box[3]])
            box = np.clip(box, 0, [new_width, new_height, new_width, new_height])
            if box[2] - box[0] <= _EMPTY_BOX_THRESHOLD or box[3] - box[1] <= _EMPTY_BOX_THRESHOLD:
                continue
            kept.append((number, obj, box))

        masks = []
        if return_segmentation_masks:
            with_masks = []
            for number, obj, box in kept:
                mask = self._segmentation_mask(obj, f"{where}['annotations'][{number}]", orig_size, new_size, flip)
                if mask is None:  # no polygon with 3+ points: detectron2's loader drops such objects
                    continue
                with_masks.append((number, obj, box))
                masks.append(mask)
            kept = with_masks
        kept_objects = [obj for _, obj, _ in kept]
        boxes = [box for _, _, box in kept]

        target: dict[str, np.ndarray] = {
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "class_labels": np.asarray([int(obj["category_id"]) for obj in kept_objects], dtype=np.int64),
            "iscrowd": np.asarray([int(obj.get("iscrowd", 0)) for obj in kept_objects], dtype=np.int64),
            "size": np.asarray(new_size, dtype=np.int64),
            "orig_size": np.asarray(orig_size, dtype=np.int64),
        }
        if return_segmentation_masks:
            target["masks"] = (
                np.stack(masks).astype(np.uint8) if masks else np.zeros((0, new_height, new_width), dtype=np.uint8)
            )
        image_id = annotation.get("image_id")
        if image_id is not None:
            if not isinstance(image_id, (numbers.Integral, np.integer)) or isinstance(image_id, bool):
                raise ValueError(f"{where}['image_id'] must be an int; got {image_id!r}")
            target["image_id"] = np.asarray(int(annotation["image_id"]), dtype=np.int64)
        return target

    @staticmethod
    def _segmentation_mask(
        obj: dict, where: str, orig_size: tuple[int, int], new_size: tuple[int, int], flip: bool
    ) -> np.ndarray | None:
        """(h, w) uint8 mask of one object in the resized (flipped) frame, or None if it has no valid polygon.

        Polygons are transformed first and rasterised at the new size (detectron2 transforms polygon
        coordinates); RLE masks are decoded at the original size, resized with nearest neighbour and
        flipped (detectron2's apply_segmentation).
        """
        if "segmentation" not in obj or obj["segmentation"] is None:
            raise ValueError(
                f"{where} has no 'segmentation' but return_segmentation_masks=True; add polygons or an RLE, "
                "or set return_segmentation_masks=False"
            )
        segmentation = obj["segmentation"]
        new_height, new_width = new_size
        if isinstance(segmentation, dict):
            _check_rle(segmentation, orig_size, where)
            mask = _decode_rle(segmentation)
            if mask.shape != (new_height, new_width):
                mask = np.asarray(Image.fromarray(mask).resize((new_width, new_height), resample=Image.NEAREST))
            return np.ascontiguousarray(mask[:, ::-1]) if flip else mask
        if isinstance(segmentation, (list, tuple)):
            polygons = _polygons(segmentation, where)
            if not polygons:
                return None
            orig_height, orig_width = orig_size
            transformed = []
            for polygon in polygons:
                xy = polygon.reshape(-1, 2) * [new_width / orig_width, new_height / orig_height]
                if flip:
                    xy[:, 0] = new_width - xy[:, 0]
                transformed.append(xy.reshape(-1))
            return _rasterize_polygons(transformed, new_height, new_width)
        raise ValueError(
            f"{where}['segmentation'] must be a list of polygons or an RLE dict {{'size', 'counts'}}; "
            f"got {type(segmentation).__name__}"
        )

    # -- post-processing ----------------------------------------------------------------------

    @staticmethod
    def _output_field(outputs: Any, name: str) -> Any:
        if hasattr(outputs, name):
            return getattr(outputs, name)
        if isinstance(outputs, dict):
            return outputs.get(name)
        return None

    def _rescaled_detections(
        self, outputs: Any, threshold: float, target_sizes: Any, need_masks: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int]]]:
        """Per image: (scores, labels, boxes, masks or None, (height, width)) after detectron2's
        detector_postprocess (score threshold, rescale to the target size, clip, drop empty boxes)."""
        pred_boxes = self._output_field(outputs, "pred_boxes")
        scores = self._output_field(outputs, "scores")
        labels = self._output_field(outputs, "labels")
        if pred_boxes is None or scores is None or labels is None:
            raise ValueError(
                "outputs must carry pred_boxes, scores and labels (lists with one tensor per image); got "
                f"{type(outputs).__name__}. Run the detector in eval mode to get detections."
            )
        masks = self._output_field(outputs, "pred_masks") if need_masks else None
        if need_masks and masks is None:
            raise ValueError(
                "outputs.pred_masks is None: this model predicts no masks (RetinaNet); "
                "use post_process_object_detection instead"
            )
        batch = len(pred_boxes)
        if len(scores) != batch or len(labels) != batch or (masks is not None and len(masks) != batch):
            raise ValueError("outputs.pred_boxes, scores, labels (and pred_masks) must have one entry per image")

        image_sizes = self._output_field(outputs, "image_sizes")
        if target_sizes is None:
            if image_sizes is None:
                raise ValueError("outputs.image_sizes is missing; pass target_sizes or keep image_sizes in outputs")
            target_sizes = image_sizes
        if len(target_sizes) != batch:
            raise ValueError(
                f"target_sizes has {len(target_sizes)} entries but the outputs hold {batch} images; "
                "give one (height, width) per image"
            )
        if image_sizes is None:
            raise ValueError("outputs.image_sizes is missing: it is needed to rescale boxes to target_sizes")

        results = []
        for index in range(batch):
            out_height, out_width = (int(v) for v in target_sizes[index])
            in_height, in_width = (int(v) for v in image_sizes[index])
            image_scores = scores[index]
            keep = image_scores > threshold
            image_boxes = pred_boxes[index][keep].float()
            image_scores = image_scores[keep]
            image_labels = labels[index][keep]
            image_masks = masks[index][keep] if masks is not None else None

            # Scale x by the width ratio and y by the height ratio, then clip and drop empty boxes.
            image_boxes = image_boxes.clone()
            image_boxes[:, 0::2] *= out_width / in_width
            image_boxes[:, 1::2] *= out_height / in_height
            image_boxes[:, 0::2] = image_boxes[:, 0::2].clamp(min=0, max=out_width)
            image_boxes[:, 1::2] = image_boxes[:, 1::2].clamp(min=0, max=out_height)
            nonempty = ((image_boxes[:, 2] - image_boxes[:, 0]) > 0) & ((image_boxes[:, 3] - image_boxes[:, 1]) > 0)
            results.append(
                (
                    image_scores[nonempty],
                    image_labels[nonempty],
                    image_boxes[nonempty],
                    image_masks[nonempty] if image_masks is not None else None,
                    (out_height, out_width),
                )
            )
        return results

    def post_process_object_detection(
        self, outputs: Any, threshold: float = 0.5, target_sizes: torch.Tensor | list | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image as `{"scores", "labels", "boxes"}`, boxes absolute (x1, y1, x2, y2).

        Args:
            outputs: the detector's eval-mode output (`pred_boxes`, `scores`, `labels`, `image_sizes`).
            threshold: keep detections with score `> threshold`.
            target_sizes: (B, 2) tensor or list of (height, width), usually the original image sizes;
                None keeps the frame of the resized image the model saw (`image_sizes`).
        """
        return [
            {"scores": scores, "labels": labels, "boxes": boxes}
            for scores, labels, boxes, _, _ in self._rescaled_detections(outputs, threshold, target_sizes, False)
        ]

    def post_process_instance_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float | None = None,
        target_sizes: torch.Tensor | list | None = None,
        return_binary_maps: bool = False,
        return_coco_annotation: bool = False,
    ) -> list[dict[str, Any]]:
        """Instance masks per image as `{"segmentation", "segments_info"}`.

        Masks are pasted into the target size with `paste_masks_in_image` (detectron2's pasting) and
        binarised at `mask_threshold` (`>=`). `segments_info[i] = {"id": i, "label_id", "score"}`
        lists the kept detections in the model's order; `segmentation` is
          - default: an (H, W) int64 id map, -1 for background; masks are painted in increasing score
            order so the highest-scoring instance wins overlaps. With `overlap_mask_area_threshold`,
            instances whose visible part is smaller than that fraction of their mask are removed from
            the map and from `segments_info` (the image-segmentation pipeline passes 0.5);
          - `return_binary_maps=True`: an (N, H, W) bool stack of the full, overlapping masks;
          - `return_coco_annotation=True`: a list of N compressed COCO RLE dicts (full masks, for
            COCO evaluation; needs pycocotools).
        """
        if return_binary_maps and return_coco_annotation:
            raise ValueError("choose one of return_binary_maps and return_coco_annotation, not both")
        results = []
        for scores, labels, boxes, masks, (height, width) in self._rescaled_detections(
            outputs, threshold, target_sizes, True
        ):
            binary = paste_masks_in_image(masks, boxes, (height, width), threshold=mask_threshold)  # (N, H, W)
            segments_info = [
                {"id": i, "label_id": int(label), "score": float(score)}
                for i, (label, score) in enumerate(zip(labels.tolist(), scores.tolist()))
            ]
            if return_binary_maps:
                segmentation: Any = binary
            elif return_coco_annotation:
                segmentation = [_encode_rle(mask.cpu().numpy()) for mask in binary]
            else:
                segmentation = torch.full((height, width), -1, dtype=torch.int64, device=binary.device)
                # Stable ascending sort: the highest score is painted last and wins overlaps.
                for i in torch.argsort(scores, stable=True).tolist():
                    segmentation[binary[i]] = i
                if overlap_mask_area_threshold is not None:
                    kept = []
                    for info in segments_info:
                        full = int(binary[info["id"]].sum())
                        visible = segmentation == info["id"]
                        if full > 0 and int(visible.sum()) >= overlap_mask_area_threshold * full:
                            kept.append(info)
                        else:
                            segmentation[visible] = -1
                    segments_info = kept
            results.append({"segmentation": segmentation, "segments_info": segments_info})
        return results


__all__ = [
    "DETECTRON2_PIXEL_MEAN",
    "DETECTRON2_PIXEL_STD",
    "DetectionImageProcessorPil",
    "get_resize_output_size",
    "paste_masks_in_image",
]
