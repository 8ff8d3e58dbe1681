"""The training loop on Accelerate: one code path for one CPU, one GPU or many machines.

The loop counts optimizer steps ("iterations", as detectron2 does). Each iteration consumes
`gradient_accumulation_steps` micro-batches per process; the data order and every augmentation
draw are functions of (seed, iteration), and the learning rate a function of the iteration, so a
run resumed from `checkpoints/checkpoint-k` continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import (
    ClassificationSamples,
    DataError,
    DetectionSamples,
    TrainingBatchSampler,
    collate_classification,
    collate_detection,
    load_coco_detection,
    load_image_folder,
)
from ..evaluation.coco_eval import CocoMetrics
from ..evaluation.loop import evaluate_classifier, evaluate_detector, no_accelerator_device
from ..evaluation.run import write_evaluation_card
from ..io_utils import atomic_write_text
from .checkpoints import checkpoint_iteration, resolve_resume, save_checkpoint
from .config import ConfigError, TrainConfig
from .models import build_image_processor, build_model, training_image_processor
from .optim import build_optimizer, set_learning_rate
from .plots import save_loss_curve

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path | None
    iteration: int
    metrics: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def _available_trackers(requested: list[str]) -> list[str]:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    chosen = []
    for name in requested:
        if name in available and available[name]():
            chosen.append(name)
        else:
            logger.warning("tracker %r is not installed; logging to the console only (pip install %s)", name, name)
    return chosen


def _flat_config(config: TrainConfig) -> dict[str, Any]:
    """Scalars only, as TensorBoard's hparams want."""
    flat = {}
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
        else:
            flat[section] = values if isinstance(values, (int, float, str, bool)) else str(values)
    return flat


def _to_device(labels: Any, device: torch.device) -> Any:
    if torch.is_tensor(labels):
        return labels.to(device)
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in target.items()} for target in labels]


class _TaskData:
    """What the loop needs from a task: training samples, their aspect ratios, evaluation, labels."""

    def __init__(self, config: TrainConfig):
        self.config = config
        data = config.data
        if data.train_images is None:
            raise ConfigError("data.train_images is not set: give the training image folder")
        train_processor = training_image_processor(config)
        self.eval_processor = build_image_processor(config)
        if config.task == "detection":
            if data.train_annotations is None:
                raise ConfigError("data.train_annotations is not set: give the COCO-format annotation file")
            train = load_coco_detection(
                data.train_images, data.train_annotations, skip_corrupt_images=data.skip_corrupt_images
            ).without_empty()
            self.label_map = train.label_map
            self.id2label = self.label_map.id2label
            if config.model.num_labels is not None:
                self.label_map.check_against(config.model.num_labels)
            mask_on = config.model.head == "mask_rcnn"
            self.samples = DetectionSamples(train, train_processor, training=True, return_masks=mask_on)
            self.aspect_ratios = train.aspect_ratios() if data.aspect_grouping else None
            self.collate = collate_detection
            self.val = None
            if data.val_images is not None and data.val_annotations is not None:
                self.val = load_coco_detection(
                    data.val_images, data.val_annotations, skip_corrupt_images=data.skip_corrupt_images
                )
                self.val.label_map.check_against(self.label_map.num_labels, self.id2label)
        else:
            train = load_image_folder(data.train_images)
            self.id2label = dict(enumerate(train.classes))
            if config.model.num_labels is not None and config.model.num_labels != len(train.classes):
                raise DataError(
                    f"{data.train_images} has {len(train.classes)} classes but model.num_labels="
                    f"{config.model.num_labels}: set model.num_labels={len(train.classes)} (or null)"
                )
            self.samples = ClassificationSamples(train, train_processor, training=True)
            self.aspect_ratios = None
            self.collate = collate_classification
            self.val = load_image_folder(data.val_images) if data.val_images is not None else None
            if self.val is not None and self.val.classes != train.classes:
                raise DataError(f"{data.val_images} has other classes than {data.train_images}: {self.val.classes}")
        self.num_train = len(self.samples)

    def evaluate(self, model, accelerator: Accelerator, output_dir: Path) -> dict[str, Any] | None:
        if self.val is None:
            return None
        run = self.config.run
        if self.config.task == "detection":
            metrics = evaluate_detector(
                model,
                self.val,
                self.eval_processor,
                accelerator,
                output_dir,
                batch_size=run.eval_batch_size,
                num_workers=self.config.data.num_workers,
                num_visualized=run.num_visualized,
            )
            return None if metrics is None else metrics.to_dict()
        return evaluate_classifier(
            model,
            self.val,
            self.eval_processor,
            accelerator,
            output_dir,
            batch_size=run.eval_batch_size,
            num_workers=self.config.data.num_workers,
        )


def _scalar_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """Detection `{"stats": {"bbox": {"AP": ..}}}` -> `{"bbox/AP": ..}`; numbers only, for the trackers."""
    metrics = (metrics or {}).get("stats", metrics or {})
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)):
            flat[key] = float(value)
    return flat


