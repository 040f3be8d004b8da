"""Test data shared by several test folders: a tiny seeded 3-label MONAI UNet model and
an oblique LPS-like affine (built in well under a second).

On ``sys.path`` through ``[tool.pytest.ini_options] pythonpath`` in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8],
        "strides": [2], "num_res_units": 0}


def tiny_seg_card(names: tuple[str, str] = ("liver", "spleen"), /,
                  **over: Any) -> dict[str, Any]:
    """model.yaml dict of the tiny UNet: labels 1, 2 named ``names``; ``over`` replaces keys."""
    card: dict[str, Any] = {
        "name": "tiny-seg", "version": "0.1",
        "labels": {0: {"name": "background", "color": [0, 0, 0]},
                   1: {"name": names[0], "color": [0, 0, 255]},
                   2: {"name": names[1], "color": [0, 255, 0]}},
        "input": {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0],
                  "normalization": {"method": "zscore"}},
        "inference": {"patch_size": [8, 8, 8], "overlap": 0.25},
        "weights": {"format": "state_dict", "file": "model.pt"},
        "architecture": {"network": "UNet", "kwargs": UNET},
    }
    card.update(over)
    return card


def make_tiny_seg_model(folder: Path, names: tuple[str, str] = ("liver", "spleen"), /,
                        **over: Any) -> Path:
    """The seeded tiny UNet state dict + model.yaml in ``folder`` (created); returns it."""
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(UNet(**UNET).state_dict(), folder / "model.pt")
    (folder / "model.yaml").write_text(yaml.safe_dump(tiny_seg_card(names, **over)))
    return folder


def oblique_lps_affine(spacing: tuple[float, float, float] = (0.9, 1.1, 2.5)) -> np.ndarray:
    """Voxel -> RAS affine: LPS-like axes, rotated 15 deg about z and 10 deg about x."""
    a, b = np.deg2rad(15.0), np.deg2rad(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rx @ rz @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    aff[:3, 3] = [31.5, -12.25, 7.0]
    return aff
