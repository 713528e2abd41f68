"""The loss curve as a PNG, drawn with numpy and written with zlib (no plotting library needed).

    png = loss_curve_png(train=[(5, 2.9), (10, 2.1)], valid=[(10, 2.3)])
    Path("loss.png").write_bytes(png)

Train loss is a blue line, validation loss orange points joined by a thin line, on light grid lines
with tick labels in a small built-in bitmap font.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

WIDTH, HEIGHT = 720, 400
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 36, 44  # margins around the plot area
TRAIN_COLOR = (31, 119, 180)
VALID_COLOR = (255, 127, 14)
AXIS_COLOR = (90, 90, 90)
GRID_COLOR = (225, 225, 225)
TEXT_COLOR = (40, 40, 40)
SCALE = 2  # each font pixel is SCALE x SCALE screen pixels

# 3x5 glyphs for the characters the labels use.
GLYPHS = {
    "0": ["###", "#.#", "#.#", "#.#", "###"], "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"], "3": ["###", "..#", ".##", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"], "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"], "7": ["###", "..#", ".#.", ".#.", ".#."],
    "8": ["###", "#.#", "###", "#.#", "###"], "9": ["###", "#.#", "###", "..#", "###"],
    ".": ["...", "...", "...", "...", ".#."], "-": ["...", "...", "###", "...", "..."],
    " ": ["...", "...", "...", "...", "..."], "a": ["...", "##.", "..#", "###", "###"],
    "d": ["..#", "..#", "###", "#.#", "###"], "e": ["...", "###", "###", "#..", "###"],
    "i": [".#.", "...", ".#.", ".#.", ".#."], "l": ["#..", "#..", "#..", "#..", "##."],
    "n": ["...", "##.", "#.#", "#.#", "#.#"], "o": ["...", "###", "#.#", "#.#", "###"],
    "p": ["...", "###", "#.#", "###", "#.."], "r": ["...", "#.#", "##.", "#..", "#.."],
    "s": ["...", "###", "##.", "..#", "###"], "t": [".#.", "###", ".#.", ".#.", ".##"],
    "v": ["...", "#.#", "#.#", "#.#", ".#."],
}


def loss_curve_png(train: list[tuple[int, float]], valid: list[tuple[int, float]]) -> bytes:
    """A PNG of the train (line) and validation (points) losses against the step."""
    canvas = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    points = [p for p in train + valid if math.isfinite(p[1])]
    if points:
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        x_ticks, y_ticks = nice_ticks(min(steps), max(steps)), nice_ticks(min(losses), max(losses))
        x_range = (x_ticks[0], x_ticks[-1])
        y_range = (y_ticks[0], y_ticks[-1])
        to_px = lambda s, v: (_scale(s, x_range, LEFT, WIDTH - RIGHT), _scale(v, y_range, HEIGHT - BOTTOM, TOP))  # noqa: E731
        for tick in x_ticks:
            x = round(_scale(tick, x_range, LEFT, WIDTH - RIGHT))
            canvas[TOP : HEIGHT - BOTTOM, x] = GRID_COLOR
            label = format_tick(tick)
            draw_text(canvas, label, x - text_width(label) // 2, HEIGHT - BOTTOM + 8, TEXT_COLOR)
        for tick in y_ticks:
            y = round(_scale(tick, y_range, HEIGHT - BOTTOM, TOP))
            canvas[y, LEFT : WIDTH - RIGHT] = GRID_COLOR
            label = format_tick(tick)
            draw_text(canvas, label, LEFT - 8 - text_width(label), y - 5, TEXT_COLOR)
        draw_polyline(canvas, [to_px(s, v) for s, v in train if math.isfinite(v)], TRAIN_COLOR, thickness=2)
        valid_px = [to_px(s, v) for s, v in valid if math.isfinite(v)]
        draw_polyline(canvas, valid_px, VALID_COLOR, thickness=1)
        for x, y in valid_px:
            _fill(canvas, x - 3, y - 3, 7, 7, VALID_COLOR)
    canvas[TOP : HEIGHT - BOTTOM + 1, LEFT] = AXIS_COLOR
    canvas[HEIGHT - BOTTOM, LEFT : WIDTH - RIGHT + 1] = AXIS_COLOR
    draw_text(canvas, "step", (WIDTH + LEFT - RIGHT) // 2 - text_width("step") // 2, HEIGHT - 18, TEXT_COLOR)
    draw_text(canvas, "loss", 8, 12, TEXT_COLOR)
    legend_x = WIDTH - RIGHT - text_width("validation") - 30
    for row, (label, color) in enumerate((("train", TRAIN_COLOR), ("validation", VALID_COLOR))):
        y = 10 + row * 14
        _fill(canvas, legend_x, y + 2, 16, 6, color)
        draw_text(canvas, label, legend_x + 22, y, TEXT_COLOR)
    return encode_png(canvas)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = [start]
    while ticks[-1] < high - 1e-9 * step:
        ticks.append(ticks[-1] + step)
    return [round(t, 10) for t in ticks]


def format_tick(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:.4g}"


def _scale(value: float, span: tuple[float, float], start: float, end: float) -> float:
    return start + (value - span[0]) / (span[1] - span[0]) * (end - start)


def _fill(canvas: np.ndarray, x: float, y: float, w: int, h: int, color: tuple[int, int, int]) -> None:
    x0, y0 = max(int(round(x)), 0), max(int(round(y)), 0)
    canvas[y0 : max(y0 + h, 0), x0 : max(x0 + w, 0)] = color


def draw_polyline(canvas: np.ndarray, points: list[tuple[float, float]], color, thickness: int) -> None:
    if len(points) == 1:
        _fill(canvas, points[0][0] - 1, points[0][1] - 1, 3, 3, color)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        count = int(max(abs(x1 - x0), abs(y1 - y0)) * 2) + 1
        xs = np.rint(np.linspace(x0, x1, count)).astype(int)
        ys = np.rint(np.linspace(y0, y1, count)).astype(int)
        for dy in range(thickness):
            for dx in range(thickness):
                canvas[np.clip(ys + dy, 0, HEIGHT - 1), np.clip(xs + dx, 0, WIDTH - 1)] = color


def text_width(text: str) -> int:
    return len(text) * 4 * SCALE - SCALE


def draw_text(canvas: np.ndarray, text: str, x: int, y: int, color) -> None:
    for index, char in enumerate(text):
        for row, line in enumerate(GLYPHS.get(char, GLYPHS[" "])):
            for col, bit in enumerate(line):
                if bit == "#":
                    _fill(canvas, x + (index * 4 + col) * SCALE, y + row * SCALE, SCALE, SCALE, color)


def encode_png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (height, width, 3) uint8 array."""
    height, width, _ = rgb.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1)  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b"")
