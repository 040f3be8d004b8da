"""Federated evaluation on Flower's simulation engine (issue 14, acceptance 4)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fed_helpers import make_model, scan

from medinfer.cli import main as cli_main
from medinfer.federated.flower import evaluate_cases, find_cases, split_cases


def _dataset(folder: Path, n: int) -> Path:
    (folder / "imagesTs").mkdir(parents=True)
    (folder / "labelsTs").mkdir()
    for i in range(n):
        vol = scan(10 + i, flip=(-1, 1, 1) if i % 2 else (1, 1, 1))
        nib.save(nib.Nifti1Image(vol.array[0], vol.affine),
                 folder / "imagesTs" / f"case{i:02d}_0000.nii.gz")
        # a label map that partly agrees with intensity bands of the scan
        lab = np.digitize(vol.array[0], [130 + 20 * i, 300]).astype(np.uint8)
        nib.save(nib.Nifti1Image(lab, vol.affine), folder / "labelsTs" / f"case{i:02d}.nii.gz")
    return folder


def test_three_sites_equal_central(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data", 7)
    model = make_model(tmp_path / "model")
    out = tmp_path / "eval"
    pythonpath = os.environ.get("PYTHONPATH")
    with pytest.raises(SystemExit) as info:  # one Flower simulation, shared by the checks
        cli_main(["federated", "evaluate", "--sites", "3", "--data", str(data), "-m",
                  str(model), "-o", str(out)])
    assert info.value.code in (0, None)
    # Flower's Ray backend rewrites PYTHONPATH; the caller's environment is restored
    assert os.environ.get("PYTHONPATH") == pythonpath
    report = json.loads((out / "evaluation.json").read_text())
    assert report["errors"] == []
    sites = split_cases(data, 3)
    assert [len(s) for s in sites] == [3, 2, 2]
    assert {s: m["num_cases"] for s, m in report["sites"].items()} == {
        "site-0": 3, "site-1": 2, "site-2": 2}
    central = evaluate_cases(find_cases(data), str(model))
    assert report["total_cases"] == 7
    for label, value in central["dice_mean"].items():
        assert math.isclose(report["dice"][label], value, rel_tol=1e-9, abs_tol=1e-12)
    assert len(set(central["per_case"]["case00"].values())) > 1  # non-trivial Dice values
    for label, n in central["hd95_cases"].items():
        if n:
            assert math.isclose(report["hd95_mm"][label], central["hd95_mean"][label],
                                rel_tol=1e-6)
    csv = (out / "sites.csv").read_text().splitlines()
    assert csv[0].startswith("site,num_cases,dice_1,hd95_1") and len(csv) == 4


def test_sites_option_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _dataset(tmp_path / "data", 2)
    with pytest.raises(SystemExit) as info:
        cli_main(["federated", "evaluate", "--sites", "3", "--data", str(data), "-o",
                  str(tmp_path / "o")])
    assert info.value.code == 2
    assert "--sites: 3 is not allowed; choose 1..2" in capsys.readouterr().err
