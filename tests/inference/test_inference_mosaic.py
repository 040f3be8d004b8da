"""``medinfer predict`` on nibabel's Siemens MOSAIC files: exit 2 with a message about the
mosaic, no label map (it exited 0 with a 256 x 256 x 2 "volume" before; issue 17 item 3)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel
import pytest

from medinfer.cli import main


def test_mosaic_that_cannot_be_split_exits_2(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
    folder = tmp_path / "mosaic"
    folder.mkdir()
    for name in ("0.dcm", "1.dcm"):
        shutil.copy(data / name, folder / name)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["predict", str(folder), "--model", str(model_dir), "-o", str(out),
              "--device", "cpu", "--no-tta"])
    assert info.value.code == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "MOSAIC" in err and "Traceback" not in err
    assert not (out.exists() and list(out.rglob("*_seg.nii.gz")))
