"""Issue 16, acceptance 6: the bundled ``demo-nodules`` on the fixed held-out set.

``tests/data/nodules_heldout/``: 16 scans, 96 synthetic lesions of the documented model
(4-25 mm, 70-140 HU, plus one 4-5 mm lesion per scan), random oblique grids (rotated,
permuted / flipped axes, 0.7-2 mm per axis), seed 20261130 (written by
``medinfer.training.nodules_eval.write_heldout_set``). The model runs with its card's
defaults at the default threshold (0.5), as ``medinfer predict`` runs it; findings are
matched by the LUNA16 hit rule; findings on the host CT's lesion-like structures are not
false positives (``medinfer.training.nodules_eval``). The calibration is the shipped
``calibration.json`` (fitted with ``medinfer calibrate`` on a separate calibration set).
The full table (with more scans) is ``benchmarks/demo_models.py``. Every target of the
issue is asserted. The set was 8 scans (scans 0-7 of the seed) until demo-nodules 1.2.0;
with 9 lesions of 4-5 mm it could not measure a sensitivity of 0.7 (one lesion is 0.11),
so it was extended with scans 8-15 of the same seed (unseen before) to 17 such lesions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from medinfer.models import load_model, resolve_model
from medinfer.postprocess.calibration import Calibration
from medinfer.training.nodules_eval import evaluate_detector, read_heldout_set, summarize
from medinfer.training.nodules_synth import LesionAtlas

DATA = Path(__file__).resolve().parents[1] / "data"
HELDOUT = DATA / "nodules_heldout"
ATLAS = DATA / "ct" / "ct_head_brain_atlas_1mm.nii.gz"


@pytest.fixture(scope="module")
def table() -> dict[str, Any]:
    card, folder = resolve_model("demo-nodules")
    net = load_model(card, folder, "cpu")
    atlas = LesionAtlas.from_file(ATLAS)
    cases = read_heldout_set(HELDOUT)
    assert len(cases) == 16 and sum(len(c[2]) for c in cases) == 96
    results = evaluate_detector(cases, card, net, atlas)
    return summarize(results, Calibration.load(folder / "calibration.json"))


def test_sensitivity_and_false_positives(table: dict[str, Any]) -> None:
    assert table["lesions_ge5"] == 79 and table["lesions_4_5"] == 17
    assert table["sensitivity_ge5"] >= 0.95, table
    assert table["sensitivity_4_5"] >= 0.7, table
    assert table["fp_per_scan"] <= 0.5, table


def test_centres_and_diameters(table: dict[str, Any]) -> None:
    assert table["centre_error_max_mm"] <= 1.0, table
    assert table["diameter_error_max_pct"] <= 15.0, table


def test_confidence_ranks_and_is_calibrated(table: dict[str, Any]) -> None:
    assert table["non_lesion_findings"] >= 1, table  # the AUC is defined
    assert table["auc_confidence"] >= 0.9, table
    assert table["ece_after"] <= 0.05, table
    assert table["ece_after"] < table["ece_before"], table
    # the card's post_processing.calibration applies the shipped file by default: the
    # malignancy scores of a plain run are the calibrated ones
    assert table["ece_reported"] == pytest.approx(table["ece_after"], abs=1e-4), table
