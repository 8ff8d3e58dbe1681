"""Loss curves as a PNG, drawn with PIL so that training needs no plotting library."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..io_utils import atomic_save_image

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def save_loss_curve(history: list[dict[str, float]], path: str | Path, size: tuple[int, int] = (720, 420)) -> None:
    """Plots every `loss*` series of the logged history against the iteration (log-scale y)."""
    names = sorted({k for record in history for k in record if k.startswith("loss")}, key=lambda n: (n != "loss", n))
    points = {
        name: [(r["iteration"], r[name]) for r in history if name in r and r[name] > 0 and math.isfinite(r[name])]
        for name in names
    }
    points = {name: series for name, series in points.items() if series}
    width, height = size
    left, right, top, bottom = 60, 170, 20, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.rectangle([left, top, width - right, height - bottom], outline=(80, 80, 80))
    if points:
        xs = [x for series in points.values() for x, _ in series]
        ys = [math.log10(y) for series in points.values() for _, y in series]
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)
        y0, y1 = math.floor(min(ys)), math.ceil(max(ys))
        y1 = max(y1, y0 + 1)

        def to_pixel(x: float, y: float) -> tuple[float, float]:
            px = left + (x - x0) / (x1 - x0) * (width - right - left)
            py = height - bottom - (math.log10(y) - y0) / (y1 - y0) * (height - bottom - top)
            return px, py

        for exponent in range(y0, y1 + 1):
            _, py = to_pixel(x0, 10.0**exponent)
            draw.line([left, py, width - right, py], fill=(225, 225, 225))
            draw.text((6, py - 6), f"1e{exponent}", fill="black", font=font)
        draw.text((left, height - bottom + 8), str(x0), fill="black", font=font)
        draw.text((width - right - 40, height - bottom + 8), str(x1), fill="black", font=font)
        draw.text(((width - right + left) // 2 - 25, height - bottom + 20), "iteration", fill="black", font=font)
        for index, (name, series) in enumerate(points.items()):
            colour = _COLOURS[index % len(_COLOURS)]
            pixels = [to_pixel(x, y) for x, y in series]
            if len(pixels) > 1:
                draw.line(pixels, fill=colour, width=2 if name == "loss" else 1)
            else:
                draw.ellipse([pixels[0][0] - 2, pixels[0][1] - 2, pixels[0][0] + 2, pixels[0][1] + 2], fill=colour)
            draw.text((width - right + 10, top + 16 * index), name, fill=colour, font=font)
    atomic_save_image(path, image)
