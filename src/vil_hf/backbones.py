"""Any transformers backbone for the detectors: its class, its stages, pretrained weights, frozen parts.

transformers gives every backbone the same outside (`BackboneMixin`: stage names, `out_features`, NCHW
feature maps) but not the same inside. What the detectors and the training code need beyond that outside
lives here:

- `backbone_class(config)`: the concrete backbone class of a config (`AutoBackbone.from_pretrained(folder)`
  fails on local folders in transformers 5.24, the class's own `from_pretrained` does not);
- `load_pretrained_backbone`: a transformers folder or Hub id of that model (a classifier, a base model or a
  backbone) loaded into a detector's backbone through transformers' own loading, with its load report;
- `plain_patch_size(config)`: whether a backbone keeps one stride in every stage (DINOv2, ViTDet), which the
  detectors meet with a simple feature pyramid;
- `FrozenBatchNorm2d`, `freeze_batch_norm` and `freeze_stages`: detectron2's frozen BatchNorm and FREEZE_AT.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING, MODEL_FOR_BACKBONE_MAPPING_NAMES

logger = logging.getLogger(__name__)


def backbone_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The backbone class registered for `config` (transformers' own, or one registered with AutoBackbone)."""
    try:
        return MODEL_FOR_BACKBONE_MAPPING[type(config)]
    except KeyError:
        known = sorted(set(MODEL_FOR_BACKBONE_MAPPING_NAMES) | {"vil"})
        raise ValueError(
            f"model_type {config.model_type!r} has no backbone class in transformers (no AutoBackbone); the "
            f"detectors need one of: {', '.join(known)}"
        ) from None


def plain_patch_size(config: PretrainedConfig) -> int | None:
    """The patch size of a plain (single-stride) ViT backbone, or None for a hierarchical one.

    A plain backbone names one stage per transformer layer (`num_hidden_layers` stages after the stem), all at
    the patch grid, and has no per-stage `depths` (Swin, ConvNeXt, ResNet and ViL have them; DINOv2, ViTDet and
    ViTPose's backbone do not).
    """
    patch_size = getattr(config, "patch_size", None)
    stages = [name for name in getattr(config, "stage_names", []) if name != "stem"]
    if patch_size is None or hasattr(config, "depths") or getattr(config, "num_hidden_layers", None) != len(stages):
        return None
    if isinstance(patch_size, (list, tuple)):
        if len(set(patch_size)) != 1:
            raise ValueError(
                f"{type(config).__name__} has a non-square patch {patch_size}; the detectors need square patches"
            )
        patch_size = patch_size[0]
    return int(patch_size)


