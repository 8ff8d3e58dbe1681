"""The demo's Mask R-CNN on ViL, Swin, ConvNeXt and ResNet backbones with the demo's recipe, side by side.

    python scripts/compare_backbones.py [--output-dir DIR] [--backbones vil swin convnext resnet] [--max-iter N]

Runs `vil-hf demo --backbone NAME` for each backbone (a fresh process each) and writes DIR/comparison.md and
DIR/comparison.json: box and mask AP, parameters, seconds per iteration and their ratio to ViL's. The logic is
`vil_hf.compare`.
"""

import sys

from vil_hf.compare import main

if __name__ == "__main__":
    sys.exit(main())
