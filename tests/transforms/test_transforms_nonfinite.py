"""Non-finite voxels and channels without range are errors, never a silently blank channel.

Issue 17 item 9a: one NaN voxel made the percentiles NaN, ``hi > lo`` was False and the
whole channel was set to 0 (82.5 % of the sample's labels changed, exit 0).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medinfer.errors import InvalidImageError
from medinfer.inference.predictor import channel_mismatch_message
from medinfer.io import load
from medinfer.transforms import check_finite, normalize_intensity
from medinfer.volume import Volume

AFFINE = np.array([[0.0, -1.2, 0.1, 30.0], [0.9, 0.0, 0.0, -20.0], [0.0, 0.1, 2.5, 5.0],
                   [0.0, 0.0, 0.0, 1.0]])
SPECS = [
    {"method": "percentile", "lower": 0.5, "upper": 99.5, "nonzero": True},
    {"method": "percentile", "lower": 0.5, "upper": 99.5, "nonzero": False},
    {"method": "zscore", "nonzero": False},
    {"method": "ct_window", "min_hu": -1000, "max_hu": 400},
    {"method": "none"},
]


def _scan() -> np.ndarray:
    return np.random.default_rng(0).uniform(10, 900, size=(1, 12, 10, 7)).astype(np.float32)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_voxel_is_refused(spec: dict, bad: float) -> None:
    arr = _scan()
    arr[0, 3, 4, 5] = bad
    with pytest.raises(InvalidImageError, match=r"scan.nii: .*first at channel, i, j, k = "
                                                r"\(0, 3, 4, 5\)"):
        normalize_intensity(Volume(arr, AFFINE, {"source": "scan.nii"}), spec)


def test_scl_slope_overflowing_float32_is_refused(tmp_path: Path) -> None:
    data = np.full((6, 5, 4), 30000, dtype=np.int16)
    data[0, 0, 0] = 1
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_slope_inter(1e35, 0.0)  # 30000 * 1e35 > float32 max
    nib.save(img, tmp_path / "overflow.nii.gz")
    vol = load(tmp_path / "overflow.nii.gz")
    with pytest.raises(InvalidImageError, match="infinite voxel"):
        normalize_intensity(vol, SPECS[0])
    with pytest.raises(InvalidImageError, match="overflow.nii.gz"):
        check_finite(vol.with_array(vol.array.astype(np.float32)))


def test_finite_and_integer_volumes_pass() -> None:
    check_finite(Volume(_scan(), AFFINE))
    check_finite(Volume(np.zeros((1, 3, 3, 3), dtype=np.int16), AFFINE))
    out = normalize_intensity(Volume(_scan(), AFFINE), SPECS[0])
    assert np.isfinite(out.array).all() and 0.0 <= out.array.min() < out.array.max() <= 1.0


@pytest.mark.parametrize("spec", SPECS[:3])
def test_channel_without_range_is_an_error_not_zeros(spec: dict) -> None:
    arr = _scan()
    second = np.full_like(arr, 7.0)
    two = Volume(np.concatenate([arr, second]), AFFINE, {"source": "two.nii"})
    with pytest.raises(InvalidImageError, match="two.nii: channel 1 has no intensity range"):
        normalize_intensity(two, spec)
    with pytest.raises(InvalidImageError, match="no intensity range"):
        normalize_intensity(Volume(np.zeros_like(arr), AFFINE), spec)


def test_four_d_nifti_message_names_time_points(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 20), np.float32), AFFINE),
             tmp_path / "bold.nii.gz")
    msg = channel_mismatch_message(load(tmp_path / "bold.nii.gz"), "demo-brain", 1)
    assert "4-D NIfTI with 20 time points" in msg and "channel(s)" not in msg
    plain = channel_mismatch_message(Volume(np.zeros((3, 2, 2, 2)), AFFINE), "m", 1)
    assert plain == "input: scan has 3 channel(s); model 'm' expects 1"
