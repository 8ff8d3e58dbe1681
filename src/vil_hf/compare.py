"""Side by side: the demo's Mask R-CNN on each of `demo.DEMO_BACKBONES`, under the demo's own recipe.

`python scripts/compare_backbones.py` runs `vil-hf demo --backbone NAME` once per backbone, each in a fresh
process (so that one run's memory and caches do not slow the next), with the same data set, iterations, batch
and schedule: whatever `vil_hf.demo` says the demo is. It then reads each run's metrics, history and model
folder and writes a table (Markdown and JSON): box and mask AP, parameters, and seconds per training iteration,
also as a ratio to ViL's measured in the same comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .demo import DEMO_BACKBONES, DemoSettings
from .io_utils import atomic_write_text

TITLES = {"vil": "ViL (the demo model)", "swin": "Swin", "convnext": "ConvNeXt", "resnet": "ResNet (ResNet-18 layout)"}


@dataclass
class ComparisonRow:
    backbone: str
    box_ap: float
    mask_ap: float
    parameters: int  # the whole detector
    backbone_parameters: int
    seconds_per_iteration: float  # training, averaged over the run's log windows
    minutes: float  # the whole demo run: data, training, evaluation
    data_digest: str  # of the training annotations: the same images for every backbone


def _history_seconds_per_iteration(history_file: Path) -> float:
    """Training seconds per iteration over the whole run, from the log windows of history.jsonl."""
    total_seconds, previous = 0.0, 0
    for line in history_file.read_text().splitlines():
        record = json.loads(line)
        total_seconds += record["seconds_per_iteration"] * (record["iteration"] - previous)
        previous = record["iteration"]
    return total_seconds / previous


def collect_row(backbone: str, folder: Path, minutes: float) -> ComparisonRow:
    """The numbers of one finished demo run in `folder` (its `run/` and `shapes/`)."""
    from transformers import AutoModelForObjectDetection

    import vil_hf  # noqa: F401  (registers the detectors)

    stats = json.loads((folder / "run" / "metrics.json").read_text())["stats"]
    model = AutoModelForObjectDetection.from_pretrained(folder / "run" / "model")
    annotations = (folder / "shapes" / "annotations" / "instances_train.json").read_bytes()
    return ComparisonRow(
        backbone=backbone,
        box_ap=stats["bbox"]["AP"],
        mask_ap=stats["segm"]["AP"],
        parameters=sum(p.numel() for p in model.parameters()),
        backbone_parameters=sum(p.numel() for p in model.backbone.parameters()),
        seconds_per_iteration=_history_seconds_per_iteration(folder / "run" / "history.jsonl"),
        minutes=minutes,
        data_digest=hashlib.sha256(annotations).hexdigest()[:16],
    )


def run_demo_process(backbone: str, folder: Path, settings: DemoSettings) -> float:
    """`vil-hf demo --backbone BACKBONE` in a fresh process, its output in `folder/demo.log`; returns minutes."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "vil_hf.cli", "demo", "--backbone", backbone, "--output-dir", str(folder),
        "--max-iter", str(settings.max_iter), "--num-train", str(settings.num_train),
        "--num-val", str(settings.num_val), "--seed", str(settings.seed),
    ]  # fmt: skip
    start = time.perf_counter()
    with open(folder / "demo.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {backbone} demo failed (exit {done.returncode}); see {folder / 'demo.log'}")
    return (time.perf_counter() - start) / 60


def comparison_markdown(rows: list[ComparisonRow], setup: dict) -> str:
    reference = next((row for row in rows if row.backbone == "vil"), rows[0])
    lines = [
        "| backbone | box AP | mask AP | parameters (backbone) | s / iteration | time vs ViL |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {TITLES.get(row.backbone, row.backbone)} | {row.box_ap:.1f} | {row.mask_ap:.1f} "
            f"| {row.parameters / 1e6:.2f}M ({row.backbone_parameters / 1e6:.2f}M) | {row.seconds_per_iteration:.2f} "
            f"| {row.seconds_per_iteration / reference.seconds_per_iteration:.2f} |"
        )
    lines += [
        "",
        f"{setup['max_iter']} iterations of {setup['batch_size']} images, {setup['num_train']} training and "
        f"{setup['num_val']} validation images; load average {setup['load_before'][0]:.2f} before and "
        f"{setup['load_after'][0]:.2f} after (1-minute), {setup['cpus']} CPUs, OMP_NUM_THREADS="
        f"{setup['omp_num_threads'] or 'unset'}.",
    ]
    return "\n".join(lines) + "\n"


def compare_backbones(
    output_dir: str | Path, backbones: list[str], settings: DemoSettings | None = None, log=print
) -> dict:
    """Runs the demo on each backbone in turn and writes `comparison.json` and `comparison.md` in `output_dir`."""
    settings = settings or DemoSettings()
    unknown = [name for name in backbones if name not in DEMO_BACKBONES]
    if unknown:
        raise ValueError(f"unknown backbones {unknown}; choose from {', '.join(DEMO_BACKBONES)}")
    root = Path(output_dir)
    setup = {
        "max_iter": settings.max_iter,
        "batch_size": settings.batch_size,
        "num_train": settings.num_train,
        "num_val": settings.num_val,
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_before": list(os.getloadavg()),
    }
    rows = []
    for backbone in backbones:
        log(f"{backbone}: vil-hf demo --backbone {backbone} (log: {root / backbone / 'demo.log'}) ...")
        minutes = run_demo_process(backbone, root / backbone, settings)
        rows.append(collect_row(backbone, root / backbone, minutes))
        log(f"{backbone}: box AP {rows[-1].box_ap:.1f}, mask AP {rows[-1].mask_ap:.1f}, {minutes:.1f} min")
    setup["load_after"] = list(os.getloadavg())
    if len({row.data_digest for row in rows}) != 1:
        raise RuntimeError("the runs trained on different data sets; compare runs of the same demo settings")
    result = {"setup": setup, "rows": [asdict(row) for row in rows]}
    atomic_write_text(root / "comparison.json", json.dumps(result, indent=2))
    atomic_write_text(root / "comparison.md", comparison_markdown(rows, setup))
    return result


def main(argv: list[str] | None = None) -> int:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(
        prog="scripts/compare_backbones.py",
        description="The demo's Mask R-CNN on each backbone with the demo's recipe: box/mask AP, parameters, time.",
    )
    parser.add_argument("--output-dir", default="backbone-comparison", help="default backbone-comparison/")
    parser.add_argument("--backbones", nargs="+", default=list(DEMO_BACKBONES), choices=list(DEMO_BACKBONES))
    parser.add_argument("--max-iter", type=int, default=defaults.max_iter, help=f"default {defaults.max_iter}")
    parser.add_argument("--num-train", type=int, default=defaults.num_train, help=f"default {defaults.num_train}")
    parser.add_argument("--num-val", type=int, default=defaults.num_val, help=f"default {defaults.num_val}")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"default {defaults.seed}")
    args = parser.parse_args(argv)
    settings = DemoSettings(max_iter=args.max_iter, num_train=args.num_train, num_val=args.num_val, seed=args.seed)
    result = compare_backbones(args.output_dir, args.backbones, settings)
    rows = [ComparisonRow(**row) for row in result["rows"]]
    print()
    print(comparison_markdown(rows, result["setup"]), end="")
    print(f"\nwritten: {Path(args.output_dir) / 'comparison.md'}, {Path(args.output_dir) / 'comparison.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
