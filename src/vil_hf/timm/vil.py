"""ViL in timm's registry: `timm.create_model("vil_small")`, with `features_only=True` for the four maps.

The model holds the same modules under the same names as `ViLForImageClassification` (`vil.*`,
`classifier.*`), so a folder written by `save_pretrained` or `vil-hf convert` loads as timm
pretrained weights; `checkpoint_filter_fn` also takes ViLBackbone folders (`encoder.*`) and the
backbone of a detector folder (`backbone.encoder.*`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from ..configuration_vil import PUBLISHED_MODELS, ViLConfig, published_arch
from ..modeling_vil import ViLModel

GLOBAL_POOLS = ("token", "avg")


class VisionLongformer(nn.Module):
    """ViL with timm's model interface (`forward_features`, `forward_head`, `forward_intermediates`,
    `reset_classifier`, `feature_info`).

    Args:
        arch: the original architecture string (see `ViLConfig`).
        num_classes: classifier outputs (0: no classifier, `forward` returns the pooled features).
        in_chans: input channels.
        global_pool: ``"token"`` (the first global token where the last stage has one, as the
            original; otherwise the mean) or ``"avg"`` (mean of all tokens).
        img_size: size the absolute position tables are built for (as `ViLConfig.image_size`).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, increasing linearly over the blocks.
        **config_kwargs: any other `ViLConfig` option (e.g. ``attention_type``, ``exact_window``).
    """

    def __init__(
        self,
        arch: str,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "token",
        img_size: int | Sequence[int] = 224,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        **config_kwargs: Any,
    ) -> None:
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}; got {global_pool!r}")
        if not isinstance(img_size, int):
            sizes = set(int(v) for v in img_size)
            if len(sizes) != 1:
                raise ValueError(f"ViL position tables are square; give one img_size, got {tuple(img_size)}")
            img_size = sizes.pop()
        self.config = ViLConfig(
            arch=arch,
            num_channels=in_chans,
            image_size=img_size,
            drop_path_rate=drop_path_rate,
            average_pool=global_pool == "avg",
            **config_kwargs,
        )
        self.vil = ViLModel(self.config)
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.config.hidden_sizes[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)
        reduction = 1
        self.feature_info = []
        for index, (channels, patch) in enumerate(zip(self.config.hidden_sizes, self.config.patch_sizes)):
            reduction *= patch
            self.feature_info.append(dict(num_chs=channels, reduction=reduction, module=f"vil.encoder.stages.{index}"))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}; got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.classifier = nn.Identity()
        if num_classes > 0:
            # As ViLForImageClassification initialises its head.
            self.classifier = nn.Linear(self.num_features, num_classes)
            nn.init.trunc_normal_(self.classifier.weight, std=self.config.initializer_range)
            nn.init.zeros_(self.classifier.bias)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, G + L, D) tokens of the last stage after the final LayerNorm."""
        return self.vil(pixel_values).last_hidden_state

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token" and self.config.num_global_tokens[-1] > 0:
            pooled = tokens[:, 0]
        else:
            pooled = tokens.mean(dim=1)
        pooled = self.head_drop(pooled)
        return pooled if pre_logits else self.classifier(pooled)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixel_values))

    def forward_intermediates(
        self,
        pixel_values: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stage maps (NCHW, no extra norm: ViLBackbone's maps) at `indices`, and with
        ``intermediates_only=False`` also the final tokens. Every remaining stage runs (`stop_early` is
        taken for timm's interface); `prune_intermediate_layers` removes the unused ones."""
        if output_fmt != "NCHW":
            raise ValueError(f"ViL gives its stage maps as NCHW only; got output_fmt={output_fmt!r}")
        if norm:
            raise ValueError("ViL has no per-stage norm for its intermediate maps; use norm=False")
        take_indices, _ = feature_take_indices(len(self.vil.encoder.stages), indices)
        encoded = self.vil.encoder(pixel_values)
        # The encoder's maps start with the stem's entry (None unless asked for): stage i is entry i + 1.
        intermediates = [encoded.feature_maps[index + 1] for index in take_indices]
        if intermediates_only:
            return intermediates
        return self.vil.layernorm(encoded.last_hidden_state), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last one in `indices` (and the norm / head); returns the indices."""
        take_indices, max_index = feature_take_indices(len(self.vil.encoder.stages), indices)
        self.vil.encoder.stages = self.vil.encoder.stages[: max_index + 1]
        if prune_norm:
            self.vil.layernorm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices


def _mapped_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(key.startswith("vil.") for key in state_dict):  # ViLForImageClassification / ViLModel-in-classifier
        return dict(state_dict)
    if any(key.startswith("encoder.") for key in state_dict):  # ViLBackbone or ViLModel folder
        return {f"vil.{key}": value for key, value in state_dict.items()}
    if any(key.startswith("backbone.encoder.") for key in state_dict):  # a detector folder's backbone
        prefix = "backbone."
        return {f"vil.{key[len(prefix) :]}": v for key, v in state_dict.items() if key.startswith(prefix)}
    raise ValueError(
        "these weights are not a ViL folder's (no 'vil.', 'encoder.' or 'backbone.encoder.' keys); convert "
        "original checkpoints with `vil-hf convert` and pass the folder's model.safetensors"
    )


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: VisionLongformer) -> dict[str, torch.Tensor]:
    """Our folders' weights -> this model's keys. The encoder must be complete; a backbone without the
    final norm or classifier keeps the model's own (freshly initialised) ones."""
    mapped = _mapped_keys(state_dict)
    own = model.state_dict()
    missing = [key for key in own if key.startswith("vil.encoder.") and key not in mapped]
    if missing:
        raise ValueError(
            f"the weights lack {len(missing)} encoder tensors of this model (first: {missing[0]}); "
            "is the file of another ViL architecture? Pick the matching vil_* model or pass arch=..."
        )
    for key, value in own.items():
        if not key.startswith("vil.encoder."):
            mapped.setdefault(key, value)
    return mapped


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # ViLImageProcessorPil's evaluation: resize 256, centre crop 224, ImageNet statistics.
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 224 / 256,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "vil.encoder.stages.0.patch_embeddings.projection",
        "classifier": "classifier",
        "license": "mit",
        **kwargs,
    }


def model_name(published: str) -> str:
    """timm's name of a published ViL: ``medium-deep`` -> ``vil_medium_deep``."""
    return "vil_" + published.replace("-", "_")


default_cfgs = generate_default_cfgs({model_name(name): _cfg() for name in PUBLISHED_MODELS})


def _create_vil(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return build_model_with_cfg(
        VisionLongformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


def _entrypoint(published: str):
    name = model_name(published)

    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create_vil(name, pretrained, **{"arch": published_arch(published), **kwargs})

    create.__name__ = create.__qualname__ = name
    create.__doc__ = (
        f"ViL-{published.replace('-', ' ').title()} (ImageNet architecture string; pass "
        f"arch=published_arch({published!r}, sparse=True) for the detection one)."
    )
    return create


ENTRYPOINTS = {model_name(name): register_model(_entrypoint(name)) for name in PUBLISHED_MODELS}
globals().update(ENTRYPOINTS)

__all__ = ["VisionLongformer", "checkpoint_filter_fn", "model_name", *ENTRYPOINTS]
