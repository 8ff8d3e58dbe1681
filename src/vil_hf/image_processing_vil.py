"""Classification image processor with the original ViL evaluation transform."""

from __future__ import annotations

from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling


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


__all__ = ["ViLImageProcessorPil"]
