"""The live loss plot, drawn with PIL.

A plain image behaves the same in gradio 3.41, 4.40 and 6.x (``gr.LinePlot`` changed its API and rendering
between them and needs altair in the older ones), and PIL is already an engine dependency.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 240
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 22, 28
BACKGROUND = (255, 255, 255)
AXIS = (120, 120, 120)
GRID = (232, 232, 232)
RAW_LINE = (160, 190, 235)  # every step's loss, light
SMOOTH_LINE = (31, 90, 200)  # the moving average the eye should follow
VALIDATION_LINE = (230, 110, 20)  # the validation loss: few points, each marked
VALIDATION_DOT = 3  # pixels, the radius of a validation point
TEXT = (60, 60, 60)


def smooth(values: Sequence[float], weight: float = 0.9) -> List[float]:
    """A bias-corrected exponential moving average (TensorBoard's smoothing)."""
    result: List[float] = []
    average, correction = 0.0, 1.0
    for value in values:
        average = weight * average + (1 - weight) * value
        correction *= weight
        result.append(average / (1 - correction))
    return result


def downsample(steps: Sequence[int], values: Sequence[float], limit: int) -> Tuple[List[float], List[float]]:
    """At most ``limit`` points: averages of equal runs of consecutive points, so long runs stay cheap to draw."""
    if len(values) <= limit:
        return [float(s) for s in steps], [float(v) for v in values]
    size = len(values) / limit
    xs, ys = [], []
    for i in range(limit):
        lo, hi = int(i * size), max(int((i + 1) * size), int(i * size) + 1)
        xs.append(sum(steps[lo:hi]) / (hi - lo))
        ys.append(sum(values[lo:hi]) / (hi - lo))
    return xs, ys


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.2e}"


def render_loss_plot(
    steps: Sequence[int],
    losses: Sequence[float],
    *,
    width: int = WIDTH,
    height: int = HEIGHT,
    title: Optional[str] = None,
    validation: Tuple[Sequence[int], Sequence[float]] = ((), ()),
) -> Image.Image:
    """Loss against step: the raw values light, their moving average dark, with min/max and step labels;
    ``validation`` (steps, values) as marked points joined by a line, on the same axes."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = MARGIN_LEFT, MARGIN_TOP, width - MARGIN_RIGHT, height - MARGIN_BOTTOM
    finite = [(s, v) for s, v in zip(steps, losses, strict=False) if math.isfinite(v)]
    checked = [(float(s), v) for s, v in zip(*validation, strict=False) if math.isfinite(v)]
    draw.rectangle((left, top, right, bottom), outline=AXIS)
    if not finite:
        draw.text((left, 4), title or "Loss", fill=TEXT, font=font)
        draw.text((left + 10, (top + bottom) // 2 - 6), "No loss values yet", fill=TEXT, font=font)
        return image
    xs, ys = downsample([s for s, _ in finite], [v for _, v in finite], limit=max(2, right - left))
    smoothed = smooth(ys)
    lo, hi = min(ys + [v for _, v in checked]), max(ys + [v for _, v in checked])
    if hi - lo < 1e-12:  # a flat line: give it some room instead of dividing by zero
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    x_lo = min([xs[0]] + [s for s, _ in checked])
    x_hi = max([xs[-1]] + [s for s, _ in checked])
    x_hi = x_hi if x_hi > x_lo else x_lo + 1

    def point(x: float, y: float) -> Tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))

    for fraction in (0.25, 0.5, 0.75):
        y = top + fraction * (bottom - top)
        draw.line((left + 1, y, right - 1, y), fill=GRID)
    for series, colour, line_width in ((ys, RAW_LINE, 1), (smoothed, SMOOTH_LINE, 2)):
        points = [point(x, y) for x, y in zip(xs, series, strict=True)]
        if len(points) == 1:
            px, py = points[0]
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        else:
            draw.line(points, fill=colour, width=line_width)
    if checked:
        points = [point(x, y) for x, y in checked]
        if len(points) > 1:
            draw.line(points, fill=VALIDATION_LINE, width=1)
        for px, py in points:
            r = VALIDATION_DOT
            draw.ellipse((px - r, py - r, px + r, py + r), fill=VALIDATION_LINE)
    draw.text((4, top - 2), _label(hi), fill=TEXT, font=font)
    draw.text((4, bottom - 10), _label(lo), fill=TEXT, font=font)
    draw.text((left, bottom + 6), f"step {int(x_lo)}", fill=TEXT, font=font)
    end_label = f"step {int(x_hi)}"
    draw.text((right - 8 * len(end_label), bottom + 6), end_label, fill=TEXT, font=font)
    caption = title or f"Loss {_label(finite[-1][1])} (smoothed {_label(smoothed[-1])})"
    if checked and not title:
        caption += f", validation {_label(checked[-1][1])}"
    draw.text((left, 4), caption, fill=TEXT, font=font)
    return image
