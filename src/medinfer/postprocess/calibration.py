"""Triage calibration: a finding feature (default ``confidence``) -> malignancy-style score.

Two monotone calibration maps are fitted from labelled findings (``label`` 1 = positive,
e.g. malignant / true lesion, 0 = negative):

* **isotonic** — the pool-adjacent-violators algorithm (PAV; Ayer et al., Ann. Math.
  Statist. 1955; Zadrozny & Elkan, KDD 2002), run by
  :func:`scipy.optimize.isotonic_regression` (equal to the former pure-Python PAV within
  2e-16, about 40x faster), gives the non-decreasing step function that minimises
  squared error; applied with linear interpolation between the fitted points
  and clamped outside them (as scikit-learn's ``IsotonicRegression``).
* **platt** — Platt scaling ``p = 1 / (1 + exp(A x + B))`` (Platt 1999, "Probabilistic
  outputs for support vector machines"), fitted by Newton's method with backtracking on
  Platt's smoothed targets ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)`` (Lin, Lin & Weng
  2007, "A note on Platt's probabilistic outputs").

A calibration file (JSON or YAML) holds the map and the **risk categories**: an ordered
list of ``{name, min_score}``; a finding gets the last category whose ``min_score`` is
``<=`` its score. Without a file the score is the uncalibrated confidence and the default
categories are ``low`` (< 0.3), ``intermediate`` (0.3-0.7), ``high`` (>= 0.7).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medinfer._atomic import write_text_atomic
from medinfer.errors import ConfigError, parse_enum

#: features a calibration may use (Finding attributes)
FEATURES = ("confidence", "diameter_mm", "volume_mm3", "mean_intensity", "sphericity")


class CalibrationMethod(StrEnum):
    """Calibration model."""

    ISOTONIC = "isotonic"
    PLATT = "platt"
    IDENTITY = "identity"


class RiskCategory(BaseModel):
    """One risk category: findings with ``score >= min_score`` (up to the next one)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=50)
    min_score: float = Field(ge=0.0, le=1.0)


DEFAULT_CATEGORIES = [
    RiskCategory(name="low", min_score=0.0),
    RiskCategory(name="intermediate", min_score=0.3),
    RiskCategory(name="high", min_score=0.7),
]


class Calibration(BaseModel):
    """A calibration file.

    Attributes
    ----------
    method : ``isotonic``, ``platt`` or ``identity``.
    feature : finding feature used as input (one of :data:`FEATURES`).
    x, y : isotonic fitted points (x ascending, y non-decreasing in [0, 1]).
    a, b : Platt parameters of ``1 / (1 + exp(a x + b))``.
    risk_categories : ordered by ``min_score``; the first must start at 0.
    n_samples, n_positive : size of the fitting set (provenance).
    """

    model_config = ConfigDict(extra="forbid")
    method: CalibrationMethod = CalibrationMethod.IDENTITY
    feature: str = "confidence"
    x: list[float] = Field(default_factory=list)
    y: list[float] = Field(default_factory=list)
    a: float | None = None
    b: float | None = None
    risk_categories: list[RiskCategory] = Field(default_factory=lambda: list(DEFAULT_CATEGORIES))
    n_samples: int | None = None
    n_positive: int | None = None

    @model_validator(mode="after")
    def _check(self) -> Calibration:
        if self.feature not in FEATURES:
            raise ValueError(f"feature: {self.feature!r} is not one of {', '.join(FEATURES)}")
        if self.method is CalibrationMethod.ISOTONIC:
            if not self.x or len(self.x) != len(self.y):
                raise ValueError("isotonic calibration needs x and y of the same non-zero length")
            if any(b < a for a, b in zip(self.x, self.x[1:], strict=False)):
                raise ValueError("x must be ascending")
            if any(b < a - 1e-12 for a, b in zip(self.y, self.y[1:], strict=False)):
                raise ValueError("y must be non-decreasing")
        if self.method is CalibrationMethod.PLATT and (self.a is None or self.b is None):
            raise ValueError("platt calibration needs a and b")
        mins = [c.min_score for c in self.risk_categories]
        if not mins or mins[0] != 0.0 or any(b <= a for a, b in zip(mins, mins[1:], strict=False)):
            raise ValueError("risk_categories: min_score must start at 0 and increase strictly")
        return self

    # ------------------------------------------------------------------ apply
    def score(self, values: npt.ArrayLike) -> np.ndarray:
        """Calibrated score in [0, 1] for feature values (float64 array, same shape)."""
        v = np.asarray(values, dtype=np.float64)
        if self.method is CalibrationMethod.ISOTONIC:
            return np.interp(v, self.x, self.y)
        if self.method is CalibrationMethod.PLATT:
            assert self.a is not None and self.b is not None  # validated above
            z = self.a * v + self.b
            return np.where(z >= 0, np.exp(-z) / (1.0 + np.exp(-z)), 1.0 / (1.0 + np.exp(z)))
        return np.clip(v, 0.0, 1.0)

    def category(self, score: float) -> str:
        """Name of the risk category of ``score``."""
        name = self.risk_categories[0].name
        for c in self.risk_categories:
            if score >= c.min_score:
                name = c.name
        return name

    @property
    def category_names(self) -> list[str]:
        """Category names in order."""
        return [c.name for c in self.risk_categories]

    def apply(self, findings: Sequence[Any]) -> None:
        """Fill ``malignancy_score`` and ``risk_category`` of :class:`Finding` objects."""
        for f in findings:
            value = getattr(f, self.feature)
            if value is None:
                f.malignancy_score, f.risk_category = None, None
                continue
            s = float(self.score([value])[0])
            f.malignancy_score = s
            f.risk_category = self.category(s)

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read a calibration JSON / YAML file.

        Raises
        ------
        ConfigError
            Missing, unreadable or invalid file (the message names the key).
        """
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: calibration file not found")
        if p.stat().st_size > 10_000_000:
            raise ConfigError(f"{p}: calibration file larger than 10 MB")
        try:
            text = p.read_text(encoding="utf-8")
            data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"{p}: not valid JSON/YAML ({exc.__class__.__name__})") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            msgs = "; ".join(
                f"{'.'.join(str(x) for x in e['loc']) or '<root>'}: "
                f"{str(e['msg']).removeprefix('Value error, ')}"
                for e in exc.errors()
            )
            raise ConfigError(f"{p}: {msgs}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as JSON (``.json``) or YAML (other suffixes), atomically."""
        import yaml

        data = self.model_dump(mode="json")
        p = Path(path)
        text = (json.dumps(data, indent=2) + "\n" if p.suffix.lower() == ".json"
                else yaml.safe_dump(data, sort_keys=False))
        return write_text_atomic(p, text)


