"""Time the up-front image check: `python scripts/time_image_check.py [--images 5000] [--threads N ...]`.

Writes a COCO-like JPEG set (640x480, quality 90) into a temporary folder, checks it with an empty
cache (every image decoded) and again (all from the cache), and extrapolates to COCO train2017.
"""

import argparse
import tempfile
from pathlib import Path

from vil_hf.data.check_timing import time_image_check, write_jpeg_set

COCO_TRAIN_IMAGES = 118_287

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--threads", type=int, nargs="*", default=[0], help="thread counts to time (0: one per core)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        images, annotations = write_jpeg_set(Path(folder) / "set", args.images)
        for number, threads in enumerate(args.threads):  # each with an empty cache of its own
            timing = time_image_check(images, annotations, Path(folder) / f"cache-{number}", threads or None)
            print(
                f"{timing.num_images} JPEGs of {timing.mean_file_bytes / 1e3:.0f} KB on average, {timing.threads} "
                f"threads: first check {timing.first_seconds:.1f} s ({timing.first_images_per_second:.0f} images/s), "
                f"cached {timing.cached_seconds:.2f} s ({timing.cached_images_per_second:.0f} images/s); "
                f"COCO train2017 ({COCO_TRAIN_IMAGES} images) at these rates: "
                f"{COCO_TRAIN_IMAGES / timing.first_images_per_second / 60:.1f} min first, "
                f"{COCO_TRAIN_IMAGES / timing.cached_images_per_second:.0f} s cached; "
                f"CPU time {timing.first_cpu_seconds / timing.num_images * 1e3:.2f} ms per image decoded"
            )
