"""Compact probability maps (issue 17 item 14): uint8 + scl_slope 1/255 by default.

Readers (nibabel, SimpleITK) see values within 1/510 of the float32 probabilities, on
the source grid; ``--prob-dtype float32`` keeps them exactly.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from inference_helpers import oblique_lps_affine

from medinfer.cli import main
from medinfer.errors import ConfigError
from medinfer.inference.outputs import UINT8_SLOPE, compact_probabilities
from medinfer.io import save
from medinfer.volume import Volume


def _smooth_probabilities() -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (40, 36, 20)],
                                indexing="ij"))
    logits = np.stack([-(grid**2).sum(0) * 3, grid[0] * 2, grid[1] * 2]).astype(np.float32)
    e = np.exp(logits - logits.max(0))
    return e / e.sum(0)


def test_uint8_storage_round_trip_and_size(tmp_path: Path) -> None:
    p = _smooth_probabilities()
    aff = oblique_lps_affine()
    vol = Volume(p, aff, {"nifti": {"qform_code": 1, "sform_code": 1}})
    small = save(compact_probabilities(vol), tmp_path / "p8.nii.gz")
    full = save(compact_probabilities(vol, "float32"), tmp_path / "p32.nii.gz")
    img = nib.load(str(small))
    assert img.get_data_dtype() == np.uint8
    assert img.dataobj.slope == pytest.approx(UINT8_SLOPE) and img.dataobj.inter == 0.0
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    back = np.moveaxis(np.asarray(img.dataobj, dtype=np.float64), -1, 0)
    assert np.abs(back - p).max() <= 1 / 510 + 1e-7
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(small)))  # (K, k, j, i)
    assert np.abs(itk.transpose(0, 3, 2, 1) - p).max() <= 1 / 510 + 1e-6
    exact = np.moveaxis(np.asarray(nib.load(str(full)).dataobj), -1, 0)
    assert np.array_equal(exact, p)
    assert 3 * small.stat().st_size < full.stat().st_size
    with pytest.raises(ConfigError, match="prob_dtype"):
        compact_probabilities(vol, "float64")


def test_predict_prob_dtype_option(tmp_path: Path, model_dir: Path) -> None:
    arr = (np.random.default_rng(0).normal(size=(14, 12, 6)) * 50 + 300).astype(np.int16)
    nib.save(nib.Nifti1Image(arr, oblique_lps_affine()), str(tmp_path / "head.nii.gz"))
    dtypes = {}
    for option in ("uint8", "float32"):
        out = tmp_path / option
        with pytest.raises(SystemExit) as info:
            main(["predict", str(tmp_path / "head.nii.gz"), "--model", str(model_dir), "-o",
                  str(out), "--device", "cpu", "--save-probabilities", "--no-tta",
                  *(["--prob-dtype", option] if option == "float32" else [])])
        assert info.value.code in (0, None)
        dtypes[option] = nib.load(str(out / "head_prob.nii.gz"))
    assert dtypes["uint8"].get_data_dtype() == np.uint8
    assert dtypes["float32"].get_data_dtype() == np.float32
    a = np.asarray(dtypes["uint8"].dataobj)
    b = np.asarray(dtypes["float32"].dataobj)
    assert a.shape == b.shape == (14, 12, 6, 3)
    assert np.abs(a - b).max() <= 1 / 510 + 1e-6
