"""Segmentation metrics: per-class Dice, IoU, HD95, surface Dice; IoU per slice along z.

Thin wrappers over MONAI's metric functions (``monai.metrics.compute_dice``,
``compute_iou``, ``compute_hausdorff_distance``, ``compute_surface_dice``; Nikolov et al.
2021 for surface Dice) on one-hot tensors, with the voxel spacing in mm, so that the
numbers equal MONAI's. Label maps are integer arrays ``(I, J, K)`` on the same grid.

Conventions for empty structures: Dice/IoU are 1.0 when both prediction and truth are
empty for a class (MONAI's ``ignore_empty=False``); HD95 and surface Dice are NaN when
either is empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medinfer.errors import GeometryError


def _onehot(label: np.ndarray, classes: Sequence[int]) -> Any:
    import torch

    arr = np.stack([label == c for c in classes])[None].astype(np.float32)
    return torch.from_numpy(arr)


def _check(pred: np.ndarray, truth: np.ndarray) -> None:
    if pred.shape != truth.shape or pred.ndim != 3:
        raise GeometryError(f"prediction shape {pred.shape} and truth shape {truth.shape} "
                            "must be equal and 3-D (I, J, K)")


def segmentation_metrics(pred: np.ndarray, truth: np.ndarray, classes: Sequence[int],
                         spacing: Sequence[float], *, tolerance_mm: float = 1.0,
                         hd_percentile: float = 95.0) -> dict[int, dict[str, float]]:
    """Per-class Dice, IoU, HD95 (mm) and surface Dice at ``tolerance_mm``.

    Parameters
    ----------
    pred, truth : integer label maps ``(I, J, K)`` on the same grid.
    classes : label values to score (e.g. the foreground values).
    spacing : voxel size in mm along I, J, K.
    tolerance_mm : surface-Dice tolerance (mm).
    hd_percentile : percentile of the symmetric surface distances (95 = HD95).

    Returns
    -------
    ``{class: {"dice", "iou", "hd95", "surface_dice"}}`` (floats; NaN where undefined).
    """
    from monai.metrics import (
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        compute_surface_dice,
    )

    _check(pred, truth)
    classes = [int(c) for c in classes]
    p = _onehot(np.asarray(pred), classes)
    g = _onehot(np.asarray(truth), classes)
    sp = [float(s) for s in spacing]
    dice = compute_dice(p, g, include_background=True, ignore_empty=False)[0]
    iou = compute_iou(p, g, include_background=True, ignore_empty=False)[0]
    out: dict[int, dict[str, float]] = {}
    for i, c in enumerate(classes):
        both = bool(p[0, i].any()) and bool(g[0, i].any())
        hd = sd = math.nan
        if both:
            hd = float(compute_hausdorff_distance(
                p[:, i:i + 1], g[:, i:i + 1], include_background=True,
                percentile=hd_percentile, spacing=sp)[0, 0])
            sd = float(compute_surface_dice(
                p[:, i:i + 1], g[:, i:i + 1], class_thresholds=[tolerance_mm],
                include_background=True, spacing=sp)[0, 0])
        out[c] = {"dice": float(dice[i]), "iou": float(iou[i]), "hd95": hd,
                  "surface_dice": sd}
    return out


def mean_foreground_dice(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> float:
    """Mean Dice over label values 1..n_classes-1 (1.0 for a class empty in both)."""
    _check(pred, truth)
    values = []
    for c in range(1, n_classes):
        p = pred == c
        g = truth == c
        denom = int(p.sum()) + int(g.sum())
        values.append(1.0 if denom == 0 else 2.0 * int(np.logical_and(p, g).sum()) / denom)
    return float(np.mean(values)) if values else math.nan


def z_axis(affine: np.ndarray) -> int:
    """The voxel axis (0, 1, 2) whose direction is closest to the RAS+ z (S) axis."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    cos = np.abs(a[2]) / np.linalg.norm(a, axis=0)
    return int(np.argmax(cos))


def iou_along_z(pred: np.ndarray, truth: np.ndarray, affine: np.ndarray,
                classes: Sequence[int]) -> tuple[int, np.ndarray]:
    """IoU per slice along the voxel axis closest to world z (RAS+ S).

    Returns
    -------
    (axis, values) : ``values`` has shape ``(n_slices, len(classes))``, float64, one row
        per slice along ``axis`` in voxel order; NaN where the class is absent from both
        prediction and truth in that slice.
    """
    _check(pred, truth)
    ax = z_axis(affine)
    p = np.moveaxis(np.asarray(pred), ax, 0)
    g = np.moveaxis(np.asarray(truth), ax, 0)
    out = np.full((p.shape[0], len(classes)), np.nan)
    for j, c in enumerate(classes):
        pc = (p == c).reshape(p.shape[0], -1)
        gc = (g == c).reshape(p.shape[0], -1)
        inter = np.logical_and(pc, gc).sum(axis=1)
        union = np.logical_or(pc, gc).sum(axis=1)
        ok = union > 0
        out[ok, j] = inter[ok] / union[ok]
    return ax, out
