"""vil_hf.data: COCO loading and its errors, detection samples, collate, samplers."""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vil_hf.data import (
    CategoryMap,
    DataError,
    DetectionSamples,
    InferenceSampler,
    TrainingBatchSampler,
    collate_detection,
    load_coco_detection,
)
from vil_hf.detection.image_processing_detection import DetectionImageProcessorPil

# (file, width, height); image 3 has only a crowd object, image 4 has none.
IMAGES = [("a.png", 40, 30), ("b.png", 24, 48), ("c.png", 32, 32), ("d.png", 50, 20)]


def _write_image(path: Path, width: int, height: int, value: int = 0) -> None:
    pixels = np.full((height, width, 3), value, dtype=np.uint8)
    pixels[: height // 2, : width // 2] = (200, 30, 90)
    Image.fromarray(pixels).save(path)


def _coco() -> dict:
    return {
        "images": [{"id": i + 10, "file_name": f, "width": w, "height": h} for i, (f, w, h) in enumerate(IMAGES)],
        "annotations": [
            # category ids 7 and 3 are not contiguous: labels follow increasing id (3 -> 0, 7 -> 1)
            {
                "id": 1,
                "image_id": 10,
                "category_id": 7,
                "bbox": [2, 3, 10, 8],
                "iscrowd": 0,
                "area": 80,
                "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]],
            },
            {
                "id": 2,
                "image_id": 10,
                "category_id": 3,
                "bbox": [20, 10, 15, 15],
                "iscrowd": 0,
                "area": 225,
                "segmentation": [[20, 10, 35, 10, 35, 25, 20, 25]],
            },
            {
                "id": 3,
                "image_id": 10,
                "category_id": 3,
                "bbox": [0, 20, 8, 8],
                "iscrowd": 1,
                "area": 64,
                "segmentation": {"size": [30, 40], "counts": [600, 8, 22, 8, 562]},
            },
            {
                "id": 4,
                "image_id": 11,
                "category_id": 7,
                "bbox": [1, 1, 20, 40],
                "iscrowd": 0,
                "area": 800,
                "segmentation": [[1, 1, 21, 1, 21, 41, 1, 41]],
            },
            {
                "id": 5,
                "image_id": 12,
                "category_id": 3,
                "bbox": [4, 4, 10, 10],
                "iscrowd": 1,
                "area": 100,
                "segmentation": {"size": [32, 32], "counts": [132, 10, 22, 10, 858]},
            },
        ],  # fmt: skip
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }


def _make_set(root: Path, content: dict | None = None) -> tuple[Path, Path]:
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for name, width, height in IMAGES:
        _write_image(image_dir / name, width, height)
    annotation_file = root / "instances.json"
    annotation_file.write_text(json.dumps(_coco() if content is None else content))
    return image_dir, annotation_file


@pytest.fixture
def coco_set(tmp_path):
    return _make_set(tmp_path)


def _processor(**kwargs) -> DetectionImageProcessorPil:
    kwargs.setdefault("shortest_edge", [32, 48])
    kwargs.setdefault("longest_edge", 96)
    return DetectionImageProcessorPil(**kwargs)


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


def test_load_rows_categories_and_label_map(coco_set):
    image_dir, annotation_file = coco_set
    data = load_coco_detection(image_dir, annotation_file)
    assert len(data) == 4
    assert data.skipped == []
    assert data.annotation_file == str(annotation_file.absolute())
    assert data.image_dir == str(image_dir.absolute())
    row = data.dataset[0]
    assert row["image_id"] == 10 and row["width"] == 40 and row["height"] == 30
    assert row["file_name"] == str(image_dir.absolute() / "a.png")
    assert json.loads(row["annotations"]) == _coco()["annotations"][:3]  # untouched, crowd kept
    assert data.dataset.features["image_id"].dtype == "int64"
    assert data.categories == _coco()["categories"]  # file order
    labels = data.label_map
    assert labels.category_to_label == {3: 0, 7: 1}
    assert labels.label_to_category == {0: 3, 1: 7}
    assert labels.id2label == {0: "cat", 1: "dog"}
    assert labels.num_labels == 2
    assert data.aspect_ratios() == pytest.approx([40 / 30, 24 / 48, 1.0, 50 / 20])


def test_without_empty_leaves_out_images_without_non_crowd_objects(coco_set):
    data = load_coco_detection(*coco_set)
    kept = data.without_empty()
    assert list(kept.dataset["image_id"]) == [10, 11]
    assert len(kept) == 2 and len(data) == 4
    assert kept.aspect_ratios() == pytest.approx([40 / 30, 0.5])
    assert kept.categories == data.categories


def test_check_against_model_config():
    labels = CategoryMap.from_categories([{"id": i + 1, "name": f"c{i}"} for i in range(80)])
    labels.check_against(80)
    labels.check_against(80, {str(i): f"c{i}" for i in range(80)})  # JSON-style string keys
    labels.check_against(80, {i: f"LABEL_{i}" for i in range(80)})  # transformers' placeholders
    with pytest.raises(
        DataError, match=r"the data has 80 categories but the model config has num_labels=3: set model\.num_labels=80"
    ):
        labels.check_against(3)
    with pytest.raises(DataError, match=r"label 5: data 'c5', model 'person'"):
        labels.check_against(80, {5: "person"})


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", r"instances\.json is empty"),
        (b"  \n\t ", r"instances\.json is empty"),
        (b'{"images": [],\n "annotations": [', r"instances\.json is not valid JSON \(line 2, column \d+"),
        (b"[1, 2]", r"holds a JSON list, not an object"),
        (b'{"images": [], "annotations": []}', r"has no 'categories' list"),
        (b'{"images": {}, "categories": []}', r"has no 'images' / 'annotations' list"),
    ],
)
def test_annotation_file_errors(tmp_path, content, match):
    image_dir, annotation_file = _make_set(tmp_path)
    annotation_file.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_coco_detection(image_dir, annotation_file)


