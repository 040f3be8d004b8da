"""Comparison helpers shared by the nnU-Net cascade tests (v1 and v2): loading a two-channel
case, reading a label map and the per-label Dice check against the oracle's labels (a uniquely
named module: ``conftest`` is a name every test folder uses)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medinfer import io
from medinfer.volume import Volume


def load_case(d: Path, name: str) -> Volume:
    """The two channels ``NAME_0000`` / ``NAME_0001`` in folder ``d`` as one (2, X, Y, Z) volume."""
    chans = [io.load(d / f"{name}_{c:04d}.nii.gz") for c in range(2)]
    return Volume(np.concatenate([v.array for v in chans]), chans[0].affine, {})


def read_labels(path: Path) -> np.ndarray:
    """The label map stored at ``path`` as int64, in its stored voxel order."""
    return np.asarray(nib.load(str(path)).dataobj).astype(np.int64)


def check_labels(ours: np.ndarray, ref: np.ndarray, what: str, min_dice: float = 0.999) -> None:
    """Assert equal shapes, a non-empty oracle and Dice >= ``min_dice`` for every label present."""
    assert ours.shape == ref.shape, what
    diff = int(np.sum(ours != ref))
    present = sorted((set(np.unique(ref).tolist()) | set(np.unique(ours).tolist())) - {0})
    assert any(np.any(ref == v) for v in present), f"{what}: oracle predicts background only"
    for v in present:
        s = int(np.sum(ours == v)) + int(np.sum(ref == v))
        dice = 2.0 * float(np.sum((ours == v) & (ref == v))) / s
        print(f"{what} label {v}: Dice {dice:.6f}, differing voxels {diff}")
        assert dice >= min_dice, (what, v, dice)