# ---------------------------------------------------------------------------------------------- pretrained
@dataclass
class BackboneLoadReport:
    """What transformers' loading did with a folder's tensors (its `output_loading_info`)."""

    source: str
    loaded: int
    missing: list[str] = field(default_factory=list)  # newly initialised: not in the source
    unexpected: list[str] = field(default_factory=list)  # in the source, not in the backbone (a classifier head...)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def listing(names: list[str]) -> str:
            return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

        parts = [f"loaded {self.loaded} tensors into the backbone"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing, newly initialised ({listing(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected, ignored ({listing(self.unexpected)})")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} of another shape ({listing(self.mismatched)})")
        return f"{self.source}: " + "; ".join(parts)


def load_pretrained_backbone(backbone: nn.Module, source: str | Path, **from_pretrained_kwargs) -> BackboneLoadReport:
    """Loads a transformers folder or Hub id (a classification model, base model or backbone of the same
    architecture) into `backbone`, a detector's backbone, through the backbone class's `from_pretrained` with
    the backbone's own config (its `out_features` included), so transformers maps the checkpoint's names
    (`swin.`, `resnet.` prefixes, a classifier head) as it does for any of its models.

    Tensors of another shape are an error (`from_pretrained` raises); missing ones (e.g. the backbone's own
    output norms, which a classifier lacks) keep their initialisation and are reported.
    """
    config = copy.deepcopy(backbone.config)  # from_pretrained may annotate the config it is given
    loaded_model, info = backbone_class(config).from_pretrained(
        str(source), config=config, output_loading_info=True, **from_pretrained_kwargs
    )
    state = loaded_model.state_dict()
    target = backbone.state_dict()
    if set(state) != set(target):  # the same class and config: the names cannot differ
        raise RuntimeError(f"{type(loaded_model).__name__} from {source} has other tensor names than the backbone")
    backbone.load_state_dict(state)
    mismatched = [
        str(entry[0]) if isinstance(entry, tuple) else str(entry) for entry in info.get("mismatched_keys", [])
    ]
    missing = sorted(info.get("missing_keys", []))
    report = BackboneLoadReport(
        source=str(source),
        loaded=len(state) - len(missing),
        missing=missing,
        unexpected=sorted(info.get("unexpected_keys", [])),
        mismatched=sorted(mismatched),
    )
    logger.info("backbone weights from %s", report.summary())
    return report


# ------------------------------------------------------------------------------------------------ freezing
class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all buffers: detectron2's "FrozenBN".

    The output is `(x - running_mean) / sqrt(running_var + eps) * weight + bias` in training and evaluation
    alike; nothing is learned or updated, and the optimizer never sees it. The buffers keep BatchNorm2d's
    names (with `num_batches_tracked`), so a state dict moves between the two unchanged.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batch_norm(cls, batch_norm: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm2d:
        frozen = cls(batch_norm.num_features, batch_norm.eps)
        with torch.no_grad():
            if batch_norm.affine:
                frozen.weight.copy_(batch_norm.weight)
                frozen.bias.copy_(batch_norm.bias)
            if batch_norm.track_running_stats:
                frozen.running_mean.copy_(batch_norm.running_mean)
                frozen.running_var.copy_(batch_norm.running_var)
                frozen.num_batches_tracked.copy_(batch_norm.num_batches_tracked)
        return frozen.to(batch_norm.running_mean.device if batch_norm.running_mean is not None else "cpu")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (hidden_states.dim() - 2)
        return hidden_states * scale.reshape(shape).to(hidden_states.dtype) + shift.reshape(shape).to(
            hidden_states.dtype
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norm(module: nn.Module) -> int:
    """Replaces every BatchNorm layer under `module` by a `FrozenBatchNorm2d` with its values; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            if not child.track_running_stats:
                raise ValueError(f"{name}: a BatchNorm without running statistics cannot be frozen")
            setattr(module, name, FrozenBatchNorm2d.from_batch_norm(child))
            count += 1
        else:
            count += freeze_batch_norm(child)
    return count


_STAGE_LISTS = ("encoder.stages", "encoder.layers", "encoder.layer")  # ResNet/ConvNeXt/ViL, Swin, DINOv2/ViTDet
_STEMS = ("embeddings", "embedder")


def stem_and_stages(backbone: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """The modules of a backbone's stem and of each stage after it, in order (the backbone's `stage_names`).

    ResNet, ConvNeXt, Swin, DINOv2, ViTDet: `embeddings`/`embedder` and `encoder.stages|layers|layer`; ViL: stage
    1's patch embedding is the stem.
    """
    num_stages = len([name for name in backbone.stage_names if name != "stem"])
    modules = dict(backbone.named_modules())
    for name, module in modules.items():
        prefix, _, leaf = name.rpartition("encoder.")
        if not (isinstance(module, nn.ModuleList) and len(module) == num_stages and f"encoder.{leaf}" in _STAGE_LISTS):
            continue
        stages = list(module)
        for stem_name in _STEMS:
            if prefix + stem_name in modules:
                return modules[prefix + stem_name], stages
        if hasattr(stages[0], "patch_embeddings"):
            return stages[0].patch_embeddings, stages
    raise ValueError(
        f"cannot tell the stem and the {num_stages} stages of {type(backbone).__name__} (looked for "
        f"{' / '.join(_STEMS)} and {' / '.join(_STAGE_LISTS)}); freezing its stages is not supported"
    )


def freeze_stages(backbone: nn.Module, freeze_at: int) -> list[nn.Module]:
    """detectron2's FREEZE_AT: 0 freezes nothing, 1 the stem, 2 the stem and the first stage, and so on.

    Frozen parts keep their weights (no gradient; the optimizer never sees them) and their BatchNorm statistics
    (turned into `FrozenBatchNorm2d`, as detectron2 does). Returns the frozen modules.
    """
    if freeze_at == 0:
        return []
    stem, stages = stem_and_stages(backbone)
    if not 0 <= freeze_at <= len(stages) + 1:
        raise ValueError(
            f"freeze_at={freeze_at}: {type(backbone).__name__} has a stem and {len(stages)} stages, so freeze_at can "
            f"be 0 (nothing) to {len(stages) + 1} (everything)"
        )
    frozen = [stem, *stages[: freeze_at - 1]]
    for module in frozen:
        freeze_batch_norm(module)
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    return frozen


__all__ = [
    "BackboneLoadReport",
    "FrozenBatchNorm2d",
    "backbone_class",
    "freeze_batch_norm",
    "freeze_stages",
    "load_pretrained_backbone",
    "plain_patch_size",
    "stem_and_stages",
]
