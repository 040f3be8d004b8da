"""Overlay PNG: a label map over its scan in three orthogonal mid slices.

The three panels are axial, coronal and sagittal planes through the centre of the scan,
cut in **world (RAS+) orientation** rather than in voxel order, so that oblique, permuted
or flipped storage (LPS, LPI, ...) and anisotropic voxels look as in a clinical viewer:
each plane is resampled onto an isotropic display grid aligned with the RAS axes.

Display convention (radiological):

- axial: seen from the feet; patient's right on the screen's left, anterior at the top;
- coronal: seen from the front; patient's right on the screen's left, superior at the top;
- sagittal: seen from the patient's left; anterior on the screen's left, superior at the top.

This module is the one renderer of medinfer's figures: the ``--overlay`` PNG
(:func:`save_overlay_png`) and the detection figures (``_visualization.png``, the PDF
key images, :mod:`medinfer.reporting.detection_figures`) all sample their planes with
:func:`display_grid` / :func:`sample_plane` and label them with :func:`draw_edge_letters`,
so a scan looks the same whatever its storage order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medinfer._atomic import atomic_path
from medinfer.errors import GeometryError
from medinfer.volume import Volume

#: the display grid has at most this many pixels along a side
MAX_DISPLAY_PIXELS = 512

#: plane name -> (world axis held fixed, world axis down the rows, world axis along the
#: columns); RAS coordinates decrease down the rows and along the columns (rows from
#: S or A to I or P, columns from R to L, or from A to P in the sagittal plane)
_PLANES: dict[str, tuple[int, int, int]] = {
    "axial": (2, 1, 0),
    "coronal": (1, 2, 0),
    "sagittal": (0, 2, 1),
}
_EDGE_LETTERS = {
    "axial": ("A", "P", "R", "L"),
    "coronal": ("S", "I", "R", "L"),
    "sagittal": ("S", "I", "A", "P"),
}


@dataclass(frozen=True)
class DisplayGrid:
    """A display plane: an isotropic pixel grid aligned with the RAS axes.

    ``plane`` is ``"axial"``, ``"coronal"`` or ``"sagittal"``; the plane holds the world
    coordinate ``fixed_mm`` on its normal axis. Pixel ``(row, col)`` lies at world
    coordinate ``top_mm - row * spacing`` on the axis down the rows and ``left_mm - col *
    spacing`` on the axis along the columns (radiological convention, module docstring).
    """

    plane: str
    fixed_mm: float
    top_mm: float
    left_mm: float
    n_rows: int
    n_cols: int
    spacing: float

    @property
    def axes(self) -> tuple[int, int, int]:
        """(world axis held fixed, world axis down the rows, world axis along the columns)."""
        return _PLANES[self.plane]

    @property
    def edge_letters(self) -> tuple[str, str, str, str]:
        """Orientation letters at the (top, bottom, left, right) edges of the plane."""
        top, bottom, left, right = _EDGE_LETTERS[self.plane]
        return top, bottom, left, right

    def world(self) -> np.ndarray:
        """RAS+ mm of every pixel centre, ``(n_rows, n_cols, 3)`` float64."""
        fixed, row_ax, col_ax = self.axes
        out = np.empty((self.n_rows, self.n_cols, 3), dtype=np.float64)
        out[..., fixed] = self.fixed_mm
        out[..., row_ax] = (self.top_mm - self.spacing * np.arange(self.n_rows))[:, None]
        out[..., col_ax] = (self.left_mm - self.spacing * np.arange(self.n_cols))[None, :]
        return out

    def pixel_of(self, point_ras: Sequence[float] | np.ndarray) -> tuple[float, float]:
        """(row, col) display pixel of a RAS+ point (mm), as floats (may be off-grid)."""
        _, row_ax, col_ax = self.axes
        p = [float(v) for v in point_ras]
        return (self.top_mm - p[row_ax]) / self.spacing, (self.left_mm - p[col_ax]) / self.spacing


def display_grid(
    image: Volume,
    plane: str,
    *,
    through: Sequence[float] | np.ndarray | None = None,
    spacing: float | None = None,
    half_size_mm: float | None = None,
) -> DisplayGrid:
    """The display grid of one plane of ``image``.

    Parameters
    ----------
    image : the scan (any orientation, oblique and anisotropic grids allowed).
    plane : ``"axial"``, ``"coronal"`` or ``"sagittal"``.
    through : RAS+ point (mm) the plane passes through; default the world centre of the
        image's bounding box.
    spacing : display pixel size in mm; default the smallest voxel size of ``image``,
        enlarged if needed to keep at most :data:`MAX_DISPLAY_PIXELS` per side.
    half_size_mm : if given, the plane covers ``through`` +- this many mm in both
        in-plane directions (a crop, e.g. a key image of a finding); else the image's
        whole world bounding box.

    Raises
    ------
    GeometryError
        Unknown ``plane``; ``spacing`` or ``half_size_mm`` not positive.
    """
    if plane not in _PLANES:
        raise GeometryError(f"display plane: {plane!r}; accepted: {', '.join(_PLANES)}")
    corners = image.corners_world()
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    point = (lo + hi) / 2.0 if through is None else np.asarray(through, dtype=np.float64)
    if half_size_mm is not None:
        if not half_size_mm > 0:
            raise GeometryError(
                f"display half size: expected a positive number of mm, got {half_size_mm}"
            )
        lo, hi = point - half_size_mm, point + half_size_mm
    extent = hi - lo
    if spacing is None:
        spacing = max(float(image.spacing.min()), float(extent.max()) / MAX_DISPLAY_PIXELS)
    if not spacing > 0:
        raise GeometryError(f"display spacing: expected a positive number of mm, got {spacing}")
    fixed, row_ax, col_ax = _PLANES[plane]
    return DisplayGrid(
        plane=plane,
        fixed_mm=float(point[fixed]),
        top_mm=float(hi[row_ax]),  # top of screen = S or A
        left_mm=float(hi[col_ax]),  # screen left = R (axial, coronal) or A (sagittal)
        n_rows=int(np.floor(extent[row_ax] / spacing + 1e-9)) + 1,
        n_cols=int(np.floor(extent[col_ax] / spacing + 1e-9)) + 1,
        spacing=float(spacing),
    )


def sample_plane(volume: Volume, grid: DisplayGrid, *, nearest: bool = False,
                 fill: float = np.nan) -> np.ndarray:
    """Channel 0 of ``volume`` on ``grid``: ``(n_rows, n_cols)``.

    Linear interpolation to float32 (``fill``, default NaN, outside the volume), or with
    ``nearest`` nearest-neighbour sampling to int64 (label maps; 0 outside).
    """
    from scipy.ndimage import map_coordinates

    inv = np.linalg.inv(volume.affine)
    vox = grid.world() @ inv[:3, :3].T + inv[:3, 3]
    coords = np.moveaxis(vox, -1, 0)
    arr = np.asarray(volume.array[0])
    if nearest:
        return map_coordinates(arr, coords, order=0, mode="constant", cval=0,
                               output=np.int64, prefilter=False)
    return map_coordinates(arr, coords, order=1, mode="constant", cval=fill,
                           output=np.float32, prefilter=False)


def display_planes(
    image: Volume, label: Volume | None = None, *, spacing: float | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Resample the three mid planes of ``image`` (and ``label``) for display.

    Parameters
    ----------
    image : the scan; channel 0 is shown. Any orientation, oblique and anisotropic
        grids allowed.
    label : optional label map (channel 0, integer values), on any grid that overlaps
        the image; sampled with nearest neighbour. Points outside it get 0.
    spacing : display pixel size in mm; default the smallest voxel size of ``image``,
        enlarged if needed to keep at most :data:`MAX_DISPLAY_PIXELS` per side.

    Returns
    -------
    dict
        ``{"axial" | "coronal" | "sagittal": (image_2d, label_2d)}``. ``image_2d`` is
        float32 ``(rows, columns)`` (linear interpolation, NaN outside the scan);
        ``label_2d`` is int64 of the same shape, or ``None`` without ``label``. Rows run
        from the top of the screen down, columns from left to right, in the
        radiological convention described in the module docstring. The planes pass
        through the world centre of the image's bounding box (:func:`display_grid`).

    Raises
    ------
    GeometryError
        ``spacing`` not positive.
    """
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for name in _PLANES:
        grid = display_grid(image, name, spacing=spacing)
        plane = sample_plane(image, grid)
        lab2 = None if label is None else sample_plane(label, grid, nearest=True)
        out[name] = (plane, lab2)
    return out


