"""Oracles for the triage calibration and FROC code (issue 17 item 16).

* isotonic fit (``pav``, now :func:`scipy.optimize.isotonic_regression`) against the
  min-max formula of weighted isotonic regression (Barlow et al. 1972):
  ``f_i = max_{j <= i} min_{k >= i} mean_w(y_j..y_k)``;
* FROC operating points and CPM against MONAI's ``compute_froc_curve_data`` /
  ``compute_froc_score`` (CAMELYON16 evaluation code).
"""

from __future__ import annotations

import numpy as np
import pytest
from monai.metrics import compute_froc_curve_data, compute_froc_score

from medinfer.errors import ConfigError
from medinfer.postprocess.calibration import pav
from medinfer.postprocess.froc import CPM_FP_RATES, Candidate, Reference, froc


def _minmax_isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    n = len(y)
    out = np.empty(n)
    for i in range(n):
        out[i] = max(
            min(float(np.sum(w[j:k + 1] * y[j:k + 1]) / np.sum(w[j:k + 1]))
                for k in range(i, n))
            for j in range(i + 1)
        )
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pav_equals_minmax_formula(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 25, size=40).astype(float)  # ties in x: pooled first
    y = (rng.random(40) < x / 25).astype(float)
    w = rng.uniform(0.2, 3.0, size=40)
    xs, fitted = pav(x, y, w)
    ux, inv = np.unique(x, return_inverse=True)
    wsum = np.bincount(inv, weights=w)
    ymean = np.bincount(inv, weights=w * y) / wsum
    np.testing.assert_array_equal(xs, ux)
    np.testing.assert_allclose(fitted, _minmax_isotonic(ymean, wsum), rtol=0, atol=1e-12)
    assert np.all(np.diff(fitted) >= 0)
    with pytest.raises(ConfigError, match="finite"):
        pav([0.1, np.nan], [0, 1])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_froc_equals_monai(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scans = [f"s{i}" for i in range(7)]
    refs = [Reference(scans[int(rng.integers(0, 7))], tuple(rng.uniform(-80, 80, 3)),
                      float(rng.uniform(4, 20))) for _ in range(12)]
    cands = []
    for n, r in enumerate(refs):
        if n == 0:
            continue  # one reference is always missed (MONAI's curve drops the lowest score)
        for _ in range(int(rng.integers(0, 3))):  # 0..2 hits, within the radius
            off = rng.normal(size=3)
            off *= rng.uniform(0, 0.45) * r.diameter_mm / np.linalg.norm(off)
            cands.append(Candidate(r.scan_id, tuple(np.add(r.center, off)),
                                   float(rng.uniform(0.01, 1))))
    for _ in range(30):  # false positives far from every reference
        cands.append(Candidate(scans[int(rng.integers(0, 7))], (500.0, 500.0, float(_)),
                               float(rng.uniform(0.01, 1))))
    ours = froc(cands, refs, scans)

    hits = np.zeros(len(cands), dtype=bool)
    tp_probs = np.zeros(len(refs))
    for ci, c in enumerate(cands):
        for ri, r in enumerate(refs):
            if c.scan_id == r.scan_id and \
                    np.linalg.norm(np.subtract(c.center, r.center)) <= r.diameter_mm / 2:
                hits[ci] = True
                tp_probs[ri] = max(tp_probs[ri], c.score)
    fp_probs = np.array([c.score for c, h in zip(cands, hits, strict=True) if not h])
    fps, sens = compute_froc_curve_data(fp_probs, tp_probs, len(refs), len(scans))
    # MONAI: thresholds ascending, then (0, 0); ours: (0, 0), then thresholds descending
    np.testing.assert_allclose(ours.fps_per_scan, fps[::-1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.sensitivity, sens[::-1], rtol=0, atol=1e-12)
    oracle = compute_froc_score(fps, sens, eval_thresholds=CPM_FP_RATES)
    assert ours.cpm == pytest.approx(float(oracle), abs=1e-12)
    assert ours.num_detected == int(np.sum(tp_probs > 0))
