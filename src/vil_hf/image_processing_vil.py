"""Classification image processor with the original ViL evaluation transform."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageInput, PILImageResampling

_ACCEPTED = "PIL images, (H, W, 3) / (3, H, W) arrays or tensors, or (H, W) grayscale arrays or tensors"


def prepare_image_list(images: ImageInput) -> ImageInput:
    """What the ViL processors accept, checked before transformers' batching.

    None and empty lists get a message naming what to pass (transformers fails with `max() arg is an
    empty sequence` or returns an empty batch), and each (H, W) grayscale array or tensor becomes
    (1, H, W), a shape transformers' image handling reads (it rejects two dimensions); RGB
    conversion then makes it three channels.
    """
    if images is None:
        raise ValueError(f"images is required: pass one image or a list of images ({_ACCEPTED})")
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"images is an empty list: pass at least one image ({_ACCEPTED})")
        return [_with_channel_axis(image) for image in images]
    return _with_channel_axis(images)


def _with_channel_axis(image: Any) -> Any:
    if isinstance(image, (np.ndarray, torch.Tensor)):
        if 0 in image.shape:
            raise ValueError(f"got an image of shape {tuple(image.shape)} with no pixels; pass {_ACCEPTED}")
        if image.ndim == 2:
            return image[None]
    return image


class ViLImageProcessorPil(PilBackend):
    """Resize the shorter side to 256 (224 / 0.875, bilinear), centre-crop 224, ImageNet mean/std.

    This is the original's evaluation transform (INPUT.CROP_PCT 0.875, INTERPOLATION 2).
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    size = {"shortest_edge": 256}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD

    def preprocess(self, images: ImageInput, *args, **kwargs):
        return super().preprocess(prepare_image_list(images), *args, **kwargs)


__all__ = ["ViLImageProcessorPil", "prepare_image_list"]
