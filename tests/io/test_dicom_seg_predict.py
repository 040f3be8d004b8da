"""``medinfer predict --output-format ...``: DICOM SEG / RTSTRUCT next to the NIfTI outputs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from io_helpers import GEOMETRIES, random_volume
from tiny_models import make_tiny_seg_model

from medinfer.cli import main
from medinfer.io import load, read_dicom
from medinfer.io.dicom_writer import write_dicom_series


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    return make_tiny_seg_model(tmp_path / "model")


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)


def _dicom_case(tmp: Path) -> Path:
    folder = tmp / "series"
    write_dicom_series(random_volume(GEOMETRIES["oblique_aniso"], (14, 12, 6), seed=3), folder,
                       modality="CT", shuffle_seed=5, series_description="CT oblique")
    return folder


def test_dicom_input_gets_seg_rtstruct_and_fractional(tmp_path, model_dir):  # type: ignore[no-untyped-def]
    series = _dicom_case(tmp_path)
    out = tmp_path / "out"
    assert _run(["predict", str(series), "-m", str(model_dir), "-o", str(out), "--device",
                 "cpu", "--output-format", "all", "--seg-type", "labelmap",
                 "--save-probabilities", "--num-workers", "0"]) == 0
    nifti = sorted(out.glob("*_seg.nii.gz"))
    assert len(nifti) == 1
    case = nifti[0].name[: -len("_seg.nii.gz")]
    labels = load(nifti[0])
    lab = np.asarray(labels.array[0])
    assert lab.any()  # the seeded net labels some voxels
    seg = pydicom.dcmread(out / f"{case}_seg.dcm")
    assert seg.SegmentationType == "LABELMAP"
    names = {s.SegmentLabel for s in seg.SegmentSequence if int(s.SegmentNumber) > 0}
    assert names == {{1: "liver", 2: "spleen"}[v] for v in np.unique(lab) if v}
    back = load(out / f"{case}_seg.dcm", reference=series)
    src = read_dicom(series)
    assert np.allclose(labels.affine, src.affine, atol=1e-4)
    assert np.array_equal(back.array[0], lab)
    frac = pydicom.dcmread(out / f"{case}_prob_seg.dcm")
    assert frac.SegmentationType == "FRACTIONAL"
    rt = load(out / f"{case}_rtstruct.dcm", reference=series)
    for v in np.unique(lab[lab > 0]):
        a, b = lab == v, rt.array[0] == v
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.95


def test_nifti_input_warns_or_uses_dicom_reference(tmp_path, model_dir, caplog):  # type: ignore[no-untyped-def]
    series = _dicom_case(tmp_path)
    src = read_dicom(series)
    nii = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(src.array[0]), src.affine), str(nii))
    out = tmp_path / "out1"
    assert _run(["predict", str(nii), "-m", str(model_dir), "-o", str(out), "--device", "cpu",
                 "--output-format", "dicom-seg"]) == 0
    assert (out / "scan_seg.nii.gz").is_file() and not list(out.glob("*.dcm"))
    warned = [r.getMessage() for r in caplog.records if "NIfTI" in r.getMessage()]
    assert len(warned) == 1 and "--dicom-reference" in warned[0]

    out2 = tmp_path / "out2"
    assert _run(["predict", str(nii), "-m", str(model_dir), "-o", str(out2), "--device", "cpu",
                 "--output-format", "dicom-seg", "--dicom-reference", str(series)]) == 0
    seg = pydicom.dcmread(out2 / "scan_seg.dcm")
    assert seg.StudyInstanceUID == src.meta["study_instance_uid"]
    lab = np.asarray(load(out2 / "scan_seg.nii.gz").array[0])
    assert np.array_equal(load(out2 / "scan_seg.dcm", reference=series).array[0], lab)

    # a reference series on another grid: exit 2, nothing written
    other = tmp_path / "other"
    write_dicom_series(random_volume(GEOMETRIES["lps_aniso"], (14, 12, 6)), other)
    out3 = tmp_path / "out3"
    assert _run(["predict", str(nii), "-m", str(model_dir), "-o", str(out3), "--device", "cpu",
                 "--output-format", "dicom-seg", "--dicom-reference", str(other)]) == 2
    assert not list(out3.glob("scan*"))


def test_bad_dicom_options_exit_2(tmp_path, model_dir, capsys):  # type: ignore[no-untyped-def]
    series = _dicom_case(tmp_path)
    for args, word in ((["--output-format", "dicom-segg"], "--output-format"),
                       (["--seg-type", "fractional"], "--seg-type"),
                       (["--seg-compression", "zip"], "--seg-compression"),
                       (["--output-format", "dicom-seg", "--seg-compression", "rle"], "BINARY")):
        out = tmp_path / "o"
        assert _run(["predict", str(series), "-m", str(model_dir), "-o", str(out), "--device",
                     "cpu", *args]) == 2
        err = capsys.readouterr().err
        assert word in err and "Traceback" not in err
        assert not list(out.glob("*_seg*")) if out.exists() else True
