"""Models and image processors built from a training config, and weights to start from."""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from ..backbones import backbone_class, freeze_batch_norm, freeze_stages, load_pretrained_backbone, stem_and_stages
from ..configuration_vil import ViLConfig, published_arch
from ..detection import (
    DetectionImageProcessorPil,
    MaskRCNNConfig,
    MaskRCNNForObjectDetection,
    RetinaNetConfig,
    RetinaNetForObjectDetection,
)
from ..image_processing_vil import ViLImageProcessorPil
from ..modeling_vil import ViLForImageClassification
from .config import ConfigError, ModelSection, TrainConfig

logger = logging.getLogger(__name__)

DETECTORS = {
    "mask_rcnn": (MaskRCNNConfig, MaskRCNNForObjectDetection),
    "retinanet": (RetinaNetConfig, RetinaNetForObjectDetection),
}


def backbone_config(model: ModelSection, **kwargs) -> PretrainedConfig:
    """The backbone's transformers config: a ViL from `model.backbone`/`model.arch` and the ViL settings, or any
    backbone from `model.backbone_config` / `model.backbone_from` (see `any_backbone_config`)."""
    if not model.uses_vil_settings():
        return any_backbone_config(model)
    arch = model.arch
    if arch is None:
        try:
            arch = published_arch(model.backbone, sparse=model.sparse)
        except ValueError as err:
            raise ConfigError(f"model.backbone: {err}") from None
    try:
        return ViLConfig(
            arch=arch,
            attention_type=model.attention_type,
            average_pool=model.average_pool,
            image_size=model.image_size,
            drop_path_rate=model.drop_path_rate,
            **kwargs,
        )
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


# Backbone settings the training config gives elsewhere; in model.backbone_config they would be overwritten.
_SET_ELSEWHERE = {
    "out_features": "the detector chooses the stages: set model.detector.backbone_features",
    "out_indices": "the detector chooses the stages: set model.detector.backbone_features",
    "drop_path_rate": "set model.drop_path_rate, which applies to every backbone",
}
# Fields of a classifier's or base model's config that say nothing about the backbone.
_NOT_BACKBONE_FIELDS = ("id2label", "label2id", "architectures", "_name_or_path", "transformers_version")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively, so that YAML values and config attributes compare equal."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def source_config(source: str) -> PretrainedConfig:
    """The config of `model.backbone_from`: a local transformers folder, or a Hub id (cached or reachable).

    A Hub id that cannot be reached (offline, no network) fails here, before any data work, saying how to get a
    local copy.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.backbone_from={path} has no config.json: give a folder written by save_pretrained "
                "(a transformers classification model, base model or backbone)"
            )
        if not any((path / name).is_file() for name in _WEIGHT_FILES):
            raise ConfigError(f"model.backbone_from={path} holds no weights ({' or '.join(_WEIGHT_FILES[:3])})")
        try:
            return AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"model.backbone_from={path}: transformers cannot read its config.json ({err})") from None
    if path.exists():
        raise ConfigError(f"model.backbone_from={source} is a file; give a transformers folder or a Hub model id")
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise ConfigError(
            f"model.backbone_from={source!r} is neither a local folder nor a Hub model id (such as "
            "microsoft/swin-tiny-patch4-window7-224)"
        ) from None
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else str(err).splitlines()[0]
        raise ConfigError(
            f"model.backbone_from={source!r} is not a local folder, and the Hub cannot give it: {why}. Where there "
            f"is a network, download it (`hf download {source} --local-dir DIR`) and set model.backbone_from=DIR"
        ) from None


def _config_of_source(source: PretrainedConfig) -> PretrainedConfig:
    """A copy of a classifier's / base model's / backbone's config as a backbone config (no labels)."""
    settings = {k: v for k, v in source.to_dict().items() if k not in _NOT_BACKBONE_FIELDS}
    return type(source).from_dict(settings)


