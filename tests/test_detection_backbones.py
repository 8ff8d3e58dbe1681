"""The detectors on plain (single-stride) backbones through ViTDet's simple feature pyramid, and gradient
checkpointing of the detectors."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForObjectDetection, Dinov2Config, SwinConfig, VitDetConfig

from vil_hf import MaskRCNNConfig, RetinaNetConfig
from vil_hf.detection.checkpointing import CheckpointedModule
from vil_hf.detection.simple_feature_pyramid import SimpleFeaturePyramid

from .test_backbones import TINY_DINOV2, TINY_SWIN, TINY_VITDET
from .test_detection_models import synthetic_batch, tiny_detector

ROOT = Path(__file__).resolve().parents[1]
PLAIN = {
    "dinov2": lambda: Dinov2Config(**TINY_DINOV2, drop_path_rate=0.1),
    "vitdet": lambda: VitDetConfig(**TINY_VITDET, drop_path_rate=0.1),
}


# -- the simple feature pyramid -----------------------------------------------------------------


def test_simple_feature_pyramid_levels_and_locality():
    torch.manual_seed(0)
    pyramid = SimpleFeaturePyramid(32)
    assert (pyramid.strides, pyramid.channels) == ([4, 8, 16, 32], [8, 16, 32, 32])
    feature_map = torch.randn(2, 32, 6, 10)
    levels = pyramid(feature_map)
    assert [tuple(level.shape) for level in levels] == [(2, 8, 24, 40), (2, 16, 12, 20), (2, 32, 6, 10), (2, 32, 3, 5)]
    assert torch.equal(levels[2], feature_map)
    # 2x2 deconvolutions and pooling do not overlap: each output cell reads one input cell.
    changed = feature_map.clone()
    changed[:, :, 2, 3] += 1.0
    for level, stride, new in zip(levels, pyramid.strides, pyramid(changed)):
        differs = (new - level).abs().sum(dim=(0, 1)) > 0
        rows, cols = torch.nonzero(differs, as_tuple=True)
        factor = 16 // stride if stride <= 16 else 1
        expected_rows = {2 * factor + i for i in range(factor)} if stride <= 16 else {1}
        expected_cols = {3 * factor + i for i in range(factor)} if stride <= 16 else {1}
        assert set(rows.tolist()) <= expected_rows and set(cols.tolist()) <= expected_cols, stride
    assert SimpleFeaturePyramid(32, (8, 16, 32)).channels == [16, 32, 32]
    with pytest.raises(ValueError, match="divisible by 4"):
        SimpleFeaturePyramid(30)


@pytest.mark.parametrize("name", list(PLAIN))
@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_plain_backbones_train_and_detect_through_the_simple_feature_pyramid(kind, name, tmp_path):
    model = tiny_detector(kind, backbone_config=PLAIN[name]()).train()
    config = model.config
    assert config.uses_simple_feature_pyramid and config.backbone_features == ["stage2"]
    assert config.backbone_input_scale == (14 / 16 if name == "dinov2" else 1.0)
    # An input that is no multiple of 32 nor of the patch, and larger than the backbone's image_size.
    pixel_values, labels = synthetic_batch(num_images=2, size=(90, 130), with_masks=kind == "mask_rcnn")
    outputs = model(pixel_values, labels=labels, output_hidden_states=True)
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert model.backbone.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0 if name == "dinov2" else (
        model.backbone.embeddings.projection.weight.grad.abs().sum() > 0
    )  # fmt: skip
    assert all(p.grad is not None for p in model.simple_feature_pyramid.parameters())
    # Padded to 96 x 160; the pyramid's levels have strides 4..32 (then P6, and P7 for RetinaNet), exactly.
    strides = [4, 8, 16, 32, 64] if kind == "mask_rcnn" else [8, 16, 32, 64, 128]
    expected = [(-(-96 // s), -(-160 // s)) for s in strides]
    assert [tuple(level.shape[-2:]) for level in outputs.feature_maps] == expected
    model.eval()
    with torch.no_grad():
        detections = model(pixel_values)
    assert len(detections.pred_boxes) == 2
    model.save_pretrained(tmp_path)
    loaded = AutoModelForObjectDetection.from_pretrained(tmp_path).eval()
    assert loaded.simple_feature_pyramid is not None
    with torch.no_grad():
        again = loaded(pixel_values)
    for expected_boxes, boxes in zip(detections.pred_boxes, again.pred_boxes):
        torch.testing.assert_close(boxes, expected_boxes)


def test_a_patch_14_backbone_sees_the_input_scaled_to_a_stride_16_grid():
    model = tiny_detector("mask_rcnn", backbone_config=PLAIN["dinov2"]()).eval()
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 128, 224))
    assert seen == [(112, 196)]  # 8 x 14 patches of 14 pixels: one patch per 16 x 16 input pixels


def test_any_input_size_with_position_tables():
    """Swin with its absolute position table (off in the published Swins) is resized to the input, as DINOv2's is."""
    model = tiny_detector("retinanet", backbone_config=SwinConfig(**TINY_SWIN, use_absolute_embeddings=True)).train()
    for size in ((64, 64), (90, 130)):
        pixel_values, labels = synthetic_batch(num_images=1, size=size, with_masks=False)
        assert torch.isfinite(model(pixel_values, labels=labels).loss)
    assert model.backbone.swin.embeddings.position_embeddings.shape[1] == (64 // 4) ** 2  # a table for 64 x 64


def test_plain_backbone_settings_are_checked():
    with pytest.raises(ValueError, match="size_divisibility must be a multiple of 32"):
        MaskRCNNConfig(backbone_config=PLAIN["dinov2"](), size_divisibility=28)
    with pytest.raises(ValueError, match="give one stage in backbone_features"):
        RetinaNetConfig(backbone_config=PLAIN["vitdet"](), backbone_features=["stage1", "stage2"])
    # Another single stage may feed the pyramid.
    assert MaskRCNNConfig(backbone_config=PLAIN["vitdet"](), backbone_features=["stage1"]).num_fpn_levels == 5


# -- gradient checkpointing ---------------------------------------------------------------------


def _loss_and_gradients(model, kind):
    pixel_values, labels = synthetic_batch(num_images=2, with_masks=kind == "mask_rcnn")
    torch.manual_seed(0)  # the same proposal sampling and drop path
    outputs = model(pixel_values, labels=labels)
    outputs.loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs.loss.detach(), gradients


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("backbone", ["vil", "swin", "dinov2"])
@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kind, backbone, reentrant):
    backbone_config = {"vil": None, "swin": SwinConfig(**TINY_SWIN, drop_path_rate=0.1), "dinov2": PLAIN["dinov2"]()}
    model = tiny_detector(kind, backbone_config=backbone_config[backbone]).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert checkpointed.is_gradient_checkpointing
    # The backbone's own blocks and each heavy head part are switched on.
    switched = {
        name for name, module in checkpointed.named_modules() if getattr(module, "gradient_checkpointing", False)
    }
    heads = {"fpn", "rpn.head", "roi_heads.mask_head"} if kind == "mask_rcnn" else {"fpn", "detector.head"}
    assert heads <= switched and any(name.startswith("backbone.") for name in switched)
    if backbone == "dinov2":
        assert "simple_feature_pyramid" in switched
    # Each checkpointed head part runs twice: in the forward and again in the backward. Its first layer counts (the
    # recomputation stops once it has what the backward needs, which may leave out the last layer).
    first = {"fpn": "fpn.lateral_convs.3", "rpn.head": "rpn.head.conv", "roi_heads.mask_head": "roi_heads.mask_head.convs.0",
             "detector.head": "detector.head.cls_convs.0"}  # fmt: skip
    first["fpn"] = f"fpn.lateral_convs.{len(model.fpn.lateral_convs) - 1}"
    calls = {(copy_name, name): 0 for copy_name in ("plain", "checkpointed") for name in heads}
    for copy_name, detector in (("plain", model), ("checkpointed", checkpointed)):
        for name in heads:
            key = (copy_name, name)
            detector.get_submodule(first[name]).register_forward_hook(
                lambda *_, key=key: calls.__setitem__(key, calls[key] + 1)
            )
    loss, gradients = _loss_and_gradients(model, kind)
    checkpointed_loss, checkpointed_gradients = _loss_and_gradients(checkpointed, kind)
    assert all(calls["checkpointed", name] == 2 * calls["plain", name] > 0 for name in heads), calls
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-5, atol=1e-6)
    assert checkpointed_gradients.keys() == gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    # Evaluation and no-grad forwards are not checkpointed.
    checkpointed.eval()
    with torch.no_grad():
        checkpointed(synthetic_batch(num_images=1)[0])


