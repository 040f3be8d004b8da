"""Quality-control overlay PNGs of reconstructed slice predictions.

For a few slices of each patient, the original slice (in the exported display
orientation, i.e. the pixel grid the 2D model saw) is drawn in grey with the rebuilt
label pixels blended in their label colours and every predicted polygon outlined on
top. Comparing the outline (what the model predicted) with the filled pixels (what went
into the 3D mask) and with the 3D mask in a viewer is the check the slice-model
workflow's "Quality Control" step asks for.

Files: ``<qc_dir>/<patient_id>_slice<index:04d>_qc.png`` (written atomically).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medinfer._atomic import atomic_path
from medinfer.reporting.overlay import compose_rgb
from medinfer.slices.labels import LabelTable
from medinfer.slices.predictions import SlicePrediction

#: slices per patient in the QC overlays
DEFAULT_QC_SLICES = 3
#: small slices are enlarged by an integer factor to at least this many pixels
_MIN_DISPLAY = 384


def choose_qc_slices(
    label_stack: npt.NDArray[Any], indices: Sequence[int], count: int
) -> list[int]:
    """Up to ``count`` slice indices, evenly spread over the slices whose rebuilt labels are
    not empty (else over ``indices``, the slices with a prediction file)."""
    labelled = [int(i) for i in indices if np.any(label_stack[int(i)])]
    pool = sorted(labelled or [int(i) for i in indices])
    if not pool or count < 1:
        return []
    if len(pool) <= count:
        return pool
    picks = np.linspace(0, len(pool) - 1, count).round().astype(int)
    return sorted({pool[int(p)] for p in picks})


def write_qc_overlays(
    patient_id: str,
    label_stack: npt.NDArray[Any],
    predictions: Mapping[int, SlicePrediction],
    table: LabelTable,
    qc_dir: str | os.PathLike[str],
    image_slices: npt.NDArray[Any] | None = None,
    count: int = DEFAULT_QC_SLICES,
    alpha: float = 0.35,
) -> list[Path]:
    """Write the QC overlay PNGs of one patient.

    Parameters
    ----------
    patient_id : file name prefix.
    label_stack : int ``(N, H, W)`` rebuilt label slices in display orientation.
    predictions : slice index -> parsed prediction (pixel coordinates, x = column).
    table : label colours.
    qc_dir : output folder (created).
    image_slices : the original image as ``(N, H, W)`` display slices (grey, window
        0.5th..99.5th percentile of the whole image); None = black background.
    count : slices per patient (evenly spread over the labelled slices).
    alpha : opacity of the filled labels.

    Returns
    -------
    list of the written PNG paths.
    """
    from PIL import Image, ImageDraw

    colors = {lab.value: lab.color for lab in table if lab.value != 0}
    if image_slices is not None:
        finite = np.asarray(image_slices, dtype=np.float64)
        lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
        window = (lo, hi if hi > lo else lo + 1.0)
    else:
        window = (0.0, 1.0)
    out_dir = Path(qc_dir)
    written: list[Path] = []
    for index in choose_qc_slices(label_stack, sorted(predictions), count):
        labels = np.asarray(label_stack[index])
        h, w = labels.shape
        plane = (
            np.asarray(image_slices[index], dtype=np.float64)
            if image_slices is not None
            else np.zeros((h, w))
        )
        rgb = compose_rgb(plane, labels, colors, window, alpha)
        scale = max(1, _MIN_DISPLAY // max(h, w, 1))
        img = Image.fromarray(rgb, mode="RGB")
        if scale > 1:
            img = img.resize((w * scale, h * scale), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(img)
        for poly in predictions[index].polygons:
            ring = np.asarray(poly.outer, dtype=np.float64)
            if ring.shape[0] < 2:
                continue
            color: Any = colors.get(poly.class_id, (255, 255, 255))
            pts = [((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5) for x, y in ring]
            draw.line([*pts, pts[0]], fill=tuple(color), width=max(1, scale // 2))
        path = out_dir / f"{patient_id}_slice{index:04d}_qc.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")
        written.append(path)
    return written
