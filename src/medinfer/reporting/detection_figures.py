"""Static figures of detection results: slice panels through findings, confidence histogram.

Slices are taken on the **source grid** (no resampling): the voxel axis whose direction is
closest to the world superior axis (RAS+ z) is the slicing axis ("axial-like"), and each
finding is shown on the slice through its centre. Pixels are drawn with their true aspect
ratio (spacing of the two in-plane axes). The heat map is overlaid with the configured
matplotlib colormap and alpha (values below 0.05 transparent); each finding gets a circle of
its equivalent diameter and its id.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medinfer._atomic import atomic_path
from medinfer.volume import Volume


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def slicing_axis(affine: np.ndarray) -> int:
    """Voxel axis (0, 1, 2) most aligned with world S (RAS+ z)."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    dirs = a / np.linalg.norm(a, axis=0)
    return int(np.argmax(np.abs(dirs[2])))


def visualization_slices(volume: Volume, detections: Sequence[dict[str, Any]],
                         num_slices: int) -> list[tuple[int, int, str | None]]:
    """The panels of the visualization PNG: ``(axis, slice index, finding id or None)``.

    One panel per finding (highest confidence first, at most ``num_slices``) through the
    finding centre; without findings, ``num_slices`` evenly spaced slices through the
    middle 80 % of the scan.
    """
    axis = slicing_axis(volume.affine)
    n = volume.spatial_shape[axis]
    if detections:
        out: list[tuple[int, int, str | None]] = []
        for d in list(detections)[:num_slices]:
            idx = int(np.clip(round(float(d["coordinates_voxel"][axis])), 0, n - 1))
            out.append((axis, idx, str(d.get("name", d["id"]))))
        return out
    idxs = np.linspace(0.1 * (n - 1), 0.9 * (n - 1), num_slices)
    return [(axis, int(round(float(i))), None) for i in idxs]


def _slice(arr: np.ndarray, axis: int, idx: int) -> np.ndarray:
    return np.take(arr, idx, axis=axis)


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
    """Write ``<case>_visualization.png``: one panel per finding slice (see module doc).

    The PNG carries a ``Description`` text chunk listing the panels
    (``"F01:axis=2:slice=40; ..."``) so tests and tools can check which slices are shown.
    """
    plt = _plt()
    panels = visualization_slices(image, detections, num_slices)
    axis = panels[0][0]
    in_plane = [a for a in range(3) if a != axis]
    sp = image.spacing
    img = np.asarray(image.array[0], dtype=np.float32)
    heat = np.asarray(heatmap.array[0], dtype=np.float32)
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 4.2 * nrow + 0.4), dpi=dpi,
                             squeeze=False)
    cmap = plt.get_cmap(colormap)
    by_id = {str(d.get("name", d["id"])): d for d in detections}
    for n, (ax_, idx, fid) in enumerate(panels):
        ax = axes[n // ncol][n % ncol]
        s_img = _slice(img, ax_, idx).T  # rows = second in-plane axis
        s_heat = _slice(heat, ax_, idx).T
        aspect = float(sp[in_plane[1]] / sp[in_plane[0]])
        ax.imshow(s_img, cmap="gray", vmin=window_hu[0], vmax=window_hu[1], origin="lower",
                  aspect=aspect, interpolation="nearest")
        masked = np.ma.masked_less(s_heat, 0.05)
        ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha, origin="lower",
                  aspect=aspect, interpolation="nearest")
        label = f"slice {idx} (axis {ax_})"
        if fid is not None:
            d = by_id[fid]
            cv = d.get("coordinates_voxel_continuous", d["coordinates_voxel"])
            ci, cj = (float(cv[a]) for a in in_plane)
            r_i = d["diameter_mm"] / 2.0 / sp[in_plane[0]]
            r_j = d["diameter_mm"] / 2.0 / sp[in_plane[1]]
            from matplotlib.patches import Ellipse

            ax.add_patch(Ellipse((ci, cj), 2 * r_i + 4, 2 * r_j + 4, fill=False,
                                 edgecolor="cyan", linewidth=1.2))
            ax.text(ci + r_i + 3, cj + r_j + 3, fid, color="cyan", fontsize=9)
            label = (f"{fid}: {d['diameter_mm']:.1f} mm, conf {d['confidence']:.2f}, "
                     f"slice {idx}")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for n in range(len(panels), nrow * ncol):
        axes[n // ncol][n % ncol].axis("off")
    fig.suptitle(title or ("no findings" if not detections else f"{len(detections)} finding(s)"),
                 fontsize=11)
    fig.tight_layout()
    desc = "; ".join(f"{fid or '-'}:axis={a}:slice={i}" for a, i, fid in panels)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Description": desc})
    plt.close(fig)
    return Path(path)


def finding_crops_png(path: str | os.PathLike[str], image: Volume,
                      detection: dict[str, Any], window_hu: tuple[float, float],
                      half_size_mm: float = 30.0, dpi: int = 100) -> Path:
    """A small key image of one finding (slice through its centre, crop of +-30 mm)."""
    plt = _plt()
    axis = slicing_axis(image.affine)
    in_plane = [a for a in range(3) if a != axis]
    sp = image.spacing
    c = [float(v) for v in detection.get("coordinates_voxel_continuous",
                                         detection["coordinates_voxel"])]
    idx = int(np.clip(round(c[axis]), 0, image.spatial_shape[axis] - 1))
    s = _slice(np.asarray(image.array[0], dtype=np.float32), axis, idx).T
    lo = [max(0, int(c[a] - half_size_mm / sp[a])) for a in in_plane]
    hi = [min(image.spatial_shape[a], int(c[a] + half_size_mm / sp[a]) + 1) for a in in_plane]
    crop = s[lo[1]:hi[1], lo[0]:hi[0]]
    fig, ax = plt.subplots(figsize=(2.4, 2.4), dpi=dpi)
    ax.imshow(crop, cmap="gray", vmin=window_hu[0], vmax=window_hu[1], origin="lower",
              aspect=float(sp[in_plane[1]] / sp[in_plane[0]]), interpolation="nearest")
    from matplotlib.patches import Ellipse

    r_i = detection["diameter_mm"] / 2.0 / sp[in_plane[0]]
    r_j = detection["diameter_mm"] / 2.0 / sp[in_plane[1]]
    ax.add_patch(Ellipse((c[in_plane[0]] - lo[0], c[in_plane[1]] - lo[1]), 2 * r_i + 3,
                         2 * r_j + 3, fill=False, edgecolor="cyan", linewidth=1.0))
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