def _broken(change) -> dict:
    content = _coco()
    change(content)
    return content


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c["annotations"][1].update(image_id=99), r"annotations\[1\] \(id 2\) refers to image_id 99, which is not in 'images'"),
        (lambda c: c["annotations"][0].update(category_id=5), r"annotations\[0\] \(id 1\) has category_id 5, which is not in 'categories' \(ids \[3, 7\]\)"),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, 3]), r"malformed bbox \[1, 2, 3\].*4 finite numbers"),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, 3, float("nan")]), r"malformed bbox .*4 finite numbers"),
        (lambda c: c["annotations"][0].update(bbox="1 2 3 4"), r"malformed bbox"),
        (lambda c: c["annotations"][0].update(bbox=[10, 10, 5, -2]), r"negative width or height.*not \[x1, y1, x2, y2\]"),
        (lambda c: c.update(images=[]), r"lists no images"),
        (lambda c: c["images"][0].pop("width"), r"images\[0\] lacks \['width'\]"),
    ],
)  # fmt: skip
def test_annotation_content_errors(tmp_path, change, match):
    image_dir, annotation_file = _make_set(tmp_path, _broken(change))
    with pytest.raises(DataError, match=match) as error:
        load_coco_detection(image_dir, annotation_file)
    assert str(annotation_file.absolute()) in str(error.value)


def test_missing_paths(tmp_path):
    image_dir, annotation_file = _make_set(tmp_path)
    with pytest.raises(DataError, match=r"image folder .*nope does not exist"):
        load_coco_detection(tmp_path / "nope", annotation_file)
    with pytest.raises(DataError, match=r"image folder .*instances\.json is not a folder"):
        load_coco_detection(annotation_file, annotation_file)
    with pytest.raises(DataError, match=r"annotation file .*missing\.json does not exist"):
        load_coco_detection(image_dir, tmp_path / "missing.json")


def test_unreadable_and_missing_images_are_skipped_with_one_warning(tmp_path, caplog):
    image_dir, annotation_file = _make_set(tmp_path)
    (image_dir / "b.png").unlink()
    (image_dir / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with caplog.at_level(logging.WARNING, logger="vil_hf.data"):
        data = load_coco_detection(image_dir, annotation_file)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert re.search(r"skipped 2 of 4 images \(1 missing, 1 unreadable\) .*: b\.png, c\.png", warnings[0].getMessage())
    assert list(data.dataset["image_id"]) == [10, 13]
    assert [Path(path).name for path, _ in data.skipped] == ["b.png", "c.png"]
    assert data.skipped[0][1] == "missing" and data.skipped[1][1].startswith("unreadable")

    with pytest.raises(DataError, match=r"2 of 4 images .* cannot be used .*b\.png, c\.png.*skip_corrupt_images=True"):
        load_coco_detection(image_dir, annotation_file, skip_corrupt_images=False)
    # Without verification only the missing file is noticed.
    assert len(load_coco_detection(image_dir, annotation_file, verify_images=False)) == 3


def test_all_images_unusable(tmp_path):
    image_dir, annotation_file = _make_set(tmp_path)
    for name, _, _ in IMAGES:
        (image_dir / name).unlink()
    with pytest.raises(
        DataError, match=r"none of the 4 images .* can be used \(missing\).*Check that the image folder"
    ):
        load_coco_detection(image_dir, annotation_file)


def _jpeg(path: Path, width: int, height: int, seed: int = 0, exif: Image.Exif | None = None) -> None:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90, **({"exif": exif} if exif is not None else {}))


