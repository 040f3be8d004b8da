"""``medinfer predict`` for detection models: scans (files or folders) -> result files.

Called by the ``predict`` command (:mod:`medinfer.inference.cli`) when ``--config`` is given
or the model card's task is ``detection``. Per scan ``<case>`` (file name without
``.nii.gz`` / ``.nii`` ...) it writes, as selected by ``output.formats``:

``<case>_detections.json`` (validated against ``detections.schema.json``),
``<case>_detections.csv``, ``<case>_heatmap.nii.gz`` (float32, source grid and affine),
``<case>_visualization.png``, ``<case>_3d.html``, ``<case>_report.pdf``;

and for the batch: ``confidence_distribution.png`` and ``batch_summary.json`` / ``.csv``
(scans, findings per scan and risk category, average processing time).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medinfer._atomic import write_text_atomic
from medinfer.errors import ConfigError, InvalidImageError, ModelError
from medinfer.postprocess.detection_config import (
    DetectionConfig,
    OutputFormat,
    load_detection_config,
)
from medinfer.postprocess.detection_run import (
    findings_from_heatmap,
    load_calibration,
    run_detection_on_volume,
    run_heatmap,
)
from medinfer.volume import Volume

__all__ = ["case_name", "collect_inputs", "predict_detection", "run_detection_on_volume",
           "write_case_outputs"]

LOG = logging.getLogger(__name__)

#: ``predict`` flags that only concern segmentation outputs (the heat map NIfTI and the
#: visualization PNG are always written as selected by ``output.formats``)
_PREDICT_ONLY_FLAGS = ("save_probabilities", "overlay", "verbose")

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".dcm")


def case_name(path: Path) -> str:
    """Case id from a scan path: the name without image suffixes (``a.nii.gz`` -> ``a``)."""
    name = path.name
    for suf in _IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)] or name
    return name


def collect_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Expand the inputs: files as given; a folder holding image files gives each file
    (sorted; ``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd``); any other folder is one
    scan (a DICOM series folder).

    Raises
    ------
    InvalidImageError
        A path that does not exist, or no inputs at all.
    """
    out: list[Path] = []
    for p in map(Path, inputs):
        if not p.exists():
            raise InvalidImageError(f"{p}: no such file or folder")
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                           and any(f.name.lower().endswith(s) for s in _IMAGE_SUFFIXES[:5]))
            out.extend(files if files else [p])
        else:
            out.append(p)
    if not out:
        raise InvalidImageError("predict: no input scans given")
    return out


def write_case_outputs(
    output_dir: Path,
    case: str,
    image: Volume,
    heatmap: Volume,
    detections: list[dict[str, Any]],
    cfg: DetectionConfig,
    *,
    card: Any,
    categories: Sequence[str],
    processing_time: float,
) -> dict[str, Path]:
    """Write the per-scan files selected in ``cfg.output.formats``; returns kind -> path."""
    from medinfer.io import save
    from medinfer.reporting.detections import (
        detection_document,
        write_detections_csv,
        write_detections_json,
    )

    fmts = set(cfg.output.formats)
    vis = cfg.visualization
    out: dict[str, Path] = {}
    output_dir.mkdir(parents=True, exist_ok=True)
    doc = detection_document(case, image, detections, model=card.name,
                             model_version=str(card.version), categories=categories,
                             processing_time_seconds=processing_time)
    if OutputFormat.JSON in fmts:
        out["json"] = write_detections_json(doc, output_dir / f"{case}_detections.json")
    if OutputFormat.CSV in fmts:
        out["csv"] = write_detections_csv(detections, output_dir / f"{case}_detections.csv")
    if OutputFormat.HEATMAP in fmts:
        out["heatmap"] = save(heatmap, output_dir / f"{case}_heatmap.nii.gz")
    png = output_dir / f"{case}_visualization.png"
    if OutputFormat.PNG in fmts or OutputFormat.PDF in fmts:
        from medinfer.reporting.detection_figures import write_visualization_png

        write_visualization_png(png, image, heatmap, detections, colormap=vis.colormap,
                                alpha=vis.alpha, num_slices=vis.num_slices,
                                window_hu=vis.window_hu, dpi=vis.dpi,
                                title=f"{case}: {len(detections)} finding(s)")
        out["png"] = png
    if OutputFormat.HTML in fmts:
        from medinfer.reporting.detection_html import write_detection_html

        out["html"] = write_detection_html(
            output_dir / f"{case}_3d.html", image, heatmap, detections,
            title=f"{case}: {len(detections)} finding(s) ({card.name})",
            threshold=cfg.post_processing.segmentation_threshold, window_hu=vis.window_hu,
            max_points=vis.html_max_points)
    if OutputFormat.PDF in fmts:
        from medinfer.reporting.detection_pdf import write_detection_pdf

        out["pdf"] = write_detection_pdf(output_dir / f"{case}_report.pdf", doc, image,
                                         overview_png=png, card=card,
                                         window_hu=vis.window_hu)
    if OutputFormat.PNG not in fmts and png.exists() and "pdf" in out:
        png.unlink()
        out.pop("png", None)
    return out


