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