def test_truncated_jpeg_and_wrong_size_are_found_before_training(tmp_path, caplog):
    """verify() passes a truncated JPEG (it does not decode pixels); the check decodes every image."""
    content = _coco()
    for image in content["images"]:
        image["file_name"] = image["file_name"].replace(".png", ".jpg")
    image_dir, annotation_file = _make_set(tmp_path, content)
    for name, width, height in IMAGES:
        _jpeg(image_dir / name.replace(".png", ".jpg"), width, height)
    data = (image_dir / "a.jpg").read_bytes()
    (image_dir / "a.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(image_dir / "a.jpg") as image:
        image.verify()  # what the old check did: no error
    _jpeg(image_dir / "c.jpg", 33, 32)  # the annotation says 32x32
    with caplog.at_level(logging.WARNING, logger="vil_hf.data"):
        data = load_coco_detection(image_dir, annotation_file)
    assert list(data.dataset["image_id"]) == [11, 13]
    reasons = dict((Path(path).name, reason) for path, reason in data.skipped)
    assert reasons["a.jpg"].startswith("unreadable: OSError") and "truncated" in reasons["a.jpg"]
    assert reasons["c.jpg"] == "wrong size: the file is 33x32 (width x height), the annotation says 32x32"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipped 2 of 4 images (1 unreadable, 1 wrong size)" in warning
    with pytest.raises(DataError, match=r"2 of 4 images .*cannot be used \(1 unreadable, 1 wrong size\)"):
        load_coco_detection(image_dir, annotation_file, skip_corrupt_images=False)


def test_image_checks_are_cached_until_a_file_changes(tmp_path, monkeypatch):
    from vil_hf.data import _images

    monkeypatch.setenv("VIL_HF_CACHE", str(tmp_path / "cache"))
    image_dir, annotation_file = _make_set(tmp_path)
    decoded = []
    real = _images.decoded_size
    monkeypatch.setattr(_images, "decoded_size", lambda path: decoded.append(Path(path).name) or real(path))
    assert len(load_coco_detection(image_dir, annotation_file)) == 4
    assert sorted(decoded) == ["a.png", "b.png", "c.png", "d.png"]
    (cache_file,) = (tmp_path / "cache" / "image-checks").iterdir()  # one file, no temporary left behind
    decoded.clear()
    assert len(load_coco_detection(image_dir, annotation_file)) == 4
    assert decoded == []  # all from the cache
    # A file rewritten (other size or mtime) is decoded again; so is a broken one, and it stays broken.
    _write_image(image_dir / "b.png", 24, 48, value=9)
    (image_dir / "c.png").write_bytes((image_dir / "c.png").read_bytes()[:60])
    data = load_coco_detection(image_dir, annotation_file)
    assert sorted(decoded) == ["b.png", "c.png"] and [Path(p).name for p, _ in data.skipped] == ["c.png"]
    decoded.clear()
    data = load_coco_detection(image_dir, annotation_file)
    assert decoded == [] and [Path(p).name for p, _ in data.skipped] == ["c.png"]
    # A damaged cache file only means checking again.
    cache_file.write_text("{not json")
    assert len(load_coco_detection(image_dir, annotation_file)) == 3 and len(decoded) == 4


def test_exif_rotated_images_are_checked_in_the_orientation_they_are_read(tmp_path):
    """A photo stored 30x40 with EXIF orientation 6 (rotate 90) is read as 40x30: that is the size it must have."""
    exif = Image.Exif()
    exif[0x0112] = 6
    image_dir, annotation_file = _make_set(tmp_path)
    (image_dir / "a.png").unlink()
    content = _coco()
    content["images"][0]["file_name"] = "a.jpg"
    annotation_file.write_text(json.dumps(content))
    _jpeg(image_dir / "a.jpg", 30, 40, exif=exif)  # IMAGES says a is 40x30
    data = load_coco_detection(image_dir, annotation_file, skip_corrupt_images=False)
    samples = DetectionSamples(data, _processor(), training=False, return_masks=False)
    assert samples[0]["labels"]["orig_size"].tolist() == [30, 40]


def test_many_images_are_checked_in_parallel_and_reported_in_order(tmp_path, monkeypatch):
    from vil_hf.data import _images

    monkeypatch.setattr(_images, "_num_threads", lambda: 4)
    image_dir = tmp_path / "many"
    image_dir.mkdir()
    paths = []
    for index in range(150):
        path = image_dir / f"{index:03d}.png"
        _write_image(path, 8 + index % 5, 8)
        paths.append(str(path))
    for index in (7, 70, 140):
        Path(paths[index]).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    expected = [(8 + index % 5, 8) for index in range(150)]
    expected[100] = (99, 8)
    problems = _images.check_image_files(
        paths, verify=True, what="test", base_dir=str(image_dir), expected_sizes=expected
    )
    assert [Path(path).name for path, _ in problems] == ["007.png", "070.png", "100.png", "140.png"]
    assert problems[2][1].startswith("wrong size: the file is 8x8")


# ------------------------------------------------------------------------------------------------
# samples and collate
# ------------------------------------------------------------------------------------------------


def test_detection_samples_targets(coco_set):
    data = load_coco_detection(*coco_set)
    samples = DetectionSamples(data, _processor(), training=False, return_masks=True)
    assert len(samples) == 4
    item = samples[0]  # 40x30 image -> shortest edge 48 (the largest without random resizing): 48x64
    assert item["image_id"] == 10
    assert item["pixel_values"].dtype == torch.float32 and item["pixel_values"].shape == (3, 64, 64)
    assert item["pixel_mask"].dtype == torch.int64 and item["pixel_mask"].shape == (64, 64)
    assert int(item["pixel_mask"].sum()) == 48 * 64
    labels = item["labels"]
    # crowd object 3 is in the row but not in the target; category ids became labels (7 -> 1, 3 -> 0)
    assert labels["class_labels"].tolist() == [1, 0]
    assert labels["iscrowd"].tolist() == [0, 0]
    torch.testing.assert_close(labels["boxes"], torch.tensor([[2, 3, 12, 11], [20, 10, 35, 25]]) * 1.6)
    assert labels["masks"].shape == (2, 48, 64)
    assert labels["size"].tolist() == [48, 64] and labels["orig_size"].tolist() == [30, 40]
    assert int(labels["image_id"]) == 10
    # an image with only a crowd object has an empty target
    assert samples[2]["labels"]["boxes"].shape == (0, 4)
    no_masks = DetectionSamples(data, _processor(), training=False, return_masks=False)[0]["labels"]
    assert "masks" not in no_masks


def test_training_augmentation_follows_the_sample_seed(coco_set):
    data = load_coco_detection(*coco_set)
    samples = DetectionSamples(data, _processor(), training=True, return_masks=True)
    first, again = samples[(0, 1234)], samples[(0, 1234)]
    torch.testing.assert_close(first["pixel_values"], again["pixel_values"])
    torch.testing.assert_close(first["labels"]["boxes"], again["labels"]["boxes"])
    # over several seeds both sizes and both flip states occur, and each matches a fresh generator's draws
    sizes, flips = set(), set()
    for seed in range(12):
        item = samples[(0, seed)]
        generator = torch.Generator().manual_seed(seed)
        shortest = (32, 48)[int(torch.randint(2, (1,), generator=generator))]
        flipped = bool(torch.rand((), generator=generator) < 0.5)
        assert item["labels"]["size"].tolist()[0] == shortest
        box = item["labels"]["boxes"][0]  # object 1 spans x 2..12 of 40
        scale = item["labels"]["size"][1] / 40
        expected_x1 = (40 - 12) * scale if flipped else 2 * scale
        assert float(box[0]) == pytest.approx(float(expected_x1), abs=1e-4)
        sizes.add(shortest)
        flips.add(flipped)
    assert sizes == {32, 48} and flips == {True, False}
    # an int key means no augmentation, also in training
    plain = samples[0]
    assert plain["labels"]["size"].tolist() == [48, 64]
    torch.testing.assert_close(plain["labels"]["boxes"][0], torch.tensor([2, 3, 12, 11]) * 1.6)


def test_read_failure_names_the_file(coco_set):
    image_dir, annotation_file = coco_set
    data = load_coco_detection(image_dir, annotation_file)
    samples = DetectionSamples(data, _processor(), training=False, return_masks=False)
    (image_dir / "b.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read image .*b\.png"):
        samples[1]
    (image_dir / "b.png").unlink()
    with pytest.raises(DataError, match=r"image .*b\.png does not exist"):
        samples[1]
    _write_image(image_dir / "a.png", 41, 30)
    with pytest.raises(DataError, match=r"a\.png is 41x30 .* but .*instances\.json says 40x30"):
        samples[0]


def test_unreadable_items_are_replaced_by_the_same_image_every_time(coco_set):
    from vil_hf.data import ReplaceUnreadable

    image_dir, annotation_file = coco_set
    data = load_coco_detection(image_dir, annotation_file)
    samples = ReplaceUnreadable(DetectionSamples(data, _processor(), training=True, return_masks=False))
    (image_dir / "b.png").write_bytes(b"garbage")
    first = samples[(1, 12345)]
    again = samples[(1, 12345)]
    assert "cannot read image" in first["replaced"] and "b.png" in first["replaced"]
    assert first["image_id"] != 11 and first["image_id"] == again["image_id"]
    torch.testing.assert_close(first["pixel_values"], again["pixel_values"])  # same image, same augmentation
    assert "replaced" not in samples[(0, 12345)]
    batch = collate_detection([samples[(0, 1)], first])
    assert batch["replaced"] == [first["replaced"]] and len(batch["image_ids"]) == 2
    for name, _, _ in IMAGES:
        (image_dir / name).write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"8 images tried in its place could not be read either"):
        samples[(1, 12345)]


