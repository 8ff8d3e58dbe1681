"""COCO box and mask evaluation with pycocotools, reported the way detectron2 reports it.

`detections_to_coco` turns one image's detections into COCO result dicts (xywh boxes in original
pixels, compressed RLE masks with ``counts`` as str so the list is JSON-serialisable);
`evaluate_coco` runs ``COCOeval`` quietly for each IoU type and returns a `CocoMetrics` with the
twelve summary numbers in percent (0-100; NaN where the ground truth has no object of that size)
and the per-class AP.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..io_utils import atomic_write_text

logger = logging.getLogger(__name__)

# The names of COCOeval.stats, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
_IOU_TYPE_TITLES = {"bbox": "box", "segm": "mask"}


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as error:  # pragma: no cover - numpy accepts nearly everything
        raise TypeError(f"{name} must be an array or tensor, got {type(value).__name__}") from error


def detection_arrays(boxes: Any, scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 4) float64 boxes, (N,) float64 scores and (N,) labels from tensors or arrays, checked."""
    boxes_np = _to_numpy(boxes, "boxes").astype(np.float64)
    scores_np = _to_numpy(scores, "scores").astype(np.float64).reshape(-1)
    labels_np = _to_numpy(labels, "labels").reshape(-1)
    if boxes_np.size == 0:
        boxes_np = boxes_np.reshape(0, 4)
    if boxes_np.ndim != 2 or boxes_np.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) as x1, y1, x2, y2; got shape {boxes_np.shape}")
    count = boxes_np.shape[0]
    if scores_np.shape[0] != count or labels_np.shape[0] != count:
        raise ValueError(
            f"boxes, scores and labels must have one entry per detection; got {count} boxes, "
            f"{scores_np.shape[0]} scores and {labels_np.shape[0]} labels"
        )
    return boxes_np, scores_np, labels_np


