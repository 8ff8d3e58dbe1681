"""Our COCO metric as an `evaluate` module: loads offline by path, and gives vil_hf.evaluation's numbers."""

from __future__ import annotations

import json
import socket

import evaluate
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from vil_hf.data import load_coco_detection, make_shapes
from vil_hf.evaluation import detections_to_coco, evaluate_coco, mask_to_rle
from vil_hf.metrics import COCO_DETECTION, flat_metrics, references_from_coco

SIZE = (64, 80)


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    paths = make_shapes(tmp_path_factory.mktemp("shapes"), num_train=1, num_val=12, image_size=SIZE, seed=7)
    return load_coco_detection(paths["val_images"], paths["val_annotations"])


@pytest.fixture()
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the metric tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def noisy_predictions(references, seed=0):
    """Per image: the ground truth moved by a few pixels, some objects missed, a false positive, random
    scores; with masks in the references, the true mask for even objects and the box filled for odd ones."""
    rng = np.random.default_rng(seed)
    predictions = []
    for reference in references:
        boxes, labels, scores, masks = [], [], [], []
        for index, (box, label) in enumerate(zip(reference["boxes"], reference["labels"])):
            if rng.random() < 0.15:
                continue
            moved = np.asarray(box) + rng.normal(0, 1.5, 4)
            boxes.append(moved.tolist())
            labels.append(label)
            scores.append(float(rng.uniform(0.3, 1.0)))
            if "masks" not in reference:
                continue
            if index % 2 == 0:
                masks.append(reference["masks"][index])
            else:
                filled = np.zeros(SIZE, dtype=bool)
                x1, y1, x2, y2 = (int(round(v)) for v in box)
                filled[y1:y2, x1:x2] = True
                masks.append(mask_to_rle(filled))
        boxes.append([1.0, 1.0, 20.0, 20.0])
        labels.append(int(rng.integers(3)))
        scores.append(0.5)
        masks.append(mask_to_rle(np.pad(np.ones((19, 19), bool), ((1, SIZE[0] - 20), (1, SIZE[1] - 20)))))
        prediction = {"image_id": reference["image_id"], "boxes": boxes, "labels": labels, "scores": scores}
        if "masks" in reference:
            prediction["masks"] = masks
        predictions.append(prediction)
    return predictions


def test_evaluate_module_loads_offline_and_matches_vil_hf_evaluation(val_data, offline, tmp_path):
    references = references_from_coco(val_data, with_masks=True)
    predictions = noisy_predictions(references)
    coco = evaluate.load(COCO_DETECTION, "segm", cache_dir=str(tmp_path))
    half = len(references) // 2
    coco.add_batch(predictions=predictions[:half], references=references[:half])
    coco.add_batch(predictions=predictions[half:], references=references[half:])
    got = coco.compute(id2label=val_data.label_map.id2label)

    # The same detections through vil_hf.evaluation against the annotation file itself.
    results = []
    for prediction in predictions:
        found = detections_to_coco(
            prediction["image_id"],
            prediction["boxes"],
            prediction["scores"],
            prediction["labels"],
            val_data.label_map.label_to_category,
            masks=np.stack([mask_utils.decode(m) for m in prediction["masks"]]),
        )
        results.extend(found)
    expected = flat_metrics(evaluate_coco(val_data.annotation_file, results))
    assert set(got) == set(expected)
    assert 10 < expected["box_AP"] < 95 and 10 < expected["mask_AP"] < 95  # neither trivial nor perfect
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6, nan_ok=True), name


def test_boxes_only_by_default_and_loadable_by_file_path(val_data, offline, tmp_path):
    references = references_from_coco(val_data)
    predictions = noisy_predictions(references, seed=1)
    coco = evaluate.load(COCO_DETECTION + "/coco_detection.py", cache_dir=str(tmp_path))
    got = coco.compute(predictions=predictions, references=references)
    assert "mask_AP" not in got and 0 < got["box_AP"] < 100
    assert {"box_AP_0", "box_AP_1", "box_AP_2"} <= set(got)  # without id2label, classes go by their labels


def test_evaluate_module_errors_name_the_fix(val_data, tmp_path):
    references = references_from_coco(val_data, with_masks=True)
    boxes_only = evaluate.load(COCO_DETECTION, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'segm'"):
        boxes_only.add_batch(predictions=noisy_predictions(references[:1]), references=references[:1])
    with pytest.raises(ValueError, match="unknown"):
        evaluate.load(COCO_DETECTION, "keypoints", cache_dir=str(tmp_path))
    plain = [{k: v for k, v in r.items() if k != "masks"} for r in references[:2]]
    found = [{"image_id": r["image_id"], "boxes": r["boxes"], "labels": r["labels"], "scores": [1.0] * len(r["labels"])}
             for r in plain]  # fmt: skip
    with pytest.raises(ValueError, match="same image_ids"):
        boxes_only.compute(predictions=found[1:], references=plain[:1])
    with pytest.raises(ValueError, match="one entry per box"):
        boxes_only.compute(predictions=[{**found[0], "scores": []}], references=plain[:1])


def test_references_from_coco_keep_areas_crowds_and_labels(val_data):
    references = references_from_coco(val_data)
    first = json.loads(val_data.dataset[0]["annotations"])
    assert references[0]["area"] == [float(obj["area"]) for obj in first]
    assert references[0]["labels"] == [val_data.label_map.category_to_label[obj["category_id"]] for obj in first]
    x, y, w, h = first[0]["bbox"]
    assert references[0]["boxes"][0] == [x, y, x + w, y + h]