def train(config: TrainConfig, *, resume: str | bool | None = None, cpu: bool = False) -> TrainResult:
    """Trains `config`'s model; writes checkpoints, evaluations and the final model folder."""
    run, optim = config.run, config.optim
    output_dir = Path(run.output_dir)
    accelerator = Accelerator(
        mixed_precision=run.mixed_precision,
        cpu=cpu or no_accelerator_device(),
        log_with=_available_trackers(run.trackers) or None,
        project_dir=str(output_dir),
        # Heads without a positive sample in a batch leave parameters out of the graph.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    micro_batches = accelerator.num_processes * optim.gradient_accumulation_steps
    if optim.batch_size % micro_batches:
        raise ConfigError(
            f"optim.batch_size={optim.batch_size} images per iteration cannot be split over "
            f"{accelerator.num_processes} processes x {optim.gradient_accumulation_steps} accumulation steps"
        )
    per_process_batch = optim.batch_size // micro_batches
    set_seed(run.seed)

    task = _TaskData(config)
    model = build_model(config, task.id2label)
    optimizer = build_optimizer(model, optim)
    model, optimizer = accelerator.prepare(model, optimizer)

    checkpoint = resolve_resume(resume, output_dir)
    start = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        start = checkpoint_iteration(checkpoint)
        logger.info("resumed from %s at iteration %d", checkpoint, start)
    elif accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(output_dir / "config.yaml")
    if accelerator.log_with:
        accelerator.init_trackers(output_dir.name, config=_flat_config(config))

    accumulation = optim.gradient_accumulation_steps
    sampler = TrainingBatchSampler(
        task.num_train,
        per_process_batch,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        seed=run.seed,
        aspect_ratios=task.aspect_ratios,
        start_iteration=start * accumulation,
    )
    loader = DataLoader(
        task.samples,
        batch_sampler=sampler,
        collate_fn=task.collate,
        num_workers=config.data.num_workers,
        # Its own generator, so that starting the workers does not consume the global RNG that
        # drop path and proposal sampling draw from (that would break exact resumption).
        generator=torch.Generator().manual_seed(run.seed),
        persistent_workers=config.data.num_workers > 0,
    )
    batches = iter(loader)
    history: list[dict[str, float]] = []
    history_file = output_dir / "history.jsonl"
    if accelerator.is_main_process and history_file.exists():
        # A resumed run repeats what came after its checkpoint: drop those lines.
        kept = [line for line in history_file.read_text().splitlines() if json.loads(line)["iteration"] <= start]
        atomic_write_text(history_file, "".join(line + "\n" for line in kept))
    metrics = None
    model.train()
    progress = tqdm(total=optim.max_iter, initial=start, desc="training", disable=not accelerator.is_local_main_process)
    window: dict[str, float] = {}  # loss sums since the last log line
    window_steps, window_start = 0, time.perf_counter()
    for iteration in range(start, optim.max_iter):
        lr = set_learning_rate(optimizer, optim, iteration)
        for micro in range(accumulation):
            batch = next(batches)
            sync = micro == accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                if config.task == "detection":
                    outputs = model(
                        pixel_values=batch["pixel_values"].to(accelerator.device),
                        pixel_mask=batch["pixel_mask"].to(accelerator.device),
                        labels=_to_device(batch["labels"], accelerator.device),
                    )
                    parts = {k: v.detach() for k, v in outputs.loss_dict.items()}
                else:
                    outputs = model(
                        pixel_values=batch["pixel_values"].to(accelerator.device),
                        labels=batch["labels"].to(accelerator.device),
                    )
                    parts = {}
                loss = outputs.loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at iteration {iteration} ({ {k: float(v) for k, v in parts.items()} }); "
                        "lower optim.lr, raise optim.warmup_iters, or check the annotations"
                    )
                accelerator.backward(loss / accumulation)
            for name, value in {"loss": loss.detach(), **parts}.items():
                window[name] = window.get(name, 0.0) + float(value) / accumulation
        grad_norm = None
        if optim.clip_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = iteration + 1
        window_steps += 1
        progress.update(1)

        if done % run.log_every == 0 or done == optim.max_iter:
            names = sorted(window)
            averaged = accelerator.reduce(
                torch.tensor([window[n] / window_steps for n in names], device=accelerator.device), reduction="mean"
            )
            record = {"iteration": done, "lr": lr, **dict(zip(names, averaged.tolist()))}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            record["seconds_per_iteration"] = (time.perf_counter() - window_start) / window_steps
            window, window_steps, window_start = {}, 0, time.perf_counter()
            history.append(record)
            progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
            accelerator.log({k: v for k, v in record.items() if k != "iteration"}, step=done)
            if accelerator.is_main_process:
                with history_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
        if done % run.checkpoint_every == 0 and done != optim.max_iter:
            save_checkpoint(accelerator, output_dir, done, run.keep_checkpoints)
        if done % run.eval_every == 0 and done != optim.max_iter:
            metrics = task.evaluate(model, accelerator, output_dir / "eval" / f"iteration-{done}")
            accelerator.log(_scalar_metrics(metrics), step=done)
    progress.close()

    save_checkpoint(accelerator, output_dir, optim.max_iter, run.keep_checkpoints)
    metrics = task.evaluate(model, accelerator, output_dir / "eval" / "final")
    if metrics is not None:
        accelerator.log(_scalar_metrics(metrics), step=optim.max_iter)
    model_dir = None
    if accelerator.is_main_process:
        model_dir = save_final_model(accelerator.unwrap_model(model), task.eval_processor, config, output_dir)
        full_history = [json.loads(line) for line in history_file.read_text().splitlines() if line.strip()]
        if full_history:
            save_loss_curve(full_history, output_dir / "loss_curve.png")
        if metrics is not None:
            atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2))
            if config.task == "detection":
                write_evaluation_card(model_dir, CocoMetrics.from_dict(metrics), config)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir, model_dir, optim.max_iter, metrics, history)


def save_final_model(model, image_processor, config: TrainConfig, output_dir: Path) -> Path:
    """save_pretrained of the model and its test-time processor, written whole into `output_dir/model`."""
    final = output_dir / "model"
    partial = output_dir / ".partial-model"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    image_processor.save_pretrained(partial)
    config.save(partial / "training_config.yaml")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final
