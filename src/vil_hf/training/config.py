"""Training configuration: YAML files with `_base_` inheritance and `key=value` overrides.

A config is a base plus overrides: mappings merge recursively, anything else (lists included)
replaces. `_base_` paths are relative to the file naming them. Command-line overrides use dotted
keys (`optim.lr=1e-4`, `data.train_shortest_edge=[640,800]`) with YAML values.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..io_utils import atomic_write_text

TASKS = ("detection", "classification")
HEADS = {"detection": ("mask_rcnn", "retinanet"), "classification": ("classification",)}
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "sgd")
# What describes a ViL backbone (from model.backbone or model.arch); model.backbone_config replaces all of it.
VIL_SETTINGS = ("sparse", "attention_type", "average_pool", "image_size")
# Settings that name files or folders: recorded absolute, so that a saved config works from anywhere.
PATH_SETTINGS = (
    ("data", "train_images"),
    ("data", "train_annotations"),
    ("data", "val_images"),
    ("data", "val_annotations"),
    ("model", "init_from"),
    ("run", "output_dir"),
)


class ConfigError(ValueError):
    """A training config that cannot be read or contradicts itself."""


@dataclass
class ModelSection:
    """The model. The backbone is a ViL (`backbone` or `arch`, with the ViL settings after them) or any
    transformers backbone (`backbone_config`, a mapping with `model_type` and the config's fields); the two
    descriptions are exclusive. `backbone_from` starts the backbone from a transformers folder or Hub id (a
    classifier, base model or backbone); alone, it also gives the architecture."""

    head: str = "mask_rcnn"
    backbone: str | None = "small"  # a published ViL size, or None when `arch` or `backbone_config` is given
    arch: str | None = None
    sparse: bool = True
    attention_type: str = "longformer"
    average_pool: bool = False
    image_size: int = 1333
    backbone_config: dict[str, Any] | None = None
    backbone_from: str | None = None
    drop_path_rate: float = 0.2  # any backbone with a drop path (ViL, Swin, ConvNeXt, DINOv2, ViTDet)
    freeze_at: int = 0  # detectron2's FREEZE_AT: 0 nothing, 1 the stem, 2 the stem and the first stage, ...
    frozen_batch_norm: bool = False  # every BatchNorm of the backbone frozen (detectron2's FrozenBN)
    num_labels: int | None = 80  # None: taken from the data
    init_from: str | None = None
    # Other MaskRCNNConfig / RetinaNetConfig arguments (e.g. fpn_channels, box_head_fc_dim).
    detector: dict[str, Any] = field(default_factory=dict)

    def uses_vil_settings(self) -> bool:
        """True when the backbone is a ViL described by `backbone`/`arch` (not by `backbone_config`/`backbone_from`)."""
        return self.backbone_config is None and self.backbone_from is None


@dataclass
class DataSection:
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    train_shortest_edge: list[int] = field(default_factory=lambda: [800])
    test_shortest_edge: int = 800
    longest_edge: int = 1333
    flip: bool = True
    aspect_grouping: bool = True
    skip_corrupt_images: bool = True
    num_workers: int = 4


@dataclass
class OptimSection:
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lr: float = 2.5e-4
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    momentum: float = 0.9  # SGD
    warmup_iters: int = 1000
    warmup_factor: float = 0.01
    max_iter: int = 90000
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    clip_grad_norm: float | None = 0.5


@dataclass
class RunSection:
    output_dir: str = "outputs/run"
    seed: int = 42
    mixed_precision: str = "no"
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    eval_every: int = 7330
    log_every: int = 20
    eval_batch_size: int = 1
    num_visualized: int = 4
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    gradient_checkpointing: bool = False  # recompute backbone blocks and head convolutions in the backward


@dataclass
class TrainConfig:
    task: str = "detection"
    mirrors: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    source: str | None = None  # the YAML file this came from (not a setting)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def with_absolute_paths(self) -> TrainConfig:
        """A copy whose file and folder settings are absolute (relative ones are relative to the
        working directory, where the run reads them)."""
        out = copy.deepcopy(self)
        for section, key in PATH_SETTINGS:
            value = getattr(getattr(out, section), key)
            if value is not None:
                setattr(getattr(out, section), key, os.path.abspath(os.path.expanduser(value)))
        source = out.model.backbone_from
        if source is not None and os.path.exists(os.path.expanduser(source)):  # else a Hub id, kept as given
            out.model.backbone_from = os.path.abspath(os.path.expanduser(source))
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Writes the resolved config (no `_base_`) atomically."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        atomic_write_text(Path(path), text)

    def validate(self) -> TrainConfig:
        _check_choice("task", self.task, TASKS)
        _check_choice("model.head", self.model.head, HEADS[self.task])
        self._validate_backbone()
        optim, run = self.optim, self.run
        for name in ("batch_size", "gradient_accumulation_steps", "max_iter"):
            if getattr(optim, name) < 1:
                raise ConfigError(f"optim.{name} must be at least 1, got {getattr(optim, name)}")
        if optim.batch_size % optim.gradient_accumulation_steps:
            raise ConfigError(
                f"optim.batch_size={optim.batch_size} is not divisible by "
                f"optim.gradient_accumulation_steps={optim.gradient_accumulation_steps}"
            )
        if list(optim.steps) != sorted(optim.steps) or any(s < 1 for s in optim.steps):
            raise ConfigError(f"optim.steps must be increasing positive iterations, got {optim.steps}")
        if optim.warmup_iters < 0 or not 0 < optim.warmup_factor <= 1:
            raise ConfigError("optim.warmup_iters must be >= 0 and optim.warmup_factor in (0, 1]")
        if len(optim.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers, got {optim.betas}")
        _check_choice("optim.optimizer", optim.optimizer, OPTIMIZERS)
        if not 0 <= optim.momentum < 1:
            raise ConfigError(f"optim.momentum must lie in [0, 1), got {optim.momentum}")
        _check_choice("run.mixed_precision", run.mixed_precision, MIXED_PRECISION)
        for name in ("checkpoint_every", "keep_checkpoints", "eval_every", "log_every", "eval_batch_size"):
            if getattr(run, name) < 1:
                raise ConfigError(f"run.{name} must be at least 1, got {getattr(run, name)}")
        if not self.data.train_shortest_edge:
            raise ConfigError("data.train_shortest_edge needs at least one size")
        return self

    def _validate_backbone(self) -> None:
        """One description of the backbone: a ViL (model.backbone or model.arch, then the ViL settings) or any
        transformers backbone (model.backbone_config and/or model.backbone_from)."""
        model = self.model
        if model.freeze_at < 0:
            raise ConfigError(f"model.freeze_at must be 0 (nothing frozen) or more, got {model.freeze_at}")
        if model.drop_path_rate < 0 or model.drop_path_rate >= 1:
            raise ConfigError(f"model.drop_path_rate must lie in [0, 1), got {model.drop_path_rate}")
        if model.uses_vil_settings():
            if (model.backbone is None) == (model.arch is None):
                raise ConfigError(
                    "model.backbone and model.arch are exclusive: give a published size in model.backbone "
                    "(tiny, small, medium-deep, base-deep) or an architecture string in model.arch, and set the other "
                    "to null (or describe another backbone with model.backbone_config / model.backbone_from)"
                )
            return
        given = "model.backbone_config" if model.backbone_config is not None else "model.backbone_from"
        if self.task != "detection":
            raise ConfigError(f"{given} is for detection; task {self.task} trains a ViL (model.backbone or model.arch)")
        vil = [
            f"model.{name}={getattr(model, name)!r}"
            for name in ("backbone", "arch")
            if getattr(model, name) is not None
        ]
        defaults = ModelSection()
        vil += [
            f"model.{name}={getattr(model, name)!r}"
            for name in VIL_SETTINGS
            if getattr(model, name) != getattr(defaults, name)
        ]
        if vil:
            raise ConfigError(
                f"{given} describes the backbone, so the ViL settings must be left out: {', '.join(vil)} "
                "(set model.backbone and model.arch to null and leave sparse, attention_type, average_pool and "
                "image_size at their defaults; a ViL goes in model.backbone_config as {model_type: vil, arch: ...})"
            )
        if model.backbone_config is not None and "model_type" not in model.backbone_config:
            raise ConfigError(
                "model.backbone_config needs a model_type (e.g. swin, convnext, resnet, dinov2, vitdet, vil) beside "
                "the config's fields"
            )


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"model": {"detector": {"a": 1}}}` -> `{"model.detector.a": 1}` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(before: dict[str, Any], after: dict[str, Any], keys=None) -> list[tuple[str, Any, Any]]:
    """(dotted key, value before, value after) for every setting that differs, in key order;
    `keys(name) -> bool` selects which settings count. A setting absent on one side is None there."""
    old, new = flatten(before), flatten(after)
    names = sorted(set(old) | set(new))
    return [(n, old.get(n), new.get(n)) for n in names if (keys is None or keys(n)) and old.get(n) != new.get(n)]


def _shortened(before: Any, after: Any, width: int = 48) -> tuple[str, str]:
    """Both values as short reprs; long strings that share a beginning are shown from where they differ."""
    texts = [repr(before), repr(after)]
    if all(len(text) <= width for text in texts):
        return texts[0], texts[1]
    common = 0
    if isinstance(before, str) and isinstance(after, str):
        while common < min(len(before), len(after)) and before[common] == after[common]:
            common += 1
        texts = [repr(before[max(common - 8, 0) :]), repr(after[max(common - 8, 0) :])]
    lead = "..." if common > 8 else ""
    return tuple(lead + (text if len(text) <= width else text[: width - 3] + "...") for text in texts)


def describe_differences(found: list[tuple[str, Any, Any]], before: str, after: str, limit: int = 6) -> str:
    """`model.arch: 'a' (checkpoint) vs 'b' (now); ...`, values shortened, at most `limit` settings."""
    parts = []
    for name, a, b in found[:limit]:
        old, new = _shortened(a, b)
        parts.append(f"{name}: {old} ({before}) vs {new} ({after})")
    if len(found) > limit:
        parts.append(f"and {len(found) - limit} more")
    return "; ".join(parts)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if path in chain:
        raise ConfigError(f"_base_ cycle: {' -> '.join(map(str, chain + (path,)))}")
    if not path.is_file():
        where = f" (named as _base_ in {chain[-1]})" if chain else ""
        raise ConfigError(f"config file {path} does not exist{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    return merge(_read_yaml((path.parent / base).resolve(), chain + (path,)), data)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML file as a dict with its `_base_` chain resolved (not validated)."""
    return _read_yaml(Path(path).resolve(), ())


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["optim.lr=1e-4", "run.trackers=[]"]` -> nested dict with YAML-typed values."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (for example optim.lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from None
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {where}{key}{hint}")
        sub = _SECTIONS.get(known[key].name) if cls is TrainConfig else None
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a mapping, got {value!r}")
            value = _build(sub, value, f"{key}.")
        else:
            value = _coerce(value, known[key], f"{where}{key}")
        kwargs[key] = value
    return cls(**kwargs)


_SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "run": RunSection}


def _coerce(value: Any, f: dataclasses.Field, name: str) -> Any:
    """Checks a YAML value against the field's annotation (ints accepted for floats)."""
    annotation = str(f.type)
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"{name} cannot be null")
    if annotation.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return value
    if annotation.startswith("list"):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # `data.train_shortest_edge=800` means one size
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return value
    if "bool" in annotation:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if "float" in annotation:
        if isinstance(value, str):
            try:  # YAML 1.1 reads `3e-4` (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if "int" in annotation:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if "str" in annotation and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def config_from_dict(data: dict[str, Any], source: str | None = None) -> TrainConfig:
    config = _build(TrainConfig, data, "")
    config.source = source
    return config.validate()


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """Reads a YAML config (resolving `_base_`), applies `key=value` overrides and validates."""
    data = read_config_file(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides or []))
    return config_from_dict(data, source=str(path) if path is not None else None)
