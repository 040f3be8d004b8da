"""Helpers shared by the inference tests."""

from __future__ import annotations

from typing import Any

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


UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8],
        "strides": [2], "num_res_units": 0}


def card_dict(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "tiny-seg",
        "version": "0.1",
        "labels": {0: {"name": "background", "color": [0, 0, 0]},
                   1: {"name": "csf", "color": [0, 0, 255]},
                   2: {"name": "tissue", "color": [0, 255, 0]}},
        "input": {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0],
                  "normalization": {"method": "zscore"}},
        "inference": {"patch_size": [8, 8, 8], "overlap": 0.25},
        "weights": {"format": "state_dict", "file": "model.pt"},
        "architecture": {"network": "UNet", "kwargs": UNET},
    }
    d.update(over)
    return d
