"""DetectionImageProcessorPil: detectron2-style pre-processing, COCO targets and post-processing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.utils import ModelOutput

from vil_hf.detection.image_processing_detection import (
    DETECTRON2_PIXEL_MEAN,
    DETECTRON2_PIXEL_STD,
    DetectionImageProcessorPil,
    get_resize_output_size,
    paste_masks_in_image,
)

mask_util = pytest.importorskip("pycocotools.mask")

# pycocotools' decode trips NumPy 2's `__array__(copy=...)` deprecation; the processor silences it itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

MULTI_SCALE = (640, 672, 704, 736, 768, 800)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)  # (H, W, 3)


def _formula(height: int, width: int, short: int, long: int) -> tuple[int, int]:
    """The ResizeShortestEdge rule as the spec states it."""
    scale = short / min(height, width)
    if max(height, width) * scale > long:
        scale = long / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _detectron2_order(height: int, width: int, short: int, long: int) -> tuple[int, int]:
    """detectron2's own operation order: short side set exactly, then both sides shrunk together."""
    scale = short / min(height, width)
    new_h, new_w = (float(short), scale * width) if height < width else (scale * height, float(short))
    if max(new_h, new_w) > long:
        shrink = long / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


# ------------------------------------------------------------------------------------------------
# resize, normalise, pad
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width",
    [
        (480, 640),
        (640, 480),
        (800, 1333),
        (1333, 800),
        (427, 640),
        (1, 1),
        (100, 5000),
        (5000, 100),
        (3, 2000),
        (2000, 3),
        (799, 801),
        (1200, 1200),
        (37, 53),
    ],
)
@pytest.mark.parametrize("short, long", [(800, 1333), (640, 1333), (512, 853)])
def test_resize_size_matches_formula(height, width, short, long):
    expected = _formula(height, width, short, long)
    assert get_resize_output_size(height, width, short, long) == expected
    assert _detectron2_order(height, width, short, long) == expected
    # The short side reaches `short` unless the long side caps it; the long side never exceeds `long`.
    new_h, new_w = expected
    assert max(new_h, new_w) <= long
    if max(height, width) / min(height, width) * short <= long:
        assert min(new_h, new_w) == short


def test_resize_rounding_follows_detectron2_operation_order():
    # 11 x 22 to short 800 / long 1333: detectron2 computes 800 * (1333 / 1600) = 666.4999..., which
    # rounds to 666, while h * (1333 / 22) = 666.5 would give 667. We follow detectron2.
    assert get_resize_output_size(11, 22, 800, 1333) == (666, 1333) == _detectron2_order(11, 22, 800, 1333)
    for height in range(1, 400, 3):
        for width in range(1, 2000, 37):
            assert get_resize_output_size(height, width, 800, 1333) == _detectron2_order(height, width, 800, 1333)


@pytest.mark.parametrize("height, width", [(300, 500), (500, 300), (40, 900), (801, 799)])
def test_pixels_are_pil_bilinear_then_normalised_then_padded(height, width):
    image = _image(height, width)
    processor = DetectionImageProcessorPil()
    out = processor(Image.fromarray(image), return_tensors="pt")
    new_h, new_w = get_resize_output_size(height, width, 800, 1333)

    expected = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), dtype=np.float32)
    expected = (expected - np.array(DETECTRON2_PIXEL_MEAN, np.float32)) / np.array(DETECTRON2_PIXEL_STD, np.float32)
    expected = torch.from_numpy(expected).permute(2, 0, 1)

    pixel_values, pixel_mask = out["pixel_values"], out["pixel_mask"]
    pad_h, pad_w = math.ceil(new_h / 32) * 32, math.ceil(new_w / 32) * 32
    assert pixel_values.shape == (1, 3, pad_h, pad_w) and pixel_values.dtype == torch.float32
    assert pixel_mask.shape == (1, pad_h, pad_w) and pixel_mask.dtype == torch.int64
    # detectron2 computes (pixel - mean255) / std255 in float32; our folded constants give the same
    # element-wise operations, so at most one float32 rounding step apart.
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(pixel_values[0, :, :new_h, :new_w], expected, atol=eps, rtol=eps)
    assert pixel_values[0, :, new_h:].abs().sum() == 0 and pixel_values[0, :, :, new_w:].abs().sum() == 0
    assert pixel_mask[0, :new_h, :new_w].all() and pixel_mask.sum() == new_h * new_w


