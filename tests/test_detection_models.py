"""The detectors as transformers models: parameter counts, training, inference, other backbones, saving,
pipelines and bad input."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForObjectDetection,
    ConvNextConfig,
    ResNetConfig,
    SwinConfig,
    pipeline,
)

import vil_hf
from vil_hf import (
    DetectionImageProcessorPil,
    MaskRCNNConfig,
    MaskRCNNForObjectDetection,
    RetinaNetConfig,
    RetinaNetForObjectDetection,
    ViLConfig,
    published_arch,
)

TINY_ARCH = (
    "l1,h1,d16,n1,s1,g1,p4,f3,a0_l2,h1,d16,n1,s1,g1,p2,f3,a0_l3,h2,d32,n1,s1,g1,p2,f3,a0_l4,h2,d32,n1,s1,g0,p2,f3,a0"
)
# Published COCO parameter counts (vil-reference section 6), which include the backbone's unused
# 1000-class head (final LayerNorm + Linear).
PUBLISHED_PARAMS = {
    ("tiny", "mask_rcnn"): 26.9e6,
    ("small", "mask_rcnn"): 45.0e6,
    ("medium-deep", "mask_rcnn"): 60.1e6,
    ("base-deep", "mask_rcnn"): 76.1e6,
    ("tiny", "retinanet"): 16.64e6,
    ("small", "retinanet"): 35.68e6,
    ("medium-deep", "retinanet"): 50.77e6,
    ("base-deep", "retinanet"): 66.74e6,
}
DETECTORS = {
    "mask_rcnn": (MaskRCNNConfig, MaskRCNNForObjectDetection),
    "retinanet": (RetinaNetConfig, RetinaNetForObjectDetection),
}
SMALL_HEADS = {
    "mask_rcnn": dict(
        fpn_channels=32,
        box_head_fc_dim=64,
        mask_head_conv_dim=32,
        rpn_batch_size_per_image=64,
        roi_batch_size_per_image=64,
    ),
    "retinanet": dict(fpn_channels=32, head_conv_layers=2),
}


def tiny_detector(kind, backbone_config=None, num_labels=3, **overrides):
    config_class, model_class = DETECTORS[kind]
    backbone_config = backbone_config or ViLConfig(arch=TINY_ARCH, image_size=128)
    config = config_class(backbone_config=backbone_config, num_labels=num_labels, **{**SMALL_HEADS[kind], **overrides})
    torch.manual_seed(0)
    return model_class(config)


def synthetic_batch(num_images=2, size=(96, 128), with_masks=True):
    """Bright rectangles on a dark background; their boxes, labels and masks."""
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(num_images, 3, *size, generator=generator) * 0.1
    labels = []
    for index in range(num_images):
        boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0 + index, 20.0, 110.0, 80.0]])
        masks = torch.zeros(2, *size, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
            pixel_values[index, k % 3, y1:y2, x1:x2] += 2.0
        target = {"boxes": boxes, "class_labels": torch.tensor([0, 2])}
        if with_masks:
            target["masks"] = masks
        labels.append(target)
    return pixel_values, labels


# ------------------------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("model_name, head", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_published_less_unused_head(model_name, head):
    config_class, model_class = DETECTORS[head]
    backbone_config = ViLConfig(arch=published_arch(model_name, sparse=True), image_size=1333)
    with torch.device("meta"):  # counting needs no memory
        model = model_class(config_class(backbone_config=backbone_config, num_labels=80))
    ours = sum(p.numel() for p in model.parameters())
    dim = backbone_config.hidden_sizes[-1]
    unused_head = dim * 1000 + 1000 + 2 * dim
    published = PUBLISHED_PARAMS[(model_name, head)]
    print(
        f"\nViL-{model_name} {head}: ours {ours / 1e6:.3f}M, published {published / 1e6:.2f}M less unused head "
        f"{unused_head / 1e6:.3f}M = {(published - unused_head) / 1e6:.3f}M"
    )
    assert abs(ours - (published - unused_head)) < 0.1e6


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_training_step_gives_finite_losses_and_reaches_the_backbone(kind):
    model = tiny_detector(kind).train()
    pixel_values, labels = synthetic_batch(with_masks=kind == "mask_rcnn")
    outputs = model(pixel_values, labels=labels)
    expected = (
        {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
        if kind == "mask_rcnn"
        else {"loss_cls", "loss_box_reg"}
    )
    assert set(outputs.loss_dict) == expected
    assert all(torch.isfinite(v) and v > 0 for v in outputs.loss_dict.values())
    torch.testing.assert_close(outputs.loss, sum(outputs.loss_dict.values()))
    assert outputs.pred_boxes is None  # training mode computes losses only
    outputs.loss.backward()
    first_conv = model.backbone.encoder.stages[0].patch_embeddings.projection.weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_a_few_dozen_steps_on_one_image_halve_the_loss(kind):
    model = tiny_detector(kind).train()
    pixel_values, labels = synthetic_batch(num_images=1, with_masks=kind == "mask_rcnn")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(30):
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"\n{kind}: loss {first:.3f} -> {last:.3f}")
    assert last < first / 2


def test_images_without_annotations_train_as_background():
    model = tiny_detector("mask_rcnn").train()
    pixel_values, labels = synthetic_batch()
    labels[1] = {
        "boxes": torch.zeros(0, 4),
        "class_labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 96, 128, dtype=torch.uint8),
    }
    outputs = model(pixel_values, labels=labels)
    assert all(torch.isfinite(v) for v in outputs.loss_dict.values())
    empty = [
        {
            "boxes": torch.zeros(0, 4),
            "class_labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 96, 128),
        }
    ] * 2
    outputs = model(pixel_values, labels=empty)
    assert outputs.loss_dict["loss_box_reg"] == 0 and outputs.loss_dict["loss_mask"] == 0
    assert outputs.loss_dict["loss_rpn_loc"] == 0 and outputs.loss_dict["loss_cls"] > 0
    outputs.loss.backward()
    retina = tiny_detector("retinanet").train()
    outputs = retina(pixel_values, labels=[{k: v for k, v in t.items() if k != "masks"} for t in empty])
    assert outputs.loss_dict["loss_box_reg"] == 0 and torch.isfinite(outputs.loss_dict["loss_cls"])


def test_degenerate_and_outside_boxes_are_clipped_or_dropped():
    model = tiny_detector("mask_rcnn")
    size = torch.tensor([[96, 128]])
    target = {
        "boxes": torch.tensor([[10.0, 10.0, 10.0, 40.0], [-20.0, -5.0, 30.0, 200.0], [200.0, 10.0, 300.0, 50.0]]),
        "class_labels": torch.tensor([0, 1, 2]),
        "masks": torch.zeros(3, 96, 128),
    }
    prepared = model._prepare_targets([target], size, needs_masks=True)[0]
    # zero width: dropped; partly outside: clipped; wholly outside: empty after clipping, dropped
    torch.testing.assert_close(prepared["boxes"], torch.tensor([[0.0, 0.0, 30.0, 96.0]]))
    assert prepared["class_labels"].tolist() == [1] and prepared["masks"].shape == (1, 96, 128)


@pytest.mark.parametrize(
    "labels, message",
    [
        ([{"boxes": torch.zeros(1, 4)}], "class_labels"),
        ([{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "class_labels": torch.tensor([3])}], "outside 0..2"),
        ([{"boxes": torch.tensor([[0.0, 0, 5]]), "class_labels": torch.tensor([0])}], r"\(N, 4\)"),
        ([{"boxes": torch.tensor([[0.0, 0, float("nan"), 5]]), "class_labels": torch.tensor([0])}], "non-finite"),
        ([], "1 images"),
    ],
)
def test_bad_targets_fail_clearly(labels, message):
    model = tiny_detector("retinanet").train()
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(1, 3, 64, 64), labels=labels)


def test_empty_batch_and_missing_labels_fail_clearly():
    model = tiny_detector("mask_rcnn").eval()
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.zeros(0, 3, 64, 64))
    with pytest.raises(ValueError, match=r"pixel_mask marks no pixel of image\(s\) \[1\]"):
        model(torch.zeros(2, 3, 64, 64), pixel_mask=torch.ones(2, 64, 64).index_fill_(0, torch.tensor([1]), 0))
    with pytest.raises(ValueError, match="needs `labels` in training mode"):
        model.train()(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="masks"):
        model(torch.zeros(1, 3, 64, 64), labels=[{"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0)}])


# --------------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_eval_outputs_are_clipped_sorted_detections(kind):
    # An untrained RetinaNet scores every anchor near its prior 0.01, below the default threshold 0.05.
    threshold = {"box_score_threshold": 0.0} if kind == "mask_rcnn" else {"score_threshold": 0.0}
    model = tiny_detector(kind, **threshold).eval()
    pixel_values, _ = synthetic_batch(size=(90, 120))  # not a multiple of 32: padded inside
    pixel_mask = torch.ones(2, 90, 120, dtype=torch.int64)
    pixel_mask[1, 70:] = 0  # the second image is only 70 rows tall
    with torch.no_grad():
        outputs = model(pixel_values, pixel_mask=pixel_mask)
    assert outputs.image_sizes.tolist() == [[90, 120], [70, 120]]
    for boxes, scores, labels, (height, width) in zip(
        outputs.pred_boxes, outputs.scores, outputs.labels, outputs.image_sizes.tolist()
    ):
        assert len(boxes) > 0 and len(boxes) <= model.config.detections_per_image
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (scores[:-1] >= scores[1:]).all() and labels.max() < 3
    if kind == "mask_rcnn":
        assert [m.shape[1:] for m in outputs.pred_masks] == [(28, 28)] * 2
        assert all(((m >= 0) & (m <= 1)).all() for m in outputs.pred_masks)
    else:
        assert outputs.pred_masks is None


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_eval_forward_with_gradients_enabled_equals_no_grad(kind):
    """`model.eval()(**inputs)` without torch.no_grad() (the README's snippet) runs and detects the same."""
    threshold = {"box_score_threshold": 0.0} if kind == "mask_rcnn" else {"score_threshold": 0.0}
    model = tiny_detector(kind, **threshold).eval()
    pixel_values, _ = synthetic_batch()
    with torch.no_grad():
        expected = model(pixel_values)
    actual = model(pixel_values)
    assert len(actual.pred_boxes[0]) > 0
    for field in ("pred_boxes", "scores", "labels", "pred_masks"):
        if getattr(expected, field) is not None:
            for a, e in zip(getattr(actual, field), getattr(expected, field)):
                assert torch.equal(a, e), field
    if kind == "mask_rcnn":  # the mask head is differentiable w.r.t. its weights
        sum(m.sum() for m in actual.pred_masks).backward()
        assert model.roi_heads.mask_head.predictor.weight.grad is not None


@pytest.mark.parametrize(
    "backbone_config",
    [
        SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64),
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic"),
        ConvNextConfig(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1]),
    ],
    ids=["swin", "resnet", "convnext"],
)
@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_other_transformers_backbones_train_and_detect(kind, backbone_config):
    model = tiny_detector(kind, backbone_config=backbone_config).train()
    pixel_values, labels = synthetic_batch(num_images=1, with_masks=kind == "mask_rcnn")
    loss = model(pixel_values, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    with torch.no_grad():
        outputs = model.eval()(pixel_values)
    assert len(outputs.pred_boxes) == 1


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_save_and_load_with_auto_classes(kind, tmp_path):
    model = tiny_detector(kind).eval()
    model.save_pretrained(tmp_path)
    DetectionImageProcessorPil().save_pretrained(tmp_path)
    loaded = AutoModelForObjectDetection.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    pixel_values, _ = synthetic_batch(num_images=1)
    with torch.no_grad():
        expected, actual = model(pixel_values), loaded(pixel_values)
    torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes)
    torch.testing.assert_close(actual.scores, expected.scores)


