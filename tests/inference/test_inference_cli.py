"""``medinfer predict``: outputs, DICOM and NIfTI folders, bad input -> exit 2, no partial files."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml
from inference_helpers import card_dict as _card_dict
from inference_helpers import oblique_lps_affine

from medinfer.cli import main


def _scan(path: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    arr = (rng.normal(size=(14, 12, 6)) * 50 + 300).astype(np.int16)
    aff = oblique_lps_affine()
    nib.save(nib.Nifti1Image(arr, aff), str(path))
    return arr, aff


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_predict_writes_outputs_on_source_grid(tmp_path: Path, model_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    arr, aff = _scan(tmp_path / "head.nii.gz")
    out = tmp_path / "out"
    code = _run(["predict", str(tmp_path / "head.nii.gz"), "--model", str(model_dir), "-o",
                 str(out), "--device", "cpu", "--save-probabilities", "--overlay", "--no-tta",
                 "--overlap", "0.5", "--batch-size", "2", "--verbose"])
    assert code == 0
    assert {"head_overlay.png", "head_prob.nii.gz", "head_seg.nii.gz", "head_stats.json",
            "run.json", "cases.csv"} <= set(_files(out))
    seg = nib.load(str(out / "head_seg.nii.gz"))
    assert seg.shape == arr.shape
    np.testing.assert_allclose(seg.affine, aff, atol=1e-5)
    assert seg.get_data_dtype() == np.uint8
    prob = nib.load(str(out / "head_prob.nii.gz"))
    assert prob.shape == (*arr.shape, 3)
    stats = json.loads((out / "head_stats.json").read_text())
    assert stats["model"]["name"] == "tiny-seg"
    assert [lab["name"] for lab in stats["labels"]] == ["csf", "tissue"]
    labels = np.asarray(seg.dataobj)
    voxel_ml = float(np.prod(np.linalg.norm(aff[:3, :3], axis=0))) / 1000
    for lab in stats["labels"]:
        assert lab["voxels"] == int(np.sum(labels == lab["value"]))
        assert lab["volume_ml"] == pytest.approx(lab["voxels"] * voxel_ml)
    assert stats["input_geometry"]["shape"] == [14, 12, 6]
    assert {"load", "preprocess", "inference", "postprocess"} <= set(stats["timings_s"])
    captured = capsys.readouterr()
    assert "label volumes" in captured.out and "tissue" in captured.out
    assert str(out.resolve()) in captured.out.replace("\n", "")
    assert "timings:" in captured.err


def test_folder_of_nifti_and_dicom_folder(tmp_path: Path, model_dir: Path) -> None:
    from medinfer.io.dicom_writer import write_dicom_series
    from medinfer.volume import Volume

    folder = tmp_path / "niftis"
    folder.mkdir()
    _scan(folder / "a.nii.gz", 1)
    _scan(folder / "b.nii", 2)
    arr, aff = _scan(tmp_path / "c.nii.gz", 3)
    write_dicom_series(Volume(arr, aff), tmp_path / "dcm", series_description="T1 axial",
                       shuffle_seed=4)
    out = tmp_path / "out"
    code = _run(["predict", str(folder), str(tmp_path / "dcm"), "-m", str(model_dir / "model.yaml"),
                 "-o", str(out), "--device", "cpu", "--name-by", "description"])
    assert code == 0
    names = _files(out)
    assert {"a_seg.nii.gz", "b_seg.nii.gz", "T1_axial_seg.nii.gz", "T1_axial_stats.json"} <= set(
        names)
    # the DICOM case lands on the same grid as its NIfTI source
    seg = nib.load(str(out / "T1_axial_seg.nii.gz"))
    assert seg.shape == arr.shape
    np.testing.assert_allclose(seg.affine, aff, atol=1e-4)


def test_text_file_named_nii_gz_exits_2_without_output(
        tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "scan.nii.gz"
    bad.write_text("this is not an image\n")
    out = tmp_path / "out"
    assert _run(["predict", str(bad), "-m", str(model_dir), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "scan.nii.gz" in err and "Traceback" not in err
    assert _files(out) == []


def test_model_file_that_is_not_a_model_exits_2(tmp_path: Path, model_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _scan(tmp_path / "head.nii.gz")
    (model_dir / "model.pt").write_bytes(b"definitely not a checkpoint")
    out = tmp_path / "out"
    assert _run(["predict", str(tmp_path / "head.nii.gz"), "-m", str(model_dir), "-o",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "not a PyTorch state dict" in err and err.count("\n") == 1
    assert _files(out) == []


def test_model_yaml_with_wrong_field_exits_2(tmp_path: Path, model_dir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _scan(tmp_path / "head.nii.gz")
    card = _card_dict()
    card["labels"][2]["color"] = [0, 256, 0]
    (model_dir / "model.yaml").write_text(yaml.safe_dump(card))
    out = tmp_path / "out"
    assert _run(["predict", str(tmp_path / "head.nii.gz"), "-m", str(model_dir), "-o",
                 str(out)]) == 2
    assert "labels.2.color" in capsys.readouterr().err
    assert _files(out) == []


def test_bad_options_and_missing_input_exit_2(tmp_path: Path, model_dir: Path) -> None:
    _scan(tmp_path / "head.nii.gz")
    out = tmp_path / "out"
    base = ["predict", str(tmp_path / "head.nii.gz"), "-m", str(model_dir), "-o", str(out)]
    assert _run([*base, "--overlap", "1.5"]) == 2
    assert _run([*base, "--device", "tpu"]) == 2
    assert _run(["predict", str(tmp_path / "missing.nii.gz"), "-m", str(model_dir), "-o",
                 str(out)]) == 2
    assert _run(["predict", str(tmp_path / "head.nii.gz"), "-m", "no-such-model", "-o",
                 str(out)]) == 2
    assert _files(out) == []


def test_failure_while_writing_leaves_no_partial_case(tmp_path: Path, model_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import medinfer.inference.cli as icli

    _scan(tmp_path / "head.nii.gz")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(icli, "_overlay_function", lambda: broken)
    out = tmp_path / "out"
    from medinfer.batch import CaseFailedError

    with pytest.raises(CaseFailedError, match="RuntimeError: disk full"):
        icli.run_predict([tmp_path / "head.nii.gz"], model=str(model_dir), output_dir=out,
                         device="cpu", overlay=True)
    assert _files(out) == []


def test_detection_is_delegated(tmp_path: Path, model_dir: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    fake = types.ModuleType("medinfer.detection")
    fake.predict_detection = (  # type: ignore[attr-defined]
        lambda *a, **kw: calls.append(a) or {"num_scans": 1, "total_detections": 0})
    monkeypatch.setitem(sys.modules, "medinfer.detection", fake)
    scan = tmp_path / "chest.nii.gz"
    _scan(scan)
    cfg = tmp_path / "det.yaml"
    cfg.write_text("min_diameter_mm: 3\n")
    out = tmp_path / "out"
    assert _run(["predict", str(scan), "--config", str(cfg), "-o", str(out), "--device", "cpu",
                 "--no-tta"]) == 0
    inputs, model, config, output_dir, device, overrides = calls[-1]
    assert inputs == [scan] and model is None and config == cfg and output_dir == out
    assert device == "cpu" and overrides["tta"] is False
    # a card with task: detection is delegated too, with the model named
    card = _card_dict(task="detection", output={"activation": "sigmoid"},
                      labels={0: {"name": "bg"}, 1: {"name": "nodule"}})
    (model_dir / "model.yaml").write_text(yaml.safe_dump(card))
    assert _run(["predict", str(scan), "-m", str(model_dir), "-o", str(out)]) == 0
    assert calls[-1][1] == str(model_dir) and calls[-1][2] is None
    assert _files(out) == []
