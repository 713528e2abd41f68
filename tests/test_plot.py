"""loss.png is drawn without a plotting library; Pillow (an independent PNG decoder) reads it back."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from macft.plot import HEIGHT, TRAIN_COLOR, VALID_COLOR, WIDTH, loss_curve_png, nice_ticks


def pixels_of(image: np.ndarray, color) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero((image == np.array(color, np.uint8)).all(axis=-1))
    return xs, ys


def test_loss_curve_png_decodes_and_follows_the_losses():
    train = [(step, 3.0 - step / 50) for step in range(5, 101, 5)]  # falls steadily from 2.9 to 1.0
    valid = [(25, 2.9), (50, 1.5), (75, 2.2), (100, 1.2)]
    image = np.asarray(Image.open(io.BytesIO(loss_curve_png(train, valid))).convert("RGB"))
    assert image.shape == (HEIGHT, WIDTH, 3)

    xs, ys = pixels_of(image, TRAIN_COLOR)
    xs, ys = xs[ys > 40], ys[ys > 40]  # leave out the legend swatch at the top
    columns = np.unique(xs)
    heights = np.array([ys[xs == x].mean() for x in columns])
    assert len(columns) > WIDTH / 2  # a line across the plot, not a few dots
    assert (np.diff(heights) >= -4).all() and heights[-1] - heights[0] > HEIGHT / 3  # falling loss: the line goes down (markers may hide a pixel)

    xs, ys = pixels_of(image, VALID_COLOR)
    keep = ys > 40
    xs, ys = xs[keep], ys[keep]
    # the 7x7 markers are the columns where the orange is 7 pixels tall; their heights follow the losses' order
    markers = [x for x in np.unique(xs) if (xs == x).sum() >= 7]
    groups = np.split(np.array(markers), np.nonzero(np.diff(markers) > 1)[0] + 1)
    assert len(groups) == len(valid)
    marker_y = [np.median(ys[np.isin(xs, group)]) for group in groups]
    assert np.argsort(marker_y).tolist() == np.argsort([-loss for _, loss in valid]).tolist()


def test_empty_and_flat_curves_still_make_a_picture():
    for train, valid in (([], []), ([(1, 2.0)], []), ([(1, 2.0), (2, 2.0)], [(2, float("nan"))])):
        image = Image.open(io.BytesIO(loss_curve_png(train, valid)))
        assert image.size == (WIDTH, HEIGHT)


def test_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0.61, 3.13) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert nice_ticks(5, 120) == [0, 50, 100, 150]
    for low, high in ((2.0, 2.0), (0.013, 0.0171), (1, 30000), (-2.5, 7.25)):
        ticks = nice_ticks(low, high)
        gaps = np.diff(ticks)
        mantissa = gaps[0] / 10 ** np.floor(np.log10(gaps[0]))
        assert ticks[0] <= low and ticks[-1] >= high and 3 <= len(ticks) <= 12
        assert np.allclose(gaps, gaps[0]) and any(np.isclose(mantissa, m) for m in (1, 2, 5))
