"""COCO box and mask AP (pycocotools, reported as detectron2 does) as an `evaluate` metric.

Load it by path, offline: ``evaluate.load(vil_hf.metrics.COCO_DETECTION)``. The logic lives in
`vil_hf.metrics.coco` (tested there); this file only declares the inputs.
"""

import datasets
import evaluate

from vil_hf.metrics.coco import compute_coco_detection

_DESCRIPTION = """\
COCO detection metrics: AP (IoU 0.50:0.95), AP50, AP75, AP for small/medium/large objects and the
recalls AR1/AR10/AR100/ARs/ARm/ARl, in percent, for boxes and (with masks) instance masks, plus the AP
of each class. Computed by pycocotools' COCOeval, as vil_hf.evaluation.evaluate_coco does.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one dict per image: `image_id` (int), `boxes` (N, 4) absolute x1, y1, x2, y2,
        `scores` (N,), `labels` (N,), and optionally `masks`: N COCO RLE dicts {"size": [H, W], "counts": str}.
    references: one dict per image: `image_id`, `boxes`, `labels`, `area` (N,) COCO object areas,
        `iscrowd` (N,), and optionally `masks` as RLE.
    iou_types: ("bbox",) or ("bbox", "segm"); default: masks too in the "segm" configuration
        (`evaluate.load(vil_hf.metrics.COCO_DETECTION, "segm")`), which requires `masks`.
    id2label: class names of the per-class APs (default: the label numbers).
Returns:
    box_AP, box_AP50, box_AP75, box_APs, box_APm, box_APl, box_AR1, box_AR10, box_AR100, box_ARs,
    box_ARm, box_ARl, box_AP_<class> (and mask_* likewise), floats in percent; NaN where the ground
    truth has no object of that size or class.
Examples:
    >>> import evaluate, vil_hf.metrics
    >>> coco = evaluate.load(vil_hf.metrics.COCO_DETECTION)
    >>> truth = {"image_id": 1, "boxes": [[10, 10, 50, 60]], "labels": [0], "area": [2000.0], "iscrowd": [0]}
    >>> found = {"image_id": 1, "boxes": [[10, 10, 50, 60]], "scores": [0.9], "labels": [0]}
    >>> round(coco.compute(predictions=[found], references=[truth])["box_AP"], 6)
    100.0
"""

_CITATION = """\
@inproceedings{lin2014microsoft,
  title={Microsoft COCO: Common Objects in Context},
  author={Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and
          Ramanan, Deva and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle={ECCV},
  year={2014}
}
"""

_FLOATS = [datasets.Value("float64")]
_INTS = [datasets.Value("int64")]
_RLE = [{"size": _INTS, "counts": datasets.Value("string")}]


def _features(with_masks: bool) -> datasets.Features:
    prediction = {
        "image_id": datasets.Value("int64"),
        "boxes": [_FLOATS],
        "scores": _FLOATS,
        "labels": _INTS,
    }
    reference = {
        "image_id": datasets.Value("int64"),
        "boxes": [_FLOATS],
        "labels": _INTS,
        "area": _FLOATS,
        "iscrowd": _INTS,
    }
    if with_masks:
        prediction["masks"] = _RLE
        reference["masks"] = _RLE
    return datasets.Features({"predictions": prediction, "references": reference})


def _check_masks(config_name, examples, what):
    """Masks given to the boxes-only configuration would be dropped without a word: refuse them."""
    if config_name != "segm" and any(isinstance(e, dict) and "masks" in e for e in examples or []):
        raise ValueError(
            f"{what} carry 'masks' but this metric was loaded for boxes only; load it with "
            "evaluate.load(vil_hf.metrics.COCO_DETECTION, 'segm') for mask AP too"
        )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoDetection(evaluate.Metric):
    """Configurations: "bbox" (the default; boxes) and "segm" (boxes and masks, `masks` required)."""

    def _info(self):
        if self.config_name not in ("default", "bbox", "segm"):
            raise ValueError(f"configuration {self.config_name!r} is unknown; use 'bbox' (default) or 'segm'")
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_features(with_masks=self.config_name == "segm"),
            reference_urls=["https://cocodataset.org/#detection-eval"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of per-image predictions and references (masks only in the "segm" configuration)."""
        _check_masks(self.config_name, predictions, "predictions")
        _check_masks(self.config_name, references, "references")
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one image's prediction and reference (masks only in the "segm" configuration)."""
        _check_masks(self.config_name, [prediction], "the prediction")
        _check_masks(self.config_name, [reference], "the reference")
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references, iou_types=None, id2label=None):
        return compute_coco_detection(predictions, references, iou_types=iou_types, id2label=id2label)
