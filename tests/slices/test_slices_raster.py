"""Polygon fill: pixel centre inside or on the polygon; holes; clipping; oracle checks."""

from __future__ import annotations

import contourpy
import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from scipy import ndimage

from medinfer.slices import fill_polygon
from medinfer.slices.raster import outside_extent, polygon_masks


def test_axis_aligned_square_includes_its_boundary() -> None:
    sq = [[1, 1], [4, 1], [4, 3], [1, 3]]  # x = columns 1..4, y = rows 1..3
    m = fill_polygon(sq, 5, 6)
    expected = np.zeros((5, 6), bool)
    expected[1:4, 1:5] = True
    np.testing.assert_array_equal(m, expected)
    closed, boundary = polygon_masks(sq, 5, 6)
    assert boundary.sum() == 2 * 4 + 2 * 1  # perimeter lattice points (10)
    assert (closed & ~boundary).sum() == 2  # (2, 2) and (3, 2)


def test_triangle_with_sub_pixel_vertices() -> None:
    tri = [[0.5, 0.5], [5.5, 0.5], [0.5, 5.5]]
    m = fill_polygon(tri, 7, 7)
    rows, cols = np.nonzero(m)
    # centres (x, y) with x, y >= 1 and x + y <= 6 (hypotenuse x + y = 6 passes through them)
    assert set(zip(cols.tolist(), rows.tolist(), strict=True)) == {
        (x, y) for x in range(1, 6) for y in range(1, 6) if x + y <= 6
    }


def test_agrees_with_matplotlib_away_from_the_boundary() -> None:
    rng = np.random.default_rng(7)
    h, w = 40, 50
    yy, xx = np.mgrid[0:h, 0:w]
    pts = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)
    compared = 0
    for _ in range(30):
        n = int(rng.integers(3, 12))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(5, 22, n)
        poly = np.column_stack([25 + rad * np.cos(ang), 20 + rad * np.sin(ang)])
        poly = poly + rng.uniform(-0.3, 0.3, poly.shape)
        ours = fill_polygon(poly, h, w).ravel()
        path = MplPath(poly, closed=False)
        inside = path.contains_points(pts)
        # compare where matplotlib's answer is robust (same with the outline grown or
        # shrunk by 1e-6 px); on the outline itself matplotlib's answer is undefined
        far = (inside == path.contains_points(pts, radius=1e-6)) & (
            inside == path.contains_points(pts, radius=-1e-6)
        )
        assert far.sum() > 0.95 * far.size
        compared += int(inside[far].sum())
        np.testing.assert_array_equal(ours[far], inside[far])
    assert compared > 3000  # not vacuous


def test_traced_contours_reproduce_random_masks_exactly() -> None:
    rng = np.random.default_rng(0)
    for t in range(60):
        h, w = (int(x) for x in rng.integers(3, 30, 2))
        noise = rng.random((h, w))
        mask = ndimage.gaussian_filter(noise, 1.0) > 0.5 if t % 2 else noise > 0.5
        gen = contourpy.contour_generator(z=mask.astype(float), fill_type="OuterOffset")
        polys, offsets = gen.filled(0.5, 1.5)
        out = np.zeros((h, w), bool)
        for pts, off in zip(polys, offsets, strict=True):
            rings = [pts[off[i] : off[i + 1]] for i in range(len(off) - 1)]
            out |= fill_polygon(rings[0], h, w, rings[1:])
        np.testing.assert_array_equal(out, mask)


def test_hole_keeps_its_outline_pixels() -> None:
    outer = [[0, 0], [6, 0], [6, 6], [0, 6]]
    hole = [[2, 2], [4, 2], [4, 4], [2, 4]]
    m = fill_polygon(outer, 7, 7, [hole])
    assert not m[3, 3]  # strictly inside the hole
    assert m[2, 2] and m[2, 3] and m[4, 4]  # on the hole outline: kept
    assert m.sum() == 49 - 1


def test_polygon_outside_is_clipped() -> None:
    poly = [[-10, -10], [3, -10], [3, 2], [-10, 2]]
    m = fill_polygon(poly, 5, 5)
    expected = np.zeros((5, 5), bool)
    expected[0:3, 0:4] = True
    np.testing.assert_array_equal(m, expected)
    assert outside_extent(poly, 5, 5)
    assert not outside_extent([[-0.5, -0.5], [4.5, -0.5], [4.5, 4.5]], 5, 5)
    assert not fill_polygon([[10, 10], [12, 10], [12, 12]], 5, 5).any()


def test_self_intersecting_outline_uses_even_odd() -> None:
    # a pentagram: the centre pentagon is crossed twice -> outside under even-odd
    ang = np.pi / 2 + np.arange(5) * 4 * np.pi / 5
    star = np.column_stack([20 + 18 * np.cos(ang), 20 - 18 * np.sin(ang)])
    m = fill_polygon(star, 41, 41)
    assert not m[20, 20]
    assert m[5, 20]  # the top spike


@pytest.mark.parametrize("bad", [np.zeros((3, 3)), np.zeros(4)])
def test_bad_vertex_arrays(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="shape"):
        fill_polygon(bad, 4, 4)
