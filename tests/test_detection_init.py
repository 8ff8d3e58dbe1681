"""The detectors' initialisation follows the published recipe (detectron2's), for a fresh model and for every head
that `from_pretrained` has to create, and leaves the backbone to its own initialisation."""

import math

import pytest
import torch
from transformers import AutoModelForObjectDetection, ResNetConfig

from vil_hf import ViLConfig

from .test_detection_models import TINY_ARCH, synthetic_batch, tiny_detector

RESNET = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic")
BACKBONES = {"vil": lambda: ViLConfig(arch=TINY_ARCH, image_size=128), "resnet": lambda: RESNET}


def fan_in(weight: torch.Tensor) -> int:
    return weight.shape[1] * weight[0, 0].numel()


def fan_out(weight: torch.Tensor) -> int:
    return weight.shape[0] * weight[0, 0].numel()


def recipe(model) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Every head parameter by the scheme detectron2 gives it: (name, tensor) pairs per scheme."""
    schemes = {"xavier": [], "normal_0.01": [], "normal_0.001": [], "msra": [], "zero": [], "prior": []}

    def add(prefix, layer, scheme, bias="zero"):
        schemes[scheme].append((f"{prefix}.weight", layer.weight))
        schemes[bias].append((f"{prefix}.bias", layer.bias))

    for i, conv in enumerate([*model.fpn.lateral_convs, *model.fpn.output_convs]):
        add(f"fpn.conv{i}", conv, "xavier")
    if hasattr(model, "rpn"):
        head = model.rpn.head
        for name in ("conv", "objectness_logits", "anchor_deltas"):
            add(f"rpn.head.{name}", getattr(head, name), "normal_0.01")
        roi = model.roi_heads
        for i, fc in enumerate(roi.box_head.fcs):
            add(f"box_head.fcs.{i}", fc, "xavier")
        add("box_predictor.cls_score", roi.box_predictor.cls_score, "normal_0.01")
        add("box_predictor.bbox_pred", roi.box_predictor.bbox_pred, "normal_0.001")
        for i, conv in enumerate([*roi.mask_head.convs, roi.mask_head.deconv]):
            add(f"mask_head.conv{i}", conv, "msra")
        add("mask_head.predictor", roi.mask_head.predictor, "normal_0.001")
    else:
        add("fpn.top_block.p6", model.fpn.top_block.p6, "xavier")
        add("fpn.top_block.p7", model.fpn.top_block.p7, "xavier")
        head = model.detector.head
        for i, conv in enumerate([*head.cls_convs, *head.bbox_convs, head.bbox_pred]):
            add(f"head.conv{i}", conv, "normal_0.01")  # RetinaNetConfig.initializer_range
        add("head.cls_score", head.cls_score, "normal_0.01", bias="prior")
    return schemes


def assert_follows_recipe(model, only: set[str] | None = None):
    """Checks the head tensors (those named in `only`, or all) against their scheme: exact constants, bounds, and
    the standard deviation of each scheme's pooled, standardised values within 4 standard errors of 1."""
    prior = (
        -math.log((1 - model.config.prior_probability) / model.config.prior_probability)
        if hasattr(model.config, "prior_probability")
        else None
    )
    for scheme, tensors in recipe(model).items():
        tensors = [(name, t.detach()) for name, t in tensors if only is None or name in only]
        if not tensors:
            continue
        for name, tensor in tensors:
            assert torch.isfinite(tensor).all(), name
        if scheme == "zero":
            for name, tensor in tensors:
                assert torch.equal(tensor, torch.zeros_like(tensor)), f"{name} should be zeros"
            continue
        if scheme == "prior":
            for name, tensor in tensors:
                assert torch.equal(tensor, torch.full_like(tensor, prior)), f"{name} should be {prior}"
            continue
        # Standardise each tensor by the std its scheme gives it, pool, and compare with 1.
        standardised = []
        for name, tensor in tensors:
            if scheme == "xavier":  # kaiming-uniform with a=1: U(-b, b), b = sqrt(3 / fan_in)
                bound = math.sqrt(3 / fan_in(tensor))
                assert tensor.abs().max() <= bound, name
                std = bound / math.sqrt(3)
            elif scheme == "msra":  # kaiming-normal, fan_out, ReLU gain
                # ConvTranspose2d weights are (in, out, k, k): torch's fan_out is then dim 0 x kernel
                std = math.sqrt(2 / fan_out(tensor))
            else:
                std = float(scheme.split("_")[1])
            assert abs(tensor.mean()) < 5 * std / math.sqrt(tensor.numel()), f"{name} is not centred"
            standardised.append(tensor.flatten() / std)
        pooled = torch.cat(standardised)
        # The sample std of n values has a relative standard error of about 1/sqrt(2n) (normal; less for uniform).
        tolerance = 4 / math.sqrt(2 * pooled.numel())
        assert tolerance < 0.15, f"{scheme}: too few values ({pooled.numel()}) to test"
        assert abs(pooled.std().item() - 1) < tolerance, f"{scheme}: std ratio {pooled.std().item():.3f}"


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_fresh_detector_follows_the_recipe(kind, backbone):
    model = tiny_detector(kind, backbone_config=BACKBONES[backbone]())
    assert_follows_recipe(model)
    if kind == "retinanet":
        torch.testing.assert_close(model.detector.head.cls_score.bias, torch.full((27,), -4.59512), rtol=0, atol=1e-5)