def test_batch_pads_to_the_largest_image_rounded_up():
    images = [_image(300, 500), _image(500, 300, 1), _image(200, 210, 2)]
    out = DetectionImageProcessorPil(size_divisibility=64)(images, return_tensors="pt")
    sizes = [get_resize_output_size(*im.shape[:2], 800, 1333) for im in images]
    pad_h = math.ceil(max(h for h, _ in sizes) / 64) * 64
    pad_w = math.ceil(max(w for _, w in sizes) / 64) * 64
    assert out["pixel_values"].shape == (3, 3, pad_h, pad_w)
    for index, (h, w) in enumerate(sizes):
        mask = out["pixel_mask"][index]
        assert mask[:h, :w].all() and mask.sum() == h * w
        assert out["pixel_values"][index, :, h:, :].abs().sum() == 0
        assert out["pixel_values"][index, :, :, w:].abs().sum() == 0


def test_grayscale_and_channels_first_inputs():
    gray = Image.fromarray(_image(60, 80)[..., 0])
    out = DetectionImageProcessorPil(shortest_edge=64, longest_edge=200)(gray, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 64, 96)
    chw = torch.from_numpy(_image(60, 80)).permute(2, 0, 1)
    from_tensor = DetectionImageProcessorPil(shortest_edge=64)(chw, return_tensors="pt")["pixel_values"]
    from_pil = DetectionImageProcessorPil(shortest_edge=64)(Image.fromarray(_image(60, 80)), return_tensors="pt")
    torch.testing.assert_close(from_tensor, from_pil["pixel_values"])


def test_float_images_use_detectron2s_interpolate_path():
    image = _image(30, 40).astype(np.float32)  # 0-255 floats
    out = DetectionImageProcessorPil(shortest_edge=60, size_divisibility=1)(image, return_tensors="pt")
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None], size=(60, 80), mode="bilinear", align_corners=False
    )[0]
    mean = torch.tensor(DETECTRON2_PIXEL_MEAN)[:, None, None]
    std = torch.tensor(DETECTRON2_PIXEL_STD)[:, None, None]
    torch.testing.assert_close(out["pixel_values"][0], (resized - mean) / std, atol=1e-5, rtol=0)


def test_multi_scale_is_deterministic_and_picks_from_the_list():
    processor = DetectionImageProcessorPil(size={"shortest_edge": list(MULTI_SCALE), "longest_edge": 1333})
    images = [_image(200, 300, seed) for seed in range(8)]

    def short_sides(**kwargs):
        out = processor(images, do_pad=False, **kwargs)
        return [min(image.shape[1:]) for image in out["pixel_values"]]

    first = short_sides(training=True, seed=123)
    assert first == short_sides(training=True, seed=123)
    assert all(side in MULTI_SCALE for side in first)
    assert len(set(first) | set(short_sides(training=True, seed=7))) > 1  # sizes vary across draws
    generator = torch.Generator().manual_seed(123)
    assert short_sides(do_random_resize=True, do_random_flip=True, generator=generator) == first
    # Without random resizing a multi-scale list uses its largest size (the test size).
    assert short_sides() == [800] * len(images)
    assert short_sides(training=True, do_random_resize=False, seed=1) == [800] * len(images)


# ------------------------------------------------------------------------------------------------
# annotations
# ------------------------------------------------------------------------------------------------


def _annotation(objects, image_id=1):
    return {"image_id": image_id, "annotations": objects}


