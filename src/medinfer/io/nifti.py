"""NIfTI-1/2 reading and writing with nibabel (minimal version; hardened in io work)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from medinfer._atomic import atomic_path
from medinfer.volume import Volume


def read_nifti(path: str | os.PathLike[str]) -> Volume:
    """Read a NIfTI file; array becomes ``(C, I, J, K)``; affine RAS+ mm."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4:
        data = np.moveaxis(data, -1, 0)
    return Volume(data, img.affine, {"source": str(path), "format": "nifti"})


def write_nifti(volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write ``volume`` as NIfTI atomically; 1-channel volumes are written 3-D."""
    arr = volume.array[0] if volume.num_channels == 1 else np.moveaxis(volume.array, 0, -1)
    img = nib.Nifti1Image(arr, volume.affine)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
