"""Held-out evaluation of a synthetic-lesion detector (``demo-nodules``): data sets and metrics.

**Data sets.** :func:`heldout_scans` draws whole scans from the documented lesion model of
:mod:`medinfer.training.nodules_synth` (equivalent diameter 4-25 mm, 70-140 HU, noise
3-10 HU) on random oblique grids (any rotation, axes permuted and flipped, spacing drawn per
axis from 0.7-2 mm), cropped to a cube of ``extent_mm`` around the brain centre (lesion
centres within ``region_mm`` of it, so every lesion lies in the field of view). Each scan
holds ``lesions_per_scan`` lesions of the model plus ``small_per_scan`` lesions of 4-5 mm
(over-sampled so that the 4-5 mm sensitivity is measured on more than a handful). The
fixed-seed set in ``tests/data/nodules_heldout/`` is written by :func:`write_heldout_set`
(``<case>.nii.gz`` int16 HU and ``lesions.csv``: ``scan_id, x, y, z`` RAS+ mm,
``diameter_mm``, ``density_hu`` — also a reference file for ``medinfer
evaluate-detections``). A calibration set is the same construction with another seed
(:data:`CALIBRATION_SEED`), made when needed.

**Matching** (LUNA16 hit rule, as :mod:`medinfer.postprocess.froc`): a finding hits a
lesion when its centre lies within the lesion's equivalent radius; each lesion takes the
nearest unused hitting finding. Unmatched findings inside the host's *lesion-like
structures* are **irrelevant** (neither true nor false): the atlas' bright non-lesion
structures, i.e. 26-connected components of >= 70 HU voxels with an equivalent diameter
>= 4 mm (calcifications, dense vessels), grown by 2 mm
(:meth:`~medinfer.training.nodules_synth.LesionAtlas.lesion_like_mask`) — they have the
intensity and size of the synthetic lesions and a detector legitimately fires on them.
All other unmatched findings are **false positives**.

**Metrics** (:func:`summarize`): sensitivity for lesions >= 5 mm and 4-5 mm, false
positives per scan (irrelevant findings not counted), centre error (mm) of hits, diameter
error (%) of hits >= 5 mm, area under the ROC curve of the confidence (Mann-Whitney, ties
1/2) of true findings against all findings that are not lesions (false *and* irrelevant:
a confidence must rank a lesion above a calcification too; ``auc_confidence_fp_only``
against false positives alone), expected calibration error (10 equal-width bins of the
score; label = finding on a lesion; Naeini et al., AAAI 2015) before and after a
calibration, CPM of the FROC curve (:func:`medinfer.postprocess.froc.froc`; irrelevant
findings left out).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medinfer._atomic import write_text_atomic
from medinfer.training.nodules_synth import (
    DIAMETER_RANGE_MM,
    LesionAtlas,
    SyntheticLesion,
    SyntheticScan,
    random_grid,
    random_rotation,
    render_scan,
)

#: seed of the checked-in held-out set and of the calibration set
HELDOUT_SEED = 20261130
CALIBRATION_SEED = 7_20261130
#: held-out construction (see module doc)
EXTENT_MM = 100.0
REGION_MM = 36.0
SPACING_RANGE_MM = (0.7, 2.0)
SMALL_RANGE_MM = (4.0, 5.0)


def heldout_scans(atlas: LesionAtlas, seed: int, n_scans: int, *, lesions_per_scan: int = 5,
                  small_per_scan: int = 1, extent_mm: float = EXTENT_MM,
                  region_mm: float = REGION_MM,
                  spacing_range: Sequence[float] = SPACING_RANGE_MM,
                  ) -> Iterator[tuple[str, SyntheticScan]]:
    """Yield ``(case id, scan)`` for ``n_scans`` synthetic scans (see module doc).

    Scan ``n`` depends on ``(seed, n)`` only. Case ids are ``nod_<seed>_<nn>``.
    """
    centre = atlas.brain_center()
    for n in range(n_scans):
        rng = np.random.default_rng([seed, n])
        lesions = atlas.sample_lesions(rng, small_per_scan, diameter_range=SMALL_RANGE_MM,
                                       region=(centre, region_mm))
        more = atlas.sample_lesions(rng, lesions_per_scan + len(lesions),
                                    diameter_range=DIAMETER_RANGE_MM, region=(centre, region_mm))
        for les in more:  # keep the gap rule between the two draws
            if len(lesions) >= lesions_per_scan + small_per_scan:
                break
            if all(np.linalg.norm(les.center - o.center) >= les.bounding_radius_mm
                   + o.bounding_radius_mm + 4.0 for o in lesions):
                lesions.append(les)
        affine, shape = random_grid(rng, centre, extent_mm, spacing_range,
                                    rotation=random_rotation(rng))
        yield f"nod_{seed}_{n:02d}", render_scan(atlas, lesions, affine, shape, rng)


REFERENCE_COLUMNS = ("scan_id", "x", "y", "z", "diameter_mm", "density_hu")


def write_heldout_set(atlas: LesionAtlas, out: str | Path, *, seed: int = HELDOUT_SEED,
                      n_scans: int = 8, **kwargs: Any) -> Path:
    """Write the scans (``<case>.nii.gz``, int16 HU) and ``lesions.csv`` into ``out``.

    Returns the path of ``lesions.csv``.
    """
    from medinfer.io import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(REFERENCE_COLUMNS)
    for case, scan in heldout_scans(atlas, seed, n_scans, **kwargs):
        save(scan.image, out / f"{case}.nii.gz")
        for les in scan.lesions:
            w.writerow([case, *(f"{v:.4f}" for v in les.center), f"{les.diameter_mm:.4f}",
                        f"{les.density_hu:.2f}"])
    write_text_atomic(out / "heldout.json", json.dumps(
        {"seed": seed, "n_scans": n_scans, **{k: v for k, v in kwargs.items()}}, indent=1)
        + "\n")
    return write_text_atomic(out / "lesions.csv", buf.getvalue())


@dataclass(frozen=True)
class RefLesion:
    """Ground truth of one lesion: RAS+ mm centre, equivalent diameter mm, density HU."""

    center: np.ndarray
    diameter_mm: float
    density_hu: float


def read_heldout_set(folder: str | Path) -> list[tuple[str, Path, list[RefLesion]]]:
    """``(case, scan path, lesions)`` of a folder written by :func:`write_heldout_set`."""
    folder = Path(folder)
    refs: dict[str, list[RefLesion]] = {}
    with open(folder / "lesions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            refs.setdefault(row["scan_id"], []).append(RefLesion(
                np.array([float(row["x"]), float(row["y"]), float(row["z"])]),
                float(row["diameter_mm"]), float(row["density_hu"])))
    cases = sorted(p.name[: -len(".nii.gz")] for p in folder.glob("*.nii.gz"))
    return [(c, folder / f"{c}.nii.gz", refs.get(c, [])) for c in cases]


def as_refs(lesions: Sequence[SyntheticLesion]) -> list[RefLesion]:
    """Ground truth of generated lesions."""
    return [RefLesion(np.asarray(les.center), les.diameter_mm, les.density_hu)
            for les in lesions]


@dataclass
class ScanResult:
    """Matching of one scan's findings to its lesions.

    Attributes
    ----------
    lesions : the ground truth; hit_by[n] = index of the finding matched to lesion n or -1.
    findings : the detection dicts (``Finding.to_dict``); status[m] = ``true``, ``false``
        or ``irrelevant``.
    """

    case: str
    lesions: list[RefLesion]
    findings: list[dict[str, Any]]
    hit_by: list[int] = field(default_factory=list)
    status: list[str] = field(default_factory=list)


def match_scan(case: str, lesions: Sequence[RefLesion], findings: Sequence[dict[str, Any]],
               lesion_like: Callable[[np.ndarray], np.ndarray]) -> ScanResult:
    """Match findings to lesions (see module doc); ``lesion_like(points (N, 3))`` -> bool."""
    centres = np.array([d["coordinates"] for d in findings], dtype=np.float64).reshape(-1, 3)
    used: set[int] = set()
    hit_by: list[int] = []
    for les in lesions:
        dist = np.linalg.norm(centres - les.center, axis=1) if len(centres) else np.zeros(0)
        cand = [int(m) for m in np.argsort(dist, kind="stable")
                if dist[m] <= les.diameter_mm / 2.0 and int(m) not in used]
        hit_by.append(cand[0] if cand else -1)
        if cand:
            used.add(cand[0])
    status = ["true" if m in used else "false" for m in range(len(findings))]
    rest = [m for m in range(len(findings)) if m not in used]
    if rest:
        irr = lesion_like(centres[rest])
        for m, flag in zip(rest, irr, strict=True):
            if flag:
                status[m] = "irrelevant"
    return ScanResult(case, list(lesions), list(findings), hit_by, status)


def roc_auc(scores_pos: Sequence[float], scores_neg: Sequence[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U / (n+ n-), ties count 1/2); None if a
    class is empty."""
    p = np.asarray(scores_pos, dtype=np.float64)
    n = np.asarray(scores_neg, dtype=np.float64)
    if len(p) == 0 or len(n) == 0:
        return None
    gt = (p[:, None] > n[None, :]).sum()
    eq = (p[:, None] == n[None, :]).sum()
    return float((gt + 0.5 * eq) / (len(p) * len(n)))


