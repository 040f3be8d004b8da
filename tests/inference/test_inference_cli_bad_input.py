"""``medinfer predict`` on hostile or ambiguous input: one message, exit 2, no output.

Complements ``test_inference_cli.py`` with the remaining cases of the foundation
issue's acceptance 5: a truncated ``.nii.gz``, a header claiming 10^12 voxels, a
folder with two DICOM series and no ``--series``, an empty folder.
"""

from __future__ import annotations

import gzip
import resource
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medinfer.cli import main
from medinfer.io import write_dicom_series
from medinfer.volume import Volume


def _predict(inp: Path, model_dir: Path, out: Path, *extra: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(["predict", str(inp), "-m", str(model_dir), "-o", str(out), *extra])
    return int(info.value.code or 0)


def _assert_clean_failure(code: int, out: Path, capsys: pytest.CaptureFixture[str],
                          *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip().startswith("medinfer: error:"), err
    assert err.count("medinfer: error:") == 1, err  # one message
    for needle in needles:
        assert needle in err, err
    # no output file of any kind, complete or partial
    assert not out.exists() or [p for p in out.rglob("*") if p.is_file()] == []
    return err


def test_truncated_nii_gz(tmp_path: Path, model_dir: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    arr = np.random.default_rng(0).normal(size=(20, 18, 16)).astype(np.float32)
    full = tmp_path / "full.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([1.2, 0.9, 2.5, 1.0])), str(full))
    data = full.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    _assert_clean_failure(_predict(cut, model_dir, out), out, capsys, "cut.nii.gz")


def test_header_claiming_1e12_voxels_allocates_nothing_huge(
        tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((10_000, 10_000, 10_000))
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\x00" * 4 + b"\x00" * 1024
    bomb = tmp_path / "huge.nii.gz"
    bomb.write_bytes(gzip.compress(raw))
    out = tmp_path / "out"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = _assert_clean_failure(_predict(bomb, model_dir, out), out, capsys, "huge.nii.gz")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200 * 1024, f"peak RSS grew by {grown_kib} KiB: {err}"


def test_folder_with_two_series_and_no_series_option(
        tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "study"
    uids = []
    for n, name in enumerate(["T1 axial", "T2 axial"], start=1):
        vol = Volume((rng.normal(size=(12, 10, 6)) * 40 + 300).astype(np.int16),
                     np.diag([1.0, 1.0, 3.0, 1.0]))
        uid = f"1.2.826.0.1.3680043.8.498.{1000 + n}"
        write_dicom_series(vol, folder / f"s{n}", series_description=name,
                           series_number=n, series_instance_uid=uid, shuffle_seed=n)
        uids.append(uid)
    out = tmp_path / "out"
    _assert_clean_failure(_predict(folder, model_dir, out), out, capsys,
                          "--series", "T1 axial", "T2 axial", *uids)
    # choosing one of them works
    assert _predict(folder, model_dir, out, "--series", uids[1]) == 0
    assert any(p.name.endswith("_seg.nii.gz") for p in out.iterdir())


def test_empty_folder(tmp_path: Path, model_dir: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    _assert_clean_failure(_predict(empty, model_dir, out), out, capsys, "empty")
