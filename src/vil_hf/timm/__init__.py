"""ViL models in timm (the ``vil-hf[timm]`` extra): ``import vil_hf.timm`` registers ``vil_tiny``,
``vil_small``, ``vil_medium_deep``, ``vil_medium_wide``, ``vil_base_deep`` and ``vil_base_wide``.

Registration is explicit, not done by ``import vil_hf``: importing timm also imports torchvision,
which most users of the transformers models do not need. Our folders load as pretrained weights::

    import timm, vil_hf.timm
    maps = timm.create_model("vil_small", features_only=True)(images)          # 4 NCHW maps
    model = timm.create_model("vil_small", pretrained=True,
                              pretrained_cfg_overlay=dict(file="vil-small/model.safetensors"))
"""

from __future__ import annotations

try:
    import timm  # noqa: F401
except Exception as error:  # ImportError, or torchvision's ops failing to load against this torch
    raise ImportError(
        f"vil_hf.timm registers ViL with timm, which cannot be imported here ({type(error).__name__}: {error}). "
        "Install the extra with `pip install 'vil-hf[timm]'`; timm needs a torchvision built for your torch "
        "(e.g. `pip install torch==2.14.1 torchvision==0.29.1`)."
    ) from error

from .vil import ENTRYPOINTS, VisionLongformer, checkpoint_filter_fn, model_name

__all__ = ["ENTRYPOINTS", "VisionLongformer", "checkpoint_filter_fn", "model_name"]
