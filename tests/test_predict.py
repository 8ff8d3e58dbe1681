"""`vil-hf predict` on images, folders and a video; unreadable inputs skipped and counted; clear errors;
draw_detections as public API."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import vil_hf
from vil_hf import DetectionImageProcessorPil, ViLConfig, ViLForImageClassification
from vil_hf.cli import main
from vil_hf.data import make_shapes
from vil_hf.evaluation import class_colour
from vil_hf.evaluation.detections import detections_per_image
from vil_hf.predict import PredictError, VideoDecoderMissing, collect_sources, predict

from .test_detection_models import TINY_ARCH, tiny_detector
from .test_training import FEW_DETECTIONS

SIZE = (64, 80)  # height, width


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Mask R-CNN folder (with its processor) and a folder of five shapes images."""
    root = tmp_path_factory.mktemp("predict")
    make_shapes(root / "shapes", num_train=1, num_val=5, image_size=SIZE, seed=2)
    model = tiny_detector("mask_rcnn", **FEW_DETECTIONS["mask_rcnn"])
    model.config.id2label = {0: "circle", 1: "triangle", 2: "square"}
    model.save_pretrained(root / "model")
    DetectionImageProcessorPil(shortest_edge=64, longest_edge=96).save_pretrained(root / "model")
    return root, sorted((root / "shapes" / "val").glob("*.png"))


