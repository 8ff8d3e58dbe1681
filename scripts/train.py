"""Train a ViL detector or classifier: `accelerate launch scripts/train.py --config CONFIG [key=value ...]`.

The loop lives in `vil_hf.training`; see the README's "Training and evaluation" section.
"""

import sys

from vil_hf.training.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
