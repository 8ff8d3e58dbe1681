"""Any transformers backbone in the detectors: its class, stages, pretrained weights, frozen BatchNorm and stages."""

import copy

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForObjectDetection,
    ConvNextConfig,
    ConvNextForImageClassification,
    Dinov2Config,
    ResNetConfig,
    ResNetForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    VitDetConfig,
)

from vil_hf import ViLConfig
from vil_hf.backbones import (
    FrozenBatchNorm2d,
    backbone_class,
    freeze_batch_norm,
    freeze_stages,
    load_pretrained_backbone,
    plain_patch_size,
    stem_and_stages,
)
from vil_hf.training.config import OptimSection
from vil_hf.training.optim import build_optimizer

from .test_detection_models import TINY_ARCH, synthetic_batch, tiny_detector

TINY_SWIN = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64)
TINY_RESNET = dict(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic")
TINY_CONVNEXT = dict(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1])
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=56)
TINY_VITDET = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=64,
                   pretrain_image_size=64)  # fmt: skip
CLASSIFIERS = {
    "swin": (SwinConfig, SwinForImageClassification, TINY_SWIN),
    "resnet": (ResNetConfig, ResNetForImageClassification, TINY_RESNET),
    "convnext": (ConvNextConfig, ConvNextForImageClassification, TINY_CONVNEXT),
}


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every tensor, BatchNorm statistics included, away from its initial value (a wrong mapping shows)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=generator) * 0.5
                tensor.copy_(noise + 0.75 if name.endswith("running_var") else tensor + noise - 0.25)
    return model


def saved_classifier(kind: str, folder, **config) -> nn.Module:
    config_class, model_class, tiny = CLASSIFIERS[kind]
    torch.manual_seed(1)
    classifier = randomised(model_class(config_class(**{**tiny, **config}, num_labels=7)).eval())
    classifier.save_pretrained(folder)
    return classifier


