"""Shared helpers of the io tests: geometries that catch axis and frame mistakes."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from medinfer.volume import Volume


def oblique_affine(
    angles_deg: tuple[float, float, float] = (12.0, -17.0, 25.0),
    spacing: tuple[float, float, float] = (0.9, 1.1, 2.5),
    origin: tuple[float, float, float] = (-40.25, 30.5, 12.75),
    flip: tuple[int, int, int] = (1, 1, 1),
    perm: tuple[int, int, int] = (0, 1, 2),
) -> np.ndarray:
    """Voxel -> RAS affine: axis permutation, flips, anisotropic spacing, then a rotation."""
    base = np.eye(3)[:, list(perm)] * np.asarray(flip, dtype=float)
    rot = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    a = np.eye(4)
    a[:3, :3] = rot @ base @ np.diag(spacing)
    a[:3, 3] = origin
    return a


#: named geometries (oblique_aniso and lps_aniso are right-handed, the others left-handed)
GEOMETRIES = {
    "oblique_aniso": oblique_affine(),
    "lps_aniso": oblique_affine((0, 0, 0), (0.8, 1.2, 3.0), flip=(-1, -1, 1)),
    "lpi_permuted_oblique": oblique_affine(
        (5, 14, -9), (1.3, 0.7, 2.0), flip=(-1, -1, -1), perm=(2, 0, 1)
    ),
    "las_oblique": oblique_affine((-18, 6, 11), (0.9, 1.1, 2.5), flip=(-1, 1, 1)),
}


def corners(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates (8, 3) of the corner voxel centres of a grid."""
    i, j, k = (int(s) - 1 for s in shape[:3])
    idx = np.array([[a, b, c, 1.0] for a in (0, i) for b in (0, j) for c in (0, k)])
    return (idx @ affine.T)[:, :3]


def max_corner_mismatch(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance from a corner of ``a`` to the nearest corner of ``b`` and back."""
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    return float(max(d.min(axis=1).max(), d.min(axis=0).max()))


def random_volume(
    affine: np.ndarray,
    shape: tuple[int, int, int] = (13, 11, 7),
    dtype: str = "int16",
    seed: int = 0,
) -> Volume:
    """A Volume of random values of ``dtype`` with no symmetry (every axis distinguishable)."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        arr = rng.normal(100.0, 40.0, size=shape).astype(dtype)
    elif np.dtype(dtype) == np.uint8:
        arr = rng.integers(0, 256, size=shape).astype(dtype)
    elif np.dtype(dtype).kind == "u":
        arr = rng.integers(0, 4000, size=shape).astype(dtype)
    else:
        arr = rng.integers(-1024, 3000, size=shape).astype(dtype)
    return Volume(arr, affine, {})
