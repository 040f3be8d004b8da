"""NIfTI writer: qform/sform codes carried from the source, qform never disagreeing with
the sform (issue 17 item 7), label intent. SimpleITK (ITK's NIfTI reader) is the oracle."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medinfer.io import read_nifti, write_nifti
from medinfer.volume import Volume


def _rotation(deg: tuple[float, float, float]) -> np.ndarray:
    out = np.eye(3)
    for axis, d in enumerate(deg):
        c, s = np.cos(np.deg2rad(d)), np.sin(np.deg2rad(d))
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def _oblique_lps() -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = _rotation((10, -20, 30)) @ np.diag([-0.8, -1.2, 2.5])
    aff[:3, 3] = [5.0, 6.0, -7.0]
    return aff


def _sheared() -> np.ndarray:
    # dipy's S0_10slices.nii.gz kind: an sform with shear that no qform can hold
    return np.array([[0.0, -1.1, 0.3, 10.0], [0.9, 0.0, 0.2, -5.0], [0.1, 0.2, 2.5, 3.0],
                     [0.0, 0.0, 0.0, 1.0]])


def _sitk_affine_ras(path: Path) -> np.ndarray:
    img = sitk.ReadImage(str(path))
    flip = np.diag([-1.0, -1.0, 1.0])
    aff = np.eye(4)
    aff[:3, :3] = flip @ np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    aff[:3, 3] = flip @ np.array(img.GetOrigin())
    return aff


def _source(tmp_path: Path, aff: np.ndarray, qcode: int, scode: int) -> Volume:
    arr = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    img = nib.Nifti1Image(arr, None)
    img.header.set_sform(aff, code=scode)
    img.header.set_qform(aff, code=qcode)
    p = tmp_path / f"src_{qcode}_{scode}.nii.gz"
    nib.save(img, str(p))
    return read_nifti(p)


@pytest.mark.parametrize("codes", [(2, 2), (0, 2), (0, 4), (1, 0), (1, 1)])
def test_source_codes_are_carried_and_itk_reads_nibabel_grid(
    tmp_path: Path, codes: tuple[int, int]
) -> None:
    aff = _oblique_lps()
    vol = _source(tmp_path, aff, *codes)
    out = write_nifti(vol, tmp_path / "out.nii.gz")
    img = nib.load(str(out))
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == codes
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    np.testing.assert_allclose(_sitk_affine_ras(out), aff, atol=1e-4)
    assert int(img.header["intent_code"]) == 0


def test_no_source_codes_give_scanner_codes(tmp_path: Path) -> None:
    aff = _oblique_lps()
    out = write_nifti(Volume(np.zeros((4, 5, 6), np.uint8), aff), tmp_path / "o.nii")
    img = nib.load(str(out))
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 1)
    np.testing.assert_allclose(_sitk_affine_ras(out), aff, atol=1e-4)


@pytest.mark.parametrize("codes", [(2, 2), (1, 1), (0, 2)])
def test_sheared_sform_gets_qform_code_0(tmp_path: Path, codes: tuple[int, int]) -> None:
    aff = _sheared()
    vol = _source(tmp_path, aff, *codes)
    out = write_nifti(vol, tmp_path / "out.nii.gz")
    img = nib.load(str(out))
    assert int(img.header["qform_code"]) == 0
    assert int(img.header["sform_code"]) == codes[1]
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    np.testing.assert_allclose(img.header.get_zooms(), np.linalg.norm(aff[:3, :3], axis=0),
                               rtol=1e-6)
    # ITK cannot hold a sheared grid: it must refuse, never read the rigid qform's grid
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(out))


def test_label_intent(tmp_path: Path) -> None:
    aff = _oblique_lps()
    labels = np.zeros((4, 5, 6), np.int64)
    labels[1, 2, 3] = 3
    out = write_nifti(Volume(labels, aff, {"intent": "label"}), tmp_path / "seg.nii.gz")
    hdr = nib.load(str(out)).header
    assert int(hdr["intent_code"]) == 1002
    assert float(hdr["cal_max"]) == 3.0