def matching_tensors(source: nn.Module, target: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Tensors of `target` (a backbone) and `source` (a classifier) whose names agree once the model prefix is
    taken off (`resnet.encoder...` vs `encoder...`; `swin.` is kept by both)."""
    pairs = {}
    source_state = source.state_dict()
    for name, tensor in target.state_dict().items():
        candidates = [key for key in source_state if key == name or key.split(".", 1)[-1] == name]
        if candidates:
            pairs[name] = (source_state[candidates[0]], tensor)
    return pairs


# -- the backbone's class and kind --------------------------------------------------------------


def test_backbone_class_and_plain_patch_size():
    assert backbone_class(SwinConfig()).__name__ == "SwinBackbone"
    assert backbone_class(ViLConfig(arch=TINY_ARCH)).__name__ == "ViLBackbone"
    from transformers import ViTConfig

    with pytest.raises(ValueError, match="'vit' has no backbone class.*dinov2.*vitdet"):
        backbone_class(ViTConfig())
    assert plain_patch_size(Dinov2Config(**TINY_DINOV2)) == 14
    assert plain_patch_size(VitDetConfig(**TINY_VITDET)) == 16
    for hierarchical in (SwinConfig(**TINY_SWIN), ResNetConfig(**TINY_RESNET), ConvNextConfig(**TINY_CONVNEXT),
                         ViLConfig(arch=TINY_ARCH)):  # fmt: skip
        assert plain_patch_size(hierarchical) is None, type(hierarchical).__name__


# -- pretrained weights -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["swin", "resnet", "convnext"])
def test_a_classifier_folder_goes_into_the_detector_backbone(kind, tmp_path, caplog):
    classifier = saved_classifier(kind, tmp_path / kind)
    config_class, _, tiny = CLASSIFIERS[kind]
    detector = tiny_detector("mask_rcnn", backbone_config=config_class(**tiny))
    before = copy.deepcopy(detector.state_dict())
    with caplog.at_level("INFO", logger="vil_hf.backbones"):
        report = load_pretrained_backbone(detector.backbone, tmp_path / kind)
    pairs = matching_tensors(classifier, detector.backbone)
    # Every backbone tensor of the classifier arrived; only what a classifier lacks (a backbone's own output
    # norms) kept its initialisation, and the report says so.
    assert len(pairs) == report.loaded > 0
    for name, (expected, actual) in pairs.items():
        assert torch.equal(expected, actual), name
    missing = [name for name in detector.backbone.state_dict() if name not in pairs]
    assert sorted(missing) == sorted(report.missing)
    assert all("hidden_states_norms" in name for name in missing)
    assert report.unexpected and all("classifier" in name or "layernorm" in name for name in report.unexpected)
    assert "loaded" in caplog.text and str(tmp_path / kind) in caplog.text
    # The heads are untouched.
    for name, tensor in detector.state_dict().items():
        if not name.startswith("backbone."):
            assert torch.equal(tensor, before[name]), name


def test_weights_of_another_architecture_are_refused(tmp_path):
    saved_classifier("swin", tmp_path / "swin", embed_dim=24)
    detector = tiny_detector("mask_rcnn", backbone_config=SwinConfig(**TINY_SWIN))
    with pytest.raises(Exception, match="(?i)size mismatch|mismatched|shape"):
        load_pretrained_backbone(detector.backbone, tmp_path / "swin")


# -- frozen BatchNorm and stages ----------------------------------------------------------------


def test_frozen_batch_norm_computes_eval_batch_norm_and_keeps_its_names():
    torch.manual_seed(0)
    batch_norm = randomised(nn.BatchNorm2d(6)).eval()
    frozen = FrozenBatchNorm2d.from_batch_norm(batch_norm)
    inputs = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(frozen(inputs), batch_norm(inputs), rtol=1e-5, atol=1e-6)
    assert frozen.state_dict().keys() == batch_norm.state_dict().keys()
    assert not list(frozen.parameters())  # nothing for an optimizer to see
    frozen.train()
    torch.testing.assert_close(frozen(inputs), batch_norm(inputs), rtol=1e-5, atol=1e-6)  # training changes nothing


def test_frozen_batch_norm_never_changes_in_training_and_reloads_as_batch_norm(tmp_path):
    detector = tiny_detector("mask_rcnn", backbone_config=ResNetConfig(**TINY_RESNET))
    randomised(detector.backbone)
    assert (
        freeze_batch_norm(detector.backbone)
        == sum(isinstance(m, FrozenBatchNorm2d) for m in detector.backbone.modules())
        > 3
    )
    assert not any(isinstance(m, nn.BatchNorm2d) for m in detector.backbone.modules())
    frozen_state = {
        name: tensor.clone()
        for module_name, module in detector.backbone.named_modules()
        if isinstance(module, FrozenBatchNorm2d)
        for name, tensor in module.state_dict(prefix=f"{module_name}.").items()
    }
    convolution = detector.backbone.embedder.embedder.convolution.weight.detach().clone()
    optimizer = build_optimizer(detector, OptimSection(optimizer="sgd", lr=0.05, weight_decay=1e-2, momentum=0.9))
    detector.train()
    pixel_values, labels = synthetic_batch(num_images=2)
    for _ in range(3):
        detector(pixel_values, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = detector.backbone.state_dict()
    for name, tensor in frozen_state.items():  # statistics and affine values: bit for bit
        assert torch.equal(state[name], tensor), name
    assert not torch.equal(detector.backbone.embedder.embedder.convolution.weight, convolution)  # the rest trained
    # The saved folder is a plain transformers detector: BatchNorm in eval computes what the frozen one did.
    detector.eval().save_pretrained(tmp_path)
    reloaded = AutoModelForObjectDetection.from_pretrained(tmp_path).eval()
    assert any(isinstance(m, nn.BatchNorm2d) for m in reloaded.backbone.modules())
    with torch.no_grad():
        # Two computations of one function (BatchNorm's fused kernel, the frozen one's scale and shift): equal up to
        # float rounding, which grows through the trained stages (2e-5 seen on maps of magnitude ~1).
        torch.testing.assert_close(
            reloaded.backbone(pixel_values).feature_maps,
            detector.backbone(pixel_values).feature_maps,
            rtol=1e-4,
            atol=1e-4,
        )


@pytest.mark.parametrize(
    "backbone_config, stem_name",
    [
        (ResNetConfig(**TINY_RESNET), "embedder"),
        (SwinConfig(**TINY_SWIN), "swin.embeddings"),
        (ConvNextConfig(**TINY_CONVNEXT), "embeddings"),
        (Dinov2Config(**TINY_DINOV2), "embeddings"),
        (VitDetConfig(**TINY_VITDET), "embeddings"),
        (ViLConfig(arch=TINY_ARCH, image_size=128), "encoder.stages.0.patch_embeddings"),
    ],
    ids=["resnet", "swin", "convnext", "dinov2", "vitdet", "vil"],
)
def test_stem_and_stages_of_each_backbone(backbone_config, stem_name):
    backbone = backbone_class(backbone_config)(backbone_config)
    stem, stages = stem_and_stages(backbone)
    assert stem is backbone.get_submodule(stem_name)
    assert len(stages) == len(backbone.stage_names) - 1


def test_freeze_at_freezes_the_stem_and_first_stages_only():
    detector = tiny_detector("mask_rcnn", backbone_config=ResNetConfig(**TINY_RESNET))
    backbone = detector.backbone
    frozen = freeze_stages(backbone, 2)  # detectron2's FREEZE_AT=2: stem and res2
    assert frozen == [backbone.embedder, backbone.encoder.stages[0]]
    for name, parameter in backbone.named_parameters():
        assert parameter.requires_grad == (not name.startswith(("embedder.", "encoder.stages.0."))), name
    # Their BatchNorm is frozen too (as detectron2 converts it), the later stages' is not.
    assert isinstance(backbone.embedder.embedder.normalization, FrozenBatchNorm2d)
    assert isinstance(backbone.encoder.stages[1].layers[0].layer[0].normalization, nn.BatchNorm2d)
    before = copy.deepcopy(backbone.state_dict())
    optimizer = build_optimizer(detector, OptimSection(optimizer="sgd", lr=0.05, momentum=0.9))
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == sum(
        p.numel() for p in detector.parameters() if p.requires_grad
    )
    pixel_values, labels = synthetic_batch(num_images=2)
    detector.train()(pixel_values, labels=labels).loss.backward()
    optimizer.step()
    after = backbone.state_dict()
    for name, tensor in before.items():
        unchanged = torch.equal(after[name], tensor)
        if name.startswith(("embedder.", "encoder.stages.0.")):
            assert unchanged, name
    assert not torch.equal(after["encoder.stages.3.layers.0.layer.0.convolution.weight"],
                           before["encoder.stages.3.layers.0.layer.0.convolution.weight"])  # fmt: skip
    with pytest.raises(ValueError, match="freeze_at can be 0 .* to 5"):
        freeze_stages(backbone, 6)


def test_sgd_and_adamw_optimizers():
    detector = tiny_detector("retinanet")
    sgd = build_optimizer(detector, OptimSection(optimizer="sgd", lr=0.02, momentum=0.8, weight_decay=1e-4))
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0]
    assert all(g["momentum"] == 0.8 and g["nesterov"] is False for g in sgd.param_groups)
    adamw = build_optimizer(detector, OptimSection(betas=[0.8, 0.99]))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.99)
