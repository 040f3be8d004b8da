"""Test data for the federated node: a tiny seeded segmentation model, an oblique DICOM
series and NIfTI scans, TAR payloads (all built in seconds by the tests)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
from tiny_models import make_tiny_seg_model

from medinfer.io.dicom_writer import write_dicom_series
from medinfer.volume import Volume


def make_model(folder: Path) -> Path:
    """A seeded tiny MONAI UNet as a medinfer state-dict model (labels liver, spleen)."""
    return make_tiny_seg_model(folder)


def oblique_affine(origin: tuple[float, float, float], spacing: tuple[float, float, float],
                   flip: tuple[int, int, int] = (1, 1, 1)) -> np.ndarray:
    a, b = np.deg2rad(17.0), np.deg2rad(-9.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag(np.asarray(spacing) * np.asarray(flip))
    aff[:3, 3] = origin
    return aff


def scan(seed: int, shape: tuple[int, int, int] = (14, 12, 6),
         flip: tuple[int, int, int] = (1, 1, 1)) -> Volume:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 400, size=(1, *shape)).astype(np.int16)
    return Volume(arr, oblique_affine((3.0, -7.0, 11.0), (1.1, 0.9, 2.5), flip), {})


def nifti_bytes(seed: int, gz: bool = True, flip: tuple[int, int, int] = (-1, -1, 1)) -> bytes:
    vol = scan(seed, flip=flip)
    img = nib.Nifti1Image(vol.array[0], vol.affine)
    raw = img.to_bytes()
    if not gz:
        return raw
    import gzip

    return gzip.compress(raw, mtime=0)


def dicom_series(folder: Path, seed: int = 3, description: str = "CT oblique") -> Path:
    write_dicom_series(scan(seed), folder, modality="CT", shuffle_seed=5,
                       series_description=description)
    return folder


MITK = [{"labels": [
    {"value": 1, "name": "Liver (site label)",
     "color": {"type": "ColorProperty", "value": [1, 0, 0]}},
    {"value": 2, "name": "Spleen (site label)",
     "color": {"type": "ColorProperty", "value": [0, 1, 0]}},
]}]


def tar_of(files: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def series_tar(folder: Path, with_labels: bool = True) -> bytes:
    files = {f"study/ct/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())}
    if with_labels:
        files["study/ct/liver.mitklabel.json"] = json.dumps(MITK).encode()
    return tar_of(files)
