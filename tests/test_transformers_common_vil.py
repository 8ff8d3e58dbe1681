"""transformers' own common tests on ViLModel, ViLForImageClassification, ViLBackbone, ViLConfig and both
image processors: ModelTesterMixin, BackboneTesterMixin, ConfigTester and ImageProcessingTestMixin of the
installed transformers (see tests/transformers_common). The tester classes follow transformers' Swin and
ConvNeXt tests; every skip says why in one line.
"""

from __future__ import annotations

import unittest

import numpy as np
import torch
from torch import nn

from vil_hf import (
    ViLBackbone,
    ViLConfig,
    ViLForImageClassification,
    ViLImageProcessorPil,
    ViLModel,
)

from .transformers_common.mixins import (
    BackboneTesterMixin,
    ConfigTester,
    ImageProcessingTester,
    ImageProcessingTestMixin,
    ModelTesterMixin,
    StaticTablesMixin,
    floats_tensor,
    ids_tensor,
)

# What transformers' static tables would list for a model inside transformers.
VIL_STATIC_TABLES = {
    "MODEL_MAPPING_NAMES": {"vil": "ViLModel"},
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": {"vil": "ViLForImageClassification"},
    "MODEL_FOR_BACKBONE_MAPPING_NAMES": {"vil": "ViLBackbone"},
}


class ViLModelTester:
    """A 4-stage ViL with every feature at toy size: longformer stages with 2 and 1 global tokens, windows
    (3, 5) that do not divide the maps (10x10, 5x5), relative bias and an absolute embedding, two full
    attention stages, drop path."""

    def __init__(
        self,
        parent,
        batch_size=3,
        image_size=40,
        num_channels=3,
        arch="l1,h2,d16,n1,s1,g2,p4,f3,a0_l2,h2,d16,n1,s1,g1,p2,f5,a1_l3,h2,d32,n1,s0,g1,p2,f7,a0_l4,h4,d32,n1,s0,g0,p2,f7,a0",
        drop_path_rate=0.1,
        is_training=True,
        use_labels=True,
        type_sequence_label_size=10,
        out_features=("stage1", "stage2"),
        out_indices=(1, 2),
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = num_channels
        self.arch = arch
        self.drop_path_rate = drop_path_rate
        self.is_training = is_training
        self.use_labels = use_labels
        self.type_sequence_label_size = type_sequence_label_size
        self.out_features = list(out_features)
        self.out_indices = list(out_indices)
        reference = ViLConfig(arch=arch)
        self.hidden_sizes, self.depths, self.patch_sizes = (
            reference.hidden_sizes,
            reference.depths,
            reference.patch_sizes,
        )
        self.num_global_tokens = reference.num_global_tokens

    def get_config(self):
        return ViLConfig(
            arch=self.arch,
            image_size=self.image_size,
            num_channels=self.num_channels,
            drop_path_rate=self.drop_path_rate,
            num_labels=self.type_sequence_label_size,
            out_features=self.out_features,
            out_indices=self.out_indices,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.type_sequence_label_size) if self.use_labels else None
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    def map_sizes(self, image_size: int) -> list[int]:
        """Side of each stage's map (the stem's first): each patch embedding is a conv with stride = kernel."""
        sizes, side = [], image_size
        for patch in self.patch_sizes:
            side //= patch
            sizes.append(side)
        return [sizes[0]] + sizes

    def create_and_check_model(self, config, pixel_values, labels):
        model = ViLModel(config).eval()
        with torch.no_grad():
            result = model(pixel_values)
        last = self.map_sizes(self.image_size)[-1]
        self.parent.assertEqual(
            result.last_hidden_state.shape,
            (self.batch_size, self.num_global_tokens[-1] + last * last, self.hidden_sizes[-1]),
        )
        self.parent.assertEqual(result.pooler_output.shape, (self.batch_size, self.hidden_sizes[-1]))

    def create_and_check_backbone(self, config, pixel_values, labels):
        model = ViLBackbone(config).eval()
        with torch.no_grad():
            result = model(pixel_values)
        sides = self.map_sizes(self.image_size)
        self.parent.assertEqual(len(result.feature_maps), len(config.out_features))
        self.parent.assertEqual(model.channels, [self.hidden_sizes[0], self.hidden_sizes[1]])
        for feature_map, index in zip(result.feature_maps, config.out_indices):
            self.parent.assertEqual(
                list(feature_map.shape), [self.batch_size, model.num_features[index], sides[index], sides[index]]
            )

        # out_features=None: the last stage only
        config.out_features = None
        model = ViLBackbone(config).eval()
        with torch.no_grad():
            result = model(pixel_values)
        self.parent.assertEqual(len(result.feature_maps), 1)
        self.parent.assertEqual(
            list(result.feature_maps[0].shape), [self.batch_size, self.hidden_sizes[-1], sides[-1], sides[-1]]
        )
        self.parent.assertEqual(model.channels, [self.hidden_sizes[-1]])

    def create_and_check_for_image_classification(self, config, pixel_values, labels):
        model = ViLForImageClassification(config).eval()
        with torch.no_grad():
            result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.type_sequence_label_size))
        self.parent.assertTrue(torch.isfinite(result.loss))

        # greyscale images
        config.num_channels = 1
        model = ViLForImageClassification(config).eval()
        with torch.no_grad():
            result = model(floats_tensor([self.batch_size, 1, self.image_size, self.image_size]))
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.type_sequence_label_size))


