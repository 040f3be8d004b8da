"""Helpers for the cohort-run tests: a tiny segmentation model and small oblique scans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tiny_models import make_tiny_seg_model, oblique_lps_affine


def make_model(folder: Path) -> Path:
    """A 3-label MONAI UNet state dict + model.yaml in ``folder``; returns the folder."""
    return make_tiny_seg_model(folder, ("csf", "tissue"))


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
