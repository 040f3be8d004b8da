"""prepare_for_inference: hand-computed windows, percentiles, token grid, views, unusable images."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_helpers import head_phantom, make_volume, rpi_affine

from medinfer.data import PrepareConfig, load_image, prepare_for_inference, prepare_volume
from medinfer.errors import ConfigError
from medinfer.volume import Volume

NO_CROP = PrepareConfig(crop_to_foreground=False)


def _grid_rpi(values_dhw: np.ndarray) -> Volume:
    """A volume already on the training grid: RPI, spacing (1, 1, 4) -> no resampling.

    ``values_dhw`` is given in (d, h, w) order; the RPI array is its (2, 1, 0) transpose.
    """
    return make_volume(np.ascontiguousarray(values_dhw.transpose(2, 1, 0)), rpi_affine((1, 1, 4)))


def test_ct_windows_by_hand():
    hu = np.array([-1000, -20, 0, 40, 80, 180, 2000, 3000], dtype=np.float32)
    vol = np.full((8, 16, 32), 40.0, dtype=np.float32)
    vol[0, 0, :8] = hu  # first row of the first slice holds the test values
    out = prepare_for_inference(_grid_rpi(vol), "ct", config=NO_CROP)
    assert out is not None
    arrs, mask, view = out
    assert view == "axial" and arrs.names == ("brain", "blood", "bone") and len(arrs) == 3
    assert all(a.dtype == torch.float32 and a.shape == (1, 8, 16, 32) for a in arrs)
    img = {name: a[0].numpy() for name, a in arrs.as_dict().items()}
    expected = {
        # brain W 80 L 40 -> [0, 80] HU
        "brain": [0, 0, 0, 0.5, 1, 1, 1, 1],
        # blood W 200 L 80 -> [-20, 180] HU
        "blood": [0, 0, 0.1, 0.3, 0.5, 1, 1, 1],
        # bone W 2800 L 600 -> [-800, 2000] HU
        "bone": [0, 780 / 2800, 800 / 2800, 840 / 2800, 880 / 2800, 980 / 2800, 1, 1],
    }
    for name, values in expected.items():
        np.testing.assert_allclose(img[name][0, 0, :8], values, atol=1e-6)
    assert np.all((img["bone"] >= 0) & (img["bone"] <= 1))


def test_mri_percentiles_by_hand():
    vol = np.arange(8 * 16 * 32, dtype=np.float32).reshape(8, 16, 32)  # 0 .. 4095
    out = prepare_for_inference(_grid_rpi(vol), "mri", config=NO_CROP)
    assert out is not None
    arrs, _mask, _view = out
    # numpy 'linear' percentiles of 0..4095: p/100 * 4095
    lo, hi = 0.005 * 4095, 0.995 * 4095
    got = arrs[0][0].numpy()
    assert arrs.names == ("mri",) and len(arrs) == 1
    for value in (0.0, 10.0, 1000.0, 2047.0, 4080.0, 4095.0):
        d, rem = divmod(int(value), 16 * 32)
        h, w = divmod(rem, 32)
        want = (min(max(value, lo), hi) - lo) / (hi - lo)
        assert got[d, h, w] == pytest.approx(want, abs=1e-6)
    assert got.min() == 0.0 and got.max() == pytest.approx(1.0)


def test_token_grid_and_background_mask_by_hand():
    vol = np.full((8, 16, 32), -1000.0, dtype=np.float32)  # token grid (2, 1, 2)
    vol[0:4, 0:1, 16:28] = 30.0  # 12 of 1024 voxels (1.2 %) -> still background
    vol[4:8, 0:4, 0:8] = 30.0  # 128 / 1024 (12.5 %) -> foreground
    vol[4:8, :, 16:] = 30.0  # full token
    out = prepare_for_inference(_grid_rpi(vol), "ct", config=NO_CROP)
    assert out is not None
    arrs, mask, _ = out
    assert mask.dtype == torch.uint8 and mask.shape == (4,) and arrs.token_grid == (2, 1, 2)
    assert mask.reshape(arrs.token_grid)[:, 0, :].tolist() == [[1, 1], [0, 0]]


def test_crop_to_foreground_then_pad_to_multiples():
    vol = np.full((24, 64, 64), -1000.0, dtype=np.float32)
    vol[5:15, 10:30, 20:41] = 40.0  # box 10 x 20 x 21 voxels
    prepared = prepare_volume(_grid_rpi(vol), "ct")
    assert prepared is not None
    # padded to multiples of (4, 16, 16), centred: start floor((n - n') / 2) = (-1, -6, -6)
    assert prepared.shape == (12, 32, 32) and prepared.token_grid == (3, 2, 2)
    brain = prepared.channels["brain"]
    assert np.count_nonzero(brain == 0.5) == 10 * 20 * 21
    assert brain[1:11, 6:26, 6:27].min() == 0.5
    # the affine follows the crop: voxel (0, 0, 0) of the output is (d, h, w) = (4, 4, 14)
    vol_in = _grid_rpi(vol)
    expected_world = vol_in.voxel_to_world([14, 4, 4])  # RPI index (w, h, d)
    np.testing.assert_allclose(prepared.affine[:3, 3], expected_world, atol=1e-9)


@pytest.mark.parametrize(
    ("spacing", "shape", "view", "dhw"),
    [
        ((0.5, 0.5, 5.0), (96, 96, 16), "axial", (20, 48, 48)),
        ((0.9, 6.0, 0.9), (60, 12, 60), "coronal", (18, 54, 54)),
        ((5.0, 1.0, 1.0), (14, 60, 50), "sagittal", (18, 50, 60)),
        ((1.0, 1.0, 1.1), (40, 40, 40), "axial", (11, 40, 40)),  # near-isotropic -> axial
    ],
)
def test_view_from_spacing_and_grid_size(spacing, shape, view, dhw):
    arr, aff, _ = head_phantom(shape, spacing)
    prepared = prepare_volume(make_volume(arr, aff), "ct", config=NO_CROP)
    assert prepared is not None and prepared.view == view
    # resampled size n * s / s' (rounded), then padded to multiples of (4, 16, 16)
    mult = (4, 16, 16)
    assert prepared.shape == tuple(-(-n // m) * m for n, m in zip(dhw, mult, strict=True))
    # through-plane spacing 4 mm along d, 1 mm in-plane
    np.testing.assert_allclose(np.linalg.norm(prepared.affine[:3, :3], axis=0), [4, 1, 1])


def test_z_dim_overrides_detection():
    arr, aff, _ = head_phantom((40, 40, 40), (1.0, 1.0, 1.0))
    for z_dim, view in ((0, "sagittal"), (1, "coronal"), ("axial", "axial")):
        out = prepare_for_inference(make_volume(arr, aff), "ct", z_dim=z_dim)
        assert out is not None and out.view == view
    with pytest.raises(ConfigError, match="z_dim"):
        prepare_for_inference(make_volume(arr, aff), "ct", z_dim=3)
    with pytest.raises(ConfigError, match="mode"):
        prepare_for_inference(make_volume(arr, aff), "pet")


def test_unusable_images_give_none_with_a_logged_reason(caplog):
    caplog.set_level(logging.WARNING, logger="medinfer.data.prepare")
    thin = np.full((64, 64, 3), 40, dtype=np.int16)
    assert prepare_for_inference(make_volume(thin, rpi_affine((1, 1, 5))), "ct") is None
    assert "3 slices" in caplog.text
    caplog.clear()
    air = np.full((32, 32, 16), -1000, dtype=np.int16)
    assert prepare_for_inference(make_volume(air, rpi_affine((1, 1, 4))), "ct") is None
    assert "no foreground" in caplog.text
    caplog.clear()
    flat = np.full((32, 32, 16), 7.0, dtype=np.float32)
    assert prepare_for_inference(make_volume(flat, rpi_affine((1, 1, 4))), "mri") is None
    assert "constant" in caplog.text
    caplog.clear()
    nan = np.zeros((32, 32, 16), dtype=np.float32)
    nan[3, 3, 3] = np.nan
    assert prepare_for_inference(make_volume(nan, rpi_affine((1, 1, 4))), "mri") is None
    assert "NaN" in caplog.text
    caplog.clear()
    four_d = Volume(np.zeros((3, 32, 32, 16), dtype=np.float32), rpi_affine((1, 1, 4)))
    assert prepare_for_inference(four_d, "mri") is None
    assert "3 channels" in caplog.text


DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize(
    ("name", "mode", "shape", "channels"),
    [
        ("ct_head_1mm_air.nii.gz", "ct", (36, 160, 144), ["brain", "blood", "bone"]),
        ("mni152_t1_1mm.nii.gz", "mri", (40, 192, 160), ["mri"]),
    ],
)
def test_real_ct_and_mri(name, mode, shape, channels):
    prepared = prepare_volume(load_image(DATA / name), mode)
    assert prepared is not None and prepared.view == "axial" and prepared.shape == shape
    assert list(prepared.channels) == channels
    fg = np.kron(1 - prepared.background, np.ones((4, 16, 16), dtype=np.uint8)).astype(bool)
    first = prepared.channels[channels[0]]
    assert 0.0 <= first.min() and first.max() <= 1.0
    # the head fills the crop: most tokens are foreground, and they hold the bright voxels
    assert 0.3 < (prepared.background == 0).mean() < 0.8
    assert first[fg].mean() > 3 * first[~fg].mean()
    if mode == "ct":  # brain tissue 20-45 HU -> brain window 0.25-0.56
        assert 0.25 < float(np.median(first[first > 0.1])) < 0.56


def test_single_dicom_file_is_loaded_and_rejected_for_too_few_slices(caplog):
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")  # one 128 x 128 CT slice shipped with pydicom
    vol = load_image(path)
    assert vol.spatial_shape == (128, 128, 1)
    caplog.set_level(logging.WARNING, logger="medinfer.data.prepare")
    assert prepare_for_inference(path, "ct") is None
    assert "1 slices" in caplog.text