def test_collate_pads_to_the_batch_maximum(coco_set):
    data = load_coco_detection(*coco_set)
    samples = DetectionSamples(
        data, _processor(shortest_edge=32, size_divisibility=8), training=False, return_masks=True
    )
    items = [samples[0], samples[1]]  # 32x43 -> (32, 48) padded; 64x32 -> (64, 32)
    assert items[0]["pixel_values"].shape == (3, 32, 48) and items[1]["pixel_values"].shape == (3, 64, 32)
    batch = collate_detection(items)
    assert batch["pixel_values"].shape == (2, 3, 64, 48)
    assert batch["pixel_mask"].shape == (2, 64, 48)
    assert batch["image_ids"] == [10, 11]
    assert batch["labels"][1] is items[1]["labels"]
    torch.testing.assert_close(batch["pixel_values"][0, :, :32, :48], items[0]["pixel_values"])
    assert torch.all(batch["pixel_values"][0, :, 32:] == 0) and torch.all(batch["pixel_mask"][0, 32:] == 0)
    assert torch.all(batch["pixel_values"][1, :, :, 32:] == 0) and torch.all(batch["pixel_mask"][1, :, 32:] == 0)
    torch.testing.assert_close(batch["pixel_mask"][0, :32, :43], torch.ones(32, 43, dtype=torch.int64))
    with pytest.raises(DataError, match="empty list"):
        collate_detection([])


