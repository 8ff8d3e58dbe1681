"""COCO evaluation on a tiny hand-made ground truth, drawing detections, top-k counts."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from vil_hf.evaluation import (
    STAT_NAMES,
    CocoMetrics,
    accuracy_from_counts,
    class_colour,
    detections_to_coco,
    draw_detections,
    evaluate_coco,
    save_detection_grid,
    topk_correct,
    visualize,
)
from vil_hf.evaluation.visualize import MASK_ALPHA, place_label

SIZE = 200
# Contiguous labels 0, 1, 2 of the model -> COCO ids 1, 3, 5 (5 has no ground truth).
LABEL_TO_CATEGORY = {0: 1, 1: 3, 2: 5}


def box_mask(x: int, y: int, w: int, h: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[y : y + h, x : x + w] = True
    return mask


@pytest.fixture()
def ground_truth(tmp_path):
    """Image 1: a 100x100 square of class 1 (RLE mask, large). Image 2: a 40x40 polygon of class 3 (medium)."""
    rle = mask_utils.encode(np.asfortranarray(box_mask(10, 10, 100, 100).astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": SIZE, "height": SIZE},
            {"id": 2, "file_name": "b.png", "width": SIZE, "height": SIZE},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 100], "area": 10000, "iscrowd": 0,
             "segmentation": rle},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [20, 20, 40, 40], "area": 1600, "iscrowd": 0,
             "segmentation": [[20, 20, 60, 20, 60, 60, 20, 60]]},
        ],
        "categories": [{"id": 1, "name": "square"}, {"id": 3, "name": "small square"}, {"id": 5, "name": "unused"}],
    }  # fmt: skip
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def polygon_mask() -> np.ndarray:
    rle = mask_utils.frPyObjects([[20, 20, 60, 20, 60, 60, 20, 60]], SIZE, SIZE)
    return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def predictions(shift: int = 0) -> list[dict]:
    """Perfect detections; ``shift`` moves the class-1 box and mask right by that many pixels."""
    first = detections_to_coco(
        1,
        torch.tensor([[10.0 + shift, 10.0, 110.0 + shift, 110.0]]),
        torch.tensor([0.9]),
        torch.tensor([0]),
        LABEL_TO_CATEGORY,
        masks=torch.from_numpy(box_mask(10 + shift, 10, 100, 100))[None],
    )
    second = detections_to_coco(
        2, np.array([[20.0, 20.0, 60.0, 60.0]]), np.array([0.8]), np.array([1]), LABEL_TO_CATEGORY,
        masks=polygon_mask()[None].astype(np.uint8),
    )  # fmt: skip
    return first + second


def test_perfect_detections_give_ap_100(ground_truth):
    metrics = evaluate_coco(ground_truth, predictions())
    assert metrics.iou_types == ["bbox", "segm"]
    for iou_type in ("bbox", "segm"):
        stats = metrics[iou_type]
        assert list(stats) == list(STAT_NAMES)
        for name in ("AP", "AP50", "AP75", "APm", "APl", "AR1", "AR10", "AR100", "ARm", "ARl"):
            assert stats[name] == pytest.approx(100.0), (iou_type, name)
        assert math.isnan(stats["APs"]) and math.isnan(stats["ARs"])  # no small objects in the ground truth
        assert metrics.per_class[iou_type]["square"] == pytest.approx(100.0)
        assert metrics.per_class[iou_type]["small square"] == pytest.approx(100.0)
        assert math.isnan(metrics.per_class[iou_type]["unused"])
    assert metrics.box_ap == pytest.approx(100.0) and metrics.mask_ap == pytest.approx(100.0)
    assert metrics.num_images == 2 and metrics.num_detections == 2


def test_shifted_detections_give_known_lower_ap(ground_truth):
    # Shift 20: IoU = 80/120 = 0.667, a match at IoU .50-.65 only: 4 of 10 thresholds -> AP 40 for
    # class 1; class 3 stays 100, so AP = 70, AP50 = 100, AP75 = 50, APl (class 1 only) = 40.
    metrics = evaluate_coco(ground_truth, predictions(shift=20))
    for iou_type in ("bbox", "segm"):
        stats = metrics[iou_type]
        assert metrics.per_class[iou_type]["square"] == pytest.approx(40.0)
        assert metrics.per_class[iou_type]["small square"] == pytest.approx(100.0)
        assert stats["AP"] == pytest.approx(70.0)
        assert stats["AP50"] == pytest.approx(100.0)
        assert stats["AP75"] == pytest.approx(50.0)
        assert stats["APl"] == pytest.approx(40.0)
        assert stats["APm"] == pytest.approx(100.0)
    # Only the box: evaluating one IoU type, and restricted to image 1.
    only_first = evaluate_coco(ground_truth, predictions(shift=20), iou_types=("bbox",), image_ids=[1])
    assert only_first.iou_types == ["bbox"] and only_first.num_images == 1
    assert only_first.box_ap == pytest.approx(40.0) and only_first.mask_ap is None


def test_no_detections_give_zeros_with_a_warning(ground_truth, caplog):
    with caplog.at_level(logging.WARNING):
        metrics = evaluate_coco(ground_truth, [])
    assert "no detections" in caplog.text
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APm", "APl", "AR1", "AR100"):
            assert metrics[iou_type][name] == 0.0
        assert metrics.per_class[iou_type]["square"] == 0.0
    assert metrics.num_detections == 0


def test_rle_json_round_trip_and_coco_boxes():
    masks = np.zeros((2, 30, 40), dtype=bool)
    masks[0, 5:12, 3:20] = True
    masks[1, 0:30, 39] = True
    results = detections_to_coco(
        7, np.array([[3, 5, 20, 12], [39, 0, 40, 30]], dtype=np.float32), [0.5, 0.25], [2, 0], LABEL_TO_CATEGORY,
        masks=masks,
    )  # fmt: skip
    loaded = json.loads(json.dumps(results))
    assert [r["category_id"] for r in loaded] == [5, 1]
    assert loaded[0]["bbox"] == [3.0, 5.0, 17.0, 7.0] and loaded[0]["image_id"] == 7
    assert loaded[1]["score"] == 0.25
    for result, mask in zip(loaded, masks):
        assert isinstance(result["segmentation"]["counts"], str)
        assert result["segmentation"]["size"] == [30, 40]
        assert np.array_equal(mask_utils.decode(result["segmentation"]).astype(bool), mask)
    assert detections_to_coco(1, np.zeros((0, 4)), [], [], LABEL_TO_CATEGORY) == []


def test_metrics_json_and_markdown(ground_truth, tmp_path):
    metrics = evaluate_coco(ground_truth, predictions(shift=20))
    path = metrics.save_json(tmp_path / "out" / "metrics.json")
    raw = json.loads(path.read_text())  # strict JSON: NaN written as null
    assert raw["stats"]["bbox"]["APs"] is None and raw["stats"]["bbox"]["AP"] == pytest.approx(70.0)
    assert not list(path.parent.glob(".*tmp"))
    loaded = CocoMetrics.load_json(path)
    assert loaded.stats["segm"]["AP"] == pytest.approx(70.0) and math.isnan(loaded.stats["segm"]["APs"])
    assert math.isnan(loaded.per_class["bbox"]["unused"])
    text = metrics.markdown()
    assert "| box | 70.00 | 100.00 | 50.00 | n/a |" in text
    assert "| mask | 70.00 |" in text
    assert "| square | 40.00 | 40.00 |" in text and "| unused | n/a | n/a |" in text


def test_bad_inputs_name_the_problem(ground_truth, tmp_path):
    with pytest.raises(ValueError, match="not in label_to_category"):
        detections_to_coco(1, [[0, 0, 1, 1]], [0.5], [9], LABEL_TO_CATEGORY)
    with pytest.raises(ValueError, match="one entry per detection"):
        detections_to_coco(1, [[0, 0, 1, 1]], [0.5, 0.2], [0], LABEL_TO_CATEGORY)
    with pytest.raises(ValueError, match=r"masks must be \(N, H, W\)"):
        detections_to_coco(1, [[0, 0, 1, 1]], [0.5], [0], LABEL_TO_CATEGORY, masks=np.zeros((2, 4, 4)))
    boxes_only = [{k: v for k, v in d.items() if k != "segmentation"} for d in predictions()]
    with pytest.raises(ValueError, match="iou_types=\\('bbox',\\)"):
        evaluate_coco(ground_truth, boxes_only)
    stray = predictions()
    stray[0]["image_id"] = 99
    with pytest.raises(ValueError, match="image ids \\[99\\]"):
        evaluate_coco(ground_truth, stray)
    with pytest.raises(ValueError, match="iou_types"):
        evaluate_coco(ground_truth, [], iou_types=("keypoints",))
    with pytest.raises(FileNotFoundError, match="not found"):
        evaluate_coco(tmp_path / "missing.json", [])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not a COCO annotation file"):
        evaluate_coco(tmp_path / "broken.json", [])


def test_draw_detections_marks_boxes_and_masks():
    image = Image.new("RGB", (64, 48), (0, 0, 0))
    mask = np.zeros((2, 48, 64), dtype=bool)
    mask[0, 20:30, 20:30] = True
    drawn = draw_detections(
        image, torch.tensor([[10.0, 15.0, 40.0, 40.0], [50, 38, 62, 46]]), torch.tensor([1, 2]),
        torch.tensor([0.93, 0.1]), masks=mask, id2label={1: "circle", 2: "square"},
    )  # fmt: skip
    assert drawn.size == image.size and drawn.mode == "RGB"
    pixels = np.asarray(drawn)
    assert np.asarray(image).sum() == 0  # the input is untouched
    inside = pixels[23:27, 23:27]  # a light tint inside the mask, away from its contour
    expected = np.round(np.array(class_colour(1)) * MASK_ALPHA).astype(int)
    assert np.abs(inside.astype(int) - expected).max() <= 1
    assert (pixels[20, 20:30] == class_colour(1)).all() and (pixels[20:30, 29] == class_colour(1)).all()  # contour
    assert pixels[40, 25].any() and pixels[25, 10].any()  # box edges
    assert not pixels[46, 2].any()  # outside every box
    assert not pixels[37:48, 48:64].any()  # the 0.1 detection is below the threshold
    low = np.asarray(draw_detections(image, [[50, 38, 62, 46]], [2], [0.1], score_threshold=0.05))
    assert low[38:47, 50:63].any()
    with pytest.raises(ValueError, match="masks must be"):
        draw_detections(image, [[0, 0, 5, 5]], [0], [1.0], masks=np.zeros((1, 10, 10), dtype=bool))


def _crowded_detections(seed: int, count: int, size: tuple[int, int]):
    rng = np.random.default_rng(seed)
    width, height = size
    corners = rng.uniform(0, [width * 0.6, height * 0.6], (count, 2))
    sides = rng.uniform(8, min(width, height) * 0.4, (count, 2))
    boxes = np.concatenate([corners, np.minimum(corners + sides, [width - 1, height - 1])], axis=1)
    masks = np.zeros((count, height, width), dtype=bool)
    for index, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        masks[index, y1 + 2 : y2 - 1, x1 + 2 : x2 - 1] = True
    return boxes.astype(np.float32), rng.integers(0, 3, count), rng.uniform(0.5, 1.0, count), masks


def test_place_label_prefers_above_then_inside_then_below_and_never_overlaps():
    taken = []
    above = place_label((10, 30, 60, 80), (20, 10), (100, 100), taken, inset=2)
    assert above == (10, 20, 29, 29)
    taken.append(above)
    assert place_label((10, 30, 60, 80), (20, 10), (100, 100), taken, inset=2) == (41, 20, 60, 29)  # right edge
    taken.append((41, 20, 60, 29))
    assert place_label((10, 30, 60, 80), (20, 10), (100, 100), taken, inset=2) == (10, 32, 29, 41)  # inside
    assert place_label((10, 2, 60, 80), (20, 10), (100, 100), [], inset=2) == (10, 4, 29, 13)  # no room above
    assert place_label((10, 2, 60, 95), (20, 10), (100, 100), [(0, 0, 99, 99)]) is None  # nowhere free
    assert place_label((90, 50, 99, 60), (20, 10), (100, 100), []) == (80, 40, 99, 49)  # kept inside the image
    assert place_label((0, 0, 5, 5), (120, 10), (100, 100), []) is None  # wider than the image


@pytest.mark.parametrize("seed", [0, 1])
def test_draw_detections_captions_do_not_overlap_and_the_rest_keeps_its_colour(seed):
    rng = np.random.default_rng(seed + 10)
    image = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    boxes, labels, scores, masks = _crowded_detections(seed, 25, image.size)
    drawn, captions = visualize._draw_detections(
        image, boxes, labels, scores, masks, {0: "circle", 1: "square", 2: "triangle"}, 0.5, None, None, None
    )
    assert np.array_equal(np.asarray(drawn), np.asarray(draw_detections(image, boxes, labels, scores, masks=masks,
                          id2label={0: "circle", 1: "square", 2: "triangle"})))  # fmt: skip
    assert 3 <= len(captions) < 25  # crowded: some captions fit, some are left out rather than stacked
    for index, rect in enumerate(captions):
        assert 0 <= rect[0] <= rect[2] < 128 and 0 <= rect[1] <= rect[3] < 96
        for other in captions[index + 1 :]:
            assert not (rect[0] <= other[2] and other[0] <= rect[2] and rect[1] <= other[3] and other[1] <= rect[3])
    # Everything but the masks, the box outlines (2 pixels wide, a pixel of slack) and the captions keeps its colour.
    touched = masks.any(0)
    for x1, y1, x2, y2 in np.clip(np.round(boxes), 0, [127, 95, 127, 95]).astype(int):
        band = np.zeros_like(touched)
        band[max(y1 - 1, 0) : y2 + 2, max(x1 - 1, 0) : x2 + 2] = True
        band[y1 + 3 : y2 - 2, x1 + 3 : x2 - 2] = False
        touched |= band
    for x1, y1, x2, y2 in captions:
        touched[y1 : y2 + 1, x1 : x2 + 1] = True
    assert (~touched).sum() > 96 * 128 // 4
    assert np.array_equal(np.asarray(drawn)[~touched], np.asarray(image)[~touched])


def test_detection_grid(tmp_path):
    images = [Image.new("RGB", (40, 30), (10, 20, 30)), Image.new("L", (20, 50), 128)]
    prediction = {"boxes": torch.tensor([[2.0, 2.0, 30.0, 20.0]]), "labels": torch.tensor([0]), "scores": [0.9]}
    path = save_detection_grid(
        [(images[0], prediction), images[1], (images[0], prediction)], tmp_path / "grid.png", columns=2, gap=4
    )
    grid = Image.open(path)
    assert grid.format == "PNG" and grid.size == (2 * 40 + 4, 2 * 50 + 4)
    assert np.asarray(grid)[2, 10].tolist() == list(class_colour(0))
    with pytest.raises(TypeError, match="PIL image"):
        save_detection_grid([np.zeros((4, 4))], tmp_path / "bad.png")


def test_topk_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.1], [0.2, 0.3, 0.5], [0.5, 0.3, 0.2]])
    labels = torch.tensor([1, 2, 0, 0])
    counts = topk_correct(logits, labels, ks=(1, 2, 5))
    assert counts == {"top1": 2, "top2": 3, "top5": 4, "total": 4}
    summed = {k: counts[k] + v for k, v in topk_correct(logits[:1], labels[:1], ks=(1, 2, 5)).items()}
    assert accuracy_from_counts(summed) == {"top1": 60.0, "top2": 80.0, "top5": 100.0}
    with pytest.raises(ValueError, match="labels must lie"):
        topk_correct(logits, torch.tensor([0, 1, 2, 3]))
