"""Upload checks: format sniffing, NIfTI header caps before decompression, zip safety."""

from __future__ import annotations

import gzip
import io
import tracemalloc
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _serve_support import make_dicom_zip, make_scan, nifti_header_claiming, zip_with_symlink

from medinfer.errors import InvalidImageError, ResourceLimitError, UnsafeArchiveError
from medinfer.serve.uploads import (
    Limits,
    ScanKind,
    UnsupportedFormatError,
    check_upload,
    load_checked,
    parse_nifti_header,
    save_upload,
)

LIMITS = Limits(max_upload_bytes=5_000_000, max_voxels=1_000_000,
                max_unpacked_bytes=20_000_000, max_archive_members=100)


def test_nifti_gz_and_plain_nifti_load_with_geometry(tmp_path: Path) -> None:
    for name in ("s.nii.gz", "s.nii"):
        src = make_scan(tmp_path / name)
        scan = check_upload(src, tmp_path / f"w-{name}", LIMITS)
        assert scan.kind is (ScanKind.NIFTI_GZ if name.endswith("gz") else ScanKind.NIFTI)
        assert scan.voxels == 22 * 18 * 12
        vol = load_checked(scan, LIMITS)
        ref = nib.load(str(src))
        assert vol.spatial_shape == ref.shape
        np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-5)


def test_format_is_sniffed_from_content_not_name(tmp_path: Path) -> None:
    src = make_scan(tmp_path / "s.nii.gz")
    renamed = tmp_path / "upload.txt"
    renamed.write_bytes(src.read_bytes())
    assert check_upload(renamed, tmp_path / "w", LIMITS).kind is ScanKind.NIFTI_GZ
    text = tmp_path / "fake.nii.gz"
    text.write_text("this is not an image\n" * 40)
    with pytest.raises(UnsupportedFormatError, match="not a recognised scan"):
        check_upload(text, tmp_path / "w2", LIMITS)


def test_truncated_gzip_is_refused(tmp_path: Path) -> None:
    src = make_scan(tmp_path / "s.nii.gz", shape=(40, 40, 30))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(InvalidImageError, match="truncated"):
        check_upload(cut, tmp_path / "w", LIMITS)


def test_complete_gzip_with_too_little_data_is_refused(tmp_path: Path) -> None:
    src = make_scan(tmp_path / "s.nii", shape=(20, 20, 10))
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(src.read_bytes()[:2000]))
    with pytest.raises(InvalidImageError, match="truncated NIfTI"):
        check_upload(short, tmp_path / "w", LIMITS)


def test_header_claiming_1e12_voxels_refused_without_allocating(tmp_path: Path) -> None:
    bomb = nifti_header_claiming(tmp_path / "bomb.nii.gz")
    tracemalloc.start()
    try:
        with pytest.raises(ResourceLimitError, match="1000000000000 voxels"):
            check_upload(bomb, tmp_path / "w", LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000


def test_gzip_bomb_beyond_header_size_is_cut(tmp_path: Path) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 4, 4))
    hdr.set_data_dtype(np.uint8)
    raw = bytes(hdr.binaryblock) + b"\0" * 4 + b"\0" * 64 + b"\0" * 30_000_000
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(gzip.compress(raw, compresslevel=9))
    assert bomb.stat().st_size < LIMITS.max_upload_bytes
    with pytest.raises(ResourceLimitError, match="decompresses to more"):
        check_upload(bomb, tmp_path / "w", LIMITS)


def test_parse_header_rejects_zero_dims_and_garbage() -> None:
    hdr = nib.Nifti1Header()
    raw = bytearray(hdr.binaryblock)
    raw[40:56] = np.array([3, 5, 0, 5, 1, 1, 1, 1], "<i2").tobytes()
    with pytest.raises(InvalidImageError, match="zero or negatives"):
        parse_nifti_header(bytes(raw))
    with pytest.raises(InvalidImageError):
        parse_nifti_header(b"\x00" * 400)


def test_upload_size_cap_while_copying(tmp_path: Path) -> None:
    small = Limits(max_upload_bytes=1000, max_voxels=10, max_unpacked_bytes=10_000,
                   max_archive_members=5)
    with pytest.raises(ResourceLimitError, match="MEDINFER_MAX_UPLOAD_BYTES"):
        save_upload(io.BytesIO(b"x" * 5000), tmp_path / "u", small)
    assert not (tmp_path / "u").exists()
    assert not list(tmp_path.iterdir())  # no partial temporary file either
    with pytest.raises(InvalidImageError, match="empty"):
        save_upload(io.BytesIO(b""), tmp_path / "e", small)


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("member", ["../evil.dcm", "a/../../evil.dcm", "/etc/evil.dcm",
                                    "..\\evil.dcm"])
def test_zip_traversal_members_refused(tmp_path: Path, member: str) -> None:
    z = _zip(tmp_path / "x.zip", {"ok.dcm": b"x", member: b"y"})
    with pytest.raises(UnsafeArchiveError, match="refused"):
        check_upload(z, tmp_path / "w", LIMITS)
    assert not (tmp_path / "evil.dcm").exists()
    assert not (tmp_path / "w" / "unpacked").exists()


def test_zip_symlink_refused(tmp_path: Path) -> None:
    z = zip_with_symlink(tmp_path / "l.zip")
    with pytest.raises(UnsafeArchiveError, match="link"):
        check_upload(z, tmp_path / "w", LIMITS)


def test_zip_member_count_and_unpacked_size_caps(tmp_path: Path) -> None:
    many = _zip(tmp_path / "many.zip", {f"f{i}.dcm": b"x" for i in range(101)})
    with pytest.raises(UnsafeArchiveError, match="archive members"):
        check_upload(many, tmp_path / "w1", LIMITS)
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * 25_000_000)
    assert big.stat().st_size < LIMITS.max_upload_bytes
    with pytest.raises(UnsafeArchiveError, match="unpacks to more"):
        check_upload(big, tmp_path / "w2", LIMITS)


def test_zip_without_dicom_is_invalid(tmp_path: Path) -> None:
    z = _zip(tmp_path / "t.zip", {"readme.txt": b"hello"})
    with pytest.raises(InvalidImageError, match="no DICOM image"):
        check_upload(z, tmp_path / "w", LIMITS)


def test_dicom_zip_members_get_generated_names(tmp_path: Path) -> None:
    src = make_scan(tmp_path / "s.nii.gz", shape=(16, 14, 6))
    z = make_dicom_zip(src, tmp_path / "series.zip")
    scan = check_upload(z, tmp_path / "w", LIMITS)
    assert scan.kind is ScanKind.DICOM_ZIP
    assert scan.voxels == 16 * 14 * 6
    names = sorted(p.name for p in scan.path.iterdir())
    assert names == [f"m{i:05d}.dcm" for i in range(6)]


def test_dicom_voxel_cap(tmp_path: Path) -> None:
    src = make_scan(tmp_path / "s.nii.gz", shape=(16, 14, 6))
    z = make_dicom_zip(src, tmp_path / "series.zip")
    tight = Limits(max_upload_bytes=5_000_000, max_voxels=1000, max_unpacked_bytes=20_000_000,
                   max_archive_members=100)
    with pytest.raises(ResourceLimitError, match="MEDINFER_MAX_VOXELS"):
        check_upload(z, tmp_path / "w", tight)
