"""How long the up-front image check takes: a COCO-like JPEG set is written, then checked twice
(decoding every image, then from the cache). `scripts/time_image_check.py` runs it."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import _images


def _photo_like(index: int, height: int, width: int, seed: int) -> np.ndarray:
    """Smooth shading plus fine grain: at quality 90 a 640x480 JPEG is ~150 KB, as COCO train2017's 18 GB over 118k images."""
    rng = np.random.default_rng([seed, index])
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, 17, (height, width, 3)).astype(np.int16)
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


def write_jpeg_set(
    root: str | os.PathLike, num_images: int, size: tuple[int, int] = (480, 640), quality: int = 90, seed: int = 0
) -> tuple[Path, Path]:
    """`root/images/*.jpg` and `root/instances.json` (one box per image); returns both paths."""
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    height, width = size

    def write(index: int) -> None:
        Image.fromarray(_photo_like(index, height, width, seed)).save(images / f"{index:012d}.jpg", quality=quality)

    with ThreadPoolExecutor(max_workers=_images._num_threads()) as pool:
        list(pool.map(write, range(num_images)))
    content = {
        "images": [
            {"id": i + 1, "file_name": f"{i:012d}.jpg", "width": width, "height": height} for i in range(num_images)
        ],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0}
            for i in range(num_images)
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    annotations = root / "instances.json"
    annotations.write_text(json.dumps(content))
    return images, annotations


@dataclass
class CheckTiming:
    num_images: int
    mean_file_bytes: float
    threads: int
    first_seconds: float  # every image decoded
    cached_seconds: float  # all from the cache
    first_cpu_seconds: float  # CPU time of the first check, all threads (unlike wall time, not slowed by other work)

    @property
    def first_images_per_second(self) -> float:
        return self.num_images / self.first_seconds

    @property
    def cached_images_per_second(self) -> float:
        return self.num_images / self.cached_seconds


def time_image_check(
    images: Path, annotations: Path, cache_root: str | os.PathLike, threads: int | None = None
) -> CheckTiming:
    """Checks the set's images twice, starting from the empty cache folder `cache_root`: the first
    pass decodes every image, the second finds them all in the cache."""
    threads = threads or _images._num_threads()
    content = json.loads(Path(annotations).read_text())
    paths = [str(Path(images) / entry["file_name"]) for entry in content["images"]]
    sizes = [(entry["width"], entry["height"]) for entry in content["images"]]
    seconds, cpu_start = [], time.process_time()
    for _ in range(2):
        start = time.perf_counter()
        problems = _images.check_image_files(
            paths, verify=True, what="timing", base_dir=str(images), expected_sizes=sizes, threads=threads,
            cache_root=cache_root,
        )  # fmt: skip
        seconds.append(time.perf_counter() - start)
        if len(seconds) == 1:
            first_cpu = time.process_time() - cpu_start
        if problems:
            raise ValueError(f"the timing set has unusable images: {problems[:3]}")
    return CheckTiming(
        num_images=len(paths),
        mean_file_bytes=sum(os.path.getsize(path) for path in paths) / max(len(paths), 1),
        threads=threads,
        first_seconds=seconds[0],
        cached_seconds=seconds[1],
        first_cpu_seconds=first_cpu,
    )


__all__ = ["CheckTiming", "time_image_check", "write_jpeg_set"]
