"""Acceptance 1: the bundled demo-nodules model + pipeline on held-out synthetic scans.

Held-out scans differ from training: whole scans (training used 48 mm patches), their own
random seeds, lesion positions anywhere in the central brain, random oblique grids with
anisotropic spacing 1.5-2 mm stored in permuted / flipped axis order. Lesions follow the
fixed lesion model (4-25 mm, 70-140 HU, noise 3-10 HU).

Requirements: sensitivity >= 0.9 at <= 1 false positive per scan; matched centres within
1.5 mm; equivalent diameters within 15 % for lesions >= 5 mm. A prediction matches a lesion
when its centre lies within the lesion's equivalent radius (the LUNA16 hit rule).

The host CT has a few real bright structures (calcifications, 70-130 HU, up to ~10 mm) that
are indistinguishable from the synthetic lesions; predictions on them are *irrelevant
findings* (neither true nor false positives, as LUNA16 treats annotated non-nodules), see
``LesionAtlas.lesion_like_mask``. They are counted separately and reported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medinfer.detection import run_detection_on_volume
from medinfer.models import load_model, resolve_model
from medinfer.training.nodules_synth import LesionAtlas, make_heldout_scan

CT = Path(__file__).resolve().parents[1] / "data" / "ct" / "ct_head_brain_atlas_1mm.nii.gz"
SEEDS = (1001, 1002, 1003, 1004)
LESIONS_PER_SCAN = 5


@pytest.fixture(scope="module")
def results() -> dict[str, list[float] | int]:
    atlas = LesionAtlas.from_file(CT)
    card, folder = resolve_model("demo-nodules")
    assert card.task.value == "detection"
    net = load_model(card, folder, "cpu")
    hits = misses = fps = ignored = 0
    lesion_like = atlas.lesion_like_mask()
    coord_err: list[float] = []
    diam_err: list[float] = []
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        scan = make_heldout_scan(atlas, rng, n_lesions=LESIONS_PER_SCAN,
                                 spacing_range=(1.5, 2.0))
        pred = run_detection_on_volume(scan.image, card, net, None)
        assert pred.heatmap is not None and pred.heatmap.same_grid(scan.image)
        centres = np.array([d["coordinates"] for d in pred.detections]).reshape(-1, 3)
        used: set[int] = set()
        for les in scan.lesions:
            dist = np.linalg.norm(centres - les.center, axis=1) if len(centres) else np.array([])
            cand = [n for n in np.argsort(dist) if dist[n] <= les.diameter_mm / 2
                    and n not in used]
            if not cand:
                misses += 1
                continue
            n = int(cand[0])
            used.add(n)
            hits += 1
            coord_err.append(float(dist[n]))
            if les.diameter_mm >= 5.0:
                diam_err.append(pred.detections[n]["diameter_mm"] / les.diameter_mm - 1.0)
        rest = [n for n in range(len(pred.detections)) if n not in used]
        if rest:
            irrelevant = atlas.is_lesion_like(centres[rest], lesion_like)
            ignored += int(irrelevant.sum())
            fps += int((~irrelevant).sum())
    return {"hits": hits, "misses": misses, "fps": fps, "ignored_on_host_calcifications": ignored,
            "coord_err": coord_err, "diam_err": diam_err}


def test_sensitivity_and_false_positives(results: dict) -> None:
    sens = results["hits"] / (results["hits"] + results["misses"])
    fp_per_scan = results["fps"] / len(SEEDS)
    assert sens >= 0.9, results
    assert fp_per_scan <= 1.0, results


def test_coordinates_within_1_5_mm(results: dict) -> None:
    assert results["coord_err"], results
    assert max(results["coord_err"]) <= 1.5, results


def test_diameters_within_15_percent(results: dict) -> None:
    assert results["diam_err"], results
    assert max(abs(e) for e in results["diam_err"]) <= 0.15, results
