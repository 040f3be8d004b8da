"""NIfTI reading/writing: exact round trips, header facts, and hostile files."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from io_helpers import GEOMETRIES, random_volume

from medinfer.errors import ConfigError, InvalidImageError, ResourceLimitError
from medinfer.io import load, read_nifti, save, write_nifti
from medinfer.volume import Volume


def _f32_exact(affine: np.ndarray) -> np.ndarray:
    """The affine rounded to float32 (what a NIfTI-1 sform stores exactly)."""
    return affine.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", ["float32", "int16", "uint8", "float64"])
def test_round_trip_exact(tmp_path: Path, name: str, suffix: str, dtype: str) -> None:
    vol = random_volume(_f32_exact(GEOMETRIES[name]), dtype=dtype, seed=3)
    out = write_nifti(vol, tmp_path / f"v{suffix}")
    back = read_nifti(out)
    assert back.shape == vol.shape
    assert back.array.dtype == vol.array.dtype
    assert np.array_equal(back.array, vol.array)
    assert np.array_equal(back.affine, vol.affine)
    # oracle: nibabel reads the same voxels and the same affine
    img = nib.load(out)
    assert np.array_equal(np.asanyarray(img.dataobj), vol.array[0])
    assert np.allclose(img.affine, vol.affine, atol=1e-6)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"


def test_round_trip_float64_affine_within_float32(tmp_path: Path) -> None:
    vol = random_volume(GEOMETRIES["oblique_aniso"], dtype="float32")
    back = load(save(vol, tmp_path / "v.nii.gz"))
    assert np.array_equal(back.array, vol.array)
    assert np.allclose(back.affine, vol.affine, atol=1e-5)
    assert back.orientation == vol.orientation


def test_label_maps_written_small(tmp_path: Path) -> None:
    aff = GEOMETRIES["las_oblique"]
    rng = np.random.default_rng(1)
    cases = {
        "u8": (rng.integers(0, 5, size=(6, 5, 4)).astype(np.int64), np.uint8),
        "u16": (rng.integers(0, 900, size=(6, 5, 4)).astype(np.int64), np.uint16),
        "i16": (rng.integers(-5, 5, size=(6, 5, 4)).astype(np.int32), np.int16),
        "bool": (rng.integers(0, 2, size=(6, 5, 4)).astype(bool), np.uint8),
    }
    for key, (arr, stored) in cases.items():
        path = write_nifti(Volume(arr, aff), tmp_path / f"{key}.nii.gz")
        img = nib.load(path)
        assert img.get_data_dtype() == np.dtype(stored), key
        back = read_nifti(path)
        assert back.array.dtype == np.dtype(stored)
        assert np.array_equal(back.array[0], arr.astype(stored)), key


def test_multichannel_is_4d(tmp_path: Path) -> None:
    aff = _f32_exact(GEOMETRIES["lpi_permuted_oblique"])
    arr = np.random.default_rng(2).random((3, 7, 6, 5)).astype(np.float32)
    path = write_nifti(Volume(arr, aff), tmp_path / "prob.nii.gz")
    img = nib.load(path)
    assert img.shape == (7, 6, 5, 3)
    assert np.array_equal(np.asanyarray(img.dataobj)[..., 1], arr[1])
    back = read_nifti(path)
    assert back.shape == (3, 7, 6, 5)
    assert np.array_equal(back.array, arr)


def test_4d_time_series_from_nibabel(tmp_path: Path) -> None:
    data = np.arange(4 * 3 * 2 * 5, dtype=np.int16).reshape(4, 3, 2, 5)
    img = nib.Nifti1Image(data, GEOMETRIES["oblique_aniso"])
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 2.5
    nib.save(img, tmp_path / "fmri.nii.gz")
    vol = read_nifti(tmp_path / "fmri.nii.gz")
    assert vol.shape == (5, 4, 3, 2)
    assert np.array_equal(vol.array[2], data[..., 2])
    assert vol.meta["nifti"]["time_step"] == 2.5
    out = write_nifti(vol, tmp_path / "again.nii")
    hdr = nib.load(out).header
    assert hdr.get_xyzt_units() == ("mm", "sec")
    assert float(hdr["pixdim"][4]) == 2.5


def test_scaling_and_codes_kept(tmp_path: Path) -> None:
    aff = GEOMETRIES["lps_aniso"]
    raw = np.random.default_rng(4).integers(0, 4000, size=(6, 5, 4)).astype(np.uint16)
    img = nib.Nifti1Image(raw, aff)
    img.header.set_data_dtype(np.uint16)
    img.header.set_slope_inter(0.25, -10.0)
    img.set_sform(aff, code=4)
    img.set_qform(aff, code=2)
    src = tmp_path / "scaled.nii.gz"
    nib.save(img, src)
    vol = read_nifti(src)
    assert vol.array.dtype == np.float32
    assert np.allclose(vol.array[0], raw * 0.25 - 10.0)
    assert np.allclose(vol.array[0], nib.load(src).get_fdata(), atol=1e-4)
    meta = vol.meta["nifti"]
    assert (meta["scl_slope"], meta["scl_inter"], meta["datatype"]) == (0.25, -10.0, "uint16")
    assert (meta["sform_code"], meta["qform_code"]) == (4, 2)
    out = write_nifti(vol, tmp_path / "out.nii.gz")
    img2 = nib.load(out)
    assert img2.get_data_dtype() == np.uint16
    assert (img2.dataobj.slope, img2.dataobj.inter) == (0.25, -10.0)
    assert int(img2.header["sform_code"]) == 4 and int(img2.header["qform_code"]) == 2
    assert np.array_equal(read_nifti(out).array, vol.array)
    # data that no longer fit the source scaling are written as float32
    changed = vol.with_array(vol.array + np.float32(0.1))
    out2 = write_nifti(changed, tmp_path / "changed.nii.gz")
    assert nib.load(out2).get_data_dtype() == np.float32
    assert np.array_equal(read_nifti(out2).array, changed.array)


def test_units_meters_become_mm(tmp_path: Path) -> None:
    aff = np.diag([0.001, 0.002, 0.003, 1.0])
    aff[:3, 3] = [0.1, -0.2, 0.05]
    img = nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), aff)
    img.header.set_xyzt_units("meter")
    nib.save(img, tmp_path / "m.nii")
    vol = read_nifti(tmp_path / "m.nii")
    assert np.allclose(vol.spacing, [1, 2, 3])
    assert np.allclose(vol.origin, [100, -200, 50])


def test_content_not_suffix(tmp_path: Path) -> None:
    vol = random_volume(_f32_exact(GEOMETRIES["oblique_aniso"]), dtype="int16")
    plain = write_nifti(vol, tmp_path / "a.nii")
    lying = tmp_path / "really_plain.nii.gz"
    lying.write_bytes(plain.read_bytes())
    assert np.array_equal(load(lying).array, vol.array)
    gz = write_nifti(vol, tmp_path / "b.nii.gz")
    lying2 = tmp_path / "really_gzip.nii"
    lying2.write_bytes(gz.read_bytes())
    assert np.array_equal(load(lying2).array, vol.array)
    noext = tmp_path / "scan"
    noext.write_bytes(gz.read_bytes())
    assert np.array_equal(load(noext).array, vol.array)


# ------------------------------------------------------------------- hostile input
def test_text_file_named_nii_gz(tmp_path: Path) -> None:
    p = tmp_path / "notes.nii.gz"
    p.write_text("this is not an image\n" * 20)
    with pytest.raises(InvalidImageError, match="notes.nii.gz"):
        load(p)
    with pytest.raises(InvalidImageError, match="not a NIfTI"):
        read_nifti(p)


def test_gzip_of_text_named_nii_gz(tmp_path: Path) -> None:
    p = tmp_path / "gz_text.nii.gz"
    p.write_bytes(gzip.compress(b"hello world " * 100))
    with pytest.raises(InvalidImageError, match="gzip"):
        load(p)


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.95])
def test_truncated_gz(tmp_path: Path, fraction: float) -> None:
    vol = random_volume(GEOMETRIES["oblique_aniso"], shape=(30, 30, 20), dtype="float32")
    full = write_nifti(vol, tmp_path / "full.nii.gz").read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(full[: int(len(full) * fraction)])
    with pytest.raises(InvalidImageError, match=r"truncated|corrupt"):
        load(cut)


def test_truncated_plain_checked_before_reading(tmp_path: Path) -> None:
    vol = random_volume(GEOMETRIES["oblique_aniso"], dtype="int16")
    full = write_nifti(vol, tmp_path / "full.nii").read_bytes()
    cut = tmp_path / "cut.nii"
    cut.write_bytes(full[:-10])
    with pytest.raises(InvalidImageError, match="truncated"):
        read_nifti(cut)


def test_corrupt_gzip_body(tmp_path: Path) -> None:
    vol = random_volume(GEOMETRIES["oblique_aniso"], shape=(30, 30, 20), dtype="float32")
    data = bytearray(write_nifti(vol, tmp_path / "ok.nii.gz").read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(InvalidImageError):
        load(bad)


def _huge_header(version: int = 1) -> bytes:
    hdr = nib.Nifti1Header() if version == 1 else nib.Nifti2Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape((10000, 10000, 10000))  # 10^12 voxels, 4 TB
    hdr["vox_offset"] = 352 if version == 1 else 544
    return hdr.binaryblock + b"\x00" * 4 + b"\x00" * 1024


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("version", [1, 2])
def test_huge_header_rejected_without_allocation(tmp_path: Path, gz: bool, version: int) -> None:
    blob = _huge_header(version)
    p = tmp_path / ("huge.nii.gz" if gz else "huge.nii")
    p.write_bytes(gzip.compress(blob) if gz else blob)
    tracemalloc.start()
    try:
        with pytest.raises(ResourceLimitError, match="10000 x 10000 x 10000"):
            load(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024**2


def test_byte_limit_argument_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = random_volume(GEOMETRIES["oblique_aniso"], shape=(10, 10, 10), dtype="float32")
    p = write_nifti(vol, tmp_path / "v.nii.gz")
    with pytest.raises(ResourceLimitError, match="4,000 bytes"):
        load(p, max_bytes=3999)
    assert load(p, max_bytes=4000).shape == (1, 10, 10, 10)
    monkeypatch.setenv("MEDINFER_MAX_IMAGE_BYTES", "1000")
    with pytest.raises(ResourceLimitError, match="MEDINFER_MAX_IMAGE_BYTES"):
        load(p)
    monkeypatch.setenv("MEDINFER_MAX_IMAGE_BYTES", "lots")
    with pytest.raises(ConfigError):
        load(p)


def test_bad_dims_and_types(tmp_path: Path) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((4, 4, 4))
    hdr["vox_offset"] = 352
    dim = hdr["dim"].copy()
    dim[2] = 0
    hdr["dim"] = dim
    p = tmp_path / "zero.nii"
    p.write_bytes(hdr.binaryblock + b"\x00" * 200)
    with pytest.raises(InvalidImageError, match="size < 1"):
        load(p)
    rgb = nib.Nifti1Image(np.zeros((3, 3, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]),
                          np.eye(4))
    nib.save(rgb, tmp_path / "rgb.nii")
    with pytest.raises(InvalidImageError, match="not supported"):
        load(tmp_path / "rgb.nii")


def test_bad_output_suffix_and_dtype_leave_nothing(tmp_path: Path) -> None:
    vol = random_volume(GEOMETRIES["oblique_aniso"], dtype="float32")
    with pytest.raises(ConfigError, match=".nii.gz"):
        save(vol, tmp_path / "out.png")
    cplx = Volume(np.ones((3, 3, 3), np.complex64), np.eye(4))
    with pytest.raises(InvalidImageError, match="complex"):
        write_nifti(cplx, tmp_path / "c.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_absurd_vox_offset(tmp_path: Path) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape((2, 2, 2))
    hdr["vox_offset"] = 1e12
    p = tmp_path / "offset.nii.gz"
    p.write_bytes(gzip.compress(hdr.binaryblock + b"\x00" * 64))
    with pytest.raises(InvalidImageError, match="vox_offset"):
        load(p)


def test_qform_only_and_vector_and_2d(tmp_path: Path) -> None:
    aff = GEOMETRIES["lps_aniso"]
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(4, 3, 2), None)
    img.set_qform(aff, code=1)
    img.set_sform(None, code=0)
    nib.save(img, tmp_path / "q.nii")
    vol = read_nifti(tmp_path / "q.nii")
    assert vol.meta["nifti"]["affine_source"] == "qform"
    assert np.allclose(vol.affine, aff, atol=1e-5)
    vec = np.random.default_rng(0).random((4, 3, 2, 1, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(vec, aff), tmp_path / "vec.nii.gz")
    v = read_nifti(tmp_path / "vec.nii.gz")
    assert v.shape == (3, 4, 3, 2)
    assert np.array_equal(v.array[2], vec[:, :, :, 0, 2])
    flat = np.arange(12, dtype=np.uint8).reshape(4, 3)
    nib.save(nib.Nifti1Image(flat, aff), tmp_path / "flat.nii")
    f = read_nifti(tmp_path / "flat.nii")
    assert f.shape == (1, 4, 3, 1)
    assert np.array_equal(f.array[0, :, :, 0], flat)
