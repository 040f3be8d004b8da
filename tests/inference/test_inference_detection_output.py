"""``medinfer predict`` with a detection model reports what it did (issue 17 item 11):
per case the number of findings and the files written, then the totals; ``-v`` adds the
time per case. It used to print nothing on success."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medinfer.cli import main

CT = Path(__file__).resolve().parents[1] / "data" / "slices" / "ct_head_3mm.nii.gz"


def test_detection_run_prints_findings_and_outputs(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    img = nib.load(str(CT))
    crop = np.asanyarray(img.dataobj)[8:32, 10:34, 8:32]
    nib.save(nib.Nifti1Image(crop, img.affine), str(tmp_path / "head.nii.gz"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["predict", str(tmp_path / "head.nii.gz"), "--model", "demo-nodules", "-o",
              str(out), "--device", "cpu", "-v"])
    assert info.value.code in (0, None)
    text = " ".join(capsys.readouterr().out.split())
    written = sorted(p.name for p in out.iterdir() if p.name.startswith("head_"))
    assert "head_detections.json" in written
    assert "head: " in text and " finding(s) in " in text  # -v: time per case
    for name in written:
        assert name in text
    assert "1 scan(s)," in text and str(out.resolve()) in text


def test_mr_through_the_ct_detection_model_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 17 item 6: an MR ran through demo-nodules (a CT model) without a word."""
    import logging

    sample = Path(__file__).resolve().parents[2] / "samples" / "t1_sample.nii.gz"
    img = nib.load(str(sample))
    crop = np.asanyarray(img.dataobj)[50:74, 60:84, 40:64]
    nib.save(nib.Nifti1Image(crop, img.affine), str(tmp_path / "mr.nii.gz"))
    with caplog.at_level(logging.WARNING, logger="medinfer.inference.contract"), \
            pytest.raises(SystemExit) as info:
        main(["predict", str(tmp_path / "mr.nii.gz"), "--model", "demo-nodules", "-o",
              str(tmp_path / "out"), "--device", "cpu"])
    assert info.value.code in (0, None)
    assert "does not fit model 'demo-nodules'" in caplog.text
    assert "do not look like a CT in Hounsfield units" in caplog.text