def _batch_summary(output_dir: Path, rows: list[dict[str, Any]], categories: Sequence[str],
                   confidences: list[float], cfg: DetectionConfig) -> None:
    total = sum(r["num_detections"] for r in rows)
    times = [r["processing_time_seconds"] for r in rows]
    per_cat = {c: sum(r["risk_categories"].get(c, 0) for r in rows) for c in categories}
    summary = {
        "num_scans": len(rows),
        "num_detections": total,
        "scans_with_detections": sum(1 for r in rows if r["num_detections"] > 0),
        "detections_per_scan": total / len(rows) if rows else 0.0,
        "risk_categories": per_cat,
        "average_processing_time_seconds": sum(times) / len(times) if times else 0.0,
        "scans": rows,
    }
    if cfg.output.batch_summary:
        write_text_atomic(output_dir / "batch_summary.json", json.dumps(summary, indent=2) + "\n")
        buf = io.StringIO()
        cols = ["scan_id", "source", "num_detections", *categories, "processing_time_seconds"]
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({"scan_id": r["scan_id"], "source": r["source"],
                        "num_detections": r["num_detections"],
                        **{c: r["risk_categories"].get(c, 0) for c in categories},
                        "processing_time_seconds": r["processing_time_seconds"]})
        write_text_atomic(output_dir / "batch_summary.csv", buf.getvalue())
    if cfg.output.confidence_distribution:
        from medinfer.reporting.detection_figures import write_confidence_distribution

        write_confidence_distribution(output_dir / "confidence_distribution.png", confidences,
                                      threshold=cfg.post_processing.threshold,
                                      dpi=cfg.visualization.dpi)


def predict_detection(
    inputs: list[Path],
    model: str | None,
    config: Path | None,
    output_dir: Path,
    device: str,
    overrides: dict[str, Any],
    progress: Callable[[str, float], None] | None = None,
) -> None:
    """Detect findings in every input scan and write all outputs (see module doc).

    Parameters
    ----------
    inputs : scan files and/or folders (a folder of NIfTI files is a batch; another folder
        is one DICOM series).
    model : bundled model name or model folder; None = ``model.name`` of the config.
    config : detection YAML (``docs/detection.md``) or None for defaults.
    output_dir : folder for the results (created).
    device : ``cpu``, ``cuda``...; overrides ``model.device`` unless empty or ``auto``.
    overrides : CLI flags (see :func:`medinfer.postprocess.detection_config.apply_overrides`);
        ``series_uid`` selects a DICOM series; ``save_probabilities``, ``overlay`` and
        ``verbose`` are ignored (outputs follow ``output.formats``).

    Raises
    ------
    ConfigError
        Invalid config or overrides; no model named.
    ModelError
        The model cannot be loaded or is not a detection model.
    InvalidImageError
        An input cannot be read.
    """
    from medinfer.io import load
    from medinfer.models import load_model, resolve_model

    ov = dict(overrides or {})
    series_uid = ov.pop("series_uid", None)
    for key in _PREDICT_ONLY_FLAGS:  # flags of the segmentation path with no meaning here
        ov.pop(key, None)
    cfg = load_detection_config(config, ov)
    name = model or cfg.model.name
    if not name:
        raise ConfigError("model.name: no model given; pass --model or set model.name in the "
                          "config (e.g. demo-nodules)")
    card, model_dir = resolve_model(name)
    if str(card.task.value) != "detection":
        raise ModelError(f"model {card.name!r}: task is {card.task.value!r}; detection "
                         "outputs need a model card with task: detection")
    dev = cfg.model.device if device in (None, "", "auto") else device
    net = load_model(card, model_dir, dev)
    calibration = load_calibration(cfg)
    categories = calibration.category_names
    files = collect_inputs(inputs)
    output_dir = Path(output_dir)
    rows: list[dict[str, Any]] = []
    confidences: list[float] = []
    seen: dict[str, int] = {}
    for n, f in enumerate(files):
        t0 = time.perf_counter()
        case = case_name(f)
        if case in seen:  # same name from two folders: keep both
            seen[case] += 1
            case = f"{case}_{seen[case]}"
        else:
            seen[case] = 0

        def prog(stage: str, frac: float, n: int = n) -> None:
            if progress is not None:
                progress(stage, (n + frac) / len(files))

        image = load(f, series_uid=series_uid) if series_uid else load(f)
        heat = run_heatmap(image, card, net, cfg, prog)
        found = findings_from_heatmap(heat, image, cfg, calibration)
        dets = [x.to_dict() for x in found]
        elapsed = time.perf_counter() - t0
        write_case_outputs(output_dir, case, image, heat, dets, cfg, card=card,
                           categories=categories, processing_time=elapsed)
        counts = {c: 0 for c in categories}
        for d in dets:
            if d["triage"]["risk_category"] is not None:
                counts[d["triage"]["risk_category"]] = \
                    counts.get(d["triage"]["risk_category"], 0) + 1
        confidences += [d["confidence"] for d in dets]
        rows.append({"scan_id": case, "source": str(f), "num_detections": len(dets),
                     "risk_categories": counts,
                     "processing_time_seconds": round(time.perf_counter() - t0, 3)})
        LOG.info("%s: %d finding(s) in %.1f s", case, len(dets), time.perf_counter() - t0)
    _batch_summary(output_dir, rows, categories, confidences, cfg)
