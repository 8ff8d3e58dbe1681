"""transformers' own common tests on the detectors (MaskRCNNForObjectDetection, RetinaNetForObjectDetection
on a ViL backbone), their configs, and DetectionImageProcessorPil: ModelTesterMixin, ConfigTester and
ImageProcessingTestMixin of the installed transformers (see tests/transformers_common). The tester classes
follow transformers' DETR tests; every skip says why in one line.
"""

from __future__ import annotations

import math
import unittest
from unittest import mock

import numpy as np
import torch
from PIL import Image

from vil_hf import (
    DetectionImageProcessorPil,
    MaskRCNNConfig,
    MaskRCNNForObjectDetection,
    RetinaNetConfig,
    RetinaNetForObjectDetection,
    ViLConfig,
)
from vil_hf.detection.image_processing_detection import get_resize_output_size

from .transformers_common.mixins import (
    ConfigTester,
    ImageProcessingTester,
    ImageProcessingTestMixin,
    ModelTesterMixin,
    floats_tensor,
)

BACKBONE_ARCH = (
    "l1,h1,d16,n1,s1,g1,p4,f3,a0_l2,h1,d16,n1,s1,g1,p2,f3,a0_l3,h2,d32,n1,s0,g1,p2,f7,a0_l4,h2,d32,n1,s0,g0,p2,f7,a0"
)


