"""A run owns its output folder.

`run.output_dir` holds one run: `run.json` names it (a random run id), every checkpoint carries the
same id, and only checkpoints with it are pruned or resumed. Starting a run in a folder that is not
empty is refused unless `--resume` continues the run there or `--overwrite` starts over; overwriting
removes only what a run writes (the names in `RUN_ENTRIES`) and refuses to run at all when anything
else is in the folder. `--resume` picks the newest checkpoint of the run that is complete, skipping
damaged ones with a warning, and refuses one of another model config or one that already reached
`optim.max_iter`.

Everything here that only reads runs before any data is touched; the folder is changed
(`claim_output_dir`) only once the data and the model are ready.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..io_utils import atomic_write_text
from .checkpoints import checkpoint_iteration, damage, is_checkpoint_name, list_checkpoints, read_record
from .config import ConfigError, TrainConfig, describe_differences, differences

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
LOGS = "logs"  # the trackers' folder (TensorBoard event files)
# What a run writes at the top of its folder, which is all that --overwrite removes.
RUN_ENTRIES = frozenset(
    {RUN_FILE, CONFIG_FILE, "history.jsonl", "loss_curve.png", "metrics.json", "checkpoints", "model", "eval", LOGS}
)
_RUN_ENTRY_PATTERNS = (
    re.compile(r"^config-until-iteration-\d+\.yaml$"),  # the config of an earlier part of a resumed run
    re.compile(r"^\.partial-model$"),  # a final model folder being written
    re.compile(r"^\..+\.tmp$"),  # a file being written atomically
)
_CHECKPOINT_ENTRY = re.compile(r"^(\.partial-)?checkpoint-\d+$")  # not checkpoint-N-of-run-X: another run's


class RunFolderError(ConfigError):
    """run.output_dir, --resume or --overwrite cannot be honoured as asked; the message says what to do."""


@dataclass
class RunPlan:
    """What a run will do with its folder, decided before any data work."""

    output_dir: Path
    run_id: str
    fresh: bool  # a new run (else resumed)
    overwrite: bool = False  # remove an earlier run's files first
    candidates: list[Path] = field(default_factory=list)  # checkpoints to resume from, best first
    record: dict[str, Any] | None = None  # the newest candidate's run record


def _is_run_entry(folder: Path, name: str) -> bool:
    if name == "checkpoints" and (folder / name).is_dir():
        return all(_CHECKPOINT_ENTRY.match(entry) for entry in os.listdir(folder / name))
    return name in RUN_ENTRIES or any(pattern.match(name) for pattern in _RUN_ENTRY_PATTERNS)


def _folder_run_id(folder: Path) -> str | None:
    try:
        run_id = json.loads((folder / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) else None


def _listing(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _describe(folder: Path, entries: list[str]) -> str:
    checkpoints = list_checkpoints(folder)
    held = f"checkpoints up to iteration {checkpoint_iteration(checkpoints[-1])}; " if checkpoints else ""
    return f"{held}it holds {_listing(entries)}"


def model_differences(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Differences in what defines the model: the task and `model.*`, except `model.init_from` and
    `model.backbone_from` (the weights a run started from; weights of another architecture fail to load with their
    own message) and `model.num_labels` (the labels are compared from the data)."""

    def defines_model(name: str) -> bool:
        starts = ("model.init_from", "model.backbone_from", "model.num_labels")
        return (name == "task" or name.startswith("model.")) and name not in starts

    return differences(before, after, defines_model)