def test_dataloader_with_batch_sampler(coco_set):
    data = load_coco_detection(*coco_set)
    samples = DetectionSamples(data, _processor(), training=True, return_masks=True)
    sampler = TrainingBatchSampler(len(samples), 2, seed=3)
    loader = DataLoader(samples, batch_sampler=sampler, collate_fn=collate_detection)
    batches = list(itertools.islice(loader, 3))
    expected = list(itertools.islice(iter(sampler), 3))
    for batch, keys in zip(batches, expected):
        assert batch["image_ids"] == [data.dataset[index]["image_id"] for index, _ in keys]
        reference = collate_detection([samples[key] for key in keys])
        torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"])


# ------------------------------------------------------------------------------------------------
# samplers
# ------------------------------------------------------------------------------------------------


def _take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


def test_training_sampler_is_deterministic_and_covers_each_epoch():
    batches = _take(TrainingBatchSampler(10, 3, seed=5), 9)
    assert batches == _take(TrainingBatchSampler(10, 3, seed=5), 9)
    assert batches != _take(TrainingBatchSampler(10, 3, seed=6), 9)
    assert all(len(batch) == 3 for batch in batches)
    # 10 images, batches of 3: three batches per epoch, one image dropped, no repeats in an epoch
    for epoch in range(3):
        indices = [index for batch in batches[3 * epoch : 3 * epoch + 3] for index, _ in batch]
        assert len(set(indices)) == 9 and set(indices) <= set(range(10))
    assert [i for b in batches[:3] for i, _ in b] != [i for b in batches[3:6] for i, _ in b]  # reshuffled
    seeds = [seed for batch in batches for _, seed in batch]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)


