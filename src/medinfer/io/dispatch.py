"""Format dispatch for :func:`load` and :func:`save` (content sniffing)."""

from __future__ import annotations

import os
from pathlib import Path

from medinfer.errors import InvalidImageError
from medinfer.volume import Volume


def load(path: str | os.PathLike[str]) -> Volume:
    """Load a scan as a :class:`Volume` (affine in RAS+ mm).

    Raises
    ------
    InvalidImageError
        The path does not exist, is empty, or is not a readable image.
    """
    from medinfer.io import nifti

    p = Path(path)
    if not p.exists():
        raise InvalidImageError(f"{p}: no such file or folder")
    return nifti.read_nifti(p)


def save(volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write ``volume`` atomically; the format follows the suffix (``.nii``, ``.nii.gz``)."""
    from medinfer.io import nifti

    return nifti.write_nifti(volume, path)