def plan_run(config: TrainConfig, resume: str | bool | None, overwrite: bool = False) -> RunPlan:
    """Checks `run.output_dir` against `--resume` / `--overwrite`, and chooses the checkpoint to
    resume from; reads only. `config` has absolute paths."""
    folder = Path(config.run.output_dir)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"run.output_dir {folder} exists and is not a folder; choose another run.output_dir")
    entries = sorted(os.listdir(folder)) if folder.is_dir() else []
    if resume not in (None, False) and overwrite:
        raise RunFolderError(
            "--resume continues the run in run.output_dir and --overwrite starts it over: give one of them"
        )
    if resume in (None, False):
        if entries and not overwrite:
            raise RunFolderError(
                f"run.output_dir {folder} is not empty ({_describe(folder, entries)}). A run owns its folder: "
                "continue the run there with --resume, start it over with --overwrite (which removes what a "
                "training run writes there and nothing else), or choose another run.output_dir"
            )
        unrelated = [name for name in entries if not _is_run_entry(folder, name)]
        if unrelated:
            raise RunFolderError(
                f"--overwrite: run.output_dir {folder} holds files that training does not write "
                f"({_listing(unrelated)}); --overwrite removes only a run's own files ({', '.join(sorted(RUN_ENTRIES))}, "
                "checkpoints/checkpoint-N, config-until-iteration-N.yaml), so move those files elsewhere or "
                "choose another run.output_dir"
            )
        return RunPlan(folder, uuid.uuid4().hex, fresh=True, overwrite=bool(entries))
    if resume in (True, "latest"):
        plan = _plan_latest(folder, entries)
    else:
        plan = _plan_explicit(folder, entries, Path(resume).absolute())
    _check_resumable(plan, config)
    return plan


def _plan_latest(folder: Path, entries: list[str]) -> RunPlan:
    checkpoints = list_checkpoints(folder)[::-1]  # newest first
    if not checkpoints:
        if entries:
            raise RunFolderError(
                f"--resume: the run in {folder} has no checkpoint yet (it stopped before its first one; "
                "run.checkpoint_every sets how often they are written): start it over with --overwrite"
            )
        raise RunFolderError(
            f"--resume: no checkpoint under {folder / 'checkpoints'}; train without --resume to start the run, "
            "or give the checkpoint folder to continue from (--resume PATH)"
        )
    run_id = _folder_run_id(folder)
    if run_id is None:
        raise RunFolderError(
            f"--resume: {folder} holds checkpoints but no run record ({RUN_FILE}); they were written by an earlier "
            f"vil-hf. Continue from one of them explicitly: --resume {checkpoints[0]}"
        )
    candidates, skipped = [], []
    for checkpoint in checkpoints:
        record = read_record(checkpoint)
        if record is not None and record["run_id"] != run_id:
            logger.warning(
                "--resume: %s belongs to another run (run id %s); it is left alone", checkpoint, record["run_id"]
            )
            continue
        problem = damage(checkpoint)
        if problem is not None:
            skipped.append((checkpoint, problem))
            continue
        candidates.append(checkpoint)
    if not candidates:
        reasons = "; ".join(f"{path.name}: {problem}" for path, problem in skipped) or "none is of this run"
        raise RunFolderError(
            f"--resume: no complete checkpoint of the run in {folder} ({reasons}). Start the run over with --overwrite"
        )
    for path, problem in skipped:
        if checkpoint_iteration(path) > checkpoint_iteration(candidates[0]):
            logger.warning(
                "--resume: skipping %s (%s); continuing from %s, the newest complete checkpoint",
                path.name, problem, candidates[0].name,
            )  # fmt: skip
    return RunPlan(folder, run_id, fresh=False, candidates=candidates, record=read_record(candidates[0]))


def _plan_explicit(folder: Path, entries: list[str], checkpoint: Path) -> RunPlan:
    if not (checkpoint.is_dir() and is_checkpoint_name(checkpoint.name)):
        raise RunFolderError(
            f"--resume {checkpoint}: not a checkpoint folder written by training "
            "(expected RUN/checkpoints/checkpoint-<iteration> holding model.safetensors)"
        )
    record = read_record(checkpoint)
    problem = damage(checkpoint)
    if problem is not None and not (record is None and "run record" in problem):
        raise RunFolderError(f"--resume {checkpoint}: cannot continue from it: {problem}")
    folder_id = _folder_run_id(folder)
    own_folder = checkpoint.parent.parent == folder
    run_id = (record or {}).get("run_id") or folder_id or uuid.uuid4().hex
    if folder_id is not None and folder_id != run_id:
        raise RunFolderError(
            f"--resume {checkpoint}: it belongs to another run than the one in run.output_dir {folder}; "
            "continue it in its own folder or in an empty run.output_dir"
        )
    if not own_folder and entries and folder_id is None:
        raise RunFolderError(
            f"--resume {checkpoint}: run.output_dir {folder} is not empty ({_describe(folder, entries)}) and holds "
            "no run of that checkpoint; continue it in its own folder or in an empty run.output_dir"
        )
    if record is None:
        logger.warning(
            "--resume %s: the checkpoint has no run record (written by an earlier vil-hf); its model config is "
            "compared with %s where that exists",
            checkpoint,
            checkpoint.parent.parent / CONFIG_FILE,
        )
        record = _legacy_record(checkpoint)
    return RunPlan(folder, run_id, fresh=False, candidates=[checkpoint], record=record)