def test_checkpointed_module_passes_nested_arguments_and_results():
    class Pair(CheckpointedModule):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 1)

        def forward(self, maps, scale=1.0, extra=None):
            return {"maps": [self.conv(m) * scale for m in maps], "note": "kept", "extra": extra}

    module = Pair()
    module.gradient_checkpointing = True
    module._gradient_checkpointing_func = lambda f, *a: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=True)
    maps = [torch.randn(1, 2, 3, 3, requires_grad=True), torch.randn(1, 2, 2, 2, requires_grad=True)]
    out = module(maps, scale=2.0, extra=None)
    assert out["note"] == "kept" and out["extra"] is None and len(out["maps"]) == 2
    sum(m.sum() for m in out["maps"]).backward()
    assert all(m.grad is not None for m in maps) and module.conv.weight.grad is not None


_MEMORY_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from vil_hf import MaskRCNNConfig, MaskRCNNForObjectDetection, ViLConfig
from vil_hf.benchmark import _resident_peak_bytes
from vil_hf.demo import DEMO_ARCH, DEMO_DETECTOR
from tests.test_detection_models import synthetic_batch
size = int(sys.argv[2])
torch.manual_seed(0)
config = MaskRCNNConfig(backbone_config=ViLConfig(arch=DEMO_ARCH, image_size=size), num_labels=3, **DEMO_DETECTOR)
model = MaskRCNNForObjectDetection(config).train()
if sys.argv[1] == "on":
    model.gradient_checkpointing_enable()
