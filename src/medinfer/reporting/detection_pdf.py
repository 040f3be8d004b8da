"""PDF report of a detection run (reportlab): findings table, key images, model provenance.

Content, in order: title and scan id, the generation time (UTC), the scan geometry, the
findings table (id, RAS+ mm centre, diameter, volume, mean HU, confidence, malignancy score,
risk category), the overview image (``<case>_visualization.png``), one key image per finding
(slice through its centre), and the model card facts (name, version, description,
provenance, licence) with the intended-use statement.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medinfer._atomic import atomic_path
from medinfer.errors import MedinferError
from medinfer.volume import Volume


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def write_detection_pdf(
    path: str | os.PathLike[str],
    doc: dict[str, Any],
    image: Volume,
    *,
    overview_png: str | os.PathLike[str] | None = None,
    card: Any = None,
    window_hu: tuple[float, float] = (-20.0, 180.0),
    max_key_images: int = 12,
) -> Path:
    """Write ``<case>_report.pdf`` for the detections document ``doc`` (see module doc).

    Raises
    ------
    MedinferError
        reportlab is not installed (extra ``report``).
    """
    try:
        from reportlab.lib import colors
        from reportlab.lib.pagesizes import A4
        from reportlab.lib.styles import getSampleStyleSheet
        from reportlab.lib.units import mm
        from reportlab.platypus import (
            Image,
            Paragraph,
            SimpleDocTemplate,
            Spacer,
            Table,
            TableStyle,
        )
    except ImportError:  # pragma: no cover - depends on the install
        raise MedinferError("the PDF report needs reportlab: pip install 'medinfer[report]'") \
            from None
    from xml.sax.saxutils import escape

    from medinfer.reporting.detection_figures import finding_crops_png

    styles = getSampleStyleSheet()
    story: list[Any] = []
    dets: Sequence[dict[str, Any]] = doc["detections"]
    story.append(Paragraph(escape(f"Detection report: {doc['scan_id']}"), styles["Title"]))
    story.append(Paragraph(escape(
        f"Model {doc['model']} {doc['model_version']} - generated {doc['timestamp']} (UTC) - "
        f"{len(dets)} finding(s) - processing {doc['summary']['processing_time_seconds']} s"),
        styles["Normal"]))
    md = doc["metadata"]
    story.append(Paragraph(escape(
        f"Scan grid: shape {md['shape']}, spacing "
        f"{[round(s, 3) for s in md['spacing']]} mm. Coordinates are RAS+ millimetres "
        "(NIfTI world); LPS (DICOM) values are in the JSON/CSV files."), styles["Normal"]))
    story.append(Spacer(1, 4 * mm))
    story.append(Paragraph("Findings", styles["Heading2"]))
    if dets:
        header = ["id", "RAS x, y, z (mm)", "diam. (mm)", "vol. (mm3)", "mean HU",
                  "conf.", "score", "risk"]
        rows = [header]
        for d in dets:
            c = d["coordinates"]
            rows.append([
                d.get("name", d["id"]), f"{c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f}",
                _fmt(d["diameter_mm"]),
                _fmt(d["properties"]["volume_mm3"], 0), _fmt(d["properties"]["mean_intensity"]),
                _fmt(d["confidence"], 3), _fmt(d["triage"]["malignancy_score"], 3),
                _fmt(d["triage"]["risk_category"]),
            ])
        t = Table(rows, repeatRows=1)
        t.setStyle(TableStyle([
            ("BACKGROUND", (0, 0), (-1, 0), colors.lightgrey),
            ("GRID", (0, 0), (-1, -1), 0.3, colors.grey),
            ("FONTSIZE", (0, 0), (-1, -1), 8),
        ]))
        story.append(t)
    else:
        story.append(Paragraph("No findings above the detection threshold.", styles["Normal"]))
    counts = doc["summary"]["risk_categories"]
    story.append(Paragraph(escape("Risk categories: " + ", ".join(
        f"{k}: {v}" for k, v in counts.items())), styles["Normal"]))
    with tempfile.TemporaryDirectory() as tmpdir:
        if overview_png is not None and Path(overview_png).is_file():
            story.append(Paragraph("Key images", styles["Heading2"]))
            from PIL import Image as PILImage

            with PILImage.open(overview_png) as im:
                w_px, h_px = im.size
            scale = min(170 * mm / w_px, 120 * mm / h_px)
            story.append(Image(str(overview_png), width=w_px * scale, height=h_px * scale))
        crops = []
        for d in list(dets)[:max_key_images]:
            p = Path(tmpdir) / f"{d['id']}.png"
            finding_crops_png(p, image, d, window_hu)
            crops.append(Image(str(p), width=42 * mm, height=42 * mm))
        if crops:
            grid = [crops[i:i + 4] for i in range(0, len(crops), 4)]
            story.append(Spacer(1, 3 * mm))
            story.append(Table(grid))
        story.append(Paragraph("Model provenance", styles["Heading2"]))
        if card is not None:
            lines = [f"Name: {card.name}, version {card.version}, task {card.task.value}",
                     f"Description: {card.description}", f"Licence: {card.license or '-'}"]
            for k, v in (card.provenance or {}).items():
                lines.append(f"{k}: {v}")
        else:
            lines = [f"Model: {doc['model']} {doc['model_version']}"]
        for line in lines:
            story.append(Paragraph(escape(str(line)), styles["Normal"]))
        story.append(Spacer(1, 3 * mm))
        story.append(Paragraph(escape(
            "Research software output; not a medical device. Risk scores are calibrated "
            "only as well as the calibration file used."), styles["Italic"]))
        with atomic_path(path) as tmp:
            pdf = SimpleDocTemplate(str(tmp), pagesize=A4, title=f"Detections {doc['scan_id']}",
                                    leftMargin=15 * mm, rightMargin=15 * mm,
                                    topMargin=15 * mm, bottomMargin=15 * mm)
            pdf.build(story)
    return Path(path)
