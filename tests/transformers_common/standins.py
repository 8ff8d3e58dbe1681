"""Our stand-ins for the modules that transformers' common test mixins import but its sdist does not ship.

- ``tests/exporters/test_export.py``: ``ExportTesterMixin``, a base class of ``ModelTesterMixin`` that runs
  transformers' own exporters (ONNX, ExecuTorch, ...) on every model; none of those backends is installed here,
  and ViL's torch.compile/torch.export support is tested by our own kernel tests.
- ``tests/generation/test_utils.py``: ``GenerationTesterMixin``; no ViL model generates, and
  ``test_generation_tester_mixin_inheritance`` checks that a model that cannot generate does not inherit it.
- ``tests/utils/test_configuration_utils.py``: ``config_common_kwargs``, a non-default value for each common
  ``PreTrainedConfig`` field, which ``ConfigTester.check_config_arguments_init`` passes to the config class and
  expects back.
- ``utils/fetch_hub_objects_for_ci.py``: ``url_to_local_path``, which maps a Hub URL to transformers' CI cache.
  Our tests never download; only tests that need two image-processor backends (skipped here) fetch images.
"""

from __future__ import annotations


class ExportTesterMixin:
    """Contributes no tests (see the module docstring)."""


class GenerationTesterMixin:
    """Contributes no tests (see the module docstring)."""


# Every public field of transformers 5.x's PreTrainedConfig except the bookkeeping ones
# (transformers_version, is_encoder_decoder), each with a value that is not its default.
config_common_kwargs = {
    "architectures": ["ViLForImageClassification"],
    "output_hidden_states": True,
    "output_attentions": True,
    "return_dict": False,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "id2label": {0: "circle", 1: "square", 2: "triangle"},
    "label2id": {"circle": 0, "square": 1, "triangle": 2},
    "problem_type": "single_label_classification",
}

# Fields of PreTrainedConfig that config_common_kwargs leaves out on purpose.
CONFIG_FIELDS_NOT_COMMON = ("transformers_version", "is_encoder_decoder")


def url_to_local_path(url: str) -> str:
    raise RuntimeError(
        f"vil-hf's run of transformers' common tests has no Hub access and no copy of {url}; a test that needs "
        "transformers' CI images cannot run here."
    )
