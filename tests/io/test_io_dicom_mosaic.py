"""Siemens MOSAIC series (issue 17 item 3): de-mosaicked with dcm2niix's geometry, or
refused; never stacked as if the tiles were slices.

Inputs: nibabel's Siemens MOSAIC test files (``nibabel/nicom/tests/data/0.dcm``,
``1.dcm``, shipped in the nibabel wheel): real CSA headers. Their 256 x 256 mosaics do not
divide into the 7 x 7 grid that 48 images need (the files were cut down), so they are
refused; valid mosaics are built from them with 252 x 252 pixels. dcm2niix is the
oracle for geometry and voxel data.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest

from medinfer.errors import InvalidImageError
from medinfer.io import load, read_dicom
from medinfer.transforms.spatial import reorient
from medinfer.volume import Volume

NIBABEL_DATA = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"


def _dcm2niix(folder: Path, out: Path) -> Path:
    exe = shutil.which("dcm2niix")
    assert exe is not None, "dcm2niix is needed (pip install dcm2niix)"
    out.mkdir()
    subprocess.run([exe, "-z", "n", "-b", "n", "-f", "ref", "-o", str(out), str(folder)],
                   check=True, capture_output=True, timeout=120)
    (nii,) = out.glob("ref*.nii")
    return nii


def _corners(vol: Volume) -> np.ndarray:
    shape = vol.spatial_shape
    idx = np.array(list(itertools.product(*[(0, n - 1) for n in shape])), dtype=float)
    return vol.voxel_to_world(idx)


def _valid_mosaics(tmp_path: Path, n_files: int) -> Path:
    """nibabel's MOSAIC files with 252 x 252 pixels (7 x 7 tiles of 36 x 36) of data."""
    folder = tmp_path / "mosaic"
    folder.mkdir()
    first = pydicom.dcmread(NIBABEL_DATA / "0.dcm")
    for i in range(n_files):
        ds = pydicom.dcmread(NIBABEL_DATA / f"{i}.dcm")
        ds.ImagePositionPatient = first.ImagePositionPatient  # one grid for all volumes
        rng = np.random.default_rng(i)
        ds.Rows = ds.Columns = 252
        ds.PixelData = rng.integers(0, 4000, (252, 252)).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{i}.dcm")
    return folder


def test_nibabel_mosaic_files_are_refused_not_stacked(tmp_path: Path) -> None:
    folder = tmp_path / "nib"
    folder.mkdir()
    for name in ("0.dcm", "1.dcm"):
        shutil.copy(NIBABEL_DATA / name, folder / name)
    with pytest.raises(InvalidImageError, match=r"MOSAIC image of 256 x 256.*7 x 7"):
        load(folder)
    with pytest.raises(InvalidImageError, match="MOSAIC"):
        load(folder / "0.dcm")


def test_single_mosaic_equals_dcm2niix(tmp_path: Path) -> None:
    folder = _valid_mosaics(tmp_path, 1)
    vol = read_dicom(folder / "0.dcm")
    assert vol.shape == (1, 36, 36, 48)
    ref = load(_dcm2niix(folder, tmp_path / "ref"))
    assert ref.spatial_shape == vol.spatial_shape
    a, b = reorient(vol, "RAS"), reorient(ref, "RAS")
    np.testing.assert_allclose(a.affine, b.affine, atol=0.01)
    np.testing.assert_allclose(_corners(a), _corners(b), atol=0.01)
    assert np.array_equal(a.array, b.array)
    # tile 0 is the top-left 36 x 36 block; tile 8 the second block of the second row
    px = pydicom.dcmread(folder / "0.dcm").pixel_array
    k_of_tile = np.argsort(np.argsort(
        [float(np.dot(vol.voxel_to_world([[0, 0, k]])[0], [0, 0, 1])) for k in range(48)]))
    assert np.array_equal(vol.array[0, :, :, k_of_tile[0]].T, px[:36, :36])
    assert np.array_equal(vol.array[0, :, :, k_of_tile[8]].T, px[36:72, 36:72])


def test_mosaic_series_is_4d_like_dcm2niix(tmp_path: Path) -> None:
    folder = _valid_mosaics(tmp_path, 2)
    vol = load(folder)
    assert vol.shape == (2, 36, 36, 48)
    assert vol.meta["mosaic_volumes"] == 2
    ref = load(_dcm2niix(folder, tmp_path / "ref"))
    assert ref.shape == vol.shape
    a, b = reorient(vol, "RAS"), reorient(ref, "RAS")
    np.testing.assert_allclose(_corners(a), _corners(b), atol=0.01)
    assert np.array_equal(a.array, b.array)