def _legacy_record(checkpoint: Path) -> dict[str, Any] | None:
    try:
        saved = yaml.safe_load((checkpoint.parent.parent / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return {"config": saved} if isinstance(saved, dict) else None


def _check_resumable(plan: RunPlan, config: TrainConfig) -> None:
    checkpoint = plan.candidates[0]
    iteration = checkpoint_iteration(checkpoint)
    saved = (plan.record or {}).get("config")
    if isinstance(saved, dict):
        found = model_differences(saved, config.to_dict())
        if found:
            raise RunFolderError(
                f"--resume: {checkpoint} was trained with another model config ("
                f"{describe_differences(found, 'checkpoint', 'now')}). Resume with the config the run started with "
                f"(its copy: {plan.output_dir / CONFIG_FILE}), or start a new run in another run.output_dir"
            )
    if iteration >= config.optim.max_iter:
        raise RunFolderError(
            f"--resume: {checkpoint} is at iteration {iteration} and optim.max_iter={config.optim.max_iter}, so "
            "there is nothing left to train (the finished model is in "
            f"{plan.output_dir / 'model'} if the run completed). To train longer, raise it: "
            f"--resume optim.max_iter={2 * iteration} (and optim.steps if the schedule should stretch too)"
        )


def check_labels(plan: RunPlan, id2label: dict[int, str]) -> None:
    """A resumed run's data must have the labels its checkpoint was trained with."""
    saved = (plan.record or {}).get("id2label")
    if plan.fresh or saved is None:
        return
    saved = {int(k): v for k, v in saved.items()}
    if saved != dict(id2label):
        raise RunFolderError(
            f"--resume: the data's classes ({len(id2label)}: {_listing(list(id2label.values()), 5)}) differ from those "
            f"{plan.candidates[0]} was trained on ({len(saved)}: {_listing(list(saved.values()), 5)}); resume with "
            "the data the run started with"
        )


def checkpoint_record(plan: RunPlan, config: TrainConfig, id2label: dict[int, str]) -> dict[str, Any]:
    """What each checkpoint of the run records besides Accelerate's state (iteration added on save)."""
    return {"run_id": plan.run_id, "config": config.to_dict(), "id2label": {str(k): v for k, v in id2label.items()}}


def claim_output_dir(plan: RunPlan, config: TrainConfig, start: int) -> None:
    """Main process only: clears an overwritten run, writes run.json and the config that runs now.

    On resume a config.yaml that differs (in the ways a resume allows, e.g. a longer optim.max_iter)
    is kept as config-until-iteration-{start}.yaml.
    """
    folder = plan.output_dir
    if plan.overwrite:
        for name in sorted(os.listdir(folder)):
            if not _is_run_entry(folder, name):  # appeared since plan_run checked
                raise RunFolderError(f"--overwrite: {folder / name} appeared in run.output_dir; it is left alone")
        for name in sorted(os.listdir(folder)):
            path = folder / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        logger.info("--overwrite: removed the earlier run's files from %s", folder)
    folder.mkdir(parents=True, exist_ok=True)
    if _folder_run_id(folder) != plan.run_id:
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(folder / RUN_FILE, json.dumps({"run_id": plan.run_id, "started": started}, indent=1) + "\n")
    current = folder / CONFIG_FILE
    if not plan.fresh and current.is_file():
        try:
            before = yaml.safe_load(current.read_text()) or {}
        except yaml.YAMLError:
            before = {}
        found = differences(before, config.to_dict()) if isinstance(before, dict) else []
        if found:
            kept = folder / f"config-until-iteration-{start}.yaml"
            os.replace(current, kept)
            logger.info(
                "resumed with changed settings (%s); the earlier config is kept as %s",
                describe_differences(found, "before", "now"),
                kept.name,
            )
    config.save(current)
