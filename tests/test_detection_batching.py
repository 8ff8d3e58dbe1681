"""Batch-invariant detection: an image gives the same detections alone or batched with larger images, and a batch
whose images fill it runs exactly as before (one padded batch)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Config, ResNetConfig
from transformers.modeling_outputs import BackboneOutput

from vil_hf import ViLConfig
from vil_hf.detection.extents import crop_anchor_rows, extent_mask, extents_at_stride, image_extents

from .test_backbones import TINY_DINOV2
from .test_detection_models import TINY_ARCH, tiny_detector

RESNET = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic")
BACKBONES = {
    "vil": lambda: ViLConfig(arch=TINY_ARCH, image_size=128),
    "resnet": lambda: RESNET,
    # A plain backbone: patch-14 input scaling and the simple feature pyramid, run once per group of extents.
    "dinov2": lambda: Dinov2Config(**TINY_DINOV2),
}
# (height, width) of the images: not multiples of 32, and extents that differ in height, in width and in both.
SIZES = [(100, 120), (256, 128), (150, 250)]


def low_threshold_detector(kind, backbone, **config):
    # Random weights: a zero score threshold keeps the full 100 detections per image to compare. Fewer RPN
    # candidates than the recipe's (300 of each level's 48 to 12288 anchors, 200 proposals) only save time.
    overrides = {"box_score_threshold": 0.0, "rpn_pre_nms_topk_test": 300, "rpn_post_nms_topk_test": 200}
    overrides = overrides if kind == "mask_rcnn" else {}
    overrides = overrides or {"score_threshold": 0.0}
    model = tiny_detector(kind, backbone_config=BACKBONES[backbone](), **overrides, **config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # Biases as a trained model has them: with the recipe's zero biases, a convolution of zeros gives zeros,
        # which would hide what a batch's padding does to the maps.
        for name, parameter in model.named_parameters():
            if name.endswith("bias") and not name.startswith("backbone."):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        if kind == "retinanet":
            # At its prior initialisation every anchor scores ~0.01 within 1e-5: spread the scores so that they rank.
            model.detector.head.cls_score.weight.normal_(std=0.1, generator=generator)
            model.detector.head.cls_score.bias.zero_()
    return model


def images_and_batch(sizes=SIZES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, height, width, generator=generator) for height, width in sizes]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixel_values = torch.zeros(len(images), 3, height, width)
    pixel_mask = torch.zeros(len(images), height, width, dtype=torch.int64)
    for index, image in enumerate(images):
        pixel_values[index, :, : image.shape[1], : image.shape[2]] = image
        pixel_mask[index, : image.shape[1], : image.shape[2]] = 1
    return images, pixel_values, pixel_mask


def unmatched(expected, actual, index_expected, index_actual, box_tolerance=0.01, score_tolerance=1e-4):
    """Detections of `expected` (image index_expected) with no detection in `actual` of the same class, boxes within
    `box_tolerance` px and score within `score_tolerance`. When `actual` holds the maximum number of detections,
    those of `expected` scoring below its lowest (plus the tolerance) may have been cut off and are not counted."""
    boxes, scores, labels = (getattr(expected, f)[index_expected] for f in ("pred_boxes", "scores", "labels"))
    fields = ("pred_boxes", "scores", "labels")
    other_boxes, other_scores, other_labels = (getattr(actual, f)[index_actual] for f in fields)
    close = (
        ((boxes[:, None] - other_boxes[None]).abs().amax(-1) <= box_tolerance)
        & ((scores[:, None] - other_scores[None]).abs() <= score_tolerance)
        & (labels[:, None] == other_labels[None])
    )
    full = len(other_scores) == 100  # detections_per_image
    cut = float(other_scores.min()) + score_tolerance if full else float("-inf")
    return [i for i in range(len(boxes)) if not close[i].any() and scores[i] > cut], close


def assert_same_detections(alone, batched, index):
    assert len(alone.pred_boxes[0]) >= 50  # enough detections for the comparison to mean something
    missing, close = unmatched(alone, batched, 0, index)
    extra, _ = unmatched(batched, alone, index, 0)
    assert not missing and not extra, f"{len(missing)} detections alone and {len(extra)} batched have no match"
    if alone.pred_masks is not None:
        for i, j in torch.nonzero(close).tolist():
            torch.testing.assert_close(batched.pred_masks[index][j], alone.pred_masks[0][i], rtol=0, atol=1e-4)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_an_image_gives_the_same_detections_alone_and_in_a_batch(kind, backbone):
    model = low_threshold_detector(kind, backbone)
    images, pixel_values, pixel_mask = images_and_batch()
    with torch.no_grad():
        batched = model(pixel_values, pixel_mask=pixel_mask)
        padded_as_before = model(pixel_values)  # no pixel_mask: every image fills the batch
        for index, image in enumerate(images):
            alone = model(image[None])
            assert_same_detections(alone, batched, index)
            assert batched.image_sizes[index].tolist() == list(image.shape[1:])
        # The comparison can fail: run as one padded batch, the smallest image's detections change.
        missing, _ = unmatched(model(images[0][None]), padded_as_before, 0, 0)
        assert len(missing) > 10


def test_batched_feature_maps_equal_the_image_alone_within_its_extent():
    model = low_threshold_detector("retinanet", "resnet")
    images, pixel_values, pixel_mask = images_and_batch()
    with torch.no_grad():
        batched = model(pixel_values, pixel_mask=pixel_mask, output_hidden_states=True).feature_maps
        alone = model(images[0][None], output_hidden_states=True).feature_maps
    extent = image_extents(torch.tensor([SIZES[0]]), 32)[0]
    for level, (level_batched, level_alone) in enumerate(zip(batched, alone)):
        height, width = extents_at_stride(extent, 8 * 2**level).tolist()
        assert level_alone.shape[-2:] == (height, width)
        torch.testing.assert_close(level_batched[0, :, :height, :width], level_alone[0], rtol=1e-4, atol=1e-5)
        assert not level_batched[0, :, height:].any() and not level_batched[0, :, :, width:].any()


class MaskAwareBackbone(nn.Module):
    """A stand-in for a backbone that handles `pixel_mask` itself (ViLBackbone with masked attention): it honours
    the contract (maps as each image alone, zero beyond its extent) and records the masks it is given."""

    supports_pixel_mask = True

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.masks = []

    def forward(self, pixel_values, pixel_mask=None):
        self.masks.append(pixel_mask)
        if pixel_mask is None:
            return self.backbone(pixel_values)
        per_image = []
        for image, mask in zip(pixel_values, pixel_mask.bool()):
            height, width = int(mask.any(1).sum()), int(mask.any(0).sum())
            per_image.append(self.backbone(image[None, :, :height, :width]).feature_maps)
        maps = []
        for level in range(len(per_image[0])):
            # The input is cut to the largest extent: the largest map of a level is the batch's.
            height = max(image_maps[level].shape[-2] for image_maps in per_image)
            width = max(image_maps[level].shape[-1] for image_maps in per_image)
            padded = [
                F.pad(
                    image_maps[level], (0, width - image_maps[level].shape[-1], 0, height - image_maps[level].shape[-2])
                )
                for image_maps in per_image
            ]
            maps.append(torch.cat(padded))
        return BackboneOutput(feature_maps=tuple(maps))


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_a_backbone_that_takes_pixel_mask_gets_the_extents(kind):
    model = low_threshold_detector(kind, "resnet")
    model.backbone = MaskAwareBackbone(model.backbone)
    images, pixel_values, pixel_mask = images_and_batch()
    with torch.no_grad():
        batched = model(pixel_values, pixel_mask=pixel_mask)
        (mask,) = model.backbone.masks
        extents = image_extents(torch.tensor(SIZES), 32)
        assert torch.equal(mask.bool(), extent_mask(extents, *extents.max(0).values.tolist()))
        alone = model(images[2][None])
    assert_same_detections(alone, batched, 2)


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_a_single_image_runs_exactly_as_without_a_mask(kind):
    model = low_threshold_detector(kind, "vil")
    images, pixel_values, pixel_mask = images_and_batch(sizes=[(90, 120)])  # padded to 96 x 128 inside
    with torch.no_grad():
        expected = model(pixel_values, output_hidden_states=True)
        actual = model(pixel_values, pixel_mask=pixel_mask, output_hidden_states=True)
    assert torch.equal(actual.image_sizes, expected.image_sizes)
    for field in ("pred_boxes", "scores", "labels", "pred_masks", "feature_maps", "proposals", "proposal_logits"):
        assert (getattr(actual, field) is None) == (getattr(expected, field) is None), field
        for a, e in zip(getattr(actual, field) or [], getattr(expected, field) or []):
            assert torch.equal(a, e), field


def test_images_that_fill_the_batch_run_as_one_padded_batch(monkeypatch):
    model = low_threshold_detector("mask_rcnn", "resnet")
    _, pixel_values, pixel_mask = images_and_batch(sizes=[(90, 120), (96, 100)])  # both padded to 96 x 128 alone
    calls = []
    backbone_forward = model.backbone.forward
    monkeypatch.setattr(
        model.backbone, "forward", lambda *a, **k: calls.append(a[0].shape) or backbone_forward(*a, **k)
    )
    with torch.no_grad():
        expected = model(pixel_values, output_hidden_states=True).feature_maps
        actual = model(pixel_values, pixel_mask=pixel_mask, output_hidden_states=True).feature_maps
    assert calls == [(2, 3, 96, 128)] * 2  # one backbone run over the whole batch, as without a mask
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))


def test_padding_beyond_every_extent_is_cut_off():
    """One image on a canvas larger than its extent (e.g. a fixed pad_size) is detected as it is alone."""
    model = low_threshold_detector("mask_rcnn", "resnet")
    images, pixel_values, pixel_mask = images_and_batch(sizes=[(100, 120)])
    canvas = F.pad(pixel_values, (0, 64, 0, 32))
    canvas_mask = F.pad(pixel_mask, (0, 64, 0, 32))
    with torch.no_grad():
        alone = model(images[0][None], output_hidden_states=True)
        on_canvas = model(canvas, pixel_mask=canvas_mask, output_hidden_states=True)
    for a, e in zip(on_canvas.feature_maps, alone.feature_maps):
        assert torch.equal(a, e)
    for field in ("pred_boxes", "scores", "labels", "pred_masks"):
        assert torch.equal(getattr(on_canvas, field)[0], getattr(alone, field)[0]), field


def test_coco_predictions_do_not_depend_on_the_evaluation_batch_size(tmp_path):
    """The evaluation loop's results (what COCO AP is computed from) at batch 1 and at batch 4."""
    from accelerate import Accelerator

    from vil_hf import DetectionImageProcessorPil
    from vil_hf.data import load_coco_detection
    from vil_hf.evaluation.loop import predict_coco

    from .test_data import _make_set

    data = load_coco_detection(*_make_set(tmp_path))  # four images of different aspect ratios, two classes
    model = low_threshold_detector("mask_rcnn", "resnet", num_labels=2)
    processor = DetectionImageProcessorPil(shortest_edge=64, longest_edge=128)
    accelerator = Accelerator(cpu=True)
    one, four = (predict_coco(model, data, processor, accelerator, batch_size=size) for size in (1, 4))
    assert {d["image_id"] for d in one} == {d["image_id"] for d in four} and len(one) > 200
    for image_id in {d["image_id"] for d in one}:
        alone, batched = ([d for d in results if d["image_id"] == image_id] for results in (one, four))
        assert len(alone) == len(batched)
        boxes, other_boxes = (torch.tensor([d["bbox"] for d in found]) for found in (alone, batched))
        scores, other_scores = (torch.tensor([d["score"] for d in found]) for found in (alone, batched))
        classes, other_classes = (torch.tensor([d["category_id"] for d in found]) for found in (alone, batched))
        close = (
            ((boxes[:, None] - other_boxes[None]).abs().amax(-1) <= 0.01)
            & ((scores[:, None] - other_scores[None]).abs() <= 1e-4)
            & (classes[:, None] == other_classes[None])
        )
        assert close.any(1).all() and close.any(0).all(), f"image {image_id}"