def draw_edge_letters(ax: Any, grid: DisplayGrid, *, color: str = "yellow",
                      fontsize: int = 9) -> None:
    """Write the orientation letters of ``grid`` at the edges of a matplotlib axes."""
    top, bottom, left, right = grid.edge_letters
    for x, y, text in ((0.5, 0.99, top), (0.5, 0.01, bottom), (0.01, 0.5, left),
                       (0.99, 0.5, right)):
        ax.text(x, y, text, color=color, fontsize=fontsize, transform=ax.transAxes,
                ha="center" if x == 0.5 else ("left" if x < 0.5 else "right"),
                va="center" if y == 0.5 else ("top" if y > 0.5 else "bottom"))


def _window(planes: Mapping[str, tuple[np.ndarray, np.ndarray | None]]) -> tuple[float, float]:
    """Display window: 0.5-99.5 percentiles of the finite non-zero pixels of all planes."""
    vals = np.concatenate([p[np.isfinite(p)].ravel() for p, _ in planes.values()])
    nz = vals[vals != 0]
    if nz.size == 0:
        nz = vals if vals.size else np.zeros(1, dtype=np.float32)
    lo, hi = np.percentile(nz, [0.5, 99.5])
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def _fallback_color(value: int) -> tuple[int, int, int]:
    from matplotlib import colormaps

    r, g, b, _ = colormaps["tab20"](value % 20)
    return int(r * 255), int(g * 255), int(b * 255)