class ViLModelTest(StaticTablesMixin, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (ViLModel, ViLBackbone, ViLForImageClassification)
    static_tables = VIL_STATIC_TABLES
    # ViL's longformer attention is never materialised, so there are no attention weights to return.
    has_attentions = False
    test_resize_embeddings = False
    # transformers runs this init test only on models it dates from 2023 on (it reads a copyright line); ours too
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = ViLModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=ViLConfig,
            has_text_modality=False,
            arch=self.model_tester.arch,
            image_size=64,
            common_properties=["image_size", "num_channels", "hidden_sizes", "depths", "num_heads", "patch_sizes"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_backbone(self):
        self.model_tester.create_and_check_backbone(*self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self):
        self.model_tester.create_and_check_for_image_classification(*self.model_tester.prepare_config_and_inputs())

    @unittest.skip(reason="ViL does not use inputs_embeds (as Swin)")
    def test_inputs_embeds(self):
        pass

    def test_model_get_set_embeddings(self):
        # as transformers' Swin test: vision input embeddings are a module, not an nn.Embedding
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, nn.Linear))

    def check_hidden_states_output(self, inputs_dict, config, model_class, image_size):
        """As transformers' Swin test: one hidden state per stage name (stem, then each stage)."""
        model = model_class(config).eval()
        with torch.no_grad():
            outputs = model(**self._prepare_for_class(inputs_dict, model_class))
        sides = self.model_tester.map_sizes(image_size)
        widths = [self.model_tester.hidden_sizes[0]] + list(self.model_tester.hidden_sizes)
        globals_ = [0] + list(self.model_tester.num_global_tokens)
        expected_layers = len(self.model_tester.depths) + 1
        self.assertEqual(len(outputs.hidden_states), expected_layers)
        if model_class is ViLBackbone:  # NCHW maps
            for hidden_state, side, width in zip(outputs.hidden_states, sides, widths):
                self.assertListEqual(list(hidden_state.shape[1:]), [width, side, side])
            return
        for hidden_state, side, width, count in zip(outputs.hidden_states, sides, widths, globals_):
            self.assertListEqual(list(hidden_state.shape[1:]), [count + side * side, width])
        if model_class is ViLModel:
            self.assertEqual(len(outputs.reshaped_hidden_states), expected_layers)
            for reshaped, tokens, count in zip(outputs.reshaped_hidden_states, outputs.hidden_states, globals_):
                # the same local tokens, as an NCHW map
                torch.testing.assert_close(reshaped.flatten(2).transpose(1, 2), tokens[:, count:], rtol=0, atol=0)

    def test_hidden_states_output(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            inputs_dict["output_hidden_states"] = True
            self.check_hidden_states_output(inputs_dict, config, model_class, self.model_tester.image_size)

            # output_hidden_states from the config
            del inputs_dict["output_hidden_states"]
            config.output_hidden_states = True
            self.check_hidden_states_output(inputs_dict, config, model_class, self.model_tester.image_size)
            config.output_hidden_states = False

    def test_attention_outputs_are_a_clear_error(self):
        """has_attentions is False: every ViL model refuses output_attentions (argument or config) alike."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            with self.assertRaisesRegex(ValueError, "never builds the \\(query, key\\) matrix"):
                model(**inputs_dict, output_attentions=True)
            self.assertIsNotNone(model(**inputs_dict, output_attentions=False)[0])
            # transformers only lets a config ask for attentions with the eager implementation
            model = model_class._from_config(config, attn_implementation="eager").eval()
            model.config.output_attentions = True
            with self.assertRaisesRegex(ValueError, f"{model_class.__name__} cannot return attention weights"):
                model(**inputs_dict)

    def test_unknown_forward_arguments_are_errors(self):
        """A misspelt argument (pixel_maks=) raises instead of being silently dropped by **kwargs."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            with self.assertRaisesRegex(TypeError, "pixel_maks"):
                model(**inputs_dict, pixel_maks=torch.ones(3, 40, 40))


class ViLBackboneTest(BackboneTesterMixin, unittest.TestCase):
    all_model_classes = (ViLBackbone,)
    config_class = ViLConfig
    has_attentions = False

    def setUp(self):
        self.model_tester = ViLModelTester(self)


class ViLImageProcessingTester(ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("do_resize", True)
        kwargs.setdefault("size", {"shortest_edge": 20})
        kwargs.setdefault("do_center_crop", True)
        kwargs.setdefault("crop_size", {"height": 18, "width": 18})
        kwargs.setdefault("do_normalize", True)
        kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
        kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
        super().__init__(parent, **kwargs)

    def _get_image_processing_classes(self):
        # transformers finds a processor through its static name table; ours is registered with the Auto class
        return {"pil": ViLImageProcessorPil}


class ViLImageProcessingTest(ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = ViLImageProcessingTester

    @unittest.skip(reason="vil-hf ships no torchvision backend (a documented choice: PIL/NumPy only)")
    def test_new_models_require_torchvision_backend(self):
        pass

    def test_image_processor_properties(self):
        processor = ViLImageProcessorPil(**self.image_processor_dict)
        for name in ("do_resize", "size", "do_center_crop", "crop_size", "do_normalize", "image_mean", "image_std"):
            self.assertTrue(hasattr(processor, name), name)

    def test_image_processor_from_dict_with_kwargs(self):
        processor = ViLImageProcessorPil.from_dict(self.image_processor_dict)
        self.assertEqual(processor.size, {"shortest_edge": 20})
        self.assertEqual(processor.crop_size, {"height": 18, "width": 18})
        processor = ViLImageProcessorPil.from_dict(self.image_processor_dict, size=42, crop_size=84)
        self.assertEqual(processor.size, {"shortest_edge": 42})
        self.assertEqual(processor.crop_size, {"height": 84, "width": 84})

    def test_defaults_are_the_original_evaluation_transform(self):
        processor = ViLImageProcessorPil()
        self.assertEqual(processor.size, {"shortest_edge": 256})
        self.assertEqual(processor.crop_size, {"height": 224, "width": 224})
        image = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
        self.assertEqual(tuple(processor(image, return_tensors="pt").pixel_values.shape), (1, 3, 224, 224))