def test_boxes_are_scaled_clipped_and_filtered():
    height, width = 200, 400
    objects = [
        {"bbox": [10, 20, 100, 50], "category_id": 3},
        {"bbox": [350, 150, 100, 100], "category_id": 0},  # runs past the bottom-right corner: clipped
        {"bbox": [50, 50, 0, 30], "category_id": 1},  # zero width: dropped
        {"bbox": [500, 10, 20, 20], "category_id": 1},  # right of the image: empty after clipping, dropped
        {"bbox": [0, 0, 400, 200], "category_id": 5, "iscrowd": 1},  # crowd: dropped by default
    ]
    processor = DetectionImageProcessorPil(shortest_edge=400, longest_edge=1000)
    out = processor(_image(height, width), annotations=_annotation(objects, 7), return_tensors="pt")
    labels = out["labels"][0]
    assert labels["size"].tolist() == [400, 800] and labels["orig_size"].tolist() == [200, 400]
    assert labels["image_id"].item() == 7
    torch.testing.assert_close(
        labels["boxes"], torch.tensor([[20.0, 40.0, 220.0, 140.0], [700.0, 300.0, 800.0, 400.0]])
    )
    assert labels["boxes"].dtype == torch.float32
    assert labels["class_labels"].tolist() == [3, 0] and labels["class_labels"].dtype == torch.int64
    assert labels["iscrowd"].tolist() == [0, 0]
    assert "masks" not in labels

    kept = processor(_image(height, width), annotations=_annotation(objects), keep_crowd=True, return_tensors="pt")
    assert kept["labels"][0]["class_labels"].tolist() == [3, 0, 5]
    assert kept["labels"][0]["iscrowd"].tolist() == [0, 0, 1]


def test_images_without_annotations_give_empty_targets():
    processor = DetectionImageProcessorPil(shortest_edge=64, longest_edge=128)
    out = processor(
        [_image(32, 48), _image(40, 40)],
        annotations=[_annotation([]), _annotation([{"bbox": [0, 0, 5, 5], "category_id": 0, "iscrowd": 1}])],
        return_segmentation_masks=True,
        return_tensors="pt",
    )
    for labels, (h, w) in zip(out["labels"], [(64, 96), (64, 64)]):
        assert labels["boxes"].shape == (0, 4) and labels["boxes"].dtype == torch.float32
        assert labels["class_labels"].shape == (0,) and labels["class_labels"].dtype == torch.int64
        assert labels["iscrowd"].shape == (0,)
        assert labels["masks"].shape == (0, h, w) and labels["masks"].dtype == torch.uint8


def test_polygon_masks_are_rasterised_at_the_resized_size():
    polygon = [10.0, 10.0, 60.0, 10.0, 60.0, 30.0, 10.0, 30.0]  # 50 x 20 rectangle
    objects = [{"bbox": [10, 10, 50, 20], "category_id": 1, "segmentation": [polygon, [0, 0, 1, 1]]}]
    processor = DetectionImageProcessorPil(shortest_edge=160, longest_edge=1000)
    out = processor(
        _image(80, 100), annotations=_annotation(objects), return_segmentation_masks=True, return_tensors="pt"
    )
    masks = out["labels"][0]["masks"]
    assert masks.shape == (1, 160, 200) and masks.dtype == torch.uint8
    scaled = (np.asarray(polygon) * 2).tolist()  # the two-point "polygon" is dropped, as detectron2 does
    expected = mask_util.decode(mask_util.merge(mask_util.frPyObjects([scaled], 160, 200)))
    np.testing.assert_array_equal(masks[0].numpy(), expected)
    assert abs(int(masks[0].sum()) - 100 * 40) <= 2 * (100 + 40)


def test_objects_without_a_valid_polygon_are_dropped_with_masks_on():
    objects = [
        {"bbox": [10, 10, 20, 20], "category_id": 1, "segmentation": [[10, 10, 30, 10]]},
        {"bbox": [10, 10, 20, 20], "category_id": 2, "segmentation": [[10, 10, 30, 10, 30, 30]]},
    ]
    out = DetectionImageProcessorPil(shortest_edge=64)(
        _image(64, 64), annotations=_annotation(objects), return_segmentation_masks=True, return_tensors="pt"
    )
    assert out["labels"][0]["class_labels"].tolist() == [2]
    assert out["labels"][0]["masks"].shape == (1, 64, 64)


