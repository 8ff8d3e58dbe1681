"""timm backbones in the detectors through transformers' timm integration (`TimmBackbone`).

The detector configs take transformers' backbone arguments as DETR does, ``backbone="resnet18",
use_timm_backbone=True, use_pretrained_backbone=False`` (or a `TimmBackboneConfig` as
``backbone_config``). Building the model needs timm (``pip install 'vil-hf[timm]'``); the config
does not. timm names its stages only when the model is built, so the FPN's inputs are chosen by
timm's feature indices (``backbone_features=[1, 2, 3, 4]``: strides 4 to 32 for ResNets).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, TimmBackboneConfig

# timm feature indices at strides 4, 8, 16, 32 for the usual hierarchical models (index 0 is the stem).
_STRIDE_4_TO_32 = (1, 2, 3, 4)


def backbone_config_from_kwargs(backbone_config: Any, kwargs: dict[str, Any]) -> Any:
    """Pop transformers' backbone arguments out of a detector config's ``kwargs`` and turn
    ``backbone="name"`` into a `TimmBackboneConfig`; without them ``backbone_config`` is returned as is."""
    backbone = kwargs.pop("backbone", None)
    use_timm_backbone = kwargs.pop("use_timm_backbone", None)
    use_pretrained_backbone = kwargs.pop("use_pretrained_backbone", None)
    backbone_kwargs = dict(kwargs.pop("backbone_kwargs", None) or {})
    if backbone is None:
        if use_timm_backbone or use_pretrained_backbone or backbone_kwargs:
            raise ValueError(
                "use_timm_backbone / use_pretrained_backbone / backbone_kwargs need backbone='<timm model name>' "
                "(e.g. backbone='resnet18', use_timm_backbone=True)"
            )
        return backbone_config
    if backbone_config is not None:
        raise ValueError("give either backbone_config or backbone='<timm model name>', not both")
    if use_timm_backbone is False:
        raise ValueError(
            f"backbone={backbone!r} with use_timm_backbone=False would fetch a transformers checkpoint from the Hub; "
            "pass backbone_config=AutoConfig.from_pretrained(local_folder) instead, or use_timm_backbone=True"
        )
    if use_pretrained_backbone:
        raise ValueError(
            "use_pretrained_backbone=True would download timm weights from the Hub when the model is built; "
            "build with use_pretrained_backbone=False and load weights yourself, e.g. "
            "model.backbone._backbone.load_state_dict(safetensors.torch.load_file(path), strict=False)"
        )
    return TimmBackboneConfig(backbone=backbone, features_only=True, **backbone_kwargs)


def is_timm_backbone_config(config: Any) -> bool:
    return isinstance(config, PretrainedConfig) and getattr(config, "model_type", None) == "timm_backbone"


def timm_backbone_features(
    config: TimmBackboneConfig, backbone_features: list[int] | None, default_count: int
) -> list[int]:
    """The timm feature indices feeding the FPN, set as the backbone config's ``out_indices``.

    Default: the indices already asked for in the config, else the last ``default_count`` of
    strides 4-32 (``[1, 2, 3, 4]`` for Mask R-CNN, ``[2, 3, 4]`` for RetinaNet).
    """
    if backbone_features is None:
        configured = list(config.out_indices or [])
        backbone_features = configured if configured and configured != [-1] else list(_STRIDE_4_TO_32[-default_count:])
    indices = list(backbone_features)
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise ValueError(
            f"with a timm backbone, backbone_features are timm feature indices (non-negative ints, e.g. "
            f"{list(_STRIDE_4_TO_32)}); got {backbone_features!r}"
        )
    if indices != sorted(set(indices)):
        raise ValueError(f"backbone_features must be increasing timm feature indices; got {indices}")
    config.out_indices = indices
    return indices


__all__ = ["backbone_config_from_kwargs", "is_timm_backbone_config", "timm_backbone_features"]
