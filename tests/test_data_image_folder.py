"""vil_hf.data image-folder classification data: loading, errors, samples with seeded flips, collate."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from vil_hf.data import ClassificationSamples, DataError, collate_classification, load_image_folder
from vil_hf.image_processing_vil import ViLImageProcessorPil


def _image(path, width=40, height=30):
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 4] = 255  # bright left edge, so a flip is visible
    Image.fromarray(pixels).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "train"
    for name, count in (("zebra", 2), ("ant", 3)):
        (root / name).mkdir(parents=True)
        for index in range(count):
            _image(root / name / f"{index}.png")
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / "README").write_text("a file beside the class folders")
    return root


def _processor():
    return ViLImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})


def test_load_image_folder(folder):
    data = load_image_folder(folder)
    assert data.classes == ["ant", "zebra"]
    assert data.id2label == {0: "ant", 1: "zebra"}
    assert len(data) == 5
    assert list(data.dataset["label"]) == [0, 0, 0, 1, 1]
    assert data.dataset[3]["file_name"] == str(folder / "zebra" / "0.png")
    assert data.skipped == []


def test_image_folder_errors(tmp_path, folder, caplog):
    with pytest.raises(DataError, match=r"image folder .*nope does not exist"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    _image(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match=r"has no class sub-folders"):
        load_image_folder(tmp_path / "flat")
    (folder / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) empty in .* hold no images"):
        load_image_folder(folder)
    (folder / "empty").rmdir()
    (folder / "ant" / "1.png").write_bytes(b"broken")
    with caplog.at_level(logging.WARNING, logger="vil_hf.data"):
        data = load_image_folder(folder)
    assert len(data) == 4
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and "skipped 1 of 5 images (unreadable)" in messages[0] and "ant/1.png" in messages[0]
    with pytest.raises(DataError, match=r"ant/1\.png"):
        load_image_folder(folder, skip_corrupt_images=False)


def test_classification_samples_and_collate(folder):
    data = load_image_folder(folder)
    plain = ClassificationSamples(data, _processor(), training=False)
    item = plain[3]
    assert item["labels"] == 1 and item["pixel_values"].shape == (3, 32, 32)
    reference = _processor()(Image.open(data.dataset[3]["file_name"]).convert("RGB"), return_tensors="pt")
    torch.testing.assert_close(item["pixel_values"], reference["pixel_values"][0])
    # no augmentation without training, even with a seed
    torch.testing.assert_close(plain[(3, 5)]["pixel_values"], item["pixel_values"])

    training = ClassificationSamples(data, _processor(), training=True)
    for seed in range(8):
        flipped = bool(torch.rand((), generator=torch.Generator().manual_seed(seed)) < 0.5)
        values = training[(3, seed)]["pixel_values"]
        expected = item["pixel_values"].flip(-1) if flipped else item["pixel_values"]
        torch.testing.assert_close(values, expected)
    batch = collate_classification([plain[0], plain[4]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [0, 1]
