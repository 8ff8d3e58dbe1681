"""COCO detection metrics from per-image predictions and references, the logic of the `evaluate`
module in ``coco_detection/`` (which stays a thin wrapper): the references become an in-memory COCO
ground truth, the predictions COCO results, and `vil_hf.evaluation.evaluate_coco` scores them.

Per image (one example each):

- prediction: ``image_id``, ``boxes`` (N, 4) absolute ``x1, y1, x2, y2``, ``scores`` (N,), ``labels``
  (N,), optionally ``masks``: N compressed RLE dicts ``{"size": [H, W], "counts": str}``
  (`vil_hf.evaluation.mask_to_rle`);
- reference: ``image_id``, ``boxes``, ``labels``, ``area`` (N,) (COCO's object areas; they set the
  small/medium/large ranges), ``iscrowd`` (N,), optionally ``masks`` as RLE.

Labels are one label space for both (the model's contiguous labels, or COCO category ids).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from ..data import CocoDetectionData
from ..evaluation.coco_eval import STAT_NAMES, CocoMetrics, detections_to_coco, evaluate_coco, mask_to_rle

_TITLES = {"bbox": "box", "segm": "mask"}


def flat_metrics(metrics: CocoMetrics) -> dict[str, float]:
    """``box_AP``, ``box_AP50``, ... (`STAT_NAMES`), ``mask_*`` for masks, and ``box_AP_<class>`` per class,
    in percent (NaN where the ground truth has no object of that size or class)."""
    flat: dict[str, float] = {}
    for iou_type, stats in metrics.stats.items():
        title = _TITLES[iou_type]
        flat.update({f"{title}_{name}": stats[name] for name in STAT_NAMES})
        flat.update({f"{title}_AP_{name}": value for name, value in metrics.per_class.get(iou_type, {}).items()})
    return flat


def _boxes(value: Any, where: str) -> np.ndarray:
    boxes = np.asarray(value, dtype=np.float64)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes must be (N, 4) as x1, y1, x2, y2; got shape {boxes.shape}")
    return boxes


def _column(example: Mapping[str, Any], name: str, count: int, where: str) -> list:
    values = list(example[name]) if name in example and example[name] is not None else None
    if values is None or len(values) != count:
        found = "nothing" if values is None else f"{len(values)} entries"
        raise ValueError(f"{where}: '{name}' needs one entry per box ({count}); got {found}")
    return values


def coco_ground_truth(
    references: Sequence[Mapping[str, Any]],
    categories: Mapping[int, str],
    with_masks: bool,
    image_sizes: Mapping[int, tuple[int, int]] | None = None,
) -> COCO:
    """An in-memory `COCO` from per-image references (see the module docstring); ``image_sizes``
    (height, width) go into the images, which COCOeval reads when it compares masks."""
    image_sizes = image_sizes or {}
    images, annotations = [], []
    for number, reference in enumerate(references):
        where = f"references[{number}] (image_id {reference.get('image_id')})"
        image_id = int(reference["image_id"])
        boxes = _boxes(reference["boxes"], where)
        labels = _column(reference, "labels", len(boxes), where)
        areas = _column(reference, "area", len(boxes), where)
        crowd = _column(reference, "iscrowd", len(boxes), where)
        masks = _column(reference, "masks", len(boxes), where) if with_masks else [None] * len(boxes)
        image = {"id": image_id}
        if image_id in image_sizes:
            image["height"], image["width"] = (int(v) for v in image_sizes[image_id])
        images.append(image)
        for (x1, y1, x2, y2), label, area, iscrowd, mask in zip(boxes.tolist(), labels, areas, crowd, masks):
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(label),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float(area),
                "iscrowd": int(iscrowd),
            }
            if mask is not None:
                annotation["segmentation"] = dict(mask)
            annotations.append(annotation)
    if len({image["id"] for image in images}) != len(images):
        raise ValueError("two references have the same image_id; give each image once")
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": int(c), "name": str(name)} for c, name in sorted(categories.items())],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def compute_coco_detection(
    predictions: Sequence[Mapping[str, Any]],
    references: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] | None = None,
    id2label: Mapping[int, str] | None = None,
) -> dict[str, float]:
    """COCO metrics (`flat_metrics`) of per-image predictions against per-image references.

    ``iou_types`` defaults to boxes, and masks too when every prediction and reference has ``masks``.
    ``id2label`` names the classes of the per-class APs (default: the label numbers).
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions for {len(references)} references; give one of each per image"
        )
    if not references:
        raise ValueError("no images to evaluate: add_batch/add some predictions and references first")
    has_masks = all(example.get("masks") is not None for example in [*predictions, *references])
    if iou_types is None:
        iou_types = ("bbox", "segm") if has_masks else ("bbox",)
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    if "segm" in iou_types and not has_masks:
        raise ValueError("iou_types asks for 'segm' but not every prediction and reference has 'masks' (RLE dicts)")
    reference_ids = sorted(int(r["image_id"]) for r in references)
    if sorted(int(p["image_id"]) for p in predictions) != reference_ids:
        raise ValueError("predictions and references must name the same image_ids, one example per image")

    labels = {int(label) for example in [*predictions, *references] for label in example["labels"]}
    id2label = {int(k): v for k, v in (id2label or {}).items()}
    categories = {label: id2label.get(label, str(label)) for label in labels | set(id2label)}
    with_masks = "segm" in iou_types
    # Masks carry their image's size, which COCOeval needs for each image with a mask.
    sizes = {
        int(example["image_id"]): tuple(mask["size"])
        for example in [*predictions, *references]
        for mask in (example.get("masks") or [] if with_masks else [])
    }
    ground_truth = coco_ground_truth(references, categories, with_masks, sizes)
    identity = {label: label for label in categories}
    results = []
    for number, prediction in enumerate(predictions):
        where = f"predictions[{number}] (image_id {prediction.get('image_id')})"
        boxes = _boxes(prediction["boxes"], where)
        masks = None
        if with_masks:
            masks = _column(prediction, "masks", len(boxes), where)
        detections = detections_to_coco(
            int(prediction["image_id"]),
            boxes,
            _column(prediction, "scores", len(boxes), where),
            _column(prediction, "labels", len(boxes), where),
            identity,
        )
        if masks is not None:
            for detection, mask in zip(detections, masks):
                detection["segmentation"] = dict(mask)
        results.extend(detections)
    metrics = evaluate_coco(ground_truth, results, iou_types=iou_types)
    return flat_metrics(metrics)


def references_from_coco(data: CocoDetectionData, with_masks: bool = False) -> list[dict[str, Any]]:
    """One reference per image of a COCO data set, in the model's contiguous labels (``data.label_map``);
    masks (``with_masks``) as RLE decoded from the annotations' polygons or RLE."""
    category_to_label = data.label_map.category_to_label
    coco = None
    if with_masks:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(data.annotation_file)
    references = []
    for row in data.dataset:
        objects = json.loads(row["annotations"])
        reference = {
            "image_id": int(row["image_id"]),
            "boxes": [[x, y, x + w, y + h] for x, y, w, h in (obj["bbox"] for obj in objects)],
            "labels": [category_to_label[obj["category_id"]] for obj in objects],
            "area": [float(obj.get("area", obj["bbox"][2] * obj["bbox"][3])) for obj in objects],
            "iscrowd": [int(obj.get("iscrowd", 0)) for obj in objects],
        }
        if coco is not None:
            reference["masks"] = [mask_to_rle(coco.annToMask(obj)) for obj in objects]
        references.append(reference)
    return references


__all__ = ["coco_ground_truth", "compute_coco_detection", "flat_metrics", "references_from_coco"]
