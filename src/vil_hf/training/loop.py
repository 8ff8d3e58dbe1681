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
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from ..console import interactive, progress_bar
from ..data import (
    ClassificationSamples,
    DataError,
    DetectionSamples,
    ReplaceUnreadable,
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
from .checkpoints import checkpoint_iteration, save_checkpoint
from .config import ConfigError, TrainConfig
from .models import build_image_processor, build_model, check_model_config, training_image_processor
from .optim import build_optimizer, set_learning_rate
from .plots import save_loss_curve
from .run_folder import LOGS, RunFolderError, RunPlan, check_labels, checkpoint_record, claim_output_dir, plan_run

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path | None
    iteration: int
    metrics: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    replaced_images: int = 0  # training images unreadable at run time, replaced by others


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


def _history_iteration(line: str) -> float:
    """The iteration of a history.jsonl line; infinity for a line that does not parse."""
    try:
        return json.loads(line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _log_line(record: dict[str, Any], max_iter: int) -> str:
    """`iteration 20/100  loss 1.2345 (loss_cls 0.3, ...)  lr 2.50e-04  0.52 s/it  ETA 0:00:42`."""
    parts = ", ".join(f"{k} {record[k]:.4f}" for k in sorted(record) if k.startswith("loss") and k != "loss")
    line = f"iteration {record['iteration']}/{max_iter}  loss {record['loss']:.4f}"
    line += f" ({parts})" if parts else ""
    eta = (max_iter - record["iteration"]) * record["seconds_per_iteration"]
    line += f"  lr {record['lr']:.2e}  {record['seconds_per_iteration']:.2f} s/it  ETA {_format_duration(eta)}"
    if record.get("replaced_images"):
        line += f"  ({record['replaced_images']} unreadable images replaced)"
    return line


def _condensed_load_error(error: Exception) -> str | None:
    """A short account of a state dict that does not fit the model (torch lists every tensor), or
    None when `error` is not about the model's shape."""
    text = str(error)
    mismatched = re.findall(r"size mismatch for ([^:]+): copying a param with shape (\S+ \S+|\S+) from checkpoint, "
                            r"the shape in current model is (\S+ \S+|\S+)", text)  # fmt: skip
    missing = re.search(r"Missing key\(s\) in state_dict: (.*?)(?:\.\s*$|\.\s*\n|\n)", text, re.S)
    unexpected = re.search(r"Unexpected key\(s\) in state_dict: (.*?)(?:\.\s*$|\.\s*\n|\n)", text, re.S)
    if not (mismatched or missing or unexpected):
        return None
    parts = []
    if mismatched:
        name, saved, now = mismatched[0]
        parts.append(
            f"{len(mismatched)} tensors of another shape, e.g. {name}: {saved.rstrip('.')} saved, {now.rstrip('.')} now"
        )
    for what, found in (("missing", missing), ("unexpected", unexpected)):
        if found:
            names = [n.strip().strip('"') for n in found.group(1).split(",") if n.strip()]
            parts.append(f"{len(names)} {what} tensors, e.g. {names[0]}")
    return "; ".join(parts)


def _load_checkpoint(accelerator: Accelerator, plan: RunPlan) -> tuple[Path, int]:
    """Loads the newest loadable candidate; a damaged one is skipped with a warning."""
    failures = []
    for checkpoint in plan.candidates:
        try:
            accelerator.load_state(str(checkpoint))
        except Exception as error:  # safetensors, torch.load and load_state_dict raise many types
            condensed = _condensed_load_error(error)
            if condensed is not None:
                raise RunFolderError(
                    f"--resume: the weights in {checkpoint} do not fit the model of this config ({condensed}). "
                    f"Resume with the config the run started with (its copy: {plan.output_dir / 'config.yaml'})"
                ) from None
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            failures.append(f"{checkpoint.name}: {reason}")
            logger.warning(
                "--resume: %s could not be loaded (%s); trying the next older checkpoint", checkpoint, reason
            )
            continue
        return checkpoint, checkpoint_iteration(checkpoint)
    raise RunFolderError(
        f"--resume: no checkpoint of the run in {plan.output_dir} could be loaded ({'; '.join(failures)}). "
        "Start the run over with --overwrite"
    )


def train(
    config: TrainConfig, *, resume: str | bool | None = None, overwrite: bool = False, cpu: bool = False
) -> TrainResult:
    """Trains `config`'s model; writes checkpoints, evaluations and the final model folder.

    The config and the run folder (`run_folder.plan_run`) are checked before any data is read.
    `resume`: True / "latest" for the newest complete checkpoint of the run in `run.output_dir`, or
    a checkpoint folder; `overwrite`: start over in a folder that holds an earlier run.
    """
    config = config.with_absolute_paths().validate()
    check_model_config(config)
    plan = plan_run(config, resume, overwrite)
    run, optim = config.run, config.optim
    output_dir = plan.output_dir
    accelerator = Accelerator(
        mixed_precision=run.mixed_precision,
        cpu=cpu or no_accelerator_device(),
        log_with=_available_trackers(run.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / LOGS)),
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

    with accelerator.main_process_first():  # the others find the main process's image checks cached
        task = _TaskData(config)
    check_labels(plan, task.id2label)
    model = build_model(config, task.id2label)
    if run.gradient_checkpointing:
        # The backbone's own checkpointed blocks and the detectors' heavy head parts, recomputed in the backward.
        model.activation_checkpointing_enable()
        logger.info("gradient checkpointing on: backbone blocks and head convolutions are recomputed in the backward")
    optimizer = build_optimizer(model, optim, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)

    start = 0
    if not plan.fresh:
        checkpoint, start = _load_checkpoint(accelerator, plan)
        logger.info("resumed from %s at iteration %d", checkpoint, start)
    if accelerator.is_main_process:
        claim_output_dir(plan, config, start)
    accelerator.wait_for_everyone()
    record_base = checkpoint_record(plan, config, task.id2label)
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
        ReplaceUnreadable(task.samples),
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
        # A resumed run repeats what came after its checkpoint: drop those lines (and a line cut short
        # when the run was killed).
        kept = [line for line in history_file.read_text().splitlines() if _history_iteration(line) <= start]
        atomic_write_text(history_file, "".join(line + "\n" for line in kept))
    metrics = None
    model.train()
    on_terminal = interactive()
    progress = progress_bar(
        total=optim.max_iter, initial=start, desc="training", disable=not accelerator.is_local_main_process
    )
    window: dict[str, float] = {}  # loss sums since the last log line
    window_steps, window_start, window_replaced, replaced_total = 0, time.perf_counter(), 0, 0
    # On a terminal, log lines go through tqdm so that they do not tear the bar.
    with logging_redirect_tqdm() if on_terminal else contextlib.nullcontext():
        for iteration in range(start, optim.max_iter):
            lr = set_learning_rate(optimizer, optim, iteration)
            for micro in range(accumulation):
                batch = next(batches)
                for reason in batch["replaced"]:
                    window_replaced += 1
                    logger.warning(
                        "iteration %d: a training image could not be read and another took its place (%s)",
                        iteration + 1, reason,
                    )  # fmt: skip
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
                    torch.tensor([window[n] / window_steps for n in names], device=accelerator.device),
                    reduction="mean",
                )
                replaced = int(
                    accelerator.reduce(torch.tensor([window_replaced], device=accelerator.device), reduction="sum")
                )
                replaced_total += replaced
                record = {"iteration": done, "lr": lr, **dict(zip(names, averaged.tolist()))}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                record["seconds_per_iteration"] = (time.perf_counter() - window_start) / window_steps
                record["replaced_images"] = replaced
                window, window_steps, window_start, window_replaced = {}, 0, time.perf_counter(), 0
                history.append(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
                accelerator.log({k: v for k, v in record.items() if k != "iteration"}, step=done)
                if accelerator.is_main_process:
                    if not on_terminal:
                        logger.info(_log_line(record, optim.max_iter))
                    with history_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
            if done % run.checkpoint_every == 0 and done != optim.max_iter:
                save_checkpoint(accelerator, output_dir, done, run.keep_checkpoints, record_base)
            if done % run.eval_every == 0 and done != optim.max_iter:
                metrics = task.evaluate(model, accelerator, output_dir / "eval" / f"iteration-{done}")
                accelerator.log(_scalar_metrics(metrics), step=done)
    progress.close()
    if replaced_total:
        logger.warning(
            "%d training images could not be read during the run and were replaced by others (see the warnings "
            "above and replaced_images in %s)", replaced_total, history_file,
        )  # fmt: skip

    save_checkpoint(accelerator, output_dir, optim.max_iter, run.keep_checkpoints, record_base)
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
    return TrainResult(output_dir, model_dir, optim.max_iter, metrics, history, replaced_total)


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