def test_fresh_vil_backbone_keeps_its_own_initialisation():
    model = tiny_detector("mask_rcnn")
    linears = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert linears and norms
    # ViL's init: Linear trunc-normal std .02 with zero bias (torch's default bias is uniform, never all zero).
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert abs(weights.std().item() - 0.02) < 0.002
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in norms)


def test_fresh_resnet_backbone_keeps_its_own_initialisation():
    model = tiny_detector("retinanet", backbone_config=RESNET)
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    # ResNet's init: kaiming-normal, fan_out, ReLU (torch's default is uniform with std 1/sqrt(3 fan_in)).
    standardised = torch.cat([m.weight.detach().flatten() / math.sqrt(2 / fan_out(m.weight)) for m in convs])
    assert abs(standardised.std().item() - 1) < 0.05


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_heads_created_by_from_pretrained_follow_the_recipe_and_train(kind, backbone, tmp_path):
    saved = tiny_detector(kind, backbone_config=BACKBONES[backbone]())
    saved.save_pretrained(tmp_path)
    model = AutoModelForObjectDetection.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert model.config.num_labels == 5
    saved_state, state = saved.state_dict(), model.state_dict()
    recreated = {name for name in state if saved_state[name].shape != state[name].shape}
    expected = (
        {
            f"roi_heads.{p}.{t}"
            for p in ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_head.predictor")
            for t in ("weight", "bias")
        }
        if kind == "mask_rcnn"
        else {"detector.head.cls_score.weight", "detector.head.cls_score.bias"}
    )
    assert recreated == expected
    for name, tensor in state.items():
        assert torch.isfinite(tensor).all(), name
        if name not in recreated:
            assert torch.equal(tensor, saved_state[name]), f"{name} was not loaded"
    short_names = {
        "roi_heads.box_predictor.cls_score": "box_predictor.cls_score",
        "roi_heads.box_predictor.bbox_pred": "box_predictor.bbox_pred",
        "roi_heads.mask_head.predictor": "mask_head.predictor",
        "detector.head.cls_score": "head.cls_score",
    }
    only = {short_names[name.rsplit(".", 1)[0]] + "." + name.rsplit(".", 1)[1] for name in recreated}
    assert_follows_recipe(model, only=only)

    # The first training step is sane: a uniform classifier over 5 classes + background, finite losses.
    pixel_values, labels = synthetic_batch(with_masks=kind == "mask_rcnn")
    for target in labels:
        target["class_labels"] = torch.tensor([0, 4])
    losses = model.train()(pixel_values, labels=labels).loss_dict
    assert all(torch.isfinite(loss) for loss in losses.values()), losses
    if kind == "mask_rcnn":
        assert abs(losses["loss_cls"].item() - math.log(6)) < 0.15, losses
    else:
        # At the prior, the focal loss of a positive anchor is 0.25 * 0.99^2 * -log(0.01) = 1.13 and negatives add
        # ~1e-6 each; the sum is normalised by ~90 + 0.1 x positives (the running normaliser starts at 100), so the
        # loss stays near 1.13 x positives / 100 (about 1 here); garbage weights give 1e5 and more.
        assert 0 < losses["loss_cls"].item() < 3.0, losses


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_every_head_missing_from_a_folder_follows_the_recipe(kind, tmp_path):
    """A folder with the backbone's weights only (as from a classification checkpoint): from_pretrained creates
    every head and FPN layer, and none keeps uninitialised memory or torch's defaults."""
    from safetensors.torch import load_file, save_file

    saved = tiny_detector(kind)
    saved.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k.startswith("backbone.")}, tmp_path / "model.safetensors")
    model = AutoModelForObjectDetection.from_pretrained(tmp_path)
    state, saved_state = model.state_dict(), saved.state_dict()
    assert all(torch.equal(state[k], saved_state[k]) for k in state if k.startswith("backbone."))
    assert_follows_recipe(model)
    anchors = model.rpn.anchor_generator if kind == "mask_rcnn" else model.detector.anchor_generator
    for level in range(len(anchors.sizes)):  # non-persistent buffers are rebuilt too
        assert torch.equal(getattr(anchors, f"cell_anchors_{level}"), anchors.cell_anchors(level))


