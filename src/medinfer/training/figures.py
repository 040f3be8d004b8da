"""Experiment figures of the UNet3D suite, with its file names.

- ``IoU.png``: global IoU per class (bar, mean +- sd over cases);
- ``IoU image z axis.png``: IoU per slice along the world z axis (line per class and case);
- ``model predictions.png``: image, truth, prediction in three planes (radiological:
  patient right on the viewer's left);
- ``overlay errors.png``: false positives (red) and false negatives (blue) on the image;
- ``training curves.png``: loss and validation metric per step.

Slices are shown on the RAS-reoriented array (reorientation only, no interpolation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medinfer._atomic import atomic_path

IOU_PNG = "IoU.png"
IOU_Z_PNG = "IoU image z axis.png"
PREDICTIONS_PNG = "model predictions.png"
ERRORS_PNG = "overlay errors.png"
CURVES_PNG = "training curves.png"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def iou_bar(per_class: Mapping[str, Sequence[float]], path: Path) -> Path:
    """Bar chart of mean IoU per class (error bar: sd over cases)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(per_class)
    vals = [np.asarray(per_class[n], float) for n in names]
    ax.bar(names, [np.nanmean(v) for v in vals], yerr=[np.nanstd(v) for v in vals],
           color="tab:blue", capsize=4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("IoU")
    ax.set_title("Global IoU per class")
    fig.tight_layout()
    return _save(fig, path)


def iou_z_lines(curves: Mapping[str, Sequence[tuple[str, np.ndarray]]], path: Path) -> Path:
    """IoU per slice along z: ``curves[class] = [(case, values (n_slices,)), ...]``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, cases) in enumerate(curves.items()):
        for j, (_case, v) in enumerate(cases):
            ax.plot(np.arange(len(v)), v, color=colors[i % len(colors)], alpha=0.8,
                    label=name if j == 0 else None)
    ax.set_xlabel("slice index along z")
    ax.set_ylabel("IoU")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("IoU along the z axis")
    fig.tight_layout()
    return _save(fig, path)


def _ras(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    tr = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    return np.asarray(nib.orientations.apply_orientation(arr, tr))


def _planes(vol: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal 2-D images for imshow(origin='lower'), radiological."""
    i, j, k = centre
    return [vol[::-1, :, k].T, vol[::-1, j, :].T, vol[i, :, :].T]


def _centre(label: np.ndarray) -> list[int]:
    idx = np.argwhere(label > 0)
    if idx.size == 0:
        return [s // 2 for s in label.shape]
    return [int(v) for v in np.round(idx.mean(axis=0))]


def predictions_figure(image: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                       affine: np.ndarray, path: Path, n_classes: int) -> Path:
    """3 x 3 grid: rows image / truth / prediction; columns axial, coronal, sagittal."""
    plt = _plt()
    img, tru, prd = (_ras(a, affine) for a in (image, truth, pred))
    c = _centre(tru)
    fig, axes = plt.subplots(3, 3, figsize=(7, 7))
    for col, (a, t, p) in enumerate(zip(_planes(img, c), _planes(tru, c), _planes(prd, c),
                                        strict=True)):
        axes[0, col].imshow(a, cmap="gray", origin="lower")
        axes[1, col].imshow(t, cmap="tab10", vmin=0, vmax=max(n_classes - 1, 1),
                            origin="lower", interpolation="nearest")
        axes[2, col].imshow(p, cmap="tab10", vmin=0, vmax=max(n_classes - 1, 1),
                            origin="lower", interpolation="nearest")
    for r, name in enumerate(("image", "truth", "prediction")):
        axes[r, 0].set_ylabel(name)
    for col, name in enumerate(("axial", "coronal", "sagittal")):
        axes[0, col].set_title(name)
    for a in axes.flat:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle("Model predictions (radiological: patient right on the left)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def errors_figure(image: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                  affine: np.ndarray, path: Path) -> Path:
    """Image with false positives (red) and false negatives (blue), three planes."""
    plt = _plt()
    img, tru, prd = (_ras(a, affine) for a in (image, truth, pred))
    fp = (prd != tru) & (prd > 0)
    fn = (prd != tru) & (tru > 0)
    c = _centre(tru)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for col, (a, f, n) in enumerate(zip(_planes(img, c), _planes(fp, c), _planes(fn, c),
                                        strict=True)):
        lo, hi = np.percentile(a, [1, 99]) if a.size else (0, 1)
        g = np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
        rgb = np.stack([g, g, g], axis=-1)
        rgb[f] = [1.0, 0.1, 0.1]
        rgb[n] = [0.1, 0.3, 1.0]
        axes[col].imshow(rgb, origin="lower")
        axes[col].set_title(("axial", "coronal", "sagittal")[col])
        axes[col].set_xticks([])
        axes[col].set_yticks([])
    fig.suptitle("Errors: false positives red, false negatives blue", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def training_curves(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Loss per step and validation metric per validation step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    val = [(r["step"], r["val_metric"]) for r in rows if r.get("val_metric") is not None]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation")
        ax2.set_ylabel("validation metric")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training curves")
    fig.tight_layout()
    return _save(fig, path)
