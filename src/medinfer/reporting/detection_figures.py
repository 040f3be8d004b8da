"""Static figures of detection results: finding panels, key images, confidence histogram.

Panels are drawn by the one figure renderer, :mod:`medinfer.reporting.overlay`: axial
planes cut in **world (RAS+) orientation** on an isotropic display grid, in the
radiological convention (patient's right on the screen's left, anterior at the top), with
orientation letters at the edges. A scan stored RAS, LPS, oblique or anisotropic therefore
gives the same picture of the same finding. Each finding is shown on the axial plane
through its centre (RAS+ ``coordinates``), with a circle of its equivalent diameter and
its id; the heat map is overlaid with the configured matplotlib colormap and alpha
(values below 0.05 transparent).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medinfer._atomic import atomic_path
from medinfer.reporting.overlay import DisplayGrid, display_grid, draw_edge_letters, sample_plane
from medinfer.volume import Volume


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _centre_ras(volume: Volume, detection: dict[str, Any]) -> np.ndarray:
    """RAS+ mm of a finding: its ``coordinates``, else its voxel position via the affine."""
    if detection.get("coordinates") is not None:
        return np.asarray(detection["coordinates"], dtype=np.float64)
    vox = detection.get("coordinates_voxel_continuous", detection["coordinates_voxel"])
    return np.asarray(volume.voxel_to_world([[float(v) for v in vox]])[0], dtype=np.float64)


def visualization_planes(volume: Volume, detections: Sequence[dict[str, Any]],
                         num_slices: int) -> list[tuple[float, str | None]]:
    """The panels of the visualization PNG: ``(S coordinate in mm, finding id or None)``.

    One axial panel per finding (highest confidence first, at most ``num_slices``)
    through the finding centre; without findings, ``num_slices`` axial planes evenly
    spaced through the middle 80 % of the scan's superior-inferior extent.
    """
    if detections:
        return [(float(_centre_ras(volume, d)[2]), str(d.get("name", d["id"])))
                for d in list(detections)[:num_slices]]
    corners = volume.corners_world()
    lo, hi = float(corners[:, 2].min()), float(corners[:, 2].max())
    zs = np.linspace(lo + 0.1 * (hi - lo), lo + 0.9 * (hi - lo), num_slices)
    return [(float(z), None) for z in zs]


def _panel_grid(image: Volume, z_mm: float, centre: np.ndarray | None = None,
                half_size_mm: float | None = None) -> DisplayGrid:
    through = image.corners_world().mean(axis=0) if centre is None else centre.copy()
    through[2] = z_mm
    return display_grid(image, "axial", through=through, half_size_mm=half_size_mm)


def _circle(ax: Any, grid: DisplayGrid, centre: np.ndarray, diameter_mm: float,
            pad_px: float, label: str | None) -> None:
    from matplotlib.patches import Circle

    row, col = grid.pixel_of(centre)
    radius = diameter_mm / 2.0 / grid.spacing + pad_px
    ax.add_patch(Circle((col, row), radius, fill=False, edgecolor="cyan", linewidth=1.2))
    if label is not None:
        ax.text(col + radius + 2, row + radius + 2, label, color="cyan", fontsize=9)


def write_visualization_png(
    path: str | os.PathLike[str],
    image: Volume,
    heatmap: Volume,
    detections: Sequence[dict[str, Any]],
    *,
    colormap: str = "hot",
    alpha: float = 0.45,
    num_slices: int = 6,
    window_hu: tuple[float, float] = (-20.0, 180.0),
    dpi: int = 100,
    title: str = "",
) -> Path:
    """Write ``<case>_visualization.png``: one axial panel per finding (module docstring).

    ``image`` and ``heatmap`` may be on any grids (RAS+ affines); both are sampled on the
    same world-aligned display grid. The PNG carries a ``Description`` text chunk listing
    the panels (``"F01:axial:S=-12.50; ..."``, S in mm) so tests and tools can check which
    planes are shown.
    """
    plt = _plt()
    panels = visualization_planes(image, detections, num_slices)
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 4.2 * nrow + 0.4), dpi=dpi,
                             squeeze=False)
    cmap = plt.get_cmap(colormap)
    by_id = {str(d.get("name", d["id"])): d for d in detections}
    for n, (z_mm, fid) in enumerate(panels):
        ax = axes[n // ncol][n % ncol]
        grid = _panel_grid(image, z_mm)
        s_img = np.nan_to_num(sample_plane(image, grid), nan=window_hu[0])
        s_heat = sample_plane(heatmap, grid, fill=0.0)
        ax.imshow(s_img, cmap="gray", vmin=window_hu[0], vmax=window_hu[1], aspect="equal",
                  interpolation="nearest")
        masked = np.ma.masked_less(s_heat, 0.05)
        ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha, aspect="equal",
                  interpolation="nearest")
        draw_edge_letters(ax, grid)
        label = f"axial S {z_mm:.1f} mm"
        if fid is not None:
            d = by_id[fid]
            _circle(ax, grid, _centre_ras(image, d), float(d["diameter_mm"]), 2.0, fid)
            label = (f"{fid}: {d['diameter_mm']:.1f} mm, conf {d['confidence']:.2f}, "
                     f"S {z_mm:.1f} mm")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for n in range(len(panels), nrow * ncol):
        axes[n // ncol][n % ncol].axis("off")
    fig.suptitle(title or ("no findings" if not detections else f"{len(detections)} finding(s)"),
                 fontsize=11)
    fig.tight_layout()
    desc = "; ".join(f"{fid or '-'}:axial:S={z:.2f}" for z, fid in panels)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Description": desc})
    plt.close(fig)
    return Path(path)


def finding_crops_png(path: str | os.PathLike[str], image: Volume,
                      detection: dict[str, Any], window_hu: tuple[float, float],
                      half_size_mm: float = 30.0, dpi: int = 100) -> Path:
    """A key image of one finding: the axial plane through its centre, +-30 mm around it,
    radiological with orientation letters (the renderer of :mod:`medinfer.reporting.overlay`).
    """
    plt = _plt()
    centre = _centre_ras(image, detection)
    grid = _panel_grid(image, float(centre[2]), centre, half_size_mm)
    crop = np.nan_to_num(sample_plane(image, grid), nan=window_hu[0])
    fig, ax = plt.subplots(figsize=(2.4, 2.4), dpi=dpi)
    ax.imshow(crop, cmap="gray", vmin=window_hu[0], vmax=window_hu[1], aspect="equal",
              interpolation="nearest")
    _circle(ax, grid, centre, float(detection["diameter_mm"]), 1.5, None)
    draw_edge_letters(ax, grid, fontsize=7)
    ax.set_title(str(detection.get("name", detection["id"])), fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def write_confidence_distribution(path: str | os.PathLike[str],
                                  confidences: Sequence[float],
                                  threshold: float | None = None,
                                  dpi: int = 100) -> Path:
    """Histogram of finding confidences over a batch (``confidence_distribution.png``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=dpi)
    vals = np.asarray(list(confidences), dtype=np.float64)
    ax.hist(vals, bins=np.linspace(0, 1, 21), color="tab:orange", edgecolor="black")
    if threshold is not None:
        ax.axvline(threshold, color="tab:blue", linestyle="--", label=f"threshold {threshold}")
        ax.legend()
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (heat-map peak value)")
    ax.set_ylabel("findings")
    ax.set_title(f"confidence distribution ({len(vals)} findings)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
