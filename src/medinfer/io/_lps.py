"""LPS <-> RAS conversion of affines (the only place where the two frames meet)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_FLIP_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def affine_lps_to_ras(affine_lps: npt.ArrayLike) -> np.ndarray:
    """Convert a voxel -> LPS mm affine (DICOM, ITK) to voxel -> RAS+ mm (NIfTI, medinfer).

    RAS = diag(-1, -1, 1) @ LPS: the x (right -> left) and y (anterior -> posterior)
    axes are negated. Input and output are (4, 4) float64.
    """
    return _FLIP_LPS_RAS @ np.asarray(affine_lps, dtype=np.float64)


def affine_ras_to_lps(affine_ras: npt.ArrayLike) -> np.ndarray:
    """Convert a voxel -> RAS+ mm affine to voxel -> LPS mm (the inverse, the same flip)."""
    return _FLIP_LPS_RAS @ np.asarray(affine_ras, dtype=np.float64)
