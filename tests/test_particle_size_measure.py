"""Size and shape of one mask (monitor.imaging.particle_size): known shapes measured as a
ruler would, in pixels or micrometres, and the caliper widths against a brute-force
search over every direction."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from monitor.imaging.particle_size import feret_diameters, measure_mask


def test_a_rectangle_of_pixels_measures_its_sides_diagonal_and_area() -> None:
    mask = np.zeros((60, 200), np.uint8)
    mask[10:20, 30:130] = 1  # 100 x 10 pixels
    size = measure_mask(mask)
    assert size is not None
    assert size.unit == "px"
    assert size.area == 1000
    assert size.ecd == pytest.approx(math.sqrt(4 * 1000 / math.pi))
    assert size.feret_max == pytest.approx(math.hypot(100, 10))  # corner to corner
    assert size.feret_min == pytest.approx(10.0)
    assert size.aspect_ratio == pytest.approx(10 / math.hypot(100, 10))


def test_a_one_pixel_line_is_as_long_as_its_pixels_and_one_wide() -> None:
    mask = np.zeros((5, 40), np.uint8)
    mask[2, 5:35] = 255
    size = measure_mask(mask, pixel_size_um=2.5)
    assert size is not None
    assert size.unit == "um"
    assert size.area == pytest.approx(30 * 2.5**2)
    assert size.feret_min == pytest.approx(2.5)
    assert size.feret_max == pytest.approx(math.hypot(30, 1) * 2.5)


def test_a_disc_is_round_and_an_empty_mask_has_no_size() -> None:
    mask = np.zeros((201, 201), np.uint8)
    cv2.circle(mask, (100, 100), 60, 1, -1)
    size = measure_mask(mask)
    assert size is not None
    assert size.ecd == pytest.approx(121, rel=0.01)
    assert size.feret_max == pytest.approx(121, rel=0.02)
    assert size.feret_min == pytest.approx(121, rel=0.02)
    assert size.aspect_ratio > 0.98
    assert measure_mask(np.zeros((10, 10), np.uint8)) is None


def test_caliper_widths_equal_a_search_over_every_direction() -> None:
    rng = np.random.default_rng(4)
    for _ in range(30):
        points = rng.normal(0, 1, (40, 2)) * rng.uniform(1, 30, 2)
        rotation = rng.uniform(0, math.pi)
        c, s = math.cos(rotation), math.sin(rotation)
        points = points @ np.array([[c, -s], [s, c]])
        feret_max, feret_min = feret_diameters(points)
        angles = np.linspace(0, math.pi, 20_000, endpoint=False)
        directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        widths = np.ptp(points @ directions.T, axis=0)
        assert feret_max == pytest.approx(widths.max(), rel=1e-5)
        # The search's step misses the exact narrowest direction (a kink of the width
        # function) by up to one step: it reads at most feret_max * step wider.
        step = math.pi / len(angles)
        assert widths.min() - feret_max * step <= feret_min <= widths.min() + 1e-4
    assert feret_diameters(np.array([[3.0, 4.0]])) == (0.0, 0.0)
