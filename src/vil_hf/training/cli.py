"""Command lines of `scripts/train.py` and `scripts/evaluate.py` (run them with `accelerate launch`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..console import interactive
from .config import ConfigError, load_config

logger = logging.getLogger("vil_hf")

_OVERRIDES_HELP = "config overrides as dotted key=value with YAML values, e.g. optim.lr=1e-4 run.output_dir=out"


def setup_logging() -> None:
    """INFO lines with times, as the training and evaluation scripts and `vil-hf demo` print them.

    Without a terminal (a log file, CI) progress bars are off, transformers' and huggingface_hub's
    too: the loops log lines at their own pace instead.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not interactive():
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        disable_progress_bars()
        transformers_logging.disable_progress_bar()


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/train.py",
        description="Train a ViL detector or classifier from a YAML config (accelerate launch scripts/train.py ...).",
    )
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/vil_small_mask_rcnn_1x.yaml")
    parser.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue the run in run.output_dir from its newest complete checkpoint, or from the checkpoint "
        "folder given",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run.output_dir that holds an earlier run: removes that run's files (checkpoints, "
        "model, eval, logs, history, configs) and refuses if the folder holds anything else",
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the final model folder and its card")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU exists")
    return parser


def train_main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = train_parser().parse_args(argv)
    if args.resume not in (None, "latest") and "=" in args.resume and not Path(args.resume).exists():
        # `--resume optim.max_iter=20`: argparse gave the override to --resume's optional value.
        args.overrides.insert(0, args.resume)
        args.resume = "latest"
    from ..data import DataError
    from .loop import train

    try:
        config = load_config(args.config, args.overrides)
        if args.push_to_hub and (code := _check_push(args.push_to_hub)):
            return code
        result = train(config, resume=args.resume, overwrite=args.overwrite, cpu=args.cpu)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.model_dir is not None:
        print(f"model written to {result.model_dir}")
        if args.push_to_hub:
            return _push(result.model_dir, args.push_to_hub)
    return 0


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/evaluate.py",
        description="COCO box/mask AP of a detector folder (or top-1/top-5 of a classifier) on the config's val data.",
    )
    parser.add_argument("--model", required=True, help="folder written by save_pretrained, training or vil-hf convert")
    parser.add_argument("--config", help="YAML config naming the val data (default: the model's training_config.yaml)")
    parser.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    parser.add_argument("--output-dir", help="where results go (default: MODEL/eval)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the model folder with its new card")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even where a GPU exists")
    return parser


def evaluate_main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = evaluate_parser().parse_args(argv)
    from ..data import DataError
    from ..evaluation.run import evaluate_model_folder

    model_dir = Path(args.model)
    config_path = args.config
    if config_path is None and (model_dir / "training_config.yaml").is_file():
        config_path = model_dir / "training_config.yaml"
    if args.push_to_hub and args.output_dir is not None:
        inside = Path(args.output_dir).resolve().is_relative_to(model_dir.resolve())
        if not inside:
            print(
                f"error: --push-to-hub uploads the model folder {model_dir} with the card of this evaluation, but "
                f"--output-dir {args.output_dir} keeps results and card outside it (the model folder is left "
                "untouched); drop one of the two options",
                file=sys.stderr,
            )
            return 2
    try:
        config = load_config(config_path, args.overrides)
        if args.push_to_hub and (code := _check_push(args.push_to_hub)):
            return code
        metrics = evaluate_model_folder(model_dir, config, output_dir=args.output_dir, cpu=args.cpu)
    except (ConfigError, DataError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if metrics is not None and args.push_to_hub:
        return _push(model_dir, args.push_to_hub)
    return 0


def _check_push(repo_id: str) -> int:
    """0 when an upload could happen, else the exit code after saying why (before any work)."""
    from ..evaluation.model_cards import HubUploadError, check_can_upload

    try:
        check_can_upload(repo_id)
    except HubUploadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


def _push(folder: Path, repo_id: str) -> int:
    from ..evaluation.model_cards import HubUploadError, push_to_hub

    try:
        url = push_to_hub(folder, repo_id)
    except HubUploadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    print(f"uploaded {folder} to {url}")
    return 0