@pytest.mark.parametrize("compressed", [True, False])
def test_rle_masks_are_decoded_and_resized_nearest(compressed):
    height, width = 30, 40
    full = np.zeros((height, width), dtype=np.uint8)
    full[5:20, 8:33] = 1
    full[12, 2:6] = 1
    if compressed:
        rle = mask_util.encode(np.asfortranarray(full))
        rle["counts"] = rle["counts"].decode("ascii")
    else:  # uncompressed column-major run lengths, as COCO stores crowd regions
        flat = full.flatten(order="F")
        changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
        rle = {"size": [height, width], "counts": np.diff(np.concatenate([[0], changes])).tolist()}
    objects = [{"bbox": [2, 5, 31, 15], "category_id": 4, "segmentation": rle, "iscrowd": 1}]
    out = DetectionImageProcessorPil(shortest_edge=45, longest_edge=1000)(
        _image(height, width),
        annotations=_annotation(objects),
        keep_crowd=True,
        return_segmentation_masks=True,
        return_tensors="pt",
    )
    expected = np.asarray(Image.fromarray(full).resize((60, 45), Image.NEAREST))
    np.testing.assert_array_equal(out["labels"][0]["masks"][0].numpy(), expected)


def test_flip_mirrors_image_boxes_and_masks():
    height, width = 50, 70
    image = _image(height, width)
    full = np.zeros((height, width), dtype=np.uint8)
    full[10:30, 5:25] = 1
    rle = mask_util.encode(np.asfortranarray(full))
    polygon = [5.0, 10.0, 25.0, 10.0, 25.0, 30.0]
    objects = [
        {"bbox": [5, 10, 20, 20], "category_id": 1, "segmentation": rle},
        {"bbox": [5, 10, 20, 20], "category_id": 2, "segmentation": [polygon]},
    ]
    processor = DetectionImageProcessorPil(shortest_edge=50, longest_edge=1000, size_divisibility=1)
    kwargs = {"annotations": _annotation(objects), "return_segmentation_masks": True, "return_tensors": "pt"}
    plain = processor(image, **kwargs)
    flipped = processor(image, do_random_flip=True, flip_probability=1.0, **kwargs)

    torch.testing.assert_close(flipped["pixel_values"], plain["pixel_values"].flip(-1))
    boxes = plain["labels"][0]["boxes"]
    torch.testing.assert_close(
        flipped["labels"][0]["boxes"],
        torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1),
    )
    torch.testing.assert_close(flipped["labels"][0]["masks"][0], plain["labels"][0]["masks"][0].flip(-1))
    # The polygon is flipped before rasterisation (as detectron2 does), so compare with a flipped polygon.
    mirrored = [width - v if i % 2 == 0 else v for i, v in enumerate(polygon)]
    expected = mask_util.decode(mask_util.merge(mask_util.frPyObjects([mirrored], height, width)))
    np.testing.assert_array_equal(flipped["labels"][0]["masks"][1].numpy(), expected)

    never = processor(image, do_random_flip=True, flip_probability=0.0, **kwargs)
    torch.testing.assert_close(never["pixel_values"], plain["pixel_values"])