def expected_calibration_error(scores: Sequence[float], labels: Sequence[int],
                               bins: int = 10) -> float | None:
    """ECE: ``sum_b n_b / N |mean(label) - mean(score)|`` over ``bins`` equal-width score
    bins on [0, 1] (the last bin includes 1); None without samples."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(labels, dtype=np.float64)
    if len(s) == 0:
        return None
    idx = np.minimum((s * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.sum() / len(s) * abs(y[m].mean() - s[m].mean())
    return float(ece)


def labelled_findings(results: Sequence[ScanResult]) -> list[dict[str, Any]]:
    """Rows ``scan_id, status, confidence, malignancy_score, diameter_mm, ..., label`` of all
    findings: label 1 for a finding on a lesion, 0 otherwise (false positives *and* findings
    on the host's lesion-like structures: neither is a lesion) — the input of ``medinfer
    calibrate``, so that the calibrated score is the probability of a lesion."""
    rows = []
    for r in results:
        for d, st in zip(r.findings, r.status, strict=True):
            rows.append({"scan_id": r.case, "status": st, "confidence": d["confidence"],
                         "malignancy_score": d["triage"]["malignancy_score"],
                         "diameter_mm": d["diameter_mm"],
                         "volume_mm3": d["properties"]["volume_mm3"],
                         "mean_intensity": d["properties"]["mean_intensity"],
                         "sphericity": d["properties"]["sphericity"],
                         "label": int(st == "true")})
    return rows


def write_labelled_csv(results: Sequence[ScanResult], path: str | Path) -> Path:
    """Write :func:`labelled_findings` as CSV (for ``medinfer calibrate``)."""
    rows = labelled_findings(results)
    buf = io.StringIO()
    cols = ["scan_id", "status", "confidence", "malignancy_score", "diameter_mm", "volume_mm3",
            "mean_intensity", "sphericity", "label"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return write_text_atomic(Path(path), buf.getvalue())


def _xyz(p: Any) -> tuple[float, float, float]:
    """A RAS+ mm point (any 3-sequence) as a float triple (FROC references / candidates)."""
    return (float(p[0]), float(p[1]), float(p[2]))


def summarize(results: Sequence[ScanResult], calibration: Any = None) -> dict[str, Any]:
    """The target table of the held-out evaluation (see module doc).

    ``calibration`` (:class:`medinfer.postprocess.calibration.Calibration`) gives the ECE
    after calibration (``ece_after``: that file's map of its feature); ``ece_before`` is
    the ECE of the uncalibrated ``confidence``; ``ece_reported`` that of the
    ``malignancy_score`` the run wrote (calibrated when the run applied a calibration, e.g.
    the model card's own).
    """
    from medinfer.postprocess.froc import Candidate, Reference, froc

    big = [0, 0]
    small = [0, 0]
    centre_err: list[float] = []
    diam_err: list[float] = []
    fps = irrelevant = 0
    for r in results:
        for les, m in zip(r.lesions, r.hit_by, strict=True):
            bucket = big if les.diameter_mm >= 5.0 else small
            bucket[1] += 1
            if m >= 0:
                bucket[0] += 1
                d = r.findings[m]
                centre_err.append(float(np.linalg.norm(np.asarray(d["coordinates"])
                                                       - les.center)))
                if les.diameter_mm >= 5.0:
                    diam_err.append(100.0 * (d["diameter_mm"] / les.diameter_mm - 1.0))
        fps += r.status.count("false")
        irrelevant += r.status.count("irrelevant")
    rows = labelled_findings(results)
    pos = [x["confidence"] for x in rows if x["label"] == 1]
    neg = [x["confidence"] for x in rows if x["label"] == 0]
    neg_strict = [x["confidence"] for x in rows if x["status"] == "false"]
    labels = [x["label"] for x in rows]
    before = expected_calibration_error([x["confidence"] for x in rows], labels)
    reported = expected_calibration_error([x["malignancy_score"] for x in rows], labels)
    after = None
    if calibration is not None:
        after = expected_calibration_error(
            calibration.score([x[calibration.feature] for x in rows]).tolist(), labels)
    refs = [Reference(r.case, _xyz(les.center), les.diameter_mm)
            for r in results for les in r.lesions]
    cands = [Candidate(r.case, _xyz(d["coordinates"]), d["confidence"])
             for r in results for d, st in zip(r.findings, r.status, strict=True)
             if st != "irrelevant"]
    cpm = froc(cands, refs, scan_ids=[r.case for r in results]).cpm if refs else None
    n = len(results)
    return {
        "scans": n, "lesions": big[1] + small[1], "lesions_ge5": big[1], "lesions_4_5": small[1],
        "sensitivity_ge5": big[0] / big[1] if big[1] else None,
        "sensitivity_4_5": small[0] / small[1] if small[1] else None,
        "fp_per_scan": fps / n if n else None,
        "irrelevant_per_scan": irrelevant / n if n else None,
        "centre_error_max_mm": max(centre_err) if centre_err else None,
        "centre_error_mean_mm": float(np.mean(centre_err)) if centre_err else None,
        "diameter_error_max_pct": max(abs(e) for e in diam_err) if diam_err else None,
        "diameter_error_mean_pct": float(np.mean(diam_err)) if diam_err else None,
        "auc_confidence": roc_auc(pos, neg), "auc_confidence_fp_only": roc_auc(pos, neg_strict),
        "true_findings": len(pos), "non_lesion_findings": len(neg),
        "ece_before": before, "ece_after": after, "ece_reported": reported, "cpm": cpm,
    }


def evaluate_detector(cases: Sequence[tuple[str, Any, Sequence[RefLesion]]], card: Any,
                      model: Any, atlas: LesionAtlas, config: Any = None) -> list[ScanResult]:
    """Run :func:`medinfer.detection.run_detection_on_volume` on each ``(case, scan,
    lesions)`` (scan: a Volume or a path) and match the findings.

    ``config``: detection configuration (defaults = the model card's settings and the
    default threshold 0.5).
    """
    from medinfer.detection import run_detection_on_volume
    from medinfer.io import load
    from medinfer.volume import Volume

    mask = atlas.lesion_like_mask()
    out = []
    for case, scan, lesions in cases:
        vol = scan if isinstance(scan, Volume) else load(scan)
        pred = run_detection_on_volume(vol, card, model, config)
        out.append(match_scan(case, lesions, pred.detections,
                              lambda p: atlas.is_lesion_like(p, mask)))
    return out


def format_table(old: dict[str, Any], new: dict[str, Any] | None = None,
                 targets: dict[str, str] | None = None) -> str:
    """A markdown table of :func:`summarize` results (``old`` and optional ``new`` column)."""
    keys = ["sensitivity_ge5", "sensitivity_4_5", "fp_per_scan", "irrelevant_per_scan",
            "centre_error_max_mm", "centre_error_mean_mm", "diameter_error_max_pct",
            "diameter_error_mean_pct", "auc_confidence", "auc_confidence_fp_only",
            "ece_before", "ece_after", "ece_reported", "cpm",
            "true_findings", "non_lesion_findings", "lesions_ge5", "lesions_4_5", "scans"]
    targets = targets or {}

    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float) and not math.isnan(v):
            return f"{v:.3f}"
        return str(v)

    head = "| metric | target | " + ("old | new |" if new is not None else "value |")
    sep = "|---|---|---|" + ("---|" if new is not None else "")
    lines = [head, sep]
    for k in keys:
        cells = [k, targets.get(k, ""), fmt(old.get(k))]
        if new is not None:
            cells.append(fmt(new.get(k)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