def test_simple_feature_pyramid_missing_from_a_folder_is_initialised(tmp_path):
    """A plain backbone's simple feature pyramid that from_pretrained has to create gets PyTorch's defaults for its
    deconvolutions (as ViTDet) and identity norms, never uninitialised memory."""
    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Config

    from .test_backbones import TINY_DINOV2

    saved = tiny_detector("mask_rcnn", backbone_config=Dinov2Config(**TINY_DINOV2))
    saved.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("simple_feature_pyramid.")},
        tmp_path / "model.safetensors",
    )
    model = AutoModelForObjectDetection.from_pretrained(tmp_path)
    for name, created in model.simple_feature_pyramid.named_parameters():
        assert torch.isfinite(created).all(), name
        if name.startswith("branches.0.1."):  # the LayerNorm between the deconvolutions
            expected = torch.ones_like(created) if name.endswith("weight") else torch.zeros_like(created)
            assert torch.equal(created, expected), name
        else:  # a deconvolution: PyTorch's default, uniform within 1/sqrt(fan-in) for weight and bias alike
            deconvolution = model.simple_feature_pyramid.get_submodule(name.rsplit(".", 1)[0])
            bound = 1 / math.sqrt(deconvolution.weight[0].numel())
            assert 0.5 * bound < created.abs().max().item() <= bound, name


def assert_pytorch_defaults(model):
    """Every FPN, RPN and RoI-head layer at PyTorch's own reset_parameters: weights and biases U(-b, b) with
    b = 1 / sqrt(fan_in) (kaiming-uniform with a=sqrt(5) gives that bound), so std b / sqrt(3) when pooled."""
    layers = [
        layer
        for part in (model.fpn, model.rpn.head, model.roi_heads.box_head, model.roi_heads.box_predictor)
        for layer in part.modules()
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    layers += [
        m for m in model.roi_heads.mask_head.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ]
    assert len(layers) >= 12
    standardised = []
    for layer in layers:
        bound = 1 / math.sqrt(layer.weight[0].numel())  # also ConvTranspose2d's: weight (in, out, k, k)
        for tensor in (layer.weight.detach(), layer.bias.detach()):
            assert tensor.abs().max() <= bound
            standardised.append(tensor.flatten() / (bound / math.sqrt(3)))
    pooled = torch.cat(standardised)
    assert abs(pooled.std().item() - 1) < 4 / math.sqrt(2 * pooled.numel())
    # Not the recipe's: its biases are zero and its predictors far narrower.
    assert model.roi_heads.box_predictor.cls_score.bias.abs().min() > 0


def test_pytorch_head_initialisation_for_fresh_and_recreated_heads(tmp_path):
    model = tiny_detector("mask_rcnn", head_initialization="pytorch")
    assert_pytorch_defaults(model)
    # The backbone keeps its own (ViL's zero biases), whatever the heads take.
    assert all(not m.bias.any() for m in model.backbone.modules() if isinstance(m, torch.nn.Linear))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForObjectDetection.from_pretrained(tmp_path)
    assert reloaded.config.head_initialization == "pytorch"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    # Heads that from_pretrained creates (a new class count) take it too; the loaded ones stay as saved.
    recreated = AutoModelForObjectDetection.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert_pytorch_defaults(recreated)
    assert torch.equal(recreated.roi_heads.box_head.fcs[0].weight, model.roi_heads.box_head.fcs[0].weight)


def test_unknown_head_initialisation_is_refused():
    with pytest.raises(
        ValueError, match="head_initialization='kaiming' is not known; choose one of 'detectron2', 'pytorch'"
    ):
        tiny_detector("mask_rcnn", head_initialization="kaiming")