def write_video(path, images, codec="libx264"):
    av = pytest.importorskip("av", reason="PyAV is in the test extra (pip install -e '.[test]')")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=5)
        stream.width, stream.height, stream.pix_fmt = images[0].width, images[0].height, "yuv420p"
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_images_and_folders_with_an_unreadable_file(setup, tmp_path, capsys):
    root, images = setup
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for image in images[:3]:
        shutil.copy(image, folder)
    shutil.copy(images[3], folder / "nested" / "deep.png")
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("ignored: neither an image nor a video")
    single = tmp_path / "single.png"
    shutil.copy(images[4], single)

    out = tmp_path / "out"
    code = main(["predict", str(root / "model"), str(folder), str(single), "--output-dir", str(out),
                 "--threshold", "0.0", "--batch-size", "2"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "images: 4, video frames: 0" in printed and "skipped 1 unreadable input(s)" in printed
    assert "broken.png" in printed

    catalogue = json.loads((out / "images.json").read_text())
    assert [entry["id"] for entry in catalogue["images"]] == [1, 2, 3, 4]
    assert [entry["output"] for entry in catalogue["images"]] == [
        *(f"photos/{p.stem}.png" for p in images[:3]),
        "single.png",
    ]
    assert catalogue["images"][3]["file_name"] == str(single)
    assert [c["name"] for c in catalogue["categories"]] == ["circle", "triangle", "square"]
    for entry in catalogue["images"]:
        drawn = Image.open(out / entry["output"])
        assert drawn.size == (SIZE[1] * 5, SIZE[0] * 5)  # enlarged 5x: 64 -> 320 pixels
        assert (entry["width"], entry["height"]) == (SIZE[1], SIZE[0])
    assert not (out / "photos" / "nested").exists()  # one level deep unless --recursive
    # pycocotools opens the pair; every detection is a COCO result with a mask.
    coco = COCO(str(out / "images.json"))
    detections = coco.loadRes(str(out / "detections.json"))
    assert len(detections.anns) > 0
    assert all("segmentation" in ann and ann["category_id"] in (0, 1, 2) for ann in detections.anns.values())


def test_results_are_the_models_detections(setup, tmp_path):
    """With one image per batch, detections.json holds what the model and processor give directly."""
    root, images = setup
    report = predict(root / "model", [images[0]], tmp_path, threshold=0.2, batch_size=1, progress=False)
    results = json.loads(report.results_file.read_text())
    model = vil_hf.MaskRCNNForObjectDetection.from_pretrained(root / "model").eval()
    processor = DetectionImageProcessorPil.from_pretrained(root / "model")
    image = Image.open(images[0]).convert("RGB")
    with torch.no_grad():
        outputs = model(**processor(images=[image], return_tensors="pt"))
    (expected,) = detections_per_image(outputs, processor, [SIZE], threshold=0.2, with_masks=True)
    assert len(results) == len(expected["boxes"]) > 0
    for result, box, score, label in zip(results, expected["boxes"], expected["scores"], expected["labels"]):
        x1, y1, x2, y2 = box.tolist()
        np.testing.assert_allclose(result["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=1e-4)
        assert result["score"] == pytest.approx(float(score), abs=1e-6)
        assert result["category_id"] == int(label) and result["image_id"] == 1


def test_recursive_folders_keep_their_layout(setup, tmp_path):
    root, images = setup
    folder = tmp_path / "album"
    (folder / "2024" / "june").mkdir(parents=True)
    shutil.copy(images[0], folder / "top.png")
    shutil.copy(images[1], folder / "2024" / "june" / "top.png")
    sources = collect_sources([folder], recursive=True)
    assert [s.output_name for s in sources] == ["album/2024/june/top", "album/top"]
    # Two inputs with one name get numbered outputs.
    assert [s.output_name for s in collect_sources([images[0], images[0]])] == [images[0].stem, images[0].stem + "-2"]
    report = predict(root / "model", [folder], tmp_path / "out", recursive=True, progress=False)
    assert report.images == 2 and (tmp_path / "out" / "album" / "2024" / "june" / "top.png").is_file()


def test_video_in_drawn_video_and_frames_out(setup, tmp_path):
    root, images = setup
    frames = [Image.open(p).convert("RGB") for p in images]
    write_video(tmp_path / "clip.mp4", frames)
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 2048)  # a video suffix, no video inside
    out = tmp_path / "out"
    report = predict(root / "model", [tmp_path / "clip.mp4", tmp_path / "bad.mp4", images[0]], out,
                     threshold=0.0, progress=False)  # fmt: skip
    assert (report.frames, report.images) == (5, 1)
    assert [path for path, _ in report.skipped] == [str(tmp_path / "bad.mp4")]
    catalogue = json.loads((out / "images.json").read_text())
    video_entries = [e for e in catalogue["images"] if e["output"] == "clip.mp4"]
    assert [e["frame_index"] for e in video_entries] == [0, 1, 2, 3, 4]
    assert {e["id"] for e in video_entries} <= {
        d["image_id"] for d in json.loads((out / "detections.json").read_text())
    }

    import av

    with av.open(str(out / "clip.mp4")) as container:
        drawn = [frame.to_image() for frame in container.decode(video=0)]
    assert len(drawn) == 5 and drawn[0].size == (SIZE[1] * 5, SIZE[0] * 5)
    assert not list(out.glob(".clip.mp4.*"))  # no temporary file left


def test_missing_video_decoder_is_a_clear_error_and_writes_nothing(setup, tmp_path, monkeypatch, capsys):
    root, images = setup
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now fails as if PyAV were not installed
    with pytest.raises(VideoDecoderMissing, match=r"pip install 'vil-hf\[video\]'"):
        predict(root / "model", [tmp_path / "clip.mp4"], tmp_path / "out", progress=False)
    assert main(["predict", str(root / "model"), str(images[0]), str(tmp_path / "clip.mp4"),
                 "--output-dir", str(tmp_path / "out")]) == 2  # fmt: skip
    assert "PyAV" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_clear_errors(setup, tmp_path):
    root, images = setup
    with pytest.raises(PredictError, match="does not exist"):
        predict(root / "model", [tmp_path / "missing.png"], tmp_path / "out")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"garbage")
    with pytest.raises(PredictError, match="none of the 1 inputs could be read"):
        predict(root / "model", [broken], tmp_path / "out" / "nested", progress=False)
    assert not (tmp_path / "out").exists()  # no file, and not the folders it made for them either
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("someone else's file")
    with pytest.raises(PredictError, match="none of the 1 inputs could be read"):
        predict(root / "model", [broken], tmp_path / "kept", progress=False)
    assert sorted(path.name for path in (tmp_path / "kept").iterdir()) == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="--recursive"):
        predict(root / "model", [tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(PredictError, match="not a model folder"):
        predict(tmp_path, images[:1], tmp_path / "out")
    ViLForImageClassification(ViLConfig(arch=TINY_ARCH, num_labels=3)).save_pretrained(tmp_path / "classifier")
    with pytest.raises(PredictError, match="does not hold an object detector"):
        predict(tmp_path / "classifier", images[:1], tmp_path / "out")
    with pytest.raises(PredictError, match="threshold"):
        predict(root / "model", images[:1], tmp_path / "out", threshold=1.5)
    if not torch.cuda.is_available():
        with pytest.raises(PredictError, match="CUDA is not available"):
            predict(root / "model", images[:1], tmp_path / "out", device="cuda")


def test_bfloat16_autocast_on_cpu(setup, tmp_path):
    root, images = setup
    full = predict(root / "model", images[:2], tmp_path / "fp32", threshold=0.0, progress=False)
    half = predict(root / "model", images[:2], tmp_path / "bf16", threshold=0.0, dtype="bfloat16", progress=False)
    assert half.images == 2 and half.detections > 0
    full_scores = [d["score"] for d in json.loads(full.results_file.read_text())]
    half_scores = [d["score"] for d in json.loads(half.results_file.read_text())]
    # bfloat16 keeps ~3 significant digits: the best score per run agrees to that, but is not bit-equal.
    assert max(half_scores) == pytest.approx(max(full_scores), abs=2e-2)


def test_draw_detections_is_public_and_readable_on_small_and_large_images():
    assert vil_hf.draw_detections is vil_hf.evaluation.draw_detections
    small = Image.new("RGB", (80, 64), (0, 0, 0))
    boxes, labels, scores = torch.tensor([[10.0, 10.0, 50.0, 40.0]]), torch.tensor([1]), torch.tensor([0.9])
    mask = torch.zeros(1, 64, 80, dtype=torch.bool)
    mask[0, 12:38, 12:48] = True
    drawn = np.asarray(vil_hf.draw_detections(small, boxes, labels, scores, masks=mask, min_side=320))
    assert drawn.shape == (320, 400, 3)  # 5x: the smallest whole factor taking 64 to 320
    assert drawn[25 * 5, 30 * 5].any() and not drawn[45 * 5, 70 * 5].any()  # the mask, scaled with the image
    assert (drawn[150:155, 10 * 5] == class_colour(1)).all()  # the box outline at 5x

    large = Image.new("RGB", (1600, 1200), (0, 0, 0))
    drawn = np.asarray(vil_hf.draw_detections(large, boxes * 20, labels, scores))
    column = drawn[600, 190:215]  # across the left edge at x = 200
    assert (column == class_colour(1)).all(axis=1).sum() == 4  # 1200 / 300: outlines grow with the image
