"""``medinfer predict`` outputs that viewers read: NIfTI codes, label intent, colour tables.

Issue 17 items 7 and 8: the source's qform/sform codes are carried, qform and sform never
disagree (SimpleITK reads the label map on nibabel's grid), label maps have intent
NIFTI_INTENT_LABEL, and a Slicer ``.ctbl`` plus an ITK-SNAP label description lie beside
each label map with the card's names and colours, listed in the outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from inference_helpers import oblique_lps_affine

from medinfer.cli import main


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)


def _sitk_affine_ras(path: Path) -> np.ndarray:
    """Voxel -> RAS affine of the grid SimpleITK (ITK's NIfTI reader) reads."""
    img = sitk.ReadImage(str(path))
    direction = np.array(img.GetDirection()).reshape(3, 3)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    aff = np.eye(4)
    aff[:3, :3] = lps_to_ras @ direction @ np.diag(img.GetSpacing())
    aff[:3, 3] = lps_to_ras @ np.array(img.GetOrigin())
    return aff


@pytest.mark.parametrize("codes", [(2, 2), (0, 2), (0, 4)])
def test_predict_carries_codes_intent_and_writes_label_tables(
    tmp_path: Path, model_dir: Path, codes: tuple[int, int]
) -> None:
    rng = np.random.default_rng(1)
    arr = (rng.normal(size=(14, 12, 6)) * 50 + 300).astype(np.int16)
    aff = oblique_lps_affine()
    img = nib.Nifti1Image(arr, None)
    img.header.set_sform(aff, code=codes[1])
    img.header.set_qform(aff, code=codes[0])
    src = tmp_path / "head.nii.gz"
    nib.save(img, str(src))
    out = tmp_path / "out"
    assert _run(["predict", str(src), "--model", str(model_dir), "-o", str(out),
                 "--device", "cpu", "--no-tta"]) == 0

    seg_path = out / "head_seg.nii.gz"
    seg = nib.load(str(seg_path))
    hdr = seg.header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == codes
    assert int(hdr["intent_code"]) == 1002  # NIFTI_INTENT_LABEL
    np.testing.assert_allclose(seg.affine, aff, atol=1e-5)
    np.testing.assert_allclose(_sitk_affine_ras(seg_path), aff, atol=1e-4)

    ctbl = (out / "head_seg.ctbl").read_text().splitlines()
    rows = [line.split() for line in ctbl if not line.startswith("#")]
    assert rows == [["0", "background", "0", "0", "0", "0"],
                    ["1", "csf", "0", "0", "255", "255"],
                    ["2", "tissue", "0", "255", "0", "255"]]
    itk = (out / "head_seg.label.txt").read_text().splitlines()
    assert itk[1] == "# ITK-SnAP Label Description File"
    rows = [line.split(maxsplit=7) for line in itk if not line.startswith("#")]
    assert rows == [["0", "0", "0", "0", "0", "0", "0", '"background"'],
                    ["1", "0", "0", "255", "1", "1", "1", '"csf"'],
                    ["2", "0", "255", "0", "1", "1", "1", '"tissue"']]
    stats = json.loads((out / "head_stats.json").read_text())
    assert stats["outputs"]["colour_table"] == "head_seg.ctbl"
    assert stats["outputs"]["label_description"] == "head_seg.label.txt"
