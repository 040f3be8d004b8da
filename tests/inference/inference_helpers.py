"""Helpers shared by the inference tests."""

from __future__ import annotations

import numpy as np


def oblique_lps_affine(spacing: tuple[float, float, float] = (0.9, 1.1, 2.5)) -> np.ndarray:
    """Voxel -> RAS affine: LPS-like axes, rotated 15 deg about z and 10 deg about x."""
    a, b = np.deg2rad(15.0), np.deg2rad(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    lps = np.diag([-1.0, -1.0, 1.0])
    aff = np.eye(4)
    aff[:3, :3] = rx @ rz @ lps @ np.diag(spacing)
    aff[:3, 3] = [31.5, -12.25, 7.0]
    return aff