def _unit_rgb(color: tuple[int, int, int]) -> tuple[float, float, float]:
    r, g, b = (float(c) / 255.0 for c in color)
    return r, g, b


def compose_rgb(
    plane: np.ndarray,
    labels: np.ndarray | None,
    colors: Mapping[int, tuple[int, int, int]],
    window: tuple[float, float],
    alpha: float,
) -> np.ndarray:
    """Blend a grey-scale plane and its labels into uint8 RGB ``(rows, columns, 3)``.

    Pixels with label 0 (background) keep the grey value; a pixel with label ``v`` gets
    ``(1 - alpha) * grey + alpha * colors[v]`` (a fixed tab20 colour for values missing
    from ``colors``). NaN (outside the scan) is black.
    """
    lo, hi = window
    grey = np.clip((np.nan_to_num(plane, nan=lo) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if labels is not None:
        for value in np.unique(labels):
            v = int(value)
            if v == 0:
                continue
            color = np.asarray(colors.get(v, _fallback_color(v)), dtype=np.float64)
            m = labels == value
            rgb[m] = (1.0 - alpha) * rgb[m] + alpha * color
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def save_overlay_png(
    image: Volume,
    label: Volume,
    path: str | os.PathLike[str],
    colors: Mapping[int, tuple[int, int, int]],
    alpha: float = 0.4,
    *,
    names: Mapping[int, str] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Write a PNG with the label map over the scan in three mid planes, plus a legend.

    Parameters
    ----------
    image : the scan (channel 0 shown), any orientation / spacing / obliquity.
    label : integer label map, normally on the same grid as ``image`` (any grid that
        overlaps it works; nearest-neighbour sampling).
    path : output ``.png`` file, written atomically (temporary file + rename).
    colors : label value -> ``(r, g, b)`` in 0..255; label 0 is background and is not
        drawn. Values present in the map but missing here get a fixed tab20 colour.
    alpha : opacity of the label colours, in [0, 1].
    names : optional label value -> name, shown in the legend (``"2: grey matter"``).
    title : optional figure title.
    dpi : resolution of the PNG.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    GeometryError
        ``alpha`` outside [0, 1] or an invalid colour.

    Notes
    -----
    Planes are cut through the centre of the image's world bounding box on an
    isotropic RAS-aligned display grid (:func:`display_planes`), shown in the
    radiological convention (patient's right on the screen's left). Rendering uses
    matplotlib's non-interactive Agg canvas, so no display is needed.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise GeometryError(f"overlay alpha: expected a number in [0, 1], got {alpha}")
    for v, c in colors.items():
        if len(tuple(c)) != 3 or not all(0 <= int(x) <= 255 for x in c):
            raise GeometryError(f"overlay colors[{v}]: expected (r, g, b) in 0..255, got {c!r}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    planes = display_planes(image, label)
    window = _window(planes)
    widths = [p.shape[1] / max(p.shape[0], 1) for p, _ in planes.values()]
    fig = Figure(figsize=(3.6 * sum(widths) + 0.6, 4.6), facecolor="black")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 3, width_ratios=widths, height_ratios=[12, 1],
                            left=0.01, right=0.99, top=0.88 if title else 0.96, bottom=0.01,
                            wspace=0.04, hspace=0.05)
    present: set[int] = set()
    for n, (name, (plane, lab)) in enumerate(planes.items()):
        ax = fig.add_subplot(grid[0, n])
        ax.imshow(compose_rgb(plane, lab, colors, window, float(alpha)),
                  interpolation="nearest", aspect="equal")
        ax.set_axis_off()
        ax.set_title(name, color="white", fontsize=10)
        draw_edge_letters(ax, display_grid(image, name))
        if lab is not None:
            present.update(int(v) for v in np.unique(lab) if v != 0)
    values = sorted((set(colors) | present) - {0})
    handles = [
        Patch(facecolor=_unit_rgb(colors.get(v, _fallback_color(v))),
              edgecolor="white",
              label=f"{v}: {names[v]}" if names and v in names else str(v))
        for v in values
    ]
    if handles:
        lax = fig.add_subplot(grid[1, :])
        lax.set_axis_off()
        lax.legend(handles=handles, loc="center", ncol=min(len(handles), 6), frameon=False,
                   labelcolor="white", fontsize=9, handlelength=1.2, handleheight=1.0)
    if title:
        fig.suptitle(title, color="white", fontsize=11)
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    return out
