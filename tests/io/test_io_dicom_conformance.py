"""The DICOM series writer passes dciodvfy (dicom3tools) with no errors (issue 17 item 13).

dciodvfy checks each file against the CT / MR Image IOD of PS3.3; before the fix it
reported the Type 2C ``Laterality`` and ``PatientPosition`` and ImageType value 3
missing, and BitsAllocated 8 for uint8 data.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from medinfer.io import read_dicom
from medinfer.io.dicom_writer import write_dicom_series
from medinfer.volume import Volume


def _oblique_lps(spacing: tuple[float, float, float] = (0.7, 0.9, 2.5)) -> np.ndarray:
    a = np.deg2rad(20.0)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    aff[:3, 3] = [12.0, -30.5, 4.25]
    return aff


def _dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    assert exe is not None, "dciodvfy (dicom3tools) is needed: apt-get install dicom3tools"
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


_VALUES = {
    "int16": lambda rng, shape: rng.integers(-1000, 2000, shape).astype(np.int16),
    "uint16": lambda rng, shape: rng.integers(0, 4000, shape).astype(np.uint16),
    "uint8": lambda rng, shape: rng.integers(0, 255, shape).astype(np.uint8),
    "float32": lambda rng, shape: rng.normal(size=shape).astype(np.float32),
}


@pytest.mark.parametrize("modality", ["CT", "MR"])
@pytest.mark.parametrize("dtype", list(_VALUES))
def test_series_writer_passes_dciodvfy(tmp_path: Path, modality: str, dtype: str) -> None:
    rng = np.random.default_rng(3)
    arr = _VALUES[dtype](rng, (1, 6, 5, 3))
    vol = Volume(arr, _oblique_lps())
    files = write_dicom_series(vol, tmp_path / "series", modality=modality, shuffle_seed=1)
    for f in (files[0], files[-1]):
        assert _dciodvfy_errors(f) == [], f
    back = read_dicom(tmp_path / "series")
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    if dtype == "float32":
        np.testing.assert_allclose(back.array, arr, atol=float(np.ptp(arr)) / 65535)
    else:
        assert np.array_equal(back.array, arr)