# ---------------------------------------------------------------------------- fitting
def pav(x: npt.ArrayLike, y: npt.ArrayLike,
        weights: npt.ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Isotonic (non-decreasing) weighted least-squares fit (pool-adjacent-violators).

    Ties in ``x`` are pooled first (weighted mean of their ``y``, summed weights), then
    :func:`scipy.optimize.isotonic_regression` (PAV, SciPy >= 1.12) fits the
    non-decreasing sequence over the unique ``x``.

    Parameters
    ----------
    x, y : 1-D arrays of equal length (any order), finite.
    weights : optional positive sample weights (default 1).

    Returns
    -------
    (xs, fitted) : unique x ascending (float64) and the fitted non-decreasing values there.

    Raises
    ------
    ConfigError
        Empty, mismatched or non-1-D inputs, non-finite values or non-positive weights.
    """
    from scipy.optimize import isotonic_regression

    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    wa = np.ones_like(xa) if weights is None else np.asarray(weights, dtype=np.float64)
    if xa.ndim != 1 or xa.shape != ya.shape or xa.shape != wa.shape or len(xa) == 0:
        raise ConfigError("pav: x, y and weights must be non-empty 1-D arrays of equal length")
    if not (np.isfinite(xa).all() and np.isfinite(ya).all() and np.isfinite(wa).all()
            and (wa > 0).all()):
        raise ConfigError("pav: x, y must be finite and weights finite and > 0")
    ux, inv = np.unique(xa, return_inverse=True)
    wsum = np.bincount(inv, weights=wa)
    ysum = np.bincount(inv, weights=wa * ya)
    fitted = isotonic_regression(ysum / wsum, weights=wsum, increasing=True).x
    return ux, np.asarray(fitted, dtype=np.float64)


def fit_platt(x: npt.ArrayLike, y: npt.ArrayLike, max_iter: int = 100) -> tuple[float, float]:
    """Platt scaling parameters ``(A, B)`` of ``p = 1 / (1 + exp(A x + B))``.

    Newton's method with backtracking line search on the smoothed targets (Platt 1999;
    the numerically stable variant of Lin, Lin & Weng 2007).
    """
    f = np.asarray(x, dtype=np.float64)
    lab = np.asarray(y, dtype=np.float64)
    npos = float(np.sum(lab > 0.5))
    nneg = float(len(lab) - npos)
    if npos == 0 or nneg == 0:
        raise ConfigError("platt: the labels need both positives (1) and negatives (0)")
    hi, lo = (npos + 1.0) / (npos + 2.0), 1.0 / (nneg + 2.0)
    t = np.where(lab > 0.5, hi, lo)
    a, b = 0.0, math.log((nneg + 1.0) / (npos + 1.0))

    def objective(a_: float, b_: float) -> float:
        z = a_ * f + b_
        # sum of t*z + log(1 + exp(-z)) in a stable form
        return float(np.sum(np.where(z >= 0, t * z + np.log1p(np.exp(-z)),
                                     (t - 1.0) * z + np.log1p(np.exp(z)))))

    fval = objective(a, b)
    sigma = 1e-12
    for _ in range(max_iter):
        z = a * f + b
        p = np.where(z >= 0, np.exp(-z) / (1.0 + np.exp(-z)), 1.0 / (1.0 + np.exp(z)))
        q = 1.0 - p
        d2 = p * q
        h11 = sigma + float(np.sum(f * f * d2))
        h22 = sigma + float(np.sum(d2))
        h21 = float(np.sum(f * d2))
        d1 = t - p
        g1, g2 = float(np.sum(f * d1)), float(np.sum(d1))
        if abs(g1) < 1e-9 and abs(g2) < 1e-9:
            break
        det = h11 * h22 - h21 * h21
        da = -(h22 * g1 - h21 * g2) / det
        db = -(-h21 * g1 + h11 * g2) / det
        gd = g1 * da + g2 * db
        step = 1.0
        while step >= 1e-10:
            na, nb = a + step * da, b + step * db
            nf = objective(na, nb)
            if nf < fval + 1e-4 * step * gd:
                a, b, fval = na, nb, nf
                break
            step /= 2.0
        else:
            break
    return float(a), float(b)


def fit_calibration(
    values: npt.ArrayLike,
    labels: npt.ArrayLike,
    method: CalibrationMethod | str = CalibrationMethod.ISOTONIC,
    *,
    feature: str = "confidence",
    categories: Sequence[RiskCategory] | None = None,
) -> Calibration:
    """Fit a :class:`Calibration` from feature values and 0/1 labels.

    Raises
    ------
    ConfigError
        Empty input, labels not 0/1, unknown method or feature.
    """
    m = parse_enum(CalibrationMethod, method, "method")
    v = np.asarray(values, dtype=np.float64)
    lab = np.asarray(labels, dtype=np.float64)
    if v.ndim != 1 or v.shape != lab.shape or len(v) == 0:
        raise ConfigError("calibrate: need a non-empty list of values with one label each")
    if not np.all(np.isin(lab, (0.0, 1.0))):
        raise ConfigError("calibrate: labels must be 0 or 1")
    if not np.all(np.isfinite(v)):
        raise ConfigError(f"calibrate: feature {feature!r} has non-finite values")
    cats = list(categories) if categories is not None else list(DEFAULT_CATEGORIES)
    common: dict[str, Any] = {"feature": feature, "risk_categories": cats,
                              "n_samples": len(v), "n_positive": int(lab.sum())}
    try:
        if m is CalibrationMethod.ISOTONIC:
            xs, ys = pav(v, lab)
            return Calibration(method=m, x=xs.tolist(), y=ys.tolist(), **common)
        if m is CalibrationMethod.PLATT:
            a, b = fit_platt(v, lab)
            return Calibration(method=m, a=a, b=b, **common)
        return Calibration(method=m, **common)
    except ValidationError as exc:
        raise ConfigError(f"calibrate: {exc.errors()[0]['msg']}") from None


def read_labelled_findings(path: str | os.PathLike[str], feature: str = "confidence",
                           label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """Read ``feature`` and ``label_column`` from a CSV of labelled findings.

    The CSV is e.g. a ``<case>_detections.csv`` with a ``label`` column added (1 = positive).

    Raises
    ------
    ConfigError
        Missing file or column, non-numeric values (the message names row and column).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: labelled findings CSV not found")
    if feature not in FEATURES:
        raise ConfigError(f"feature: {feature!r} is not one of {', '.join(FEATURES)}")
    vals: list[float] = []
    labs: list[float] = []
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        for col in (feature, label_column):
            if col not in cols:
                raise ConfigError(f"{p}: column {col!r} missing (columns: {', '.join(cols)})")
        for n, row in enumerate(reader, start=2):
            try:
                vals.append(float(row[feature]))
                labs.append(float(row[label_column]))
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{p}: line {n}: {feature}={row.get(feature)!r}, "
                    f"{label_column}={row.get(label_column)!r} are not numbers"
                ) from None
    if not vals:
        raise ConfigError(f"{p}: no rows")
    return np.array(vals), np.array(labs)


def parse_categories(names: str, thresholds: str) -> list[RiskCategory]:
    """Categories from CLI strings: ``"low,intermediate,high"`` and ``"0.3,0.7"``.

    Raises
    ------
    ConfigError
        Counts do not match (n names need n-1 thresholds) or thresholds not increasing in
        (0, 1].
    """
    ns = [s.strip() for s in names.split(",") if s.strip()]
    try:
        ts = [float(s) for s in thresholds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--thresholds: {thresholds!r} is not a comma-separated list of "
                          "numbers") from None
    if len(ns) != len(ts) + 1:
        raise ConfigError(f"--categories/--thresholds: {len(ns)} categories need "
                          f"{len(ns) - 1} thresholds, got {len(ts)}")
    bounds = [0.0, *ts]
    if any(not 0.0 < t <= 1.0 for t in ts) or any(b <= a for a, b in
                                                  zip(bounds, bounds[1:], strict=False)):
        raise ConfigError(f"--thresholds: must increase strictly within (0, 1], got {ts}")
    return [RiskCategory(name=n, min_score=b) for n, b in zip(ns, bounds, strict=True)]
