"""Evaluate a model folder: `accelerate launch scripts/evaluate.py --model DIR [--config CONFIG] [key=value ...]`.

COCO box/mask AP for detectors, top-1/top-5 for classifiers; the logic lives in `vil_hf.evaluation`.
"""

import sys

from vil_hf.training.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
