"""Models and image processors built from a training config, and weights to start from."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PretrainedConfig, PreTrainedModel

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


def backbone_config(model: ModelSection, **kwargs) -> ViLConfig:
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
    try:
        return config_class(backbone_config=backbone_config(config.model), **labels, **config.model.detector)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.detector: {err}") from None


def check_model_config(config: TrainConfig) -> None:
    """Everything about the model that can be checked without the data: `model.*` settings (the
    backbone name, architecture string, detector arguments) and that `model.init_from` holds weights.

    Training runs it before it reads any data, so that a typo costs seconds, not a data check.
    """
    num_labels = config.model.num_labels or 1  # None: taken from the data later
    model_config(config, {label: f"LABEL_{label}" for label in range(num_labels)})
    if config.model.init_from:
        _weights_files(Path(config.model.init_from))


def build_model(config: TrainConfig, id2label: dict[int, str]) -> PreTrainedModel:
    """A randomly initialised model of the config's head, then `model.init_from` weights if given."""
    settings = model_config(config, id2label)
    if config.task == "classification":
        model = ViLForImageClassification(settings)
    else:
        model = DETECTORS[config.model.head][1](settings)
    if config.model.init_from:
        load_initial_weights(model, config.model.init_from)
    return model


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
            f"(e.g. {next(iter(weights), 'none')}); give a ViL or detector folder of the same backbone"
        )
    model.load_state_dict(loaded, strict=False)
    missing = [name for name in target if name not in loaded]
    logger.info("init_from %s: loaded %d tensors, %d left at their initialisation", folder, len(loaded), len(missing))
    if skipped:
        logger.warning(
            "init_from %s: skipped %d tensors of another shape: %s", folder, len(skipped), "; ".join(skipped)
        )