def test_training_flips_about_half_the_images_deterministically():
    processor = DetectionImageProcessorPil(shortest_edge=16, longest_edge=64, size_divisibility=1)
    image = _image(16, 16)
    objects = _annotation([{"bbox": [0, 0, 4, 16], "category_id": 0}])

    def left_edges(seed):
        out = processor([image] * 40, annotations=[objects] * 40, training=True, seed=seed, return_tensors="pt")
        return [labels["boxes"][0, 0].item() for labels in out["labels"]]

    edges = left_edges(0)
    assert edges == left_edges(0)
    assert set(edges) == {0.0, 12.0} and 8 <= edges.count(12.0) <= 32


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "objects, message",
    [
        ([{"category_id": 1}], "has no 'bbox'"),
        ([{"bbox": [1, 2, 3], "category_id": 1}], r"must be 4 finite numbers"),
        ([{"bbox": [1, 2, float("nan"), 3], "category_id": 1}], r"must be 4 finite numbers"),
        ([{"bbox": [10, 10, -5, 3], "category_id": 1}], "negative width or height"),
        ([{"bbox": [1, 2, 3, 4]}], "has no 'category_id'"),
        ([{"bbox": [1, 2, 3, 4], "category_id": "cat"}], "category_id'\\] must be a non-negative int"),
        ([{"bbox": [1, 2, 3, 4], "category_id": 1, "iscrowd": 2}], "iscrowd"),
        (["not a dict"], r"annotations'\]\[0\] must be a dict"),
    ],
)
def test_malformed_boxes_are_refused(objects, message):
    with pytest.raises(ValueError, match=message):
        DetectionImageProcessorPil(shortest_edge=32)(_image(32, 32), annotations=_annotation(objects))


@pytest.mark.parametrize(
    "segmentation, message",
    [
        (None, "has no 'segmentation'"),
        ([[1, 2, 3, 4, 5]], "odd number of coordinates"),
        ({"counts": "abc"}, "lacks 'counts' or 'size'"),
        ({"size": [10, 10], "counts": [100]}, r"RLE size \[10, 10\] does not match the image size"),
        ("polygon", "must be a list of polygons or an RLE dict"),
    ],
)
def test_malformed_segmentations_are_refused(segmentation, message):
    objects = [{"bbox": [1, 2, 3, 4], "category_id": 0, "segmentation": segmentation}]
    with pytest.raises(ValueError, match=message):
        DetectionImageProcessorPil(shortest_edge=32)(
            _image(32, 32), annotations=_annotation(objects), return_segmentation_masks=True
        )


