"""Helpers for the cohort-run tests: a tiny segmentation model and small oblique scans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml

UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8],
        "strides": [2], "num_res_units": 0}


def make_model(folder: Path) -> Path:
    """A 3-label MONAI UNet state dict + model.yaml in ``folder``; returns the folder."""
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(UNet(**UNET).state_dict(), folder / "model.pt")
    card: dict[str, Any] = {
        "name": "tiny-seg", "version": "0.1",
        "labels": {0: {"name": "background", "color": [0, 0, 0]},
                   1: {"name": "csf", "color": [0, 0, 255]},
                   2: {"name": "tissue", "color": [0, 255, 0]}},
        "input": {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0],
                  "normalization": {"method": "zscore"}},
        "inference": {"patch_size": [8, 8, 8], "overlap": 0.25},
        "weights": {"format": "state_dict", "file": "model.pt"},
        "architecture": {"network": "UNet", "kwargs": UNET},
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(card))
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


def scan_array(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(14, 12, 6)) * 50 + 300).astype(np.int16)


def write_nifti(path: Path, seed: int) -> Path:
    nib.save(nib.Nifti1Image(scan_array(seed), oblique_lps_affine()), str(path))
    return path


def write_dicom(folder: Path, seed: int, *, patient_id: str, description: str = "AX T1",
                series_number: int = 3) -> Path:
    from medinfer.io.dicom_writer import write_dicom_series
    from medinfer.volume import Volume

    write_dicom_series(Volume(scan_array(seed), oblique_lps_affine()), folder,
                       series_description=description, patient_id=patient_id,
                       series_number=series_number, shuffle_seed=seed)
    return folder


def manifest(out: Path, name: str = "run.json") -> dict[str, Any]:
    data = json.loads((out / name).read_text())
    assert isinstance(data, dict)
    return data


def final_files(out: Path) -> list[str]:
    """Non-hidden files in ``out`` (temporary files start with a dot)."""
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
