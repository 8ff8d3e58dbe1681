"""Evaluating a saved model folder: what `scripts/evaluate.py` runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, AutoModelForObjectDetection

from ..data import DataError, load_coco_detection, load_image_folder
from .coco_eval import CocoMetrics
from .loop import evaluate_classifier, evaluate_detector, no_accelerator_device

if TYPE_CHECKING:
    from ..training.config import TrainConfig

logger = logging.getLogger(__name__)


def write_evaluation_card(
    folder: Path, metrics: CocoMetrics, config: TrainConfig, model_name: str | None = None
) -> Path:
    """`folder/README.md`: a card with the measured AP in its model-index metadata (named after
    `model_name`, by default the folder's name)."""
    from .model_cards import evaluation_model_card, write_card

    backbone_type = None
    if (Path(folder) / "config.json").is_file():
        backbone = getattr(AutoConfig.from_pretrained(folder), "backbone_config", None)
        backbone_type = getattr(backbone, "model_type", None)
    source = config.model.backbone_from
    card = evaluation_model_card(
        model_name or Path(folder).resolve().name,
        metrics,
        config_path=config.source or "training_config.yaml",
        dataset_name=Path(config.data.val_annotations or "val").stem,
        # A Hub id is a base model the Hub can link; a local folder is named in the notes instead.
        base_model=source if source and not Path(source).exists() else None,
        backbone_type=backbone_type,
        notes=f"Backbone started from `{source}` (model.backbone_from)." if source and Path(source).exists() else "",
    )
    return write_card(card, folder)


def evaluate_model_folder(
    model_dir: str | Path,
    config: TrainConfig,
    *,
    output_dir: str | Path | None = None,
    cpu: bool = False,
    write_card: bool = True,
) -> dict[str, Any] | None:
    """Evaluates `model_dir` on the config's val data; the main process returns the metrics.

    Results go to `output_dir` (default `model_dir/eval`). The card with the measured AP is the
    model folder's README.md when the results stay inside the model folder; with an `output_dir`
    elsewhere the model folder is left untouched and the card is `output_dir/README.md`.
    """
    import vil_hf  # noqa: F401  (registers the ViL models with the Auto classes)

    from ..training.config import ConfigError

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json): give a save_pretrained folder")
    data = config.data
    if data.val_images is None:
        raise ConfigError("data.val_images is not set: give the evaluation image folder (data.val_images=...)")
    output_dir = Path(output_dir) if output_dir is not None else model_dir / "eval"
    card_dir = model_dir if output_dir.resolve().is_relative_to(model_dir.resolve()) else output_dir
    accelerator = Accelerator(cpu=cpu or no_accelerator_device(), mixed_precision=config.run.mixed_precision)
    model_config = AutoConfig.from_pretrained(model_dir)
    try:
        processor = AutoImageProcessor.from_pretrained(model_dir)
    except OSError:
        from ..training.models import build_image_processor

        logger.warning("%s has no image processor; using the config's test-time settings", model_dir)
        processor = build_image_processor(config)

    if config.task == "classification":
        model = AutoModelForImageClassification.from_pretrained(model_dir)
        val = load_image_folder(data.val_images)
        if len(val.classes) != model_config.num_labels:
            raise DataError(
                f"{data.val_images} has {len(val.classes)} classes; the model predicts {model_config.num_labels}"
            )
        model = accelerator.prepare(model)
        metrics = evaluate_classifier(
            model, val, processor, accelerator, output_dir, batch_size=config.run.eval_batch_size
        )
        return metrics

    if data.val_annotations is None:
        raise ConfigError("data.val_annotations is not set: give the COCO-format annotation file of the val images")
    model = AutoModelForObjectDetection.from_pretrained(model_dir)
    val = load_coco_detection(data.val_images, data.val_annotations, skip_corrupt_images=data.skip_corrupt_images)
    val.label_map.check_against(model_config.num_labels, model_config.id2label)
    model = accelerator.prepare(model)
    metrics = evaluate_detector(
        model,
        val,
        processor,
        accelerator,
        output_dir,
        batch_size=config.run.eval_batch_size,
        num_workers=data.num_workers,
        num_visualized=config.run.num_visualized,
    )
    if metrics is None:
        return None
    if write_card:
        write_evaluation_card(card_dir, metrics, config, model_name=model_dir.resolve().name)
    logger.info("results written to %s", output_dir)
    return metrics.to_dict()
