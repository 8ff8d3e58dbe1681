"""torch.compile of the detectors (graph breaks where the data decides shapes: NMS, RoIAlign, post-processing) and
torch.export of their backbone + FPN part."""

import pytest
import torch
from torch import nn
from torch.export import Dim
from transformers import ResNetConfig

from vil_hf import ViLConfig

from .test_detection_models import TINY_ARCH, tiny_detector

RESNET = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic")
# The default kernel on CPU ("blocked") is made traceable separately; "vectorized" is plain tensor code.
VIL = ViLConfig(arch=TINY_ARCH, image_size=128, longformer_implementation="vectorized")


def detector(kind, backbone_config):
    threshold = {"box_score_threshold": 0.0} if kind == "mask_rcnn" else {"score_threshold": 0.0}
    return tiny_detector(kind, backbone_config=backbone_config, **threshold).eval()


def assert_same_outputs(actual, expected):
    for field in ("pred_boxes", "scores", "labels", "pred_masks"):
        if getattr(expected, field) is None:
            assert getattr(actual, field) is None
            continue
        for a, e in zip(getattr(actual, field), getattr(expected, field), strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def compiled_against_eager(model, *calls):
    torch._dynamo.reset()
    # aot_eager: dynamo's capture and AOT tracing without inductor's C++ build (minutes here); static shapes trace
    # faster than the symbolic ones a second shape would switch to.
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        for args, kwargs in calls:
            expected = model(*args, **kwargs)
            assert len(expected.pred_boxes[0]) > 0
            assert_same_outputs(compiled(*args, **kwargs), expected)


def test_compiled_mask_rcnn_matches_eager():
    """A single image, then a batch whose images are detected as alone (per-extent crops: more graph breaks)."""
    pixel_values = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.int64)
    pixel_mask[1, 60:] = 0
    pixel_mask[1, :, 64:] = 0
    compiled_against_eager(
        detector("mask_rcnn", RESNET), ((pixel_values[:1],), {}), ((pixel_values,), {"pixel_mask": pixel_mask})
    )


def test_compiled_retinanet_matches_eager():
    pixel_values = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    compiled_against_eager(detector("retinanet", RESNET), ((pixel_values,), {}))


@pytest.mark.slow
def test_compiled_detector_with_a_vil_backbone_matches_eager():
    pixel_values = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    compiled_against_eager(detector("mask_rcnn", VIL), ((pixel_values,), {}))


class FeaturePyramid(nn.Module):
    """The backbone + FPN part of a detector, as one module to export."""

    def __init__(self, model):
        super().__init__()
        self.backbone, self.fpn = model.backbone, model.fpn

    def forward(self, pixel_values):
        return tuple(self.fpn(list(self.backbone(pixel_values).feature_maps)))


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_backbone_and_fpn_export_with_dynamic_sizes(kind):
    pyramid = FeaturePyramid(detector(kind, RESNET))
    generator = torch.Generator().manual_seed(1)
    # Any batch, and heights and widths that are multiples of 32 from 96 (P6 then has more than one cell).
    sizes = {0: Dim("batch", min=1, max=16), 2: Dim("h", min=3, max=64) * 32, 3: Dim("w", min=3, max=64) * 32}
    exported = torch.export.export(
        pyramid, (torch.randn(2, 3, 96, 128, generator=generator),), dynamic_shapes={"pixel_values": sizes}, strict=True
    )
    for shape in [(1, 3, 96, 96), (3, 3, 160, 256)]:
        pixel_values = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = pyramid(pixel_values)
        actual = exported.module()(pixel_values)
        assert len(actual) == len(expected) == 5
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_backbone_and_fpn_export_with_a_vil_backbone():
    pyramid = FeaturePyramid(detector("retinanet", VIL))
    pixel_values = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    # strict (dynamo) tracing: the non-strict tracer would leave fake tensors in the kernels' geometry cache
    exported = torch.export.export(pyramid, (pixel_values,), strict=True)
    with torch.no_grad():
        expected = pyramid(pixel_values)
    for a, e in zip(exported.module()(pixel_values), expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
