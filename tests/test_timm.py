"""The timm extra: ViL in timm's registry, our folders as timm weights, timm backbones in the detectors.

Tests marked `timm` need timm (``pip install 'vil-hf[timm]'``); .ci/run runs them in their own virtual
environment (.venv-timm), since timm's torchvision must match torch. Without timm they are skipped,
and the tests of the errors a user without timm gets run instead.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForObjectDetection

from vil_hf import (
    MaskRCNNConfig,
    MaskRCNNForObjectDetection,
    RetinaNetConfig,
    RetinaNetForObjectDetection,
    ViLBackbone,
    ViLConfig,
    ViLForImageClassification,
    published_arch,
)

from .test_detection_models import SMALL_HEADS, TINY_ARCH, synthetic_batch, tiny_detector

try:
    import timm

    import vil_hf.timm  # noqa: F401  (registers the vil_* models)
except ImportError:  # timm missing, or its torchvision not loading against this torch
    timm = None

needs_timm = pytest.mark.skipif(
    timm is None, reason="timm not installed (pip install 'vil-hf[timm]'); .ci/run runs these in .venv-timm"
)
needs_no_timm = pytest.mark.skipif(timm is not None, reason="timm is installed: its absence cannot be shown here")
pytestmark = pytest.mark.timm


def _maps_close(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- without timm
@needs_no_timm
def test_without_timm_the_errors_name_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'vil-hf\[timm\]'"):
        import vil_hf.timm  # noqa: F401
    # The config needs no timm; building the backbone does, and transformers says so.
    config = MaskRCNNConfig(backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=False, num_labels=3)
    with pytest.raises(ImportError, match="timm"):
        MaskRCNNForObjectDetection(config)


def test_timm_backbone_arguments_are_checked():
    config = RetinaNetConfig(backbone="resnet18", use_timm_backbone=True, num_labels=3)
    assert config.backbone_config.model_type == "timm_backbone" and config.backbone_features == [2, 3, 4]
    assert config.backbone_config.out_indices == [2, 3, 4] and config.num_fpn_levels == 5
    with pytest.raises(ValueError, match="download timm weights"):
        MaskRCNNConfig(backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=True)
    with pytest.raises(ValueError, match="use_timm_backbone=False"):
        MaskRCNNConfig(backbone="microsoft/resnet-18", use_timm_backbone=False)
    with pytest.raises(ValueError, match="not both"):
        MaskRCNNConfig(backbone="resnet18", backbone_config=ViLConfig(arch=TINY_ARCH))
    with pytest.raises(ValueError, match="need backbone="):
        MaskRCNNConfig(use_timm_backbone=True)
    with pytest.raises(ValueError, match="timm feature indices"):
        MaskRCNNConfig(backbone="resnet18", backbone_features=["stage1", "stage2"])


# ------------------------------------------------------------------------------------ ViL in timm
@needs_timm
def test_vil_models_are_registered_and_give_the_backbone_maps():
    assert {"vil_tiny", "vil_small", "vil_medium_deep", "vil_base_deep"} <= set(timm.list_models("vil_*"))
    torch.manual_seed(0)
    features = timm.create_model("vil_small", features_only=True).eval()
    assert features.feature_info.channels() == [96, 192, 384, 768]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    # The same weights in ViLBackbone give the same maps (an input that is not a multiple of the window).
    backbone = ViLBackbone(
        ViLConfig(arch=published_arch("small"), out_features=["stage1", "stage2", "stage3", "stage4"])
    ).eval()
    own = {key.removeprefix("model.vil."): value for key, value in features.state_dict().items()}
    backbone.load_state_dict(own)
    pixel_values = torch.randn(1, 3, 100, 148)
    with torch.no_grad():
        _maps_close(features(pixel_values), backbone(pixel_values).feature_maps)
    two = timm.create_model("vil_tiny", features_only=True, out_indices=(2, 3))
    assert two.feature_info.channels() == [192, 384] and len(two.model.vil.encoder.stages) == 4


@needs_timm
def test_our_folders_load_as_timm_pretrained_weights(tmp_path):
    torch.manual_seed(0)
    classifier = ViLForImageClassification(ViLConfig(arch=published_arch("tiny"), num_labels=1000)).eval()
    classifier.save_pretrained(tmp_path / "cls")
    pixel_values = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = classifier(pixel_values).logits
        for overlay in (
            dict(file=str(tmp_path / "cls" / "model.safetensors")),
            dict(source="local-dir", file=str(tmp_path / "cls")),
        ):
            model = timm.create_model("vil_tiny", pretrained=True, pretrained_cfg_overlay=overlay).eval()
            torch.testing.assert_close(model(pixel_values), expected, rtol=1e-5, atol=1e-5)

    # A ViLBackbone folder and a detector folder give features_only models their encoder.
    backbone = ViLBackbone(ViLConfig(arch=TINY_ARCH, out_features=["stage1", "stage2", "stage3", "stage4"])).eval()
    backbone.save_pretrained(tmp_path / "backbone")
    detector = tiny_detector("retinanet")
    detector.save_pretrained(tmp_path / "detector")
    images = torch.randn(1, 3, 96, 128)
    # RetinaNet's backbone hands out stages 2-4 only: compare the last three maps.
    for folder, reference, first in (("backbone", backbone, 0), ("detector", detector.backbone.eval(), 1)):
        features = timm.create_model(
            "vil_tiny",
            arch=TINY_ARCH,
            features_only=True,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(tmp_path / folder / "model.safetensors")),
        ).eval()
        with torch.no_grad():
            _maps_close(features(images)[first:], reference(images).feature_maps)

    with pytest.raises(ValueError, match="another ViL architecture"):
        timm.create_model(
            "vil_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "cls" / "model.safetensors"))
        )


@needs_timm
def test_timm_classifier_interface():
    model = timm.create_model("vil_tiny", num_classes=5, arch=TINY_ARCH, global_pool="avg")
    pixel_values = torch.randn(2, 3, 64, 64)
    tokens = model.forward_features(pixel_values)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, 32)
    assert model(pixel_values).shape == (2, 5)
    final, maps = model.forward_intermediates(pixel_values)
    torch.testing.assert_close(final, tokens)
    assert [m.shape[1] for m in maps] == [16, 16, 32, 32]
    model.reset_classifier(0)
    assert model(pixel_values).shape == (2, 32)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(pixel_values, output_fmt="NHWC")


# --------------------------------------------------------------------------- timm in the detectors
@needs_timm
@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_detectors_train_detect_and_reload_with_a_timm_backbone(kind, tmp_path):
    config_class, model_class = {
        "mask_rcnn": (MaskRCNNConfig, MaskRCNNForObjectDetection),
        "retinanet": (RetinaNetConfig, RetinaNetForObjectDetection),
    }[kind]
    config = config_class(
        backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=False, num_labels=3, **SMALL_HEADS[kind]
    )
    torch.manual_seed(0)
    model = model_class(config)
    assert type(model.backbone).__name__ == "TimmBackbone"
    pixel_values, labels = synthetic_batch(with_masks=kind == "mask_rcnn")
    losses = model.train()(pixel_values=pixel_values, labels=labels).loss
    losses.backward()
    assert torch.isfinite(losses) and model.backbone._backbone.conv1.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        detections = model(pixel_values=pixel_values)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForObjectDetection.from_pretrained(tmp_path).eval()
    assert type(reloaded.backbone).__name__ == "TimmBackbone"
    with torch.no_grad():
        again = reloaded(pixel_values=pixel_values)
    for got, expected in zip(again.pred_boxes, detections.pred_boxes):
        torch.testing.assert_close(got, expected)


@needs_timm
def test_our_timm_vil_as_a_detector_backbone():
    """transformers' TimmBackbone builds our registered ViL: the detector's maps are ViLBackbone's."""
    config = MaskRCNNConfig(
        backbone="vil_tiny",
        backbone_kwargs={"out_indices": [0, 1, 2, 3]},
        num_labels=3,
        **SMALL_HEADS["mask_rcnn"],
    )
    assert config.backbone_features == [0, 1, 2, 3]
    model = MaskRCNNForObjectDetection(config).eval()
    assert list(model.backbone.channels) == [48, 96, 192, 384]
    pixel_values, _ = synthetic_batch()
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    assert len(outputs.pred_boxes) == 2
