"""Pure-numpy rendering for the review UI: display frame, slice overlays, class table.

No Streamlit import here, so these functions are unit-tested directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

#: (plane name, axis of the RAS display array it slices)
PLANES: tuple[tuple[str, int], ...] = (("Axial", 2), ("Coronal", 1), ("Sagittal", 0))


def to_display_frame(image: np.ndarray, label: np.ndarray, affine: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Flip / permute voxel axes so that axes 0, 1, 2 point to the closest R, A, S.

    Parameters
    ----------
    image, label : ``(I, J, K)`` arrays on the same grid (any dtype).
    affine : 4x4 voxel -> RAS+ mm of that grid.

    Returns
    -------
    (image, label) in display order ``(X->R, Y->A, Z->S)``; no resampling (an oblique
    scan is shown along its nearest axes), so one slice is one voxel layer.
    """
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    return (nio.apply_orientation(image, ornt), nio.apply_orientation(label, ornt))


def _window(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1.0, 99.0])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def overlay_slice(image: np.ndarray, label: np.ndarray, axis: int, index: int,
                  colors: Mapping[int, tuple[int, int, int]], opacity: float,
                  window: tuple[float, float] | None = None) -> np.ndarray:
    """RGB uint8 slice ``(rows, cols, 3)`` of a RAS display volume with the label overlay.

    The slice is rotated so that the second in-plane axis (anterior or superior) points
    up. Label 0 is transparent; other labels are blended with ``opacity``
    in [0, 1] using ``colors`` (label value -> (r, g, b)); unknown labels are red.
    """
    lo, hi = window or _window(image)
    sl = np.take(image, index, axis=axis).astype(np.float32)
    lab = np.take(label, index, axis=axis)
    gray = np.clip((sl - lo) / (hi - lo), 0.0, 1.0) * 255.0
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    alpha = float(np.clip(opacity, 0.0, 1.0))
    for value in np.unique(lab):
        if int(value) == 0:
            continue
        mask = lab == value
        color = np.array(colors.get(int(value), (255, 0, 0)), dtype=np.float32)
        rgb[mask] = (1.0 - alpha) * rgb[mask] + alpha * color
    # the second in-plane axis (A or S) up, the first (R or A) to the right
    return np.ascontiguousarray(np.rot90(rgb, k=1)).astype(np.uint8)


def class_table(summary: Mapping[str, Any], card: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{value, class, voxels, volume (mL)}`` for every non-background card label.

    Labels absent from the prediction get 0 voxels; values come from the summary's
    ``labels`` list (voxel counts on the source grid, mL = voxels x voxel volume / 1000).
    """
    found = {int(lab["value"]): lab for lab in summary.get("labels", [])}
    rows = []
    for key, spec in sorted(card.get("labels", {}).items(), key=lambda kv: int(kv[0])):
        value = int(key)
        if value == 0:
            continue
        lab = found.get(value, {})
        rows.append({"value": value, "class": str(spec.get("name", value)),
                     "voxels": int(lab.get("voxels", 0)),
                     "volume (mL)": round(float(lab.get("volume_ml", 0.0)), 3)})
    return rows


def class_histogram(summary: Mapping[str, Any],
                    card: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{value, class, voxels}`` for every card label, background included (its count
    is the grid's voxel count, ``prod(summary["shape"])``, minus the other classes)."""
    rows = class_table(summary, card)
    total = int(np.prod([int(s) for s in summary.get("shape", [])])) \
        if summary.get("shape") else 0
    labels = card.get("labels", {})
    bg = next((spec for key, spec in labels.items() if int(key) == 0), None)
    out = [{"value": r["value"], "class": r["class"], "voxels": r["voxels"]} for r in rows]
    if bg is not None:
        rest = sum(r["voxels"] for r in rows)
        out.insert(0, {"value": 0, "class": str(bg.get("name", 0)),
                       "voxels": max(0, total - rest)})
    return out


def display_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along the display axes of :func:`to_display_frame` (R, A, S)."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    vox = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    out = [1.0, 1.0, 1.0]
    for src_axis, (dst_axis, _) in enumerate(ornt):
        out[int(dst_axis)] = float(vox[src_axis])
    return out[0], out[1], out[2]


def physical_aspect(rgb: np.ndarray, axis: int, spacing: tuple[float, float, float]
                    ) -> np.ndarray:
    """Resize an :func:`overlay_slice` image so that pixels are square in mm.

    ``rgb`` is ``(rows, cols, 3)`` for a slice across display ``axis``; rows run along the
    second remaining axis, columns along the first. Nearest-neighbour, so label edges stay
    crisp; the smaller spacing sets the pixel size.
    """
    from PIL import Image

    first, second = (a for a in range(3) if a != axis)
    col_mm, row_mm = spacing[first], spacing[second]
    unit = min(col_mm, row_mm)
    rows, cols = rgb.shape[:2]
    size = (max(1, round(cols * col_mm / unit)), max(1, round(rows * row_mm / unit)))
    if size == (cols, rows):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.NEAREST))
