"""Conversion of the original ViL checkpoints into folders the Auto classes load."""

from .original import (
    ConversionError,
    ConversionOptions,
    ConversionReport,
    convert_checkpoint,
    load_original_checkpoint,
    map_original_state_dict,
)

__all__ = [
    "ConversionError",
    "ConversionOptions",
    "ConversionReport",
    "convert_checkpoint",
    "load_original_checkpoint",
    "map_original_state_dict",
]