pixel_values, labels = synthetic_batch(num_images=2, size=(size, size))
before = _resident_peak_bytes()
model(pixel_values, labels=labels).loss.backward()
print(json.dumps({"step_mib": (_resident_peak_bytes() - before) / 2**20}))
"""


@pytest.mark.slow
def test_gradient_checkpointing_lowers_peak_memory_on_a_larger_input():
    """One training step of the demo's ViL Mask R-CNN on two 768 x 768 images, each setting in a fresh process:
    the peak resident set it adds (VmHWM after the step minus before) is smaller with checkpointing. At 512 the
    saving (about 40 MiB of 360-390) is too close to the allocator's noise for a ratio. glibc maps every block of 128
    KiB or more and unmaps it when freed (a fixed MALLOC_MMAP_THRESHOLD_ turns off its adaptive reuse of freed
    blocks), so the peak is that of the live tensors: with glibc's default the same step's ratio spread over 0.69-0.91
    between runs; with it, 0.57 (the ATen attention forward) and 0.63 (the native float32 one) in every run here."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072"}
    size = 768
    peaks = {}
    for setting in ("off", "on"):
        done = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, setting, str(size)], capture_output=True, text=True, env=env,
            timeout=300, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[setting] = json.loads(done.stdout.strip().splitlines()[-1])["step_mib"]
    print(
        f"peak memory of a training step, 2 x {size} x {size}: {peaks['off']:.0f} MiB plain, {peaks['on']:.0f} MiB checkpointed"
    )
    assert peaks["on"] < 0.9 * peaks["off"], peaks
