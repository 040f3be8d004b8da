"""Issue 18, readers: the smallest inputs that once cost GBs, minutes or a traceback."""

from __future__ import annotations

import gzip
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fuzz_corpus import (
    _zeros,
    corrupt_deflate,
    dicom_slice,
    edit_dicom,
    enhanced_shared_only,
    nifti_bytes,
    set_nifti_field,
)
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medinfer.errors import GeometryError, InvalidImageError, ResourceLimitError
from medinfer.io import load, read_nifti


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_18_1_enhanced_million_frames_refused_before_building_frames(tmp_path: Path) -> None:
    p = _write(tmp_path, "frames.dcm", enhanced_shared_only(1_000_000))
    assert p.stat().st_size < 1000
    tracemalloc.start()
    t0 = time.process_time()
    with pytest.raises(MedinferErrorTypes):
        load(p)
    cpu = time.process_time() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 1024**2, peak  # no per-frame objects (10^6 of them were 1.1 GB)
    assert cpu < 30  # generous; it used to take 130 s


MedinferErrorTypes = (InvalidImageError, GeometryError, ResourceLimitError)


def test_18_1_frame_count_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fuzz_corpus import enhanced_per_frame

    p = _write(tmp_path, "per.dcm", enhanced_per_frame(40))
    monkeypatch.setenv("MEDINFER_MAX_FRAMES", "30")
    with pytest.raises(ResourceLimitError, match="40 frames.*MEDINFER_MAX_FRAMES"):
        load(p)


def test_18_2_deflate_inflation_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    p = _write(tmp_path, "bomb.dcm", _zeros(1024, 1024))  # 2 MiB inflated from a few KB
    assert p.stat().st_size < 20_000
    monkeypatch.setenv("MEDINFER_MAX_UNPACKED_BYTES", str(1024**2))
    with pytest.raises(ResourceLimitError, match="MEDINFER_MAX_UNPACKED_BYTES"):
        load(p)
    monkeypatch.setenv("MEDINFER_MAX_UNPACKED_BYTES", str(8 * 1024**2))
    vol = load(p)
    assert vol.shape == (1, 1024, 1024, 1) and not vol.array.any()


def test_18_2_pixel_read_has_no_widening_temporaries(tmp_path: Path) -> None:
    # 12-bit CT slice, intercept -1024 (int16 out): the old reader made int64 copies
    # of whole frames (~11x the array)
    p = _write(tmp_path, "ct.dcm", dicom_slice(rows=1024, cols=1024))
    tracemalloc.start()
    vol = load(p)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out_bytes = vol.array.nbytes  # 2 MiB int16
    # pixel bytes held by pydicom (2 MiB) + decoded frame (2 MiB) + output + one block
    assert peak < 3 * out_bytes + 9 * 1024**2, (peak, out_bytes)
    assert vol.array.dtype == np.int16


def test_18_2_deflated_round_trip_values(tmp_path: Path) -> None:
    explicit = load(_write(tmp_path, "a.dcm", dicom_slice(seed=3)))
    deflated = load(_write(tmp_path, "b.dcm", dicom_slice(
        ts=DeflatedExplicitVRLittleEndian, seed=3)))
    assert np.array_equal(explicit.array, deflated.array)
    assert np.allclose(explicit.affine, deflated.affine)


def test_18_3_scaled_gzip_nifti_peak_is_the_output(tmp_path: Path) -> None:
    shape = (200, 200, 50)  # uint8 2 MB raw, float32 8 MB out
    raw = nifti_bytes(shape=shape, dtype="uint8", slope=2.0, inter=-1.0)
    p = _write(tmp_path, "s.nii.gz", gzip.compress(raw, mtime=0))
    out_bytes = int(np.prod(shape)) * 4
    tracemalloc.start()
    vol = read_nifti(p, max_bytes=out_bytes)  # the limit is the output size: accepted
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak <= out_bytes + 4 * 1024**2 + 1024**2, (peak, out_bytes)
    ref = np.asarray(nib.load(p).dataobj).astype(np.float32)  # nibabel as oracle
    assert vol.array.dtype == np.float32
    assert np.array_equal(vol.array[0], ref)


def test_18_6_corrupt_deflate_is_a_clean_error(tmp_path: Path) -> None:
    p = _write(tmp_path, "z.dcm", corrupt_deflate(dicom_slice(
        ts=DeflatedExplicitVRLittleEndian)))
    with pytest.raises(InvalidImageError, match="deflate"):
        load(p)


def test_18_7_rescale_slope_1e308(tmp_path: Path) -> None:
    p = _write(tmp_path, "s.dcm", edit_dicom(dicom_slice(), RescaleSlope="1e308"))
    with pytest.raises(InvalidImageError, match="RescaleSlope 1e\\+308.*float32"):
        load(p)


def test_18_12_negative_sform_code_follows_nibabel(tmp_path: Path) -> None:
    raw = nifti_bytes()
    # sform scaled differently from the qform, sform_code -1 (undefined: unset)
    raw = set_nifti_field(set_nifti_field(raw, "srow_x0", 7.0), "sform_code", -1)
    p = _write(tmp_path, "neg.nii", raw)
    vol = load(p)
    assert vol.meta["nifti"]["affine_source"] == "qform"
    assert vol.meta["nifti"]["sform_code"] == 0
    assert np.allclose(vol.affine, nib.load(p).affine, atol=1e-5)  # nibabel as oracle


def test_18_12_absurd_pixel_spacing_is_refused(tmp_path: Path) -> None:
    p = _write(tmp_path, "sp.dcm", edit_dicom(dicom_slice(), PixelSpacing=["1e300", "1e300"]))
    with pytest.raises(GeometryError, match="absurd"):
        load(p)


def test_18_17_dicom_without_preamble_loads(tmp_path: Path) -> None:
    raw = dicom_slice(preamble=False, seed=5)
    assert raw[128:132] != b"DICM"
    vol = load(_write(tmp_path, "raw", raw))
    ref = load(_write(tmp_path, "p10.dcm", dicom_slice(seed=5)))
    assert np.array_equal(vol.array, ref.array)


def test_18_14_dicom_series_folder_gets_umask_permissions(tmp_path: Path) -> None:
    import os

    from fuzz_corpus import oblique_affine

    from medinfer.io import write_dicom_series
    from medinfer.volume import Volume

    vol = Volume(np.arange(60, dtype=np.int16).reshape(1, 5, 4, 3), oblique_affine())
    out = tmp_path / "series"
    old = os.umask(0o022)
    try:
        write_dicom_series(vol, out)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644


def test_18_scaled_integers_never_overflow_to_inf(tmp_path: Path) -> None:
    raw = set_nifti_field(nifti_bytes(dtype="uint8", slope=2.0), "scl_slope", 1e38)
    vol = load(_write(tmp_path, "big.nii", raw))
    stored = np.asarray(nib.load(tmp_path / "big.nii").dataobj.get_unscaled())
    assert vol.array.dtype == np.float64 and np.all(np.isfinite(vol.array))
    assert np.allclose(vol.array[0], stored.astype(np.float64) * np.float32(1e38), rtol=1e-6)


def test_18_truncated_functional_groups_are_a_clean_error(tmp_path: Path) -> None:
    from fuzz_corpus import enhanced_per_frame

    raw = enhanced_per_frame(3, 2, 2)
    cut = raw[: raw.find(b"\xe0\x7f\x10\x00") - 40]  # inside the per-frame sequence
    with pytest.raises(MedinferErrorTypes):
        load(_write(tmp_path, "cut.dcm", cut))
