"""CLI entry checks (issue 17 items 2 and 12).

* Bad input is refused before torch or the model is imported: a subprocess runs the CLI
  on a text file named ``.nii.gz`` and on a header announcing 10^12 voxels, and reports
  which heavy modules ``sys.modules`` holds at exit (timing-free).
* Help text keeps its bracketed text (``[default: demo-brain]``, ``'medinfer[ui]'``),
  ``medinfer --version`` and ``python -m medinfer`` work.
"""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from medinfer import __version__
from medinfer.cli import main

RUNNER = """
import json, sys
from medinfer.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = [m for m in ("torch", "monai", "onnxruntime") if m in sys.modules]
sys.stdout.write(json.dumps({"exit": code, "heavy": heavy}) + "\\n")
"""


def _run_cli(args: list[str], cwd: Path) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _huge_nifti_header(path: Path) -> None:
    """A NIfTI-1 header announcing 10^4 x 10^4 x 10^4 float32 voxels, no data."""
    import nibabel as nib
    import numpy as np

    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape((10_000, 10_000, 10_000))
    with gzip.open(path, "wb") as f:
        f.write(hdr.binaryblock + struct.pack("<i", 0))


def test_bad_input_is_refused_before_torch_is_imported(tmp_path: Path) -> None:
    text = tmp_path / "scan.nii.gz"
    text.write_text("this is not an image\n")
    huge = tmp_path / "huge.nii.gz"
    _huge_nifti_header(huge)
    for path, words in ((text, "neither NIfTI nor DICOM"), (huge, "the limit is")):
        result, err = _run_cli(["predict", str(path), "-o", str(tmp_path / "out")], tmp_path)
        assert result == {"exit": 2, "heavy": []}, (result, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and str(path) in lines[0] and words in lines[0], err
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _help(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrap the help columns


def test_help_keeps_bracketed_text(capsys: pytest.CaptureFixture[str]) -> None:
    predict = _help(["predict", "--help"], capsys)
    assert "[default: demo-brain]" in predict and "[default: card]" in predict
    assert "pip install 'medinfer[ui]'" in _help(["ui", "--help"], capsys)


def test_version_flag_and_python_m(capsys: pytest.CaptureFixture[str],
                                   tmp_path: Path) -> None:
    assert _help(["--version"], capsys) == f"medinfer {__version__}"
    proc = subprocess.run([sys.executable, "-m", "medinfer", "--version"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == f"medinfer {__version__}"


@pytest.mark.parametrize("module", ["medinfer.slices", "medinfer.slices.reconstruct",
                                    "medinfer.data", "medinfer.compat.pivot.main"])
def test_advertised_python_m_modules_run(module: str, tmp_path: Path) -> None:
    """Every ``python -m medinfer...`` the docs advertise runs its command (no silent 0)."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Usage:" in proc.stdout, proc.stderr
