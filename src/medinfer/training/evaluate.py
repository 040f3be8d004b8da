"""``medinfer evaluate``: run a model on labelled cases, write metrics and figures.

Outputs in the output folder: ``metrics.csv`` (one row per case and class: Dice, IoU,
HD95 mm, surface Dice), ``summary.csv`` (per class mean and sd over cases),
``iou_z.csv`` (case, class, slice, IoU), ``metrics.json`` (all of it), and the figures
of :mod:`medinfer.training.figures`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from medinfer._atomic import write_text_atomic
from medinfer.training import figures
from medinfer.training.data import find_pairs, load_source_case
from medinfer.training.metrics import iou_along_z, segmentation_metrics

_FIELDS = ("dice", "iou", "hd95", "surface_dice")


def _csv(rows: list[dict[str, Any]], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def evaluate_model(model: str | os.PathLike[str], out: str | os.PathLike[str], *,
                   images: str | os.PathLike[str] | None = None,
                   labels: str | os.PathLike[str] | None = None,
                   cases: str | os.PathLike[str] | None = None, device: str = "auto",
                   tolerance_mm: float = 1.0) -> dict[str, Any]:
    """Predict every case with ``model`` and score it against its label map.

    Parameters
    ----------
    model : model folder, its ``model.yaml`` or a bundled name.
    out : output folder (created).
    images, labels, cases : the data (layouts of :func:`medinfer.training.data.find_pairs`).
    device : ``auto``, ``cpu`` or ``cuda``.
    tolerance_mm : surface-Dice tolerance.

    Returns
    -------
    ``{"cases": [...], "summary": {class name: {metric: {"mean", "sd"}}}}``.

    Raises
    ------
    ConfigError, GeometryError, ModelError
    """
    from medinfer.inference import Predictor
    from medinfer.models import load_model, resolve_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    card, model_dir = resolve_model(model)
    net = load_model(card, model_dir, device)
    predictor = Predictor(card, net, device=device)
    classes = card.foreground_values
    names = {v: card.labels[v].name for v in classes}
    rows: list[dict[str, Any]] = []
    zrows: list[dict[str, Any]] = []
    curves: dict[str, list[tuple[str, np.ndarray]]] = {names[c]: [] for c in classes}
    first: tuple[Any, ...] | None = None
    for pair in find_pairs(images, labels, cases):
        vol, truth_vol = load_source_case(pair)
        pred = np.asarray(predictor.predict(vol).label.array[0]).astype(np.int64)
        truth = np.rint(np.asarray(truth_vol.array[0])).astype(np.int64)
        m = segmentation_metrics(pred, truth, classes, [float(v) for v in vol.spacing],
                                 tolerance_mm=tolerance_mm)
        for c in classes:
            rows.append({"case": pair.case, "label": c, "name": names[c], **m[c]})
        ax, iz = iou_along_z(pred, truth, vol.affine, classes)
        for j, c in enumerate(classes):
            curves[names[c]].append((pair.case, iz[:, j]))
            zrows += [{"case": pair.case, "label": c, "name": names[c], "axis": ax,
                       "slice": s, "iou": v} for s, v in enumerate(iz[:, j])]
        if first is None:
            first = (np.asarray(vol.array[0]), truth, pred, vol.affine)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    srows = []
    for c in classes:
        summary[names[c]] = {}
        for f in _FIELDS:
            v = np.array([r[f] for r in rows if r["label"] == c], float)
            ok = v[~np.isnan(v)]
            mean = float(ok.mean()) if ok.size else math.nan
            sd = float(ok.std()) if ok.size else math.nan
            summary[names[c]][f] = {"mean": mean, "sd": sd}
            srows.append({"label": c, "name": names[c], "metric": f, "mean": mean, "sd": sd,
                          "n": int(ok.size)})
    write_text_atomic(out / "metrics.csv", _csv(rows, ["case", "label", "name", *_FIELDS]))
    write_text_atomic(out / "summary.csv",
                      _csv(srows, ["label", "name", "metric", "mean", "sd", "n"]))
    write_text_atomic(out / "iou_z.csv",
                      _csv(zrows, ["case", "label", "name", "axis", "slice", "iou"]))
    result = {"model": card.name, "cases": rows, "summary": summary}
    write_text_atomic(out / "metrics.json",
                      json.dumps(_nan_none(result), indent=1, allow_nan=False) + "\n")
    figures.iou_bar({names[c]: [r["iou"] for r in rows if r["label"] == c] for c in classes},
                    out / figures.IOU_PNG)
    figures.iou_z_lines(curves, out / figures.IOU_Z_PNG)
    if first is not None:
        image, truth, pred, affine = first
        figures.predictions_figure(image, truth, pred, affine, out / figures.PREDICTIONS_PNG,
                                   max(card.labels) + 1)
        figures.errors_figure(image, truth, pred, affine, out / figures.ERRORS_PNG)
    return result


def _nan_none(value: Any) -> Any:
    """Replace NaN (undefined metric) by None, recursively, for strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_none(v) for v in value]
    return value
