"""A file of the chosen DICOM series that cannot be read is an error naming it, never a
volume with a slice fewer (issue 17 item 9b), unless ``allow_missing_slices``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from medinfer.errors import InvalidImageError
from medinfer.io import load, read_dicom
from medinfer.io._missing_slices import ALLOW_MISSING_SLICES_ENV
from medinfer.io.dicom_writer import write_dicom_series
from medinfer.volume import Volume


def _oblique_lps() -> np.ndarray:
    a = np.deg2rad(12.0)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-0.8, -0.9, 3.0])
    aff[:3, 3] = [40.0, 12.5, -20.0]
    return aff


def _series(folder: Path, n_k: int = 6, seed: int = 0, **kw: object) -> tuple[Volume, list[Path]]:
    rng = np.random.default_rng(seed)
    vol = Volume(rng.integers(-500, 1500, (1, 12, 10, n_k)).astype(np.int16), _oblique_lps())
    files = write_dicom_series(vol, folder, modality="CT", **kw)  # type: ignore[arg-type]
    return vol, files  # files in slice (K) order


def _cut(f: Path, n: int) -> None:
    f.write_bytes(f.read_bytes()[:n])


def _offset(f: Path, tag: bytes) -> int:
    i = f.read_bytes().find(tag)
    assert i > 0
    return i


def test_truncated_last_file(tmp_path: Path) -> None:
    vol, files = _series(tmp_path / "s")
    last = files[-1]
    _cut(last, last.stat().st_size - 50)  # pixel data cut short
    with pytest.raises(InvalidImageError, match=re.escape(str(last))) as err:
        load(tmp_path / "s")
    assert "--allow-missing-slices" in str(err.value)
    back = load(tmp_path / "s", allow_missing_slices=True)
    assert back.spatial_shape == (12, 10, 5)
    assert np.array_equal(back.array, vol.array[..., :5])
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    assert back.meta["skipped_files"] == [str(last)]


@pytest.mark.parametrize("cut_at", ["file_meta", "before_series_uid", "in_series_uid",
                                    "before_rows"])
def test_unreadable_first_file(tmp_path: Path, cut_at: str) -> None:
    vol, files = _series(tmp_path / "s", shuffle_seed=3)
    first = files[0]
    where = {
        "file_meta": 200,
        "before_series_uid": _offset(first, b"\x08\x00\x60\x00"),  # Modality
        "in_series_uid": _offset(first, b"\x20\x00\x0e\x00") + 20,
        "before_rows": _offset(first, b"\x28\x00\x10\x00"),  # Rows
    }[cut_at]
    _cut(first, where)
    with pytest.raises(InvalidImageError, match=re.escape(str(first))):
        read_dicom(tmp_path / "s")
    back = read_dicom(tmp_path / "s", allow_missing_slices=True)
    assert back.spatial_shape == (12, 10, 5)
    assert np.array_equal(back.array, vol.array[..., 1:])
    np.testing.assert_allclose(back.affine, vol.affine @ np.array(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1.0]]), atol=1e-5)


def test_environment_variable_allows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, files = _series(tmp_path / "s")
    _cut(files[-1], 300)
    monkeypatch.setenv(ALLOW_MISSING_SLICES_ENV, "1")
    assert load(tmp_path / "s").spatial_shape == (12, 10, 5)
    # an explicit argument wins over the environment
    with pytest.raises(InvalidImageError, match=re.escape(str(files[-1]))):
        load(tmp_path / "s", allow_missing_slices=False)


def test_damaged_file_of_another_series_does_not_block(tmp_path: Path) -> None:
    vol_a, _ = _series(tmp_path / "both" / "a", seed=1)
    _, files_b = _series(tmp_path / "both" / "b", seed=2)
    f = files_b[2]
    _cut(f, _offset(f, b"\x28\x00\x10\x00"))  # series B's header cut after its UID
    uid_a = read_dicom(tmp_path / "both" / "a").meta["series_instance_uid"]
    uid_b = read_dicom(tmp_path / "both" / "b" / files_b[0].name).meta["series_instance_uid"]
    back = load(tmp_path / "both", series_uid=uid_a)
    assert np.array_equal(back.array, vol_a.array)
    with pytest.raises(InvalidImageError, match=re.escape(str(f))):
        load(tmp_path / "both", series_uid=uid_b)


def test_file_named_dcm_that_is_not_dicom(tmp_path: Path) -> None:
    _, files = _series(tmp_path / "s")
    files[0].write_bytes(b"\x00" * 64 + b"not a DICOM file at all")
    with pytest.raises(InvalidImageError, match=re.escape(str(files[0]))):
        load(tmp_path / "s")
    (tmp_path / "s" / "notes.txt").write_text("a stray file is no slice")
    assert load(tmp_path / "s", allow_missing_slices=True).spatial_shape == (12, 10, 5)
