"""Accelerate checkpoints written whole or not at all, each stamped with the run that wrote it.

A checkpoint folder is named after the iteration it ends, `checkpoint-{iteration}`; that number is
all the loop needs besides Accelerate's own state, since the learning rate is a function of it.
Each also holds `vil_hf_run.json`: the run id, the iteration, the resolved config and the labels.
Pruning to the newest K touches only checkpoints of the current run, and resuming reads the record
to refuse a checkpoint of another model config.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..io_utils import atomic_write_text

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")
RECORD = "vil_hf_run.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.bin"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders under `output_dir/checkpoints` (of any run), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir() if (m := _NAME.match(path.name)) and path.is_dir()]
    return [path for _, path in sorted(found)]


def checkpoint_iteration(path: Path) -> int:
    return int(_NAME.match(Path(path).name).group(1))


def is_checkpoint_name(name: str) -> bool:
    return _NAME.match(name) is not None


def read_record(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint's run record, or None when it has none (or an unreadable one)."""
    try:
        record = json.loads((Path(checkpoint) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def run_checkpoints(output_dir: str | Path, run_id: str) -> list[Path]:
    """The checkpoints of run `run_id` under `output_dir`, oldest first."""
    return [path for path in list_checkpoints(output_dir) if (read_record(path) or {}).get("run_id") == run_id]


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, iteration: int, keep: int, record: dict[str, Any]
) -> Path:
    """`accelerator.save_state` plus the run record into a temporary folder renamed when complete;
    then prunes the run's own checkpoints (those whose record has `record["run_id"]`) to `keep`.

    Every process must call this (save_state gathers state from all of them).
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"checkpoint-{iteration}"
    partial = root / f".partial-checkpoint-{iteration}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(partial / RECORD, json.dumps({**record, "iteration": iteration}, indent=1))
        if final.is_dir() and (read_record(final) or {}).get("run_id") != record["run_id"]:
            # Not ours (copied in, or an earlier vil-hf's): kept under another name, never replaced.
            owner = (read_record(final) or {}).get("run_id", "unrecorded")
            aside = root / f"{final.name}-of-run-{owner}"
            logger.warning("%s belongs to another run; it is kept as %s", final, aside.name)
            final.rename(aside)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in run_checkpoints(output_dir, record["run_id"])[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def damage(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be loaded (a missing or cut-short file), or None when it looks whole.

    Cheap: safetensors checks that its header covers the whole file, and a torch zip archive cut
    short has lost its central directory; the small random-state archives are read in full.
    """
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return "it is not a folder"
    model = checkpoint / MODEL_FILE
    if not model.is_file():
        return f"{MODEL_FILE} is missing"
    try:
        with safe_open(str(model), framework="pt"):
            pass
    except Exception as error:  # SafetensorError, OSError
        return f"{MODEL_FILE} is damaged or cut short ({error})"
    states = sorted(checkpoint.glob("random_states_*.pkl"))
    if not states:
        return "random_states_0.pkl is missing"
    for path in [checkpoint / OPTIMIZER_FILE, *states]:
        if not path.is_file():
            return f"{path.name} is missing"
        try:
            with zipfile.ZipFile(path) as archive:
                if path in states and archive.testzip() is not None:
                    raise zipfile.BadZipFile("a record fails its CRC check")
        except (zipfile.BadZipFile, OSError) as error:
            return f"{path.name} is damaged or cut short ({error})"
    if read_record(checkpoint) is None:
        return f"{RECORD} (its run record) is missing or unreadable"
    return None