def test_rank_slices_are_disjoint_and_make_up_the_global_batches():
    single = _take(TrainingBatchSampler(23, 6, seed=1), 10)
    per_rank = [_take(TrainingBatchSampler(23, 2, num_replicas=3, rank=r, seed=1), 10) for r in range(3)]
    for step in range(10):
        parts = [per_rank[r][step] for r in range(3)]
        assert sum(parts, []) == single[step]  # same keys, seeds included
        indices = [index for part in parts for index, _ in part]
        assert len(set(indices)) == 6
    # the layout does not change the seeds: one process with batch 6 == three with batch 2
    assert TrainingBatchSampler(23, 2, num_replicas=3, seed=1).batches_per_epoch == 3


def test_start_iteration_equals_skipping_batches():
    for aspect in (None, [0.5 + (i % 3) * 0.4 for i in range(17)]):
        reference = _take(TrainingBatchSampler(17, 2, num_replicas=2, rank=1, seed=9, aspect_ratios=aspect), 20)
        for start in (0, 1, 3, 4, 9):
            resumed = TrainingBatchSampler(
                17, 2, num_replicas=2, rank=1, seed=9, aspect_ratios=aspect, start_iteration=start
            )
            assert _take(resumed, 20 - start) == reference[start:]


def test_start_iteration_far_ahead_is_cheap():
    sampler = TrainingBatchSampler(1000, 4, seed=0, start_iteration=10**9)
    batch = next(iter(sampler))
    epoch, within = divmod(10**9, 250)
    reference = next(itertools.islice(TrainingBatchSampler(1000, 4, seed=0).global_batches(epoch * 250 + within), 1))
    assert batch == reference[:4]


def test_aspect_grouping_batches_hold_one_group():
    ratios = [1.5 if i % 3 else 0.6 for i in range(40)]  # 26 wide, 14 tall
    sampler = TrainingBatchSampler(40, 2, num_replicas=2, rank=0, seed=2, aspect_ratios=ratios)
    assert sampler.batches_per_epoch == 6 + 3
    batches = list(itertools.islice(sampler.global_batches(), 27))
    kinds = set()
    for batch in batches:
        wide = {ratios[index] >= 1 for index, _ in batch}
        assert len(wide) == 1
        kinds |= wide
    assert kinds == {True, False}
    first_epoch = [index for batch in batches[:9] for index, _ in batch]
    assert len(set(first_epoch)) == 36
    assert batches == list(
        itertools.islice(TrainingBatchSampler(40, 4, seed=2, aspect_ratios=ratios).global_batches(), 27)
    )


def test_training_sampler_errors():
    with pytest.raises(
        DataError, match=r"has 5 images, fewer than one global batch of 6 \(batch_size 3 x 2 processes\)"
    ):
        TrainingBatchSampler(5, 3, num_replicas=2)
    with pytest.raises(DataError, match=r"3 wide and 3 tall"):
        TrainingBatchSampler(6, 4, aspect_ratios=[2, 2, 2, 0.5, 0.5, 0.5])
    with pytest.raises(DataError, match=r"aspect_ratios has 2 entries but there are 6 images"):
        TrainingBatchSampler(6, 2, aspect_ratios=[1, 1])
    with pytest.raises(DataError, match=r"rank must be in 0\.\.1"):
        TrainingBatchSampler(6, 2, num_replicas=2, rank=2)


def test_inference_sampler():
    assert list(InferenceSampler(7)) == list(range(7))
    parts = [list(InferenceSampler(7, num_replicas=3, rank=r)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(InferenceSampler(7, 3, r)) for r in range(3)] == [3, 2, 2]
    with pytest.raises(DataError, match="rank"):
        InferenceSampler(7, 2, 5)


def test_image_check_timing_decodes_first_and_reads_the_cache_second(tmp_path):
    from vil_hf.data.check_timing import time_image_check, write_jpeg_set

    images, annotations = write_jpeg_set(tmp_path / "set", 12, size=(48, 64))
    assert len(list(images.glob("*.jpg"))) == 12
    assert len(load_coco_detection(images, annotations, skip_corrupt_images=False)) == 12
    timing = time_image_check(images, annotations, tmp_path / "cache", threads=2)
    assert timing.num_images == 12 and timing.threads == 2 and timing.mean_file_bytes > 1000
    assert timing.first_seconds > 0 and timing.cached_seconds > 0
    assert len(list((tmp_path / "cache" / "image-checks").iterdir())) == 1