def test_checkpoint_with_another_class_count_fails_clearly(tmp_path):
    tiny_detector("mask_rcnn", num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="(?i)size mismatch|ignore_mismatched_sizes"):
        MaskRCNNForObjectDetection.from_pretrained(tmp_path, num_labels=5)
    # The documented way to fine-tune on other classes: fresh predictors, the rest loaded.
    model = MaskRCNNForObjectDetection.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert model.roi_heads.box_predictor.cls_score.out_features == 6


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_output_hidden_states_and_return_dict_default_to_the_config(kind):
    model = tiny_detector(kind).eval()
    pixel_values, _ = synthetic_batch(num_images=1)
    with torch.no_grad():
        assert model(pixel_values).feature_maps is None
        model.config.output_hidden_states = True
        outputs = model(pixel_values)
        assert len(outputs.feature_maps) == model.config.num_fpn_levels
        assert (outputs.proposals is not None) == (kind == "mask_rcnn")
        assert model(pixel_values, output_hidden_states=False).feature_maps is None  # the keyword wins
        model.config.return_dict = False
        assert isinstance(model(pixel_values), tuple)


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_unknown_forward_arguments_fail_clearly(kind):
    model = tiny_detector(kind).eval()
    pixel_values = torch.zeros(1, 3, 64, 64)
    with pytest.raises(TypeError, match=r"'pixel_maks'.*did you mean 'pixel_mask'.*accepts pixel_values, pixel_mask"):
        model(pixel_values, pixel_maks=torch.ones(1, 64, 64))
    with pytest.raises(ValueError, match="no attention maps"):
        model(pixel_values, output_attentions=True)
    # What transformers' Trainer and pipelines may pass is accepted.
    with torch.no_grad():
        model(pixel_values, pixel_mask=torch.ones(1, 64, 64), output_attentions=False, num_items_in_batch=4)
    assert model.accepts_loss_kwargs is False  # Trainer then divides by the accumulation steps itself


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_base_model_is_the_detector_and_folders_of_the_former_prefix_load(kind, tmp_path, monkeypatch):
    model = tiny_detector(kind)
    assert model.base_model is model
    assert all(name.split(".")[0] != model.base_model_prefix for name, _ in model.named_modules())
    # A folder saved before the prefix changed (it was "detector", RetinaNet's head attribute) loads unchanged.
    monkeypatch.setattr(type(model), "base_model_prefix", "detector")
    model.save_pretrained(tmp_path)
    monkeypatch.undo()
    loaded = AutoModelForObjectDetection.from_pretrained(tmp_path)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[name], loaded_state[name]) for name in state)