def any_backbone_config(model: ModelSection) -> PretrainedConfig:
    """The backbone config of `model.backbone_config` (a mapping with `model_type` and the config's fields) and/or
    `model.backbone_from` (whose config.json gives the architecture when `model.backbone_config` is null, and must
    agree with it otherwise); `model.drop_path_rate` is the backbone's drop path."""
    settings = dict(model.backbone_config or {})
    for name, where in _SET_ELSEWHERE.items():
        if name in settings:
            raise ConfigError(f"model.backbone_config.{name}: {where}")
    model_type = settings.pop("model_type", None)
    if model.backbone_from is not None:
        source = source_config(model.backbone_from)
        if model_type is not None and model_type != source.model_type:
            raise ConfigError(
                f"model.backbone_from={model.backbone_from} holds a {source.model_type} model but "
                f"model.backbone_config says model_type {model_type!r}"
            )
        differing = [
            f"{name}: {getattr(source, name, None)!r} in the folder vs {value!r} in model.backbone_config"
            for name, value in settings.items()
            if _plain(getattr(source, name, None)) != _plain(value)
        ]
        if differing:
            raise ConfigError(
                f"model.backbone_from={model.backbone_from} is another architecture than model.backbone_config ("
                + "; ".join(differing)
                + "). Set model.backbone_config=null to train the folder's architecture with this recipe, or give a "
                "folder of the configured architecture"
            )
        config = _config_of_source(source)
    else:
        try:
            default = AutoConfig.for_model(model_type)
        except ValueError:
            raise ConfigError(
                f"model.backbone_config: model_type {model_type!r} is not a transformers model type (e.g. swin, "
                "convnext, convnextv2, resnet, dinov2, vitdet, vil)"
            ) from None
        for name in settings:
            if not hasattr(default, name):
                close = difflib.get_close_matches(name, [k for k in default.to_dict() if not k.startswith("_")], n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(f"model.backbone_config.{name} is not a field of {type(default).__name__}{hint}")
        try:
            config = AutoConfig.for_model(model_type, **settings)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.backbone_config: {err}") from None
    try:
        backbone_class(config)
    except ValueError as err:
        raise ConfigError(f"model.backbone_config: {err}") from None
    if hasattr(config, "drop_path_rate"):
        config.drop_path_rate = model.drop_path_rate
    elif model.drop_path_rate:
        raise ConfigError(
            f"model.drop_path_rate={model.drop_path_rate}: a {config.model_type} backbone has no drop path; set "
            "model.drop_path_rate=0"
        )
    return config


def model_config(config: TrainConfig, id2label: dict[int, str]) -> PretrainedConfig:
    """The transformers config of the model `config` describes, for these labels."""
    labels = {"id2label": dict(id2label), "label2id": {name: i for i, name in id2label.items()}}
    if config.task == "classification":
        return backbone_config(config.model, **labels)
    config_class, _ = DETECTORS[config.model.head]
    accepted = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs", "backbone_config"}
    unknown = sorted(set(config.model.detector) - accepted)
    if unknown:
        raise ConfigError(
            f"model.detector: {unknown} are not {config_class.__name__} arguments; known: {', '.join(sorted(accepted))}"
        )
    backbone = backbone_config(config.model)
    try:
        return config_class(backbone_config=backbone, **labels, **config.model.detector)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.detector: {err}") from None


def check_model_config(config: TrainConfig) -> None:
    """Everything about the model that can be checked without the data: `model.*` settings (the
    backbone name, architecture string, detector arguments) and that `model.init_from` holds weights.

    Training runs it before it reads any data, so that a typo costs seconds, not a data check.
    """
    num_labels = config.model.num_labels or 1  # None: taken from the data later
    settings = model_config(config, {label: f"LABEL_{label}" for label in range(num_labels)})
    if config.model.init_from:
        _weights_files(Path(config.model.init_from))
    if config.task == "detection" and (config.model.freeze_at or config.model.frozen_batch_norm):
        # The backbone's modules on the meta device: its stages and BatchNorm layers, at no cost.
        with torch.device("meta"):
            backbone = backbone_class(settings.backbone_config)(copy.deepcopy(settings.backbone_config))
        _check_freezing(config.model, backbone)


def _check_freezing(model: ModelSection, backbone: torch.nn.Module) -> None:
    name = type(backbone).__name__
    if model.frozen_batch_norm and not any(
        isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in backbone.modules()
    ):
        raise ConfigError(
            f"model.frozen_batch_norm: the {name} backbone has no BatchNorm layer to freeze; set it false"
        )
    if model.freeze_at:
        try:
            _, stages = stem_and_stages(backbone)
        except ValueError as err:
            raise ConfigError(f"model.freeze_at: {err}") from None
        if model.freeze_at > len(stages) + 1:
            raise ConfigError(
                f"model.freeze_at={model.freeze_at}: the {name} backbone has a stem and {len(stages)} stages, so "
                f"freeze_at can be 0 (nothing) to {len(stages) + 1} (everything)"
            )


def build_model(config: TrainConfig, id2label: dict[int, str]) -> PreTrainedModel:
    """A randomly initialised model of the config's head, then the `model.backbone_from` weights in its backbone
    and the `model.init_from` weights, then the frozen parts (`model.frozen_batch_norm`, `model.freeze_at`)."""
    settings = model_config(config, id2label)
    if config.task == "classification":
        model = ViLForImageClassification(settings)
    else:
        model = DETECTORS[config.model.head][1](settings)
    if config.model.backbone_from:
        try:
            load_pretrained_backbone(model.backbone, config.model.backbone_from)
        except (OSError, ValueError, RuntimeError) as err:
            raise ConfigError(f"model.backbone_from={config.model.backbone_from}: {err}") from None
    if config.model.init_from:
        load_initial_weights(model, config.model.init_from)
    if config.task == "detection":
        freeze_backbone(model, config.model)
    return model


def freeze_backbone(model: PreTrainedModel, settings: ModelSection) -> None:
    """detectron2's frozen BatchNorm and FREEZE_AT on a detector's backbone (after its weights are loaded: frozen
    statistics are copied from the layers they replace)."""
    _check_freezing(settings, model.backbone)
    if settings.frozen_batch_norm:
        count = freeze_batch_norm(model.backbone)
        logger.info("froze the %d BatchNorm layers of the backbone (statistics and affine parameters fixed)", count)
    if settings.freeze_at:
        freeze_stages(model.backbone, settings.freeze_at)
        frozen = sum(p.numel() for p in model.backbone.parameters() if not p.requires_grad)
        logger.info("freeze_at=%d: %.2fM backbone parameters frozen", settings.freeze_at, frozen / 1e6)


def build_image_processor(config: TrainConfig):
    """The test-time processor, saved with the model."""
    if config.task == "classification":
        return ViLImageProcessorPil()
    return DetectionImageProcessorPil(
        shortest_edge=config.data.test_shortest_edge, longest_edge=config.data.longest_edge
    )


def training_image_processor(config: TrainConfig):
    """The training-time processor: multi-scale sizes (and flips when `data.flip`)."""
    if config.task == "classification":
        return ViLImageProcessorPil()
    data = config.data
    return DetectionImageProcessorPil(
        shortest_edge=list(data.train_shortest_edge),
        longest_edge=data.longest_edge,
        flip_probability=0.5 if data.flip else 0.0,
    )


def _weights_files(folder: Path) -> list[Path]:
    """The safetensors files of a save_pretrained folder (one, or the shards of its index)."""
    if not folder.is_dir():
        raise ConfigError(f"model.init_from={folder} is not a folder; give a folder written by save_pretrained")
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    raise ConfigError(
        f"model.init_from={folder} has no model.safetensors: give a folder written by save_pretrained "
        "or by `vil-hf convert`"
    )


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for path in _weights_files(folder):
        weights.update(load_file(path))
    return weights


def load_initial_weights(model: PreTrainedModel, folder: str | Path) -> None:
    """Copies matching weights from a vil-hf folder: a detector, a ViL classifier, model or backbone.

    ViL weights go into the detector's backbone. Tensors whose shapes differ (another class count,
    absolute tables for another image size) are skipped with a warning, as detectron2 does when it
    starts from ImageNet weights.
    """
    folder = Path(folder)
    weights = _read_weights(folder)
    target = model.state_dict()
    backbone_prefix = "backbone." if hasattr(model, "backbone") else "vil."
    loaded, skipped = {}, []
    for key, tensor in weights.items():
        name = key
        if name not in target:
            stripped = name.removeprefix("vil.")
            name = backbone_prefix + stripped
        if name not in target:
            continue
        if target[name].shape != tensor.shape:
            skipped.append(f"{key} {tuple(tensor.shape)} vs {tuple(target[name].shape)}")
            continue
        loaded[name] = tensor
    if not loaded:
        raise ConfigError(
            f"no weight of {folder} matches the model: it holds {len(weights)} tensors "
            f"(e.g. {next(iter(weights), 'none')}); give a ViL or detector folder of the same backbone "
            "(a transformers classifier, base model or backbone of another kind goes in model.backbone_from)"
        )
    model.load_state_dict(loaded, strict=False)
    missing = [name for name in target if name not in loaded]
    logger.info("init_from %s: loaded %d tensors, %d left at their initialisation", folder, len(loaded), len(missing))
    if skipped:
        logger.warning(
            "init_from %s: skipped %d tensors of another shape: %s", folder, len(skipped), "; ".join(skipped)
        )
