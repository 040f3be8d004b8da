"""FROC analysis and the CPM score of detection results (LUNA16 rules).

Matching (per scan, world RAS+ mm): a predicted finding **hits** a reference finding when
its centre lies within the reference sphere, i.e. its distance to the reference centre is
``<= diameter_mm / 2`` (the LUNA16 rule, Setio et al., Med. Image Anal. 2017). A
prediction that hits no reference finding is a **false positive**. A reference finding is
detected at score threshold ``t`` when at least one of its hits has ``score >= t``; further
hits of the same reference finding are neither true nor false positives (as in the
LUNA16 evaluation script ``noduleCADEvaluationLUNA16.py``).

FROC: for every distinct score ``t`` (descending) the operating point
``(FP(t) / number of scans, detected(t) / number of reference findings)``, starting at
``(0, 0)``. **CPM** (competition performance metric, van Ginneken et al. 2010): the mean
sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per scan, each read from the
FROC polyline by linear interpolation between operating points (``numpy.interp`` as in the
LUNA16 script; for a staircase this is the best sensitivity reachable with at most that
many FPs per scan) and clamped to the last point beyond it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medinfer.errors import ConfigError

#: the FP-per-scan rates of the CPM score
CPM_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Reference:
    """A reference finding: scan id, RAS+ mm centre, diameter mm."""

    scan_id: str
    center: tuple[float, float, float]
    diameter_mm: float


@dataclass(frozen=True)
class Candidate:
    """A predicted finding: scan id, RAS+ mm centre, score."""

    scan_id: str
    center: tuple[float, float, float]
    score: float


@dataclass
class FrocResult:
    """FROC curve and CPM.

    Attributes
    ----------
    fps_per_scan, sensitivity : operating points (ascending FP rate), float arrays.
    thresholds : score threshold of each point (``inf`` for the first point (0, 0)).
    cpm : mean sensitivity at :data:`CPM_FP_RATES`.
    sensitivity_at : FP rate -> sensitivity.
    num_scans, num_references, num_candidates, num_detected : counts; num_detected is the
        number of reference findings hit by any candidate (at the lowest threshold).
    """

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    cpm: float
    sensitivity_at: dict[float, float] = field(default_factory=dict)
    num_scans: int = 0
    num_references: int = 0
    num_candidates: int = 0
    num_detected: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {
            "cpm": self.cpm,
            "sensitivity_at_fps_per_scan": {str(k): v for k, v in self.sensitivity_at.items()},
            "num_scans": self.num_scans,
            "num_references": self.num_references,
            "num_candidates": self.num_candidates,
            "num_detected": self.num_detected,
            "froc": {
                "fps_per_scan": [float(v) for v in self.fps_per_scan],
                "sensitivity": [float(v) for v in self.sensitivity],
                "thresholds": [None if not np.isfinite(t) else float(t) for t in self.thresholds],
            },
        }


def froc(
    candidates: Sequence[Candidate],
    references: Sequence[Reference],
    scan_ids: Sequence[str] | None = None,
    fp_rates: Sequence[float] = CPM_FP_RATES,
) -> FrocResult:
    """FROC operating points and CPM (see the module docstring for the rules).

    Parameters
    ----------
    candidates, references : predictions and reference findings of all scans.
    scan_ids : all scans evaluated (scans without any finding count in the FP rate); by
        default the union of the ids in ``candidates`` and ``references``.
    fp_rates : FP-per-scan rates averaged into the CPM.

    Raises
    ------
    ConfigError
        No scans, or no reference findings.
    """
    scans = sorted(set(scan_ids) if scan_ids is not None else
                   {c.scan_id for c in candidates} | {r.scan_id for r in references})
    if not scans:
        raise ConfigError("evaluate-detections: no scans to evaluate")
    if not references:
        raise ConfigError("evaluate-detections: the reference has no findings (sensitivity "
                          "is undefined)")
    ref_index = {id(r): n for n, r in enumerate(references)}
    best = np.full(len(references), -np.inf)  # best hit score per reference
    fp_scores: list[float] = []
    by_scan: dict[str, list[Reference]] = {}
    for r in references:
        by_scan.setdefault(r.scan_id, []).append(r)
    for c in candidates:
        hit = False
        for r in by_scan.get(c.scan_id, []):
            d = float(np.linalg.norm(np.subtract(c.center, r.center)))
            if d <= r.diameter_mm / 2.0:
                hit = True
                n = ref_index[id(r)]
                best[n] = max(best[n], c.score)
        if not hit:
            fp_scores.append(c.score)
    fp = np.array(fp_scores, dtype=np.float64)
    thresholds = np.unique(np.concatenate([best[np.isfinite(best)], fp]))[::-1]
    nscan, nref = len(scans), len(references)
    fps = [0.0]
    sens = [0.0]
    ths = [np.inf]
    for t in thresholds:
        fps.append(float(np.sum(fp >= t)) / nscan)
        sens.append(float(np.sum(best >= t)) / nref)
        ths.append(float(t))
    fps_a, sens_a = np.array(fps), np.array(sens)
    at = {float(r): sensitivity_at(fps_a, sens_a, r) for r in fp_rates}
    return FrocResult(
        fps_per_scan=fps_a, sensitivity=sens_a, thresholds=np.array(ths),
        cpm=float(np.mean(list(at.values()))), sensitivity_at=at, num_scans=nscan,
        num_references=nref, num_candidates=len(candidates),
        num_detected=int(np.sum(np.isfinite(best))),
    )


def sensitivity_at(fps: np.ndarray, sens: np.ndarray, rate: float) -> float:
    """Sensitivity at ``rate`` FPs per scan on the FROC polyline (points ascending).

    Between the last point with ``fps <= rate`` (its highest sensitivity) and the next
    point the value is interpolated linearly; beyond the last point it is clamped.
    """
    below = np.flatnonzero(fps <= rate)
    m = int(below[-1])  # points are ordered; (0, 0) guarantees one
    if m == len(fps) - 1:
        return float(sens[m])
    x0, y0, x1, y1 = fps[m], sens[m], fps[m + 1], sens[m + 1]
    return float(y0 + (y1 - y0) * (rate - x0) / (x1 - x0))


def plot_froc(result: FrocResult, path: str | os.PathLike[str], title: str = "FROC") -> Path:
    """Write the FROC curve (log FP axis, CPM rates marked) as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medinfer._atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    x = np.maximum(result.fps_per_scan, 1e-3)
    ax.step(x, result.sensitivity, where="post", color="tab:blue", label="FROC")
    rates = list(result.sensitivity_at)
    ax.plot(rates, [result.sensitivity_at[r] for r in rates], "o", color="tab:red",
            label=f"CPM = {result.cpm:.3f}")
    ax.set_xscale("log")
    ax.set_xlim(0.1, max(10.0, float(x.max()) * 1.2))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------ I/O