@pytest.fixture
def transformers_errors():
    """Records what transformers logs at ERROR level (its logger does not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler(level=logging.ERROR)
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    yield records
    transformers_logger.removeHandler(handler)


def saved_detector(kind, folder):
    overrides = {"box_score_threshold": 0.0} if kind == "mask_rcnn" else {"score_threshold": 0.0}
    model = tiny_detector(kind, **overrides).eval()
    model.config.id2label = {0: "square", 1: "circle", 2: "triangle"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(folder)
    processor = DetectionImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96})
    processor.save_pretrained(folder)
    return model, processor


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_object_detection_pipeline_runs_our_detector_without_errors(kind, tmp_path, transformers_errors):
    model, processor = saved_detector(kind, tmp_path)
    image = Image.new("RGB", (120, 80), (30, 30, 30))
    for detector in (
        pipeline("object-detection", model=model, image_processor=processor),
        pipeline("object-detection", model=str(tmp_path)),
    ):
        results = detector(image, threshold=0.0)
        assert results and {"score", "label", "box"} <= set(results[0])
        assert results[0]["label"] in {"square", "circle", "triangle"}
        assert 0 <= results[0]["box"]["xmin"] <= results[0]["box"]["xmax"] <= 120
        assert 0 <= results[0]["box"]["ymin"] <= results[0]["box"]["ymax"] <= 80
    assert [record.getMessage()[:200] for record in transformers_errors] == []


def test_image_segmentation_pipeline_loads_a_mask_rcnn_folder(tmp_path, transformers_errors):
    saved_detector("mask_rcnn", tmp_path)
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    assert isinstance(segmenter.model, MaskRCNNForObjectDetection)
    results = segmenter(Image.new("RGB", (120, 80), (30, 30, 30)), threshold=0.0)
    assert results and all({"score", "label", "mask"} == set(result) for result in results)
    assert all(result["label"] in {"square", "circle", "triangle"} for result in results)
    assert all(0 <= result["score"] <= 1 for result in results)
    masks = [np.asarray(result["mask"]) for result in results]
    assert all(mask.shape == (80, 120) and set(np.unique(mask)) <= {0, 255} for mask in masks)
    assert any(mask.any() for mask in masks)
    assert [record.getMessage()[:200] for record in transformers_errors] == []
    # The table entries that silence the pipelines' check leave transformers' own Auto mappings working.
    from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING

    assert MODEL_FOR_OBJECT_DETECTION_MAPPING[RetinaNetConfig] is RetinaNetForObjectDetection
    assert RetinaNetConfig in MODEL_FOR_OBJECT_DETECTION_MAPPING.keys()
    assert ConvNextConfig not in MODEL_FOR_OBJECT_DETECTION_MAPPING


def test_registered_with_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForInstanceSegmentation

    config = AutoConfig.for_model("vil-mask-rcnn", backbone_config={"model_type": "vil", "arch": TINY_ARCH})
    assert isinstance(config, MaskRCNNConfig) and isinstance(config.backbone_config, ViLConfig)
    assert AutoModelForInstanceSegmentation.from_config(config).__class__ is MaskRCNNForObjectDetection
    assert vil_hf.RetinaNetConfig().backbone_config.out_features == ["stage2", "stage3", "stage4"]
    config.save_pretrained(tmp_path)
    DetectionImageProcessorPil().save_pretrained(tmp_path)
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), DetectionImageProcessorPil)


@pytest.mark.parametrize("kind", sorted(DETECTORS))
def test_a_detector_trains_after_a_first_call_under_inference_mode(kind):
    """Nothing that a first call under ``torch.inference_mode()`` caches (the backbone kernels' geometry and
    workspaces) stays an inference tensor: a training step on the same sizes follows, as after a validation pass run
    that way. A size no other test uses."""
    model = tiny_detector(kind).eval()
    pixel_values, labels = synthetic_batch(size=(104, 136), with_masks=kind == "mask_rcnn")
    with torch.inference_mode():
        model(pixel_values=pixel_values)
    loss = model.train()(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
