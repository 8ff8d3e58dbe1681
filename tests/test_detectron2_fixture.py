"""A detectron2 Mask R-CNN checkpoint, converted with the CLI, gives detectron2's features, proposals and
detections (fixtures/detectron2/det_mask_rcnn_small)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForObjectDetection

import vil_hf
from vil_hf.cli import main
from vil_hf.detection.image_processing_detection import paste_masks_in_image
from vil_kernels.ops import box_iou


@pytest.fixture(scope="module")
def converted(fixtures_dir, tmp_path_factory):
    folder = fixtures_dir / "detectron2" / "det_mask_rcnn_small"
    meta = json.loads((folder / "meta.json").read_text())
    out_dir = tmp_path_factory.mktemp("det") / "mask_rcnn"
    args = ["convert", str(folder / "model_final.pth"), str(out_dir), "--head", "mask_rcnn", "--arch", meta["arch"]]
    assert main([*args, "--num-detection-classes", str(meta["num_classes"])]) == 0
    model = AutoModelForObjectDetection.from_pretrained(out_dir).eval()
    reference = load_file(folder / "reference.safetensors")
    image_height, image_width = reference["image"].shape[-2:]
    pixel_values = reference["pixel_values_padded"]
    pixel_mask = torch.zeros(1, *pixel_values.shape[-2:], dtype=torch.int64)
    pixel_mask[:, :image_height, :image_width] = 1
    with torch.no_grad():
        outputs = model(pixel_values, pixel_mask=pixel_mask, output_hidden_states=True)
    return meta, out_dir, model, reference, outputs


def test_converted_detector_loads_with_auto_classes(converted):
    meta, out_dir, model, _, _ = converted
    assert isinstance(model, vil_hf.MaskRCNNForObjectDetection)
    assert model.config.num_labels == meta["num_classes"]
    assert model.config.backbone_config.to_arch_string() == meta["arch"]
    assert isinstance(AutoImageProcessor.from_pretrained(out_dir), vil_hf.DetectionImageProcessorPil)
    # detectron2's count includes the backbone's unused classification norm and head, which we drop.
    backbone_config = model.config.backbone_config
    unused = backbone_config.hidden_sizes[-1] * 1000 + 1000 + 2 * backbone_config.hidden_sizes[-1]
    ours = sum(p.numel() for p in model.parameters())
    print(f"\nparameters: ours {ours} + unused head {unused} = {ours + unused}; detectron2 {meta['params']}")
    assert ours + unused == meta["params"]


def test_fpn_features_match(converted):
    _, _, _, reference, outputs = converted
    for level, feature in enumerate(outputs.feature_maps, start=2):
        expected = reference[f"features.p{level}"]
        scale = expected.abs().max()
        torch.testing.assert_close(feature, expected, rtol=0, atol=1e-5 * scale)


def test_top_proposals_match(converted):
    _, _, _, reference, outputs = converted
    count = reference["proposals.boxes"].shape[0]
    boxes, logits = outputs.proposals[0][:count], outputs.proposal_logits[0][:count]
    torch.testing.assert_close(logits, reference["proposals.objectness_logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(boxes, reference["proposals.boxes"], rtol=0, atol=1e-5 * 330)  # 1e-5 of the image size


def test_detections_and_masks_match_by_matching(converted):
    _, _, _, reference, outputs = converted
    boxes, scores, labels = outputs.pred_boxes[0], outputs.scores[0], outputs.labels[0]
    ref_boxes, ref_scores = reference["instances.boxes"], reference["instances.scores"]
    ref_labels, ref_masks = reference["instances.classes"], reference["instances.masks"].bool()
    image_size = tuple(reference["image"].shape[-2:])
    masks = paste_masks_in_image(outputs.pred_masks[0], boxes, image_size)
    iou = box_iou(ref_boxes, boxes)
    compatible = (
        (iou > 0.99) & (ref_labels[:, None] == labels[None]) & ((ref_scores[:, None] - scores[None]).abs() < 1e-4)
    )
    # Near the top-k cut-off a detection may swap with an equal-scoring neighbour: allow a couple.
    unmatched = [i for i in range(len(ref_boxes)) if not compatible[i].any()]
    assert len(unmatched) <= 2, f"{len(unmatched)} of {len(ref_boxes)} detectron2 detections have no match"
    assert abs(len(boxes) - len(ref_boxes)) <= 2
    mask_agreement = []
    for i in range(len(ref_boxes)):
        if compatible[i].any():
            j = int(torch.nonzero(compatible[i])[0])
            mask_agreement.append((masks[j] == ref_masks[i]).float().mean().item())
    print(f"\nmatched {len(mask_agreement)}/{len(ref_boxes)}; worst mask pixel agreement {min(mask_agreement):.6f}")
    assert min(mask_agreement) > 0.999


def to_detectron2_keys(model) -> dict:
    """A detector's state dict in detectron2's layout (test-only inverse of the converter's map)."""
    import re

    from .test_original_fixtures import to_original_keys

    state = model.state_dict()
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    original = {"backbone.bottom_up." + k: v for k, v in to_original_keys(backbone).items()}
    first_level = 2 if isinstance(model, vil_hf.MaskRCNNForObjectDetection) else 3
    renames = [
        (r"fpn\.lateral_convs\.(\d+)\.", lambda m: f"backbone.fpn_lateral{int(m[1]) + first_level}."),
        (r"fpn\.output_convs\.(\d+)\.", lambda m: f"backbone.fpn_output{int(m[1]) + first_level}."),
        (r"fpn\.top_block\.", lambda m: "backbone.top_block."),
        (r"rpn\.head\.", lambda m: "proposal_generator.rpn_head."),
        (r"roi_heads\.box_head\.fcs\.(\d+)\.", lambda m: f"roi_heads.box_head.fc{int(m[1]) + 1}."),
        (r"roi_heads\.mask_head\.convs\.(\d+)\.", lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}."),
        (r"detector\.head\.(cls|bbox)_convs\.(\d+)\.", lambda m: f"head.{m[1]}_subnet.{2 * int(m[2])}."),
        (r"detector\.head\.", lambda m: "head."),
    ]
    for key, value in state.items():
        if key.startswith("backbone."):
            continue
        for pattern, rename in renames:
            if re.match(pattern, key):
                key = re.sub(pattern, rename, key, count=1)
                break
        original[key] = value
    return original


@pytest.mark.parametrize("head", ["retinanet", "mask_rcnn"])
def test_detectron2_file_of_other_heads_and_class_counts_round_trips(head, tmp_path):
    """No fixture covers RetinaNet or other class counts: a detectron2-layout file written from our model must
    come back with the same weights and the same detections."""
    from .test_detection_models import TINY_ARCH, synthetic_batch, tiny_detector

    model = tiny_detector(head, num_labels=7).eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
        if head == "retinanet":  # off the prior 0.01, so that detections pass the 0.05 score threshold
            model.detector.head.cls_score.bias.add_(3.0)
    path = tmp_path / "model_final.pth"
    torch.save({"model": {k: v.half() for k, v in to_detectron2_keys(model).items()}}, path)
    out_dir = tmp_path / "converted"
    assert main(["convert", str(path), str(out_dir), "--head", head, "--arch", TINY_ARCH, "--img-size", "128"]) == 0
    loaded = AutoModelForObjectDetection.from_pretrained(out_dir).eval()
    assert loaded.config.num_labels == 7
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})  # same fp16 rounding
    pixel_values, _ = synthetic_batch(num_images=1)
    with torch.no_grad():
        expected, actual = model(pixel_values), loaded(pixel_values)
    assert len(expected.pred_boxes[0]) > 0
    torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes)
    torch.testing.assert_close(actual.scores, expected.scores)
    torch.testing.assert_close(actual.labels, expected.labels)