def test_bad_images_and_annotation_lists_are_refused():
    processor = DetectionImageProcessorPil(shortest_edge=32)
    with pytest.raises(ValueError, match="images is required"):
        processor(None)
    with pytest.raises(ValueError, match=r"cannot read an image of shape \(20, 20, 2\)"):
        processor(np.zeros((20, 20, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="2 images but 1 annotation"):
        processor([_image(20, 20), _image(20, 20)], annotations=[_annotation([])])
    with pytest.raises(ValueError, match=r"\['image_id'\] must be an int"):
        processor(_image(20, 20), annotations={"image_id": "a.jpg", "annotations": []})
    with pytest.raises(ValueError, match="COCO detection format"):
        processor(_image(20, 20), annotations={"boxes": []})
    with pytest.raises(ValueError, match="size must have the keys 'shortest_edge'"):
        DetectionImageProcessorPil(size={"height": 10, "width": 10})
    with pytest.raises(ValueError, match="flip_probability must be in"):
        processor(_image(20, 20), flip_probability=1.5)


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    processor = DetectionImageProcessorPil(
        size={"shortest_edge": list(MULTI_SCALE), "longest_edge": 1000},
        size_divisibility=64,
        flip_probability=0.25,
        keep_crowd=True,
        return_segmentation_masks=True,
    )
    processor.save_pretrained(tmp_path)
    loaded = DetectionImageProcessorPil.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.size.shortest_edge == MULTI_SCALE and loaded.size.longest_edge == 1000
    assert loaded.size_divisibility == 64 and loaded.flip_probability == 0.25 and loaded.keep_crowd
    images = [_image(100, 150), _image(120, 90, 1)]
    for a, b in zip(
        processor(images, training=True, seed=3, return_tensors="pt").values(),
        loaded(images, training=True, seed=3, return_tensors="pt").values(),
    ):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------
# post-processing
# ------------------------------------------------------------------------------------------------


def _outputs(boxes, scores, labels, image_sizes, masks=None):
    return SimpleNamespace(
        pred_boxes=[torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes],
        scores=[torch.tensor(s, dtype=torch.float32) for s in scores],
        labels=[torch.tensor(lab, dtype=torch.int64) for lab in labels],
        pred_masks=masks,
        image_sizes=torch.tensor(image_sizes, dtype=torch.int64),
    )


@dataclass
class _DetectorOutput(ModelOutput):
    pred_boxes: list | None = None
    scores: list | None = None
    labels: list | None = None
    pred_masks: list | None = None
    image_sizes: torch.Tensor | None = None


def test_post_processing_reads_a_model_output():
    fake = _outputs([[[0, 0, 20, 20]]], [[0.9]], [[3]], [[40, 40]], masks=[torch.ones((1, 28, 28))])
    outputs = _DetectorOutput(**vars(fake))
    processor = DetectionImageProcessorPil()
    detections = processor.post_process_object_detection(outputs, target_sizes=[(80, 80)])[0]
    torch.testing.assert_close(detections["boxes"], torch.tensor([[0.0, 0.0, 40.0, 40.0]]))
    instances = processor.post_process_instance_segmentation(outputs, target_sizes=[(80, 80)])[0]
    assert instances["segments_info"] == [{"id": 0, "label_id": 3, "score": pytest.approx(0.9)}]
    assert (instances["segmentation"] == 0).sum() == 40 * 40


def test_post_process_object_detection_rescales_clips_and_thresholds():
    outputs = _outputs(
        boxes=[[[10, 20, 110, 220], [-5, -5, 50, 900], [0, 0, 5, 5], [300, 300, 310, 320]], []],
        scores=[[0.9, 0.8, 0.3, 0.95], []],
        labels=[[1, 2, 3, 4], []],
        image_sizes=[[800, 400], [600, 600]],
    )
    processor = DetectionImageProcessorPil()
    # Image 0: the model saw 800 x 400; the original is 400 x 100 (y halves, x quarters); image 1 is empty.
    results = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=[(400, 100), (300, 300)])
    first = results[0]
    # Box 1 scales to (-1.25, -2.5, 12.5, 450) and is clipped to the 100 x 400 original; the 0.3 box is
    # under the threshold; the last box scales to (75, 150, 77.5, 160).
    torch.testing.assert_close(
        first["boxes"], torch.tensor([[2.5, 10.0, 27.5, 110.0], [0.0, 0.0, 12.5, 400.0], [75.0, 150.0, 77.5, 160.0]])
    )
    torch.testing.assert_close(first["scores"], torch.tensor([0.9, 0.8, 0.95]))
    assert first["labels"].tolist() == [1, 2, 4]
    assert results[1]["boxes"].shape == (0, 4) and results[1]["scores"].shape == (0,)

    # Boxes that end up with no area after clipping are dropped; tensors as target sizes work too.
    outside = _outputs([[[410, 10, 500, 50], [10, 10, 20, 20]]], [[0.9, 0.9]], [[0, 1]], [[100, 400]])
    result = processor.post_process_object_detection(outside, target_sizes=torch.tensor([[100, 400]]))[0]
    assert result["labels"].tolist() == [1]

    # No target sizes: stay in the model's frame (image_sizes), still clipped.
    same = processor.post_process_object_detection(outputs, threshold=0.5)[0]
    torch.testing.assert_close(same["boxes"][1], torch.tensor([0.0, 0.0, 50.0, 800.0]))

    with pytest.raises(ValueError, match="target_sizes has 1 entries but the outputs hold 2 images"):
        processor.post_process_object_detection(outputs, target_sizes=[(10, 10)])
    with pytest.raises(ValueError, match="must carry pred_boxes, scores and labels"):
        processor.post_process_object_detection(SimpleNamespace(logits=torch.zeros(1)))


def _reference_paste(mask: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """Per-pixel loop: bilinear sample (align_corners=False, zeros outside) at pixel centres of the grown box."""
    size_y, size_x = mask.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    out = np.zeros((height, width), dtype=np.float64)
    for py in range(max(math.floor(y1) - 1, 0), min(math.ceil(y2) + 1, height)):
        for px in range(max(math.floor(x1) - 1, 0), min(math.ceil(x2) + 1, width)):
            gx = (px + 0.5 - x1) / (x2 - x1) * 2 - 1
            gy = (py + 0.5 - y1) / (y2 - y1) * 2 - 1
            sx = ((gx + 1) * size_x - 1) / 2  # sample position in mask pixels
            sy = ((gy + 1) * size_y - 1) / 2
            fx, fy = math.floor(sx), math.floor(sy)
            value = 0.0
            for cy, wy in ((fy, 1 - (sy - fy)), (fy + 1, sy - fy)):
                for cx, wx in ((fx, 1 - (sx - fx)), (fx + 1, sx - fx)):
                    if 0 <= cy < size_y and 0 <= cx < size_x:
                        value += wy * wx * mask[cy, cx]
            out[py, px] = value
    return out


def test_paste_masks_matches_a_per_pixel_reference():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand((4, 28, 28), generator=generator)
    height, width = 40, 50
    boxes = torch.tensor(
        [[3.3, 4.7, 20.2, 30.9], [0.0, 0.0, 50.0, 40.0], [45.5, 35.2, 50.0, 40.0], [10.0, 12.0, 11.5, 12.8]]
    )
    soft = paste_masks_in_image(masks, boxes, (height, width), threshold=None)
    hard = paste_masks_in_image(masks[:, None], boxes, (height, width), threshold=0.5)
    assert soft.shape == hard.shape == (4, height, width) and hard.dtype == torch.bool
    for index in range(4):
        reference = _reference_paste(masks[index].double().numpy(), boxes[index].tolist(), height, width)
        np.testing.assert_allclose(soft[index].numpy(), reference, atol=1e-5)
        clear = np.abs(reference - 0.5) > 1e-5  # pixels not on the threshold's rounding edge
        np.testing.assert_array_equal(hard[index].numpy()[clear], (reference >= 0.5)[clear])
    # Empty input and degenerate boxes give empty masks.
    assert paste_masks_in_image(torch.zeros((0, 28, 28)), torch.zeros((0, 4)), (5, 6)).shape == (0, 5, 6)
    flat = paste_masks_in_image(torch.ones((1, 28, 28)), torch.tensor([[5.0, 5.0, 5.0, 9.0]]), (20, 20))
    assert not flat.any()
    with pytest.raises(ValueError, match=r"boxes must be \(N, 4\)"):
        paste_masks_in_image(torch.ones((2, 28, 28)), torch.zeros((3, 4)), (5, 5))


def test_full_masks_paste_to_their_boxes():
    # An all-ones mask pastes to the box grown by the bilinear half-pixel fringe: every pixel whose
    # centre lies inside the box is on.
    pasted = paste_masks_in_image(torch.ones((1, 28, 28)), torch.tensor([[10.0, 5.0, 30.0, 25.0]]), (40, 40))[0]
    expected = torch.zeros((40, 40), dtype=torch.bool)
    expected[5:25, 10:30] = True
    assert torch.equal(pasted, expected)


def test_post_process_instance_segmentation_paints_highest_score_on_top():
    mask = torch.ones((28, 28))
    outputs = _outputs(
        boxes=[[[0, 0, 20, 20], [10, 10, 30, 30], [25, 0, 40, 10], [0, 30, 5, 35]]],
        scores=[[0.6, 0.9, 0.7, 0.2]],
        labels=[[5, 6, 7, 8]],
        image_sizes=[[40, 40]],
        masks=[mask.expand(4, 28, 28)],
    )
    processor = DetectionImageProcessorPil()
    result = processor.post_process_instance_segmentation(outputs, threshold=0.5)[0]
    segmentation = result["segmentation"]
    assert segmentation.shape == (40, 40) and segmentation.dtype == torch.int64
    assert result["segments_info"] == [
        {"id": 0, "label_id": 5, "score": pytest.approx(0.6)},
        {"id": 1, "label_id": 6, "score": pytest.approx(0.9)},
        {"id": 2, "label_id": 7, "score": pytest.approx(0.7)},
    ]
    assert segmentation[15, 15] == 1  # overlap of 0 and 1: the 0.9 instance wins
    assert segmentation[5, 5] == 0 and segmentation[5, 35] == 2 and segmentation[35, 2] == -1
    assert (segmentation == -1).any()

    # Same instances in a different order paint the same pixels.
    reordered = _outputs(
        boxes=[[[10, 10, 30, 30], [0, 0, 20, 20]]],
        scores=[[0.9, 0.6]],
        labels=[[6, 5]],
        image_sizes=[[40, 40]],
        masks=[mask.expand(2, 28, 28)],
    )
    again = processor.post_process_instance_segmentation(reordered)[0]["segmentation"]
    assert again[15, 15] == 0 and again[5, 5] == 1

    binary = processor.post_process_instance_segmentation(outputs, return_binary_maps=True)[0]["segmentation"]
    assert binary.shape == (3, 40, 40) and binary.dtype == torch.bool
    assert binary[0, 15, 15] and binary[1, 15, 15]  # full masks overlap

    coco = processor.post_process_instance_segmentation(outputs, return_coco_annotation=True)[0]["segmentation"]
    assert len(coco) == 3 and all(isinstance(rle["counts"], str) for rle in coco)
    for rle, full in zip(coco, binary):
        decoded = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
        np.testing.assert_array_equal(decoded.astype(bool), full.numpy())

    # The pipeline's overlap rule drops instances hidden behind higher-scoring ones.
    hidden = _outputs(
        boxes=[[[0, 0, 30, 30], [5, 5, 25, 25]]],
        scores=[[0.9, 0.8]],
        labels=[[1, 2]],
        image_sizes=[[40, 40]],
        masks=[mask.expand(2, 28, 28)],
    )
    kept = processor.post_process_instance_segmentation(hidden, overlap_mask_area_threshold=0.5)[0]
    assert [info["id"] for info in kept["segments_info"]] == [0]
    assert set(kept["segmentation"].unique().tolist()) == {-1, 0}


def test_post_process_instance_segmentation_rescales_masks_with_boxes():
    masks = torch.rand((1, 28, 28), generator=torch.Generator().manual_seed(1))
    outputs = _outputs([[[4, 8, 40, 44]]], [[0.9]], [[0]], [[50, 60]], masks=[masks])
    processor = DetectionImageProcessorPil()
    result = processor.post_process_instance_segmentation(
        outputs, mask_threshold=0.4, target_sizes=[(100, 30)], return_binary_maps=True
    )[0]
    box = torch.tensor([[2.0, 16.0, 20.0, 88.0]])  # x halves, y doubles
    torch.testing.assert_close(
        processor.post_process_object_detection(outputs, target_sizes=[(100, 30)])[0]["boxes"], box
    )
    assert torch.equal(result["segmentation"], paste_masks_in_image(masks, box, (100, 30), threshold=0.4))

    empty = _outputs([[]], [[]], [[]], [[50, 60]], masks=[torch.zeros((0, 28, 28))])
    nothing = processor.post_process_instance_segmentation(empty, target_sizes=[(100, 30)])[0]
    assert nothing["segments_info"] == [] and (nothing["segmentation"] == -1).all()

    retina = _outputs([[[4, 8, 40, 44]]], [[0.9]], [[0]], [[50, 60]], masks=None)
    with pytest.raises(ValueError, match="predicts no masks"):
        processor.post_process_instance_segmentation(retina)
    with pytest.raises(ValueError, match="choose one of return_binary_maps and return_coco_annotation"):
        processor.post_process_instance_segmentation(outputs, return_binary_maps=True, return_coco_annotation=True)
