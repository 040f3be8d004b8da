"""Polygon filling on the pixel grid of one exported slice.

Rule: a pixel belongs to a polygon when its **centre** (integer ``(x, y)``, x = column,
y = row) lies inside the polygon or **on its boundary** (closed polygon, even-odd rule
for self-intersecting outlines). Holes remove the pixels whose centres lie strictly
inside them (a hole's outline is the region's boundary, hence kept).

Implementation: a vectorised scanline fill (for every pixel row, crossings of all
edges with the half-open rule ``min(y0, y1) <= y < max(y0, y1)``, sorted, filled in
pairs; Foley et al., *Computer Graphics: Principles and Practice*, 2nd ed., sec.
3.6) plus the lattice points that lie exactly on an edge (tolerance ``1e-9`` px).
Neither matplotlib's ``Path.contains_points`` nor ``skimage.draw.polygon`` define
what happens to points on the boundary; sub-pixel contours of a label mask (e.g.
level 0.5 contours that run through border pixel centres) need it defined.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_EPS = 1e-9
#: at most this many (row, edge) pairs are evaluated at once (bounds temporary memory)
_MAX_PAIRS = 2_000_000


def _as_polygon(points: npt.ArrayLike) -> npt.NDArray[np.float64]:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"polygon: expected shape (n, 2), got {p.shape}")
    return p


def polygon_masks(
    points: npt.ArrayLike, height: int, width: int
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Rasterise one closed polygon onto an ``(height, width)`` pixel grid.

    Parameters
    ----------
    points : (n, 2) float vertices ``(x, y)`` in pixel coordinates (x = column,
        y = row, pixel centres at integers); the closing edge is implicit. Parts
        outside the grid are clipped.
    height, width : grid size H, W.

    Returns
    -------
    (closed, boundary) : two bool arrays of shape ``(H, W)``; ``closed`` holds the
    pixels whose centre is inside or on the polygon, ``boundary`` those whose centre
    lies on an edge (within 1e-9 px). ``closed & ~boundary`` is the open interior.
    """
    p = _as_polygon(points)
    closed = np.zeros((height, width), dtype=bool)
    boundary = np.zeros((height, width), dtype=bool)
    if p.shape[0] == 0 or not np.all(np.isfinite(p)):
        return closed, boundary
    # work on the bounding box of the polygon clipped to the grid
    lo_y = max(0, int(np.ceil(p[:, 1].min() - _EPS)))
    hi_y = min(height - 1, int(np.floor(p[:, 1].max() + _EPS)))
    lo_x = max(0, int(np.ceil(p[:, 0].min() - _EPS)))
    hi_x = min(width - 1, int(np.floor(p[:, 0].max() + _EPS)))
    if lo_y > hi_y or lo_x > hi_x:
        return closed, boundary
    w = hi_x - lo_x + 1
    box_closed = closed[lo_y : hi_y + 1, lo_x : hi_x + 1]  # views
    box_bnd = boundary[lo_y : hi_y + 1, lo_x : hi_x + 1]
    tol = _EPS * max(1.0, float(np.abs(p).max()))
    x0 = p[:, 0] - lo_x
    y0 = p[:, 1]
    x1 = np.concatenate([x0[1:], x0[:1]])
    y1 = np.concatenate([y0[1:], y0[:1]])
    ymin_e = np.minimum(y0, y1)
    ymax_e = np.maximum(y0, y1)
    dy = y1 - y0
    horizontal = dy == 0.0
    safe_dy = np.where(horizontal, 1.0, dy)
    slope = (x1 - x0) / safe_dy
    chunk = max(1, min(256, _MAX_PAIRS // max(1, p.shape[0])))
    for start in range(lo_y, hi_y + 1, chunk):
        ys = np.arange(start, min(hi_y + 1, start + chunk), dtype=np.float64)[:, None]
        nrows = ys.shape[0]
        r0 = start - lo_y
        # x of every edge at every row of the chunk: (rows, edges)
        xs = x0 + (ys - y0) * slope
        # --- interior: half-open crossings, even-odd pairs
        cross = (~horizontal) & (ymin_e <= ys) & (ys < ymax_e)
        xc = np.where(cross, xs, np.inf)
        xc.sort(axis=1)
        max_pairs = int(cross.sum(axis=1).max()) // 2
        if max_pairs:
            starts = xc[:, 0 : 2 * max_pairs : 2]
            ends = xc[:, 1 : 2 * max_pairs : 2]
            valid = np.isfinite(starts) & np.isfinite(ends)
            c0 = np.clip(np.ceil(np.where(valid, starts, 0.0) - _EPS), 0, w).astype(np.int64)
            c1 = np.clip(np.floor(np.where(valid, ends, 0.0) + _EPS) + 1, 0, w).astype(np.int64)
            keep = valid & (c1 > c0)
            rows_idx = np.broadcast_to(np.arange(nrows)[:, None], keep.shape)[keep]
            diff = np.zeros((nrows, w + 1), dtype=np.int32)
            np.add.at(diff, (rows_idx, c0[keep]), 1)
            np.add.at(diff, (rows_idx, c1[keep]), -1)
            box_closed[r0 : r0 + nrows] |= np.cumsum(diff[:, :w], axis=1) > 0
        # --- boundary lattice points on non-horizontal edges
        on = (~horizontal) & (ymin_e - _EPS <= ys) & (ys <= ymax_e + _EPS)
        xr = np.rint(xs)
        hit = on & (np.abs(xs - xr) <= tol) & (xr >= 0) & (xr < w)
        rr, ee = np.nonzero(hit)
        if rr.size:
            box_bnd[rr + r0, xr[rr, ee].astype(np.int64)] = True
    # --- boundary lattice points on horizontal edges lying on a pixel row
    yr = np.rint(y0)
    hz = horizontal & (np.abs(y0 - yr) <= tol) & (yr >= lo_y) & (yr <= hi_y)
    if hz.any():
        a = np.clip(np.ceil(np.minimum(x0, x1)[hz] - _EPS), 0, w).astype(np.int64)
        b = np.clip(np.floor(np.maximum(x0, x1)[hz] + _EPS) + 1, 0, w).astype(np.int64)
        rows_h = (yr[hz] - lo_y).astype(np.int64)
        ok = b > a
        diff = np.zeros((hi_y - lo_y + 1, w + 1), dtype=np.int32)
        np.add.at(diff, (rows_h[ok], a[ok]), 1)
        np.add.at(diff, (rows_h[ok], b[ok]), -1)
        box_bnd |= np.cumsum(diff[:, :w], axis=1) > 0
    box_closed |= box_bnd
    return closed, boundary


def fill_polygon(
    outer: npt.ArrayLike,
    height: int,
    width: int,
    holes: Sequence[npt.ArrayLike] = (),
) -> npt.NDArray[np.bool_]:
    """Pixels of a polygon with optional holes, shape ``(height, width)``, bool.

    A pixel is set when its centre is inside or on ``outer`` and not strictly inside
    any hole (see the module docstring for the rule and its source).
    """
    mask, _ = polygon_masks(outer, height, width)
    for hole in holes:
        closed, bnd = polygon_masks(hole, height, width)
        mask &= ~(closed & ~bnd)
    return mask


def outside_extent(points: npt.ArrayLike, height: int, width: int) -> bool:
    """True if any vertex lies beyond the image area ``[-0.5, W-0.5] x [-0.5, H-0.5]``."""
    p = _as_polygon(points)
    if p.size == 0:
        return False
    tol = 1e-6
    return bool(
        (p[:, 0].min() < -0.5 - tol)
        or (p[:, 0].max() > width - 0.5 + tol)
        or (p[:, 1].min() < -0.5 - tol)
        or (p[:, 1].max() > height - 0.5 + tol)
    )
