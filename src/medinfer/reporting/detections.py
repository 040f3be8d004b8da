"""Detection results as files: ``<case>_detections.json`` (with its JSON Schema) and CSV.

The JSON layout is fixed by ``detections.schema.json`` (in this package); every document
written here is validated against it before it is written. The CSV has one row per
finding with the same values (columns in :data:`CSV_COLUMNS`; coordinates RAS+ mm, LPS mm
and voxel indices).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from medinfer._atomic import write_text_atomic
from medinfer.errors import MedinferError
from medinfer.volume import Volume

SCHEMA_PATH = Path(__file__).with_name("detections.schema.json")

#: the CSV header: the PIVOT columns first (``coord_x/y/z`` = RAS+ mm, as the JSON's
#: ``coordinates``), then medinfer's extra columns
CSV_COLUMNS = (
    "scan_id", "detection_id", "coord_x", "coord_y", "coord_z", "diameter_mm", "confidence",
    "malignancy_score", "risk_category",
    "name", "x_lps", "y_lps", "z_lps", "i", "j", "k", "volume_mm3", "mean_intensity",
    "std_intensity", "sphericity",
)


@lru_cache(maxsize=1)
def detection_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``<case>_detections.json``."""
    data: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return data


def validate_detections(doc: dict[str, Any]) -> None:
    """Validate a detections document against the schema.

    Raises
    ------
    MedinferError
        The document does not follow the schema (message: JSON path and reason).
    """
    import jsonschema

    validator = jsonschema.Draft202012Validator(detection_schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "<root>"
        raise MedinferError(f"detections JSON: {where}: {e.message}")


def utc_timestamp() -> str:
    """Now in UTC, ISO 8601 with ``Z`` (seconds precision)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def detection_document(
    scan_id: str,
    volume: Volume,
    detections: Sequence[dict[str, Any]],
    *,
    model: str,
    model_version: str,
    categories: Sequence[str],
    processing_time_seconds: float,
    timestamp: str | None = None,
) -> dict[str, Any]:
    """Build (and validate) the ``<case>_detections.json`` document.

    Parameters
    ----------
    scan_id : case name.
    volume : the source scan (its grid goes into ``metadata``).
    detections : finding dicts (``Finding.to_dict``).
    categories : all risk category names (each is counted, zeros included).
    """
    counts = {c: 0 for c in categories}
    for d in detections:
        cat = d["triage"]["risk_category"]
        if cat is not None:
            counts[cat] = counts.get(cat, 0) + 1
    doc = {
        "scan_id": scan_id,
        "model": model,
        "model_version": model_version,
        "timestamp": timestamp or utc_timestamp(),
        "metadata": {
            "spacing": [round(float(s), 6) for s in volume.spacing],
            "shape": [int(s) for s in volume.spatial_shape],
            "affine": [[float(v) for v in row] for row in volume.affine],
        },
        "detections": list(detections),
        "summary": {
            "num_detections": len(detections),
            "high_risk_count": counts.get("high", 0),
            "low_risk_count": counts.get("low", 0),
            "risk_categories": counts,
            "processing_time_seconds": round(float(processing_time_seconds), 3),
        },
    }
    validate_detections(doc)
    return doc


def detections_to_rows(detections: Sequence[dict[str, Any]],
                       scan_id: str = "") -> list[dict[str, Any]]:
    """Flatten finding dicts into CSV rows (keys :data:`CSV_COLUMNS`)."""
    rows = []
    for d in detections:
        p, t = d["properties"], d["triage"]
        rows.append({
            "scan_id": scan_id, "detection_id": d["id"],
            "coord_x": d["coordinates"][0], "coord_y": d["coordinates"][1],
            "coord_z": d["coordinates"][2], "name": d.get("name", ""),
            "x_lps": d["coordinates_lps"][0], "y_lps": d["coordinates_lps"][1],
            "z_lps": d["coordinates_lps"][2],
            "i": d["coordinates_voxel"][0], "j": d["coordinates_voxel"][1],
            "k": d["coordinates_voxel"][2],
            "diameter_mm": d["diameter_mm"], "confidence": d["confidence"],
            "volume_mm3": p["volume_mm3"], "mean_intensity": p["mean_intensity"],
            "std_intensity": p["std_intensity"], "sphericity": p["sphericity"],
            "malignancy_score": t["malignancy_score"], "risk_category": t["risk_category"],
        })
    return rows


def write_detections_json(doc: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the document as indented UTF-8 JSON, atomically."""
    return write_text_atomic(path, json.dumps(doc, indent=2) + "\n")


def write_detections_csv(detections: Sequence[dict[str, Any]],
                         path: str | os.PathLike[str], scan_id: str = "") -> Path:
    """Write one row per finding (header always present), atomically. ``None`` -> empty.

    The header is :data:`CSV_COLUMNS` (the PIVOT columns
    ``scan_id,detection_id,coord_x,coord_y,coord_z,diameter_mm,confidence,malignancy_score,
    risk_category`` first, coordinates RAS+ mm).
    """
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    w.writeheader()
    for row in detections_to_rows(detections, scan_id):
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return write_text_atomic(path, buf.getvalue())
