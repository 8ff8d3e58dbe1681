"""transformers' common test mixins of the installed version; importing this module fetches them once
(or skips the importing test module when the package index cannot be reached)."""

from __future__ import annotations

from . import common_test_module, listed_in_static_tables

_modeling = common_test_module("test_modeling_common")
_backbone = common_test_module("test_backbone_common")
_configuration = common_test_module("test_configuration_common")
_image_processing = common_test_module("test_image_processing_common")

ModelTesterMixin = _modeling.ModelTesterMixin
floats_tensor = _modeling.floats_tensor
ids_tensor = _modeling.ids_tensor
BackboneTesterMixin = _backbone.BackboneTesterMixin
ConfigTester = _configuration.ConfigTester
ImageProcessingTester = _image_processing.ImageProcessingTester
ImageProcessingTestMixin = _image_processing.ImageProcessingTestMixin


class StaticTablesMixin:
    """Lists `static_tables` ({table name: {model_type: class name}}) in transformers' `*_MAPPING_NAMES` for the
    duration of the test class (see `listed_in_static_tables`)."""

    static_tables: dict[str, dict[str, str]] = {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        context = listed_in_static_tables(cls.static_tables)
        context.__enter__()
        cls.addClassCleanup(context.__exit__, None, None, None)


__all__ = [
    "BackboneTesterMixin",
    "ConfigTester",
    "ImageProcessingTestMixin",
    "ImageProcessingTester",
    "ModelTesterMixin",
    "StaticTablesMixin",
    "floats_tensor",
    "ids_tensor",
]
