"""vil_hf.data.make_shapes and `vil-hf make-shapes`: a deterministic, loadable, consistent synthetic COCO set."""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from vil_hf.cli import main
from vil_hf.data import DataError, DetectionSamples, load_coco_detection
from vil_hf.data.shapes import make_shapes
from vil_hf.detection.image_processing_detection import DetectionImageProcessorPil

# pycocotools' decode predates NumPy 2's copy= protocol and warns on every mask.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes(root / "set", num_train=40, num_val=10, image_size=(96, 112), seed=3)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_determinism(shapes, tmp_path):
    root = Path(shapes["root"])
    assert sorted(p.name for p in (root / "train").iterdir()) == [f"{i:06d}.png" for i in range(40)]
    assert len(list((root / "val").iterdir())) == 10
    assert Path(shapes["train_annotations"]) == root / "annotations" / "instances_train.json"
    assert Path(shapes["val_annotations"]).is_file()
    again = make_shapes(tmp_path / "again", num_train=40, num_val=10, image_size=(96, 112), seed=3)
    assert _files(root) == _files(Path(again["root"]))  # byte-identical
    other = make_shapes(tmp_path / "other", num_train=5, num_val=1, image_size=(96, 112), seed=4)
    assert (Path(other["train_images"]) / "000000.png").read_bytes() != (root / "train" / "000000.png").read_bytes()
    assert not list(root.rglob(".*.tmp"))


def test_annotations_load_and_masks_match_boxes(shapes):
    for split in ("train", "val"):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(shapes[f"{split}_annotations"])
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "triangle", "square"]
        per_image = Counter(a["image_id"] for a in coco.dataset["annotations"])
        assert set(per_image) == set(coco.getImgIds())  # every image has an object
        assert max(per_image.values()) <= 6
        polygons = 0
        for ann in coco.dataset["annotations"]:
            mask = coco.annToMask(ann).astype(bool)
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == [x, y, w, h]
            assert mask.sum() == ann["area"]
            assert 0.1 * 96 <= max(w, h) <= 0.7 * 112
            assert ann["iscrowd"] == 0
            polygons += isinstance(ann["segmentation"], list)
        assert 0 < polygons < len(coco.dataset["annotations"])  # fully visible: polygons; occluded: RLE
    train = json.loads(open(shapes["train_annotations"]).read())
    assert {a["category_id"] for a in train["annotations"]} == {1, 2, 3}


def test_visible_masks_do_not_overlap_and_occlusion_happens(shapes):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(shapes["train_annotations"])
    occluded = 0
    for image_id in coco.getImgIds():
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        assert np.stack(masks).sum(0).max() == 1  # visible parts are disjoint
        occluded += sum(isinstance(a["segmentation"], dict) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)))
    assert occluded > 0


def test_loads_with_load_coco_detection_and_samples(shapes):
    data = load_coco_detection(shapes["val_images"], shapes["val_annotations"])
    assert len(data) == 10 and data.skipped == []
    assert data.label_map.id2label == {0: "circle", 1: "triangle", 2: "square"}
    samples = DetectionSamples(data, DetectionImageProcessorPil(shortest_edge=96), training=True, return_masks=True)
    item = samples[(0, 7)]
    labels = item["labels"]
    assert len(labels["boxes"]) == len(labels["masks"]) == len(json.loads(data.dataset[0]["annotations"]))
    for box, mask in zip(labels["boxes"], labels["masks"]):
        ys, xs = np.nonzero(mask.numpy())
        assert abs(xs.min() - float(box[0])) <= 2 and abs(xs.max() + 1 - float(box[2])) <= 2
        assert abs(ys.min() - float(box[1])) <= 2 and abs(ys.max() + 1 - float(box[3])) <= 2


def test_refuses_foreign_folder_and_rewrites_its_own(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(
        DataError, match=r"foreign is not empty and does not hold a previous shapes set.*overwrite=True"
    ):
        make_shapes(foreign, num_train=2, num_val=1)
    make_shapes(foreign, num_train=2, num_val=1, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    # a previous shapes set is rewritten without overwrite; images of the larger set go away
    own = tmp_path / "own"
    make_shapes(own, num_train=4, num_val=2)
    make_shapes(own, num_train=2, num_val=1)
    assert sorted(p.name for p in (own / "train").iterdir()) == ["000000.png", "000001.png"]
    assert len(json.loads((own / "annotations" / "instances_train.json").read_text())["images"]) == 2
    with pytest.raises(DataError, match="image_size must be at least 32x32"):
        make_shapes(tmp_path / "tiny", image_size=(16, 16))


def test_cli_make_shapes(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(["make-shapes", str(out), "--num-train", "3", "--num-val", "2", "--image-size", "64", "80", "--seed", "1"])
        == 0
    )
    assert "wrote 3 training and 2 validation images" in capsys.readouterr().out
    val = json.loads((out / "annotations" / "instances_val.json").read_text())
    assert [(i["height"], i["width"]) for i in val["images"]] == [(64, 80), (64, 80)]
    direct = make_shapes(tmp_path / "direct", num_train=3, num_val=2, image_size=(64, 80), seed=1)
    assert (out / "train" / "000002.png").read_bytes() == (tmp_path / "direct" / "train" / "000002.png").read_bytes()
    assert direct["root"] != str(out)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["make-shapes", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
