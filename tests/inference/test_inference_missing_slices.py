"""``medinfer predict`` on a DICOM series with an unreadable file: exit 2 naming the file,
no outputs; ``--allow-missing-slices`` runs without it (issue 17 item 9b)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from inference_helpers import oblique_lps_affine

from medinfer.cli import main
from medinfer.io._missing_slices import ALLOW_MISSING_SLICES_ENV
from medinfer.io.dicom_writer import write_dicom_series
from medinfer.volume import Volume


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)


def test_truncated_last_file_exit_2_then_allowed(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=(1, 14, 12, 6)) * 50 + 300).astype(np.int16)
    files = write_dicom_series(Volume(arr, oblique_lps_affine()), tmp_path / "dcm",
                               series_description="T1 axial", shuffle_seed=2)
    last = files[-1]
    last.write_bytes(last.read_bytes()[:-40])
    out = tmp_path / "out"
    args = ["predict", str(tmp_path / "dcm"), "--model", str(model_dir), "--device", "cpu",
            "--no-tta"]
    assert _run([*args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert last.name in err.replace("\n", "") and "Traceback" not in err
    assert not list(out.rglob("*_seg.nii.gz")) if out.exists() else True

    out2 = tmp_path / "out2"
    assert _run([*args, "-o", str(out2), "--allow-missing-slices"]) == 0
    segs = list(out2.rglob("*_seg.nii.gz"))
    assert len(segs) == 1
    assert nib.load(str(segs[0])).shape == (14, 12, 5)
    import os

    assert ALLOW_MISSING_SLICES_ENV not in os.environ  # the flag does not leak
