"""ViL-Small detection backbone against Swin-T, and the longformer kernels; see `vil_hf.benchmark`.

python scripts/benchmark.py --json benchmark.json
python scripts/benchmark.py --quick --json /tmp/quick.json
"""

from vil_hf.benchmark import main

if __name__ == "__main__":
    main()
