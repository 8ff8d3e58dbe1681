"""Regenerate configs/ and model_cards/ from the published table (vil_hf.published).

    python scripts/generate_configs_and_cards.py [--root REPO_ROOT] [--check]

`--check` writes nothing and exits 1 when a generated file differs from the checked-in one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vil_hf.published import generated_files, write_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="repository root")
    parser.add_argument("--check", action="store_true", help="only report files that would change")
    args = parser.parse_args(argv)
    files = generated_files()
    if args.check:
        stale = [
            p
            for p, text in files.items()
            if not (Path(args.root) / p).is_file() or (Path(args.root) / p).read_text(encoding="utf-8") != text
        ]
        for path in stale:
            print(f"out of date: {path}")
        return 1 if stale else 0
    written = write_files(files, args.root)
    print(f"{len(files)} generated files, {len(written)} changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
