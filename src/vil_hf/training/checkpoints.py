"""Accelerate checkpoints written whole or not at all, the newest K kept.

A checkpoint folder is named after the iteration it ends, `checkpoint-{iteration}`; that number is
all the loop needs besides Accelerate's own state, since the learning rate is a function of it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from accelerate import Accelerator

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir/checkpoints`, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir() if (m := _NAME.match(path.name)) and path.is_dir()]
    return [path for _, path in sorted(found)]


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, iteration: int, keep: int) -> Path:
    """`accelerator.save_state` into a temporary folder renamed when complete; prunes to `keep`.

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
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str | bool | None, output_dir: str | Path) -> Path | None:
    """`True`/"latest": the newest checkpoint of the run (an error if none); a path: that checkpoint."""
    if resume in (None, False):
        return None
    if resume in (True, "latest"):
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(
                f"--resume: no checkpoint under {Path(output_dir) / 'checkpoints'}; "
                "train without --resume or give the checkpoint folder"
            )
        return found[-1]
    path = Path(resume)
    if not _NAME.match(path.name) or not any(path.glob("model*.safetensors")):
        raise FileNotFoundError(
            f"--resume {path}: not a checkpoint folder written by training "
            "(expected checkpoints/checkpoint-<iteration> holding model.safetensors)"
        )
    return path


def checkpoint_iteration(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))
