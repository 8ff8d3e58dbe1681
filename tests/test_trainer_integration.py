"""transformers' Trainer with the detectors: collate, per-epoch augmentation, COCO AP as compute_metrics,
checkpoints in safetensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from transformers import AutoModelForObjectDetection, EvalPrediction, Trainer, TrainingArguments

from vil_hf import DetectionImageProcessorPil, MaskRCNNForObjectDetection
from vil_hf.data import DetectionSamples, load_coco_detection, make_shapes
from vil_hf.evaluation import STAT_NAMES, detections_to_coco, evaluate_coco
from vil_hf.evaluation.loop import predict_coco
from vil_hf.integrations.trainer import (
    CocoMetricsForTrainer,
    EpochAugmentedSamples,
    collate_for_trainer,
    detector_fields,
)

from .test_detection_models import tiny_detector
from .test_training import FEW_DETECTIONS


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    paths = make_shapes(tmp_path_factory.mktemp("shapes"), num_train=4, num_val=4, image_size=(64, 80), seed=3)
    train = load_coco_detection(paths["train_images"], paths["train_annotations"])
    val = load_coco_detection(paths["val_images"], paths["val_annotations"])
    # Images are resized (64x80 -> 72x90), so boxes and masks go through the rescaling.
    processor = DetectionImageProcessorPil(shortest_edge=72, longest_edge=96)
    return train, val, processor


def training_arguments(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        use_cpu=True,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(str(output_dir), **{**settings, **overrides})


def oracle_logits(samples: DetectionSamples, indices, shift: float = 0.0):
    """What Trainer hands compute_metrics for a detector that finds the ground truth, boxes moved right
    by `shift` pixels of the resized image: (image_sizes, loss_dict, pred_boxes, scores, labels)."""
    items = [samples[i] for i in indices]
    boxes = [item["labels"]["boxes"] + torch.tensor([shift, 0.0, shift, 0.0]) for item in items]
    scores = [torch.linspace(0.9, 0.5, len(b)) for b in boxes]
    labels = [item["labels"]["class_labels"] for item in items]
    sizes = torch.stack([item["labels"]["size"] for item in items])
    return (sizes, {"loss_cls": torch.tensor(1.0)}, boxes, scores, labels), [item["labels"] for item in items]


def test_collate_for_trainer_pads_and_keeps_labels(shapes):
    _, val, processor = shapes
    samples = DetectionSamples(val, processor, training=False, return_masks=True)
    # Trainer's column removal drops the top-level image_id; the labels still carry it.
    items = [{k: v for k, v in samples[i].items() if k != "image_id"} for i in range(2)]
    batch = collate_for_trainer(items)
    assert sorted(batch) == ["labels", "pixel_mask", "pixel_values"]
    assert batch["pixel_values"].shape[0] == 2 and batch["pixel_mask"].shape[0] == 2
    assert [int(label["image_id"]) for label in batch["labels"]] == val.dataset["image_id"][:2]


def test_epoch_augmented_samples_draw_per_epoch(shapes):
    train, _, processor = shapes
    processor_with_sizes = DetectionImageProcessorPil(shortest_edge=[40, 56, 72, 88], longest_edge=200)
    samples = EpochAugmentedSamples(
        DetectionSamples(train, processor_with_sizes, training=True, return_masks=False), seed=5
    )

    def draws(epoch):
        samples.set_epoch(epoch)
        return [(tuple(samples[i]["pixel_values"].shape), samples[i]["labels"]["boxes"].tolist()) for i in range(4)]

    assert draws(0) == draws(0)  # the same epoch draws the same
    assert draws(0) != draws(1)  # another epoch draws anew
    with pytest.raises(ValueError, match="training=True"):
        EpochAugmentedSamples(DetectionSamples(train, processor, training=False, return_masks=False))


def test_metric_matches_evaluate_coco_in_both_trainer_modes(shapes):
    """Ground-truth boxes give box AP 100; shifted ones give what evaluate_coco gives for the same boxes
    rescaled to the original images by hand."""
    _, val, processor = shapes
    samples = DetectionSamples(val, processor, training=False, return_masks=False)
    metric = CocoMetricsForTrainer(val, processor)

    perfect = [oracle_logits(samples, [0, 1]), oracle_logits(samples, [2, 3])]
    metrics = metric(EvalPrediction(predictions=[p for p, _ in perfect], label_ids=[lab for _, lab in perfect]))
    assert metrics["box_AP"] == pytest.approx(100.0) and "mask_AP" not in metrics
    per_class = {"box_AP_circle", "box_AP_triangle", "box_AP_square"}
    assert {f"box_{name}" for name in STAT_NAMES} | per_class == set(metrics)

    shifted = [oracle_logits(samples, [0, 1], shift=3.0), oracle_logits(samples, [2, 3], shift=3.0)]
    # batch_eval_metrics=True: one batch per call, tensors; the result comes with the last batch.
    assert metric(EvalPrediction(predictions=shifted[0][0], label_ids=shifted[0][1]), compute_result=False) == {}
    batched = metric(EvalPrediction(predictions=shifted[1][0], label_ids=shifted[1][1]), compute_result=True)
    # eval_do_concat_batches=False: every batch at the end, as numpy arrays.
    numpy_batches = [tuple(_numpy(v) for v in logits) for logits, _ in shifted]
    numpy_labels = [[{k: v.numpy() for k, v in label.items()} for label in labels] for _, labels in shifted]
    listed = metric(EvalPrediction(predictions=numpy_batches, label_ids=numpy_labels))

    expected_results = []
    for logits, labels in shifted:
        for boxes, scores, classes, label in zip(logits[2], logits[3], logits[4], labels):
            scale = (label["orig_size"].flip(0) / label["size"].flip(0)).repeat(2)  # (w, h, w, h)
            expected_results += detections_to_coco(
                int(label["image_id"]), boxes * scale, scores, classes, val.label_map.label_to_category
            )
    expected = evaluate_coco(val.annotation_file, expected_results, iou_types=("bbox",))
    assert 0 < expected.box_ap < 100
    for name in STAT_NAMES:
        for got in (batched, listed):
            assert got[f"box_{name}"] == pytest.approx(expected["bbox"][name], abs=1e-6, nan_ok=True)


def _numpy(value):
    if isinstance(value, list):
        return [v.numpy() for v in value]
    if isinstance(value, dict):
        return {k: v.numpy() for k, v in value.items()}
    return value.numpy()


def test_metric_errors_name_the_fix(shapes):
    _, val, processor = shapes
    samples = DetectionSamples(val, processor, training=False, return_masks=False)
    logits, labels = oracle_logits(samples, [0, 1])
    metric = CocoMetricsForTrainer(val, processor)
    # Trainer's default concatenates batches: one tuple, no compute_result.
    with pytest.raises(ValueError, match="batch_eval_metrics=True"):
        metric(EvalPrediction(predictions=logits, label_ids=labels))
    with pytest.raises(ValueError, match="pred_boxes"):
        detector_fields((torch.zeros(2, 10),))
    with pytest.raises(ValueError, match="image_id"):
        metric.add_batch(logits, [{k: v for k, v in label.items() if k != "image_id"} for label in labels])
    with pytest.raises(ValueError, match="predicts no masks"):
        CocoMetricsForTrainer(val, processor, iou_types=("bbox", "segm")).add_batch(logits, labels)


@pytest.mark.slow
def test_trainer_trains_evaluates_and_checkpoints_mask_rcnn(shapes, tmp_path):
    train, val, processor = shapes
    model = tiny_detector("mask_rcnn", **FEW_DETECTIONS["mask_rcnn"])
    metric = CocoMetricsForTrainer(val, processor)
    args = training_arguments(
        tmp_path / "run", max_steps=2, save_steps=2, logging_steps=1, learning_rate=1e-3, batch_eval_metrics=True
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=EpochAugmentedSamples(DetectionSamples(train, processor, training=True, return_masks=True)),
        eval_dataset=DetectionSamples(val, processor, training=False, return_masks=True),
        data_collator=collate_for_trainer,
        compute_metrics=metric,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    # Trainer's data loader (Accelerate's) passes each epoch on to the data set's augmentation.
    trainer.get_train_dataloader().set_epoch(3)
    assert trainer.train_dataset.epoch == 3

    metrics = trainer.evaluate()
    # The eval loss: Mask R-CNN computes its losses whenever labels are given, in eval mode too.
    assert math.isfinite(metrics["eval_loss"])
    for prefix in ("eval_box_", "eval_mask_"):
        assert {prefix + name for name in STAT_NAMES} <= set(metrics)

    # Trainer's checkpoint is a save_pretrained folder in safetensors that our classes load.
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    state = trainer.model.state_dict()
    saved = load_file(checkpoint / "model.safetensors")
    assert set(saved) <= set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    reloaded = MaskRCNNForObjectDetection.from_pretrained(checkpoint)
    assert all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())
    trainer.save_model(tmp_path / "final")
    final = AutoModelForObjectDetection.from_pretrained(tmp_path / "final")
    assert type(final) is MaskRCNNForObjectDetection
    assert all(torch.equal(v, state[k]) for k, v in final.state_dict().items())

    # The same detections as the project's own evaluation loop at the same batch size.
    AcceleratorState._reset_state(True)
    try:
        reference = predict_coco(trainer.model, val, processor, Accelerator(cpu=True), batch_size=2)
    finally:
        AcceleratorState._reset_state(True)
    got = sorted(metric.last_results, key=lambda d: (d["image_id"], -d["score"]))
    assert len(got) == len(reference) > 0
    for mine, theirs in zip(got, reference):
        assert (mine["image_id"], mine["category_id"]) == (theirs["image_id"], theirs["category_id"])
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-5)
        np.testing.assert_allclose(mine["bbox"], theirs["bbox"], atol=1e-3)
        assert mine["segmentation"]["size"] == theirs["segmentation"]["size"]
    expected = evaluate_coco(val.annotation_file, reference)
    assert metrics["eval_box_AP"] == pytest.approx(expected.box_ap, abs=1e-6)


@pytest.mark.slow
def test_trainer_evaluates_retinanet_with_unconcatenated_batches(shapes, tmp_path):
    _, val, processor = shapes
    model = tiny_detector("retinanet", **FEW_DETECTIONS["retinanet"])
    trainer = Trainer(
        model=model,
        args=training_arguments(tmp_path, eval_do_concat_batches=False),
        eval_dataset=DetectionSamples(val, processor, training=False, return_masks=False),
        data_collator=collate_for_trainer,
        compute_metrics=CocoMetricsForTrainer(val, processor),
    )
    metrics = trainer.evaluate()
    assert {f"eval_box_{name}" for name in STAT_NAMES} <= set(metrics)
    assert not any(key.startswith("eval_mask_") for key in metrics)
    assert math.isfinite(metrics["eval_loss"])
