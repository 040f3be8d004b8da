"""``medinfer data metadata`` speaks its own syntax in errors (issue 17 item 11)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medinfer.cli import main


def test_unmatched_mode_suggests_the_m_option(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "raw" / "s01" / "t1.nii.gz"
    img.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.diag([1.0, 1.2, 2.0, 1.0])),
             str(img))
    with pytest.raises(SystemExit) as info:
        main(["data", "metadata", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "-m '*=ct'" in err and "-m 's01/*=mri'" in err and "{'*'" not in err
    with pytest.raises(SystemExit) as info:
        main(["data", "metadata", str(tmp_path), "-m", "s01/*=mri"])
    assert info.value.code in (0, None)
    assert "mri: 1" in capsys.readouterr().out
