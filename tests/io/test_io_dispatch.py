"""load/save dispatch on content; sniffing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from io_helpers import GEOMETRIES, random_volume

from medinfer.errors import ConfigError, InvalidImageError
from medinfer.io import ImageFormat, load, save, sniff_format, write_dicom_series, write_nifti


def test_sniff(tmp_path: Path) -> None:
    vol = random_volume(GEOMETRIES["oblique_aniso"])
    assert sniff_format(write_nifti(vol, tmp_path / "a.nii")) is ImageFormat.NIFTI
    assert sniff_format(write_nifti(vol, tmp_path / "a.nii.gz")) is ImageFormat.NIFTI
    files = write_dicom_series(vol, tmp_path / "d")
    assert sniff_format(files[0]) is ImageFormat.DICOM
    assert sniff_format(tmp_path / "d") is ImageFormat.DICOM
    (tmp_path / "t.nii").write_text("hello")
    with pytest.raises(InvalidImageError, match="neither NIfTI nor DICOM"):
        sniff_format(tmp_path / "t.nii")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty"):
        sniff_format(tmp_path / "empty.nii.gz")
    with pytest.raises(InvalidImageError, match="no such file"):
        load(tmp_path / "missing.nii.gz")


def test_dicom_file_with_nifti_name(tmp_path: Path) -> None:
    vol = random_volume(GEOMETRIES["lps_aniso"], shape=(6, 5, 1))
    (f,) = write_dicom_series(vol, tmp_path / "d")
    liar = tmp_path / "scan.nii.gz"
    liar.write_bytes(f.read_bytes())
    back = load(liar)
    assert back.meta["format"] == "dicom"
    assert np.array_equal(back.array, vol.array)
    assert np.allclose(back.affine, vol.affine, atol=1e-6)


def test_raw_implicit_vr_files_without_preamble(tmp_path: Path) -> None:
    vol = random_volume(GEOMETRIES["oblique_aniso"], seed=5)
    files = write_dicom_series(vol, tmp_path / "d", shuffle_seed=2)
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(raw / f"slice{i:03d}.nii", implicit_vr=True, little_endian=True)
        assert (raw / f"slice{i:03d}.nii").read_bytes()[128:132] != b"DICM"
    back = load(raw)
    assert np.array_equal(back.array, vol.array)
    assert np.allclose(back.affine, vol.affine, atol=1e-6)


def test_save_formats(tmp_path: Path) -> None:
    vol = random_volume(GEOMETRIES["oblique_aniso"], dtype="uint8")
    p = save(vol, tmp_path / "x.nii.gz")
    assert p == tmp_path / "x.nii.gz"
    assert np.array_equal(load(p).array, vol.array)
    d = save(vol, tmp_path / "series", format="dicom")
    assert np.array_equal(load(d).array, vol.array)
    with pytest.raises(ConfigError, match="format='dicom'"):
        save(vol, tmp_path / "x.mha")
    with pytest.raises(ConfigError, match="'nifti', 'dicom'"):
        save(vol, tmp_path / "x.nii", format="nrrd")
