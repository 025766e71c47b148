"""Per-frame J and F of both protocols: hand-worked cases; the AHCQ band against scipy morphology."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import disk

from ahcq.video.metrics import (
    AHCQ_EPS,
    Score,
    VOSReport,
    ahcq_band,
    ahcq_scores,
    boundary_map,
    official_radius,
    official_scores,
)
from ahcq.video.metrics import _matched as matched_within


def _square(shape: tuple[int, int], r0: int, c0: int, side: int) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[r0:r0 + side, c0:c0 + side] = True
    return m


def test_official_edge_cases() -> None:
    empty, full = np.zeros((20, 20), bool), _square((20, 20), 5, 5, 5)
    assert official_scores(empty, empty) == (1.0, 1.0)
    assert official_scores(empty, full) == (0.0, 0.0)
    assert official_scores(full, empty) == (0.0, 0.0)
    assert official_scores(full, full) == (1.0, 1.0)


def test_boundary_map_is_half_pixel_towards_origin() -> None:
    """A 5x5 square at rows/cols 5..9: 6 + 5 background pixels above/left, 9 mask pixels bottom/right."""
    b = boundary_map(_square((20, 20), 5, 5, 5))
    expected = np.zeros((20, 20), bool)
    expected[4, 4:10] = expected[5:10, 4] = expected[5:10, 9] = expected[9, 5:10] = True
    np.testing.assert_array_equal(b, expected)


def test_boundary_map_image_border_rules() -> None:
    """Last row compares only with E, last column only with S; the corner never counts."""
    m = np.ones((4, 4), bool)
    assert not boundary_map(m).any()
    m[3, 1] = False
    expected = np.zeros((4, 4), bool)
    expected[2, 0] = expected[2, 1] = True
    expected[3, 0] = expected[3, 1] = True
    np.testing.assert_array_equal(boundary_map(m), expected)


def test_official_shifted_square_worked_by_hand() -> None:
    """20x20 image: radius ceil(0.008 * 28.3) = 1. Square shifted 3 px: J = 10/40; 10 of 20 boundary
    pixels lie within 1 px of the other boundary in each direction, so P = R = F = 0.5."""
    gt, pred = _square((20, 20), 5, 5, 5), _square((20, 20), 5, 8, 5)
    assert official_radius(gt.shape) == 1
    j, f = official_scores(pred, gt)
    assert j == pytest.approx(0.25) and f == pytest.approx(0.5)


def test_official_radius_matches_davis_sizes() -> None:
    assert official_radius((480, 854)) == 8
    assert official_radius((563, 1000)) == 10


def test_boundary_tolerance_is_skimage_disk() -> None:
    """A pixel matches another within radius 10 exactly where skimage's disk(10) (used by the official
    tools' dilation) is set: (6, 8), at distance 10, matches; (7, 8), at 10.6, does not."""
    kernel = disk(10).astype(bool)
    centre = np.zeros((31, 31), bool)
    centre[15, 15] = True
    for dy in range(-13, 14):
        for dx in range(-13, 14):
            point = np.zeros_like(centre)
            point[15 + dy, 15 + dx] = True
            inside = abs(dy) <= 10 and abs(dx) <= 10 and kernel[dy + 10, dx + 10]
            assert matched_within(point, centre, 10) == int(inside), (dy, dx)
    assert kernel[16, 18] and not kernel[17, 18]


def test_void_pixels_are_not_scored() -> None:
    gt = _square((30, 30), 5, 5, 10)
    void = _square((30, 30), 5, 15, 6)
    pred = gt | void
    assert official_scores(pred, gt)[0] < 1
    assert official_scores(pred, gt, void) == (1.0, 1.0)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        official_scores(np.zeros((4, 5), bool), np.zeros((5, 4), bool))
    with pytest.raises(ValueError, match="shape"):
        ahcq_scores(np.zeros((4, 5), bool), np.zeros((5, 4), bool))


def test_ahcq_single_pixels_worked_by_hand() -> None:
    """10x10 image: round(0.02 * 14.1) = 0 -> 1 iteration, so a pixel's band is its 5-pixel plus sign.
    Neighbouring pixels share 2 band pixels: P = R = (2 + eps) / (5 + eps); J = 0."""
    gt, pred = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    gt[5, 5], pred[5, 6] = True, True
    assert ahcq_band(gt).sum() == 5
    j, f = ahcq_scores(pred, gt)
    assert j == 0.0
    assert f == pytest.approx((2 + AHCQ_EPS) / (5 + AHCQ_EPS), rel=1e-12)


def test_ahcq_edge_cases() -> None:
    empty, dot = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    dot[2, 2] = True
    assert ahcq_scores(empty, empty) == (1.0, 1.0)
    j, f = ahcq_scores(empty, dot)
    recall = AHCQ_EPS / (5 + AHCQ_EPS)
    assert j == 0.0 and f == pytest.approx(2 * recall / (1 + recall), rel=1e-9)


def test_ahcq_band_erodes_from_the_image_border() -> None:
    """A full 10x10 mask: dilation is the image, the 1-step erosion leaves the 8x8 interior."""
    assert ahcq_band(np.ones((10, 10), bool)).sum() == 100 - 64


def _scipy_band(mask: np.ndarray) -> np.ndarray:
    k = max(1, int(round(0.02 * float(np.hypot(*mask.shape)))))
    return ndimage.binary_dilation(mask, iterations=k) ^ ndimage.binary_erosion(mask, iterations=k)


@pytest.mark.parametrize("shape", [(40, 50), (150, 200), (97, 263)])
def test_ahcq_matches_plain_iterated_morphology(shape: tuple[int, int], rng: np.random.Generator) -> None:
    """Random blobs (touching the border too): the distance-transform band equals k iterated steps."""
    for _ in range(4):
        noise = ndimage.gaussian_filter(rng.random(shape), 4)
        gt, pred = noise > np.quantile(noise, 0.6), noise > np.quantile(noise, 0.5)
        np.testing.assert_array_equal(ahcq_band(gt), _scipy_band(gt))
        pb, gb = _scipy_band(pred), _scipy_band(gt)
        inter = (pb & gb).sum()
        p, r = (inter + AHCQ_EPS) / (pb.sum() + AHCQ_EPS), (inter + AHCQ_EPS) / (gb.sum() + AHCQ_EPS)
        j, f = ahcq_scores(pred, gt)
        assert f == pytest.approx(2 * p * r / (p + r), rel=1e-12)
        assert j == pytest.approx((pred & gt).sum() / (pred | gt).sum(), rel=1e-12)


def test_report_dict_and_table() -> None:
    report = VOSReport(Score(90.0, 80.0, 3), Score(70.0, 50.0, 12))
    d = report.as_dict()
    assert d["official/J&F"] == 85.0 and d["ahcq/J&F"] == 60.0 and d["ahcq/count"] == 12
    lines = report.table().splitlines()
    assert len(lines) == 3 and "85.00" in lines[1] and "60.00" in lines[2] and "12 object-frames" in lines[2]
    assert math.isclose(report.official.jf, 85.0)