def mask_to_rle(mask: Any) -> dict[str, Any]:
    """One (H, W) binary mask -> compressed COCO RLE ``{"size": [H, W], "counts": str}``."""
    array = _to_numpy(mask, "mask")
    if array.ndim != 2:
        raise ValueError(f"a mask must be (H, W); got shape {array.shape}")
    rle = mask_utils.encode(np.asfortranarray(array.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _binary_masks(masks: Any, count: int) -> np.ndarray:
    array = _to_numpy(masks, "masks")
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[0] != count:
        raise ValueError(
            f"masks must be (N, H, W) at the original image size with N = {count} (one per box); "
            f"got shape {array.shape}"
        )
    if array.dtype == np.bool_:
        return array
    if np.issubdtype(array.dtype, np.floating):
        # Probabilities: binarise at 0.5, as detectron2's paste_masks_in_image does.
        return array >= 0.5
    if array.size and (array.min() < 0 or array.max() > 1):
        raise ValueError(
            "integer masks must hold 0 and 1 only; pass bool masks, 0/1 integers or probabilities in [0, 1]"
        )
    return array.astype(bool)


def detections_to_coco(
    image_id: int,
    boxes_xyxy: Any,
    scores: Any,
    labels: Any,
    label_to_category: Mapping[int, int],
    masks: Any = None,
) -> list[dict[str, Any]]:
    """COCO result dicts for one image.

    Args:
        image_id: the COCO image id.
        boxes_xyxy: (N, 4) boxes ``x1, y1, x2, y2`` in original image pixels.
        scores: (N,) confidences.
        labels: (N,) contiguous labels 0..K-1 of the model.
        label_to_category: contiguous label -> COCO category id (``CategoryMap.label_to_category``).
        masks: optional (N, H, W) bool/0-1 masks at the original image size (float probabilities are
            binarised at 0.5); each becomes ``segmentation`` as compressed RLE with str counts.
    """
    boxes, scores_np, labels_np = detection_arrays(boxes_xyxy, scores, labels)
    count = boxes.shape[0]
    unknown = sorted({int(label) for label in labels_np} - {int(key) for key in label_to_category})
    if unknown:
        raise ValueError(
            f"labels {unknown} are not in label_to_category (which has {len(label_to_category)} labels); "
            "pass the data set's CategoryMap.label_to_category of the model's classes"
        )
    binary = _binary_masks(masks, count) if masks is not None else None
    results = []
    for index in range(count):
        x1, y1, x2, y2 = (float(v) for v in boxes[index])
        result: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": int(label_to_category[int(labels_np[index])]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(scores_np[index]),
        }
        if binary is not None:
            result["segmentation"] = mask_to_rle(binary[index])
        results.append(result)
    return results


def _nan_to_none(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _none_to_nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _format(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


@dataclass
class CocoMetrics:
    """COCO results per IoU type (``bbox``, ``segm``), in percent like detectron2.

    ``stats[iou_type]`` maps the names in `STAT_NAMES` to values (NaN where the ground truth has no
    object in that size range); ``per_class[iou_type]`` maps class names to AP (NaN for classes
    without ground truth).
    """

    stats: dict[str, dict[str, float]]
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    num_images: int = 0
    num_detections: int = 0

    @property
    def iou_types(self) -> list[str]:
        return list(self.stats)

    @property
    def box_ap(self) -> float | None:
        return self.stats.get("bbox", {}).get("AP")

    @property
    def mask_ap(self) -> float | None:
        return self.stats.get("segm", {}).get("AP")

    def __getitem__(self, iou_type: str) -> dict[str, float]:
        if iou_type not in self.stats:
            raise KeyError(f"no {iou_type!r} results; evaluated: {self.iou_types}")
        return self.stats[iou_type]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes None (null)."""
        return {
            "stats": {t: {k: _nan_to_none(v) for k, v in s.items()} for t, s in self.stats.items()},
            "per_class": {t: {k: _nan_to_none(v) for k, v in s.items()} for t, s in self.per_class.items()},
            "num_images": self.num_images,
            "num_detections": self.num_detections,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CocoMetrics:
        if not isinstance(data, Mapping) or "stats" not in data:
            raise ValueError("not CocoMetrics data: expected a mapping with 'stats' (as written by to_dict)")
        return cls(
            stats={t: {k: _none_to_nan(v) for k, v in s.items()} for t, s in data["stats"].items()},
            per_class={t: {k: _none_to_nan(v) for k, v in s.items()} for t, s in data.get("per_class", {}).items()},
            num_images=int(data.get("num_images", 0)),
            num_detections=int(data.get("num_detections", 0)),
        )

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write `to_dict` as JSON (temporary name, then renamed)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> CocoMetrics:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"metrics file {path} not found; write one with CocoMetrics.save_json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"metrics file {path} is not JSON ({error}); rewrite it with save_json") from error
        return cls.from_dict(data)

    def summary_markdown(self) -> str:
        header = "| | " + " | ".join(STAT_NAMES) + " |"
        lines = [header, "|---" * (len(STAT_NAMES) + 1) + "|"]
        for iou_type, stats in self.stats.items():
            title = _IOU_TYPE_TITLES.get(iou_type, iou_type)
            lines.append(f"| {title} | " + " | ".join(_format(stats.get(n, float("nan"))) for n in STAT_NAMES) + " |")
        return "\n".join(lines)

    def per_class_markdown(self) -> str:
        types = [t for t in self.stats if t in self.per_class]
        if not types:
            return ""
        names: list[str] = []
        for iou_type in types:
            names.extend(n for n in self.per_class[iou_type] if n not in names)
        lines = [
            "| class | " + " | ".join(f"{_IOU_TYPE_TITLES.get(t, t)} AP" for t in types) + " |",
            "|---" * (len(types) + 1) + "|",
        ]
        for name in names:
            values = [_format(self.per_class[t].get(name, float("nan"))) for t in types]
            lines.append(f"| {name} | " + " | ".join(values) + " |")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The summary table and the per-class AP table."""
        parts = [self.summary_markdown()]
        per_class = self.per_class_markdown()
        if per_class:
            parts.append(per_class)
        return "\n\n".join(parts) + "\n"


def _load_ground_truth(ground_truth: str | os.PathLike | COCO) -> COCO:
    if isinstance(ground_truth, COCO):
        return ground_truth
    path = Path(ground_truth)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth annotation file {path} not found; pass a COCO instances JSON file")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as error:
        raise ValueError(
            f"ground-truth file {path} is not a COCO annotation file ({type(error).__name__}: {error}); "
            "it needs 'images', 'annotations' and 'categories'"
        ) from error


def _load_detections(detections: Iterable[Mapping[str, Any]] | str | os.PathLike) -> list[dict[str, Any]]:
    if isinstance(detections, (str, os.PathLike)):
        path = Path(detections)
        if not path.is_file():
            raise FileNotFoundError(f"detections file {path} not found")
        detections = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(detections, Mapping):
        raise TypeError("detections must be a list of COCO result dicts (from detections_to_coco), not one dict")
    return [dict(d) for d in detections]


def _category_names(coco: COCO, category_names: Mapping[int, str] | Sequence[str] | None) -> dict[int, str]:
    category_ids = sorted(coco.getCatIds())
    if category_names is None:
        return {c: str(coco.cats[c].get("name", c)) for c in category_ids}
    if isinstance(category_names, Mapping):
        missing = [c for c in category_ids if c not in category_names]
        if missing:
            raise ValueError(f"category_names has no name for category ids {missing}; map every category id")
        return {c: str(category_names[c]) for c in category_ids}
    names = list(category_names)
    if len(names) != len(category_ids):
        raise ValueError(
            f"category_names has {len(names)} names but the ground truth has {len(category_ids)} categories; "
            "pass one name per category in category-id order, or a dict category id -> name"
        )
    return dict(zip(category_ids, names))


def _empty_results(coco: COCO) -> COCO:
    """A result set without detections: COCOeval then scores 0 wherever there is ground truth."""
    results = COCO()
    results.dataset = {
        "images": list(coco.dataset["images"]),
        "categories": copy.deepcopy(coco.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        results.createIndex()
    return results


def evaluate_coco(
    ground_truth: str | os.PathLike | COCO,
    detections: Iterable[Mapping[str, Any]] | str | os.PathLike,
    iou_types: Sequence[str] = IOU_TYPES,
    category_names: Mapping[int, str] | Sequence[str] | None = None,
    *,
    image_ids: Iterable[int] | None = None,
) -> CocoMetrics:
    """Evaluate COCO result dicts against a ground truth, quietly (COCOeval's prints are captured).

    Args:
        ground_truth: a COCO instances JSON path or a loaded `pycocotools.coco.COCO`.
        detections: result dicts (`detections_to_coco`) or a JSON file of them.
        iou_types: ``"bbox"`` and/or ``"segm"`` (segm needs ``segmentation`` in every detection).
        category_names: names for the per-class table (dict id -> name, or a list in id order);
            default the ground truth's names.
        image_ids: evaluate these images only (default: every image of the ground truth).

    Returns `CocoMetrics` in percent. With no detections at all the APs are 0 (with a warning),
    not an error.
    """
    iou_types = tuple(iou_types) if not isinstance(iou_types, str) else (iou_types,)
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad or not iou_types:
        raise ValueError(f"iou_types must be a non-empty selection of {IOU_TYPES}; got {list(iou_types)}")
    coco = _load_ground_truth(ground_truth)
    names = _category_names(coco, category_names)
    results = _load_detections(detections)

    known_images = set(coco.getImgIds())
    if image_ids is not None:
        selected = sorted({int(i) for i in image_ids})
        missing = [i for i in selected if i not in known_images]
        if missing:
            raise ValueError(f"image_ids {missing[:10]} are not in the ground truth")
    else:
        selected = sorted(known_images)
    stray = sorted({int(r["image_id"]) for r in results} - known_images)
    if stray:
        raise ValueError(
            f"detections name image ids {stray[:10]} that the ground truth does not have; "
            "evaluate against the annotation file the images came from"
        )
    stray_categories = sorted({int(r["category_id"]) for r in results} - set(names))
    if stray_categories:
        raise ValueError(
            f"detections use category ids {stray_categories[:10]} that the ground truth does not have; "
            "map labels with the data set's label_to_category"
        )
    selected_set = set(selected)
    results = [r for r in results if int(r["image_id"]) in selected_set]
    if "segm" in iou_types and any("segmentation" not in r for r in results):
        raise ValueError(
            "iou_types includes 'segm' but some detections have no 'segmentation'; pass masks to "
            "detections_to_coco, or evaluate with iou_types=('bbox',) (e.g. for RetinaNet)"
        )
    if not results:
        logger.warning(
            "no detections on the %d evaluated images: every AP is 0 (is the score threshold too high?)",
            len(selected),
        )

    stats: dict[str, dict[str, float]] = {}
    per_class: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        # Without the box, COCOeval takes the mask's area for the size ranges (as detectron2 does).
        if iou_type == "segm":
            typed = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        else:
            typed = copy.deepcopy(results)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_results = coco.loadRes(typed) if typed else _empty_results(coco)
            evaluator = COCOeval(coco, coco_results, iou_type)
            evaluator.params.imgIds = selected
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats[iou_type] = {
            name: float(value * 100) if value >= 0 else float("nan") for name, value in zip(STAT_NAMES, evaluator.stats)
        }
        # precision: (IoU thresholds, recall points, classes, area ranges, max detections)
        precision = evaluator.eval["precision"]
        table = {}
        for index, category_id in enumerate(evaluator.params.catIds):
            values = precision[:, :, index, 0, -1]
            values = values[values > -1]
            table[names[category_id]] = float(values.mean() * 100) if values.size else float("nan")
        per_class[iou_type] = table
    return CocoMetrics(stats=stats, per_class=per_class, num_images=len(selected), num_detections=len(results))


__all__ = ["STAT_NAMES", "IOU_TYPES", "CocoMetrics", "detections_to_coco", "evaluate_coco", "mask_to_rle"]