_REF_ALIASES = {
    "scan_id": ("scan_id", "seriesuid", "case"),
    "x": ("x", "coordX", "coord_x"),
    "y": ("y", "coordY", "coord_y"),
    "z": ("z", "coordZ", "coord_z"),
    "diameter_mm": ("diameter_mm", "diameter"),
    "score": ("confidence", "score", "probability"),
}


def _col(row: Mapping[str, str], key: str, path: Path, line: int) -> str:
    for name in _REF_ALIASES[key]:
        if name in row and row[name] not in (None, ""):
            return row[name]
    raise ConfigError(f"{path}: line {line}: no value for {key!r} "
                      f"(columns accepted: {', '.join(_REF_ALIASES[key])})")


def _float(text: str, path: Path, line: int, key: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"{path}: line {line}: {key}={text!r} is not a number") from None
    if not np.isfinite(v):
        raise ConfigError(f"{path}: line {line}: {key}={text!r} is not finite")
    return v


def _xyz(row: Mapping[str, str], path: Path, line: int, frame: str) -> tuple[float, float, float]:
    x, y, z = (_float(_col(row, k, path, line), path, line, k) for k in ("x", "y", "z"))
    if frame.upper() == "LPS":
        return (-x, -y, z)
    if frame.upper() != "RAS":
        raise ConfigError(f"--frame: {frame!r} is not allowed; choose 'RAS' or 'LPS'")
    return (x, y, z)


def read_references(path: str | os.PathLike[str], frame: str = "RAS") -> list[Reference]:
    """Reference findings CSV: ``scan_id, x, y, z, diameter_mm`` (mm in ``frame``).

    LUNA16 column names (``seriesuid, coordX, coordY, coordZ, diameter_mm``) are accepted;
    LUNA16 coordinates are LPS (ITK world), so pass ``frame="LPS"`` for them.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: reference CSV not found")
    out = []
    with p.open(newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.DictReader(fh), start=2):
            d = _float(_col(row, "diameter_mm", p, n), p, n, "diameter_mm")
            if d <= 0:
                raise ConfigError(f"{p}: line {n}: diameter_mm must be > 0, got {d}")
            out.append(Reference(_col(row, "scan_id", p, n), _xyz(row, p, n, frame), d))
    return out


def read_candidates(path: str | os.PathLike[str], frame: str = "RAS") -> tuple[list[Candidate],
                                                                                list[str]]:
    """Predictions: a CSV (``scan_id, x, y, z, confidence``), a ``*_detections.json`` or a
    folder of ``*_detections.json`` files (coordinates RAS+ mm; ``frame`` applies to CSV).

    Returns the candidates and the scan ids seen (JSON files with no finding count as
    scans).
    """
    import json

    p = Path(path)
    files: list[Path]
    if p.is_dir():
        files = sorted(p.rglob("*_detections.json"))
        if not files:
            raise ConfigError(f"{p}: no *_detections.json files in this folder")
    elif p.is_file():
        files = [p]
    else:
        raise ConfigError(f"{p}: predictions not found")
    cands: list[Candidate] = []
    scans: list[str] = []
    for f in files:
        if f.suffix.lower() == ".json":
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
                sid = str(doc["scan_id"])
                scans.append(sid)
                for det in doc["detections"]:
                    c = det["coordinates"]
                    cands.append(Candidate(sid, (float(c[0]), float(c[1]), float(c[2])),
                                           float(det["confidence"])))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise ConfigError(f"{f}: not a detections JSON ({exc.__class__.__name__}: "
                                  f"{exc})") from None
        else:
            with f.open(newline="", encoding="utf-8") as fh:
                for n, row in enumerate(csv.DictReader(fh), start=2):
                    sid = _col(row, "scan_id", f, n)
                    scans.append(sid)
                    cands.append(Candidate(sid, _xyz(row, f, n, frame),
                                           _float(_col(row, "score", f, n), f, n, "confidence")))
    return cands, sorted(set(scans))