class DetectorTester:
    """A detector on a toy ViL, and a batch of images of a size that is not a multiple of 32 with two objects
    each (boxes, classes, masks) for training."""

    def __init__(self, parent, config_class, batch_size=2, height=60, width=90, num_labels=3, is_training=True):
        self.parent = parent
        self.config_class = config_class
        self.batch_size = batch_size
        self.height, self.width = height, width
        self.num_channels = 3
        self.num_labels = num_labels
        self.is_training = is_training

    def get_config(self):
        heads = dict(fpn_channels=16)
        if self.config_class is MaskRCNNConfig:
            heads.update(
                box_head_fc_dim=32,
                mask_head_conv_dim=16,
                rpn_batch_size_per_image=32,
                roi_batch_size_per_image=32,
                rpn_post_nms_topk_test=50,
                rpn_post_nms_topk_train=50,
            )
        else:
            # at the prior every score is about 0.01: keep them all, so that there are detections to compare
            heads.update(head_conv_layers=1, score_threshold=0.0)
        return self.config_class(
            backbone_config=ViLConfig(arch=BACKBONE_ARCH, image_size=96), num_labels=self.num_labels, **heads
        )

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.height, self.width])
        pixel_mask = torch.ones(self.batch_size, self.height, self.width, dtype=torch.long)
        pixel_mask[-1, :, -10:] = 0  # the last image is narrower
        return self.get_config(), {"pixel_values": pixel_values, "pixel_mask": pixel_mask}

    def labels(self):
        labels = []
        for index in range(self.batch_size):
            boxes = torch.tensor([[5.0, 6.0, 40.0, 50.0], [30.0 + index, 10.0, 75.0, 55.0]])
            masks = torch.zeros(2, self.height, self.width, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
                masks[k, y1:y2, x1:x2] = 1
            labels.append({"boxes": boxes, "class_labels": torch.tensor([0, 2]), "masks": masks})
        return labels


class DetectorModelTestMixin(ModelTesterMixin):
    """What both detector tests share, as transformers' DETR test does it."""

    detector_class = None
    config_class = None
    # detectors hold no text inputs and no tied embeddings; their heads have no attention weights
    has_attentions = False
    test_resize_embeddings = False
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = DetectorTester(self, self.config_class)
        self.config_tester = ConfigTester(self, config_class=self.config_class, has_text_modality=False)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs_dict["labels"] = self.model_tester.labels()
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_detections_per_image(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.detector_class(config).eval()
        with torch.no_grad():
            outputs = model(**inputs_dict)
        self.assertEqual(len(outputs.pred_boxes), self.model_tester.batch_size)
        for boxes, scores, labels in zip(outputs.pred_boxes, outputs.scores, outputs.labels):
            self.assertEqual(boxes.shape, (scores.shape[0], 4))
            self.assertEqual(labels.shape, scores.shape)
        self.assertEqual(outputs.image_sizes.tolist(), [[60, 90], [60, 80]])

    def test_training_losses(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.detector_class(config).train()
        outputs = model(**self._prepare_for_class(inputs_dict, self.detector_class, return_labels=True))
        self.assertTrue(torch.isfinite(outputs.loss))
        torch.testing.assert_close(outputs.loss, sum(outputs.loss_dict.values()))

    @unittest.skip(reason="detectors do not use inputs_embeds (as DETR)")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="detectors have no get_input_embeddings (as DETR)")
    def test_model_get_set_embeddings(self):
        pass

    def _prepare_config_and_inputs_for_retain_grad_hidden_states_attentions(self):
        # the test runs a training-mode forward; the detectors, like torchvision's, need labels for it
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        return config, {**inputs_dict, "labels": self.model_tester.labels()}

    def check_feature_maps(self, outputs, config):
        strides = [4, 8, 16, 32, 64] if self.config_class is MaskRCNNConfig else [8, 16, 32, 64, 128]
        height, width = 64, 96  # the input padded to a multiple of 32
        self.assertEqual(len(outputs.feature_maps), len(strides))
        for feature_map, stride in zip(outputs.feature_maps, strides):
            self.assertEqual(
                list(feature_map.shape),
                [
                    self.model_tester.batch_size,
                    config.fpn_channels,
                    math.ceil(height / stride),
                    math.ceil(width / stride),
                ],
            )

    def test_hidden_states_output(self):
        """As transformers' Swin and ConvNeXt tests override it for maps: the FPN levels, asked for by argument
        or by the config."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.detector_class(config).eval()
        with torch.no_grad():
            self.assertIsNone(model(**inputs_dict).feature_maps)
            self.check_feature_maps(model(**inputs_dict, output_hidden_states=True), config)
            model.config.output_hidden_states = True
            self.check_feature_maps(model(**inputs_dict), config)

    def test_greyscale_images(self):
        # as transformers' DETR test: a one-channel backbone takes one-channel images
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        config.backbone_config.num_channels = 1
        inputs_dict["pixel_values"] = inputs_dict["pixel_values"][:, :1]
        model = self.detector_class(config).eval()
        with torch.no_grad():
            outputs = model(**inputs_dict)
        self.assertEqual(len(outputs.pred_boxes), self.model_tester.batch_size)


class MaskRCNNModelTest(DetectorModelTestMixin, unittest.TestCase):
    all_model_classes = (MaskRCNNForObjectDetection,)
    detector_class = MaskRCNNForObjectDetection
    config_class = MaskRCNNConfig

    def test_model_outputs_equivalence(self):
        """transformers' test, with each forward seeded: Mask R-CNN's losses sample anchors and RoIs at random
        (as detectron2), so two calls with labels would differ in their losses."""
        forward = self.detector_class.forward

        def seeded_forward(model, *args, **kwargs):
            torch.manual_seed(0)
            return forward(model, *args, **kwargs)

        with mock.patch.object(self.detector_class, "forward", seeded_forward):
            super().test_model_outputs_equivalence()


class RetinaNetModelTest(DetectorModelTestMixin, unittest.TestCase):
    all_model_classes = (RetinaNetForObjectDetection,)
    detector_class = RetinaNetForObjectDetection
    config_class = RetinaNetConfig


class DetectionImageProcessingTester(ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("do_resize", True)
        kwargs.setdefault("size", {"shortest_edge": 20, "longest_edge": 1333})
        kwargs.setdefault("do_normalize", True)
        kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
        kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
        kwargs.setdefault("size_divisibility", 32)
        super().__init__(parent, **kwargs)

    def _get_image_processing_classes(self):
        # transformers finds a processor through its static name table; ours is registered with the Auto class
        return {"pil": DetectionImageProcessorPil}

    def expected_output_image_shape(self, images):
        """detectron2's ResizeShortestEdge per image, padded to the batch maximum rounded up to 32."""
        sizes = []
        for image in images:
            if isinstance(image, Image.Image):
                width, height = image.size
            elif isinstance(image, np.ndarray):
                height, width = image.shape[:2]
            else:
                height, width = image.shape[1:]
            sizes.append(get_resize_output_size(height, width, self.size["shortest_edge"], self.size["longest_edge"]))
        divisor = self.size_divisibility
        height = math.ceil(max(size[0] for size in sizes) / divisor) * divisor
        width = math.ceil(max(size[1] for size in sizes) / divisor) * divisor
        return self.num_channels, height, width


class DetectionImageProcessingTest(ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = DetectionImageProcessingTester

    @unittest.skip(reason="vil-hf ships no torchvision backend (a documented choice: PIL/NumPy only)")
    def test_new_models_require_torchvision_backend(self):
        pass

    @unittest.skip(reason="the detection processor is RGB-only (documented): the detectors' pixel statistics are RGB")
    def test_call_numpy_4_channels(self):
        pass

    def test_image_processor_properties(self):
        processor = DetectionImageProcessorPil(**self.image_processor_dict)
        for name in ("do_resize", "size", "do_normalize", "image_mean", "image_std", "do_pad", "size_divisibility"):
            self.assertTrue(hasattr(processor, name), name)

    def test_image_processor_from_dict_with_kwargs(self):
        processor = DetectionImageProcessorPil.from_dict(self.image_processor_dict)
        self.assertEqual(processor.size, {"shortest_edge": 20, "longest_edge": 1333})
        processor = DetectionImageProcessorPil.from_dict(self.image_processor_dict, size_divisibility=64)
        self.assertEqual(processor.size_divisibility, 64)

    def test_pixel_mask_marks_the_real_pixels(self):
        processor = DetectionImageProcessorPil(**self.image_processor_dict)
        images = self.image_processor_tester.prepare_image_inputs(equal_resolution=False)
        encoding = processor(images, return_tensors="pt")
        self.assertEqual(encoding.pixel_mask.shape, encoding.pixel_values.shape[:1] + encoding.pixel_values.shape[2:])
        for image, mask in zip(images, encoding.pixel_mask):
            height, width = get_resize_output_size(image.size[1], image.size[0], 20, 1333)
            self.assertEqual(int(mask.sum()), height * width)
            self.assertTrue(bool(mask[:height, :width].all()))