def _pyramid_with_a_smaller_image(strides, channels=8, canvas=(64, 128), extent=(32, 96), seed=0):
    """Random FPN levels for two images; image 0's extent is smaller and its levels are zero beyond it (what the
    detector hands its heads). -> levels, per-level extents, and image 0's levels alone."""
    generator = torch.Generator().manual_seed(seed)
    extents = torch.tensor([extent, canvas])
    levels, level_extents, alone = [], [], []
    for stride in strides:
        level_extent = extents_at_stride(extents, stride)
        height, width = (-(-size // stride) for size in canvas)
        level = torch.randn(2, channels, height, width, generator=generator)
        level[0, :, level_extent[0, 0] :] = 0
        level[0, :, :, level_extent[0, 1] :] = 0
        levels.append(level)
        level_extents.append(level_extent)
        alone.append(level[:1, :, : level_extent[0, 0], : level_extent[0, 1]])
    return levels, level_extents, alone


def assert_same_boxes(boxes, scores, expected_boxes, expected_scores):
    assert len(boxes) == len(expected_boxes) > 0
    close = ((boxes[:, None] - expected_boxes[None]).abs().amax(-1) < 1e-3) & (
        (scores[:, None] - expected_scores[None]).abs() < 1e-5
    )
    assert close.any(0).all() and close.any(1).all()


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_dense_heads_consider_only_the_anchors_inside_each_extent(kind):
    """Anchors beyond an image's extent do not exist alone: with every candidate kept (no top-k cut), they would
    add proposals or detections to the batched image."""
    from vil_hf import MaskRCNNConfig, RetinaNetConfig
    from vil_hf.detection.retinanet import RetinaNetDetector
    from vil_hf.detection.rpn import RegionProposalNetwork

    torch.manual_seed(0)
    image_sizes = torch.tensor([[30, 90], [64, 128]])
    if kind == "mask_rcnn":
        config = MaskRCNNConfig(backbone_config=RESNET, rpn_pre_nms_topk_test=10**6, rpn_post_nms_topk_test=10**6)
        head, strides = RegionProposalNetwork(config, 8).eval(), [4, 8, 16, 32, 64]
    else:
        config = RetinaNetConfig(
            backbone_config=RESNET, num_labels=2, score_threshold=0.0, topk_candidates=10**6, detections_per_image=10**6
        )
        head, strides = RetinaNetDetector(config, 8).eval(), [8, 16, 32, 64, 128]
    levels, extents, alone = _pyramid_with_a_smaller_image(strides)
    with torch.no_grad():
        if kind == "mask_rcnn":
            (boxes, _), (scores, _), _ = head(levels, strides, image_sizes, extents=extents)
            (expected_boxes,), (expected_scores,), _ = head(alone, strides, image_sizes[:1])
        else:
            batched = head(levels, strides, image_sizes, detect=True, extents=extents)[0]
            expected = head(alone, strides, image_sizes[:1], detect=True)[0]
            boxes, scores = batched["boxes"][0], batched["scores"][0]
            expected_boxes, expected_scores = expected["boxes"][0], expected["scores"][0]
            assert torch.equal(batched["labels"][0].sort().values, expected["labels"][0].sort().values)
    assert_same_boxes(boxes, scores, expected_boxes, expected_scores)


def test_crop_anchor_rows_keeps_the_cells_inside_the_extent_in_order():
    rows = torch.arange(4 * 5 * 3).reshape(1, 4 * 5 * 3, 1).expand(2, -1, 2)  # (N, H*W*A, k), location-major
    cropped = crop_anchor_rows(rows, 1, (4, 5), (2, 3))
    expected = torch.tensor([(y * 5 + x) * 3 + a for y in range(2) for x in range(3) for a in range(3)])
    assert torch.equal(cropped[1, :, 0], expected) and cropped.shape == (2, 18, 2)
    assert extents_at_stride(torch.tensor([[96, 160]]), 64).tolist() == [[2, 3]]
    assert image_extents(torch.tensor([[90, 128]]), 32).tolist() == [[96, 128]]
