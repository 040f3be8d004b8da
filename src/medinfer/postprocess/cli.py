"""CLI sub-commands of the detection pipeline: ``calibrate`` and ``evaluate-detections``.

(``medinfer predict`` itself lives in :mod:`medinfer.inference.cli` and calls
:func:`medinfer.detection.predict_detection` for detection models.)
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add ``calibrate`` and ``evaluate-detections`` to the root app."""

    @app.command("calibrate")
    def calibrate(
        findings: Path = typer.Argument(..., help="CSV of labelled findings (e.g. "
                                        "<case>_detections.csv with a 'label' column, 1/0)."),
        output: Path = typer.Option(..., "--output", "-o",
                                    help="Calibration file to write (.json or .yaml)."),
        method: str = typer.Option("isotonic", help="isotonic (PAV) or platt."),
        feature: str = typer.Option("confidence", help="Finding feature to calibrate: "
                                    "confidence, diameter_mm, volume_mm3, mean_intensity, "
                                    "sphericity."),
        label_column: str = typer.Option("label", help="Column holding the 0/1 labels."),
        categories: str = typer.Option("low,intermediate,high",
                                       help="Risk category names, lowest first."),
        thresholds: str = typer.Option("0.3,0.7", help="Score where each category after the "
                                       "first starts (n-1 values in (0, 1])."),
    ) -> None:
        """Fit a triage calibration (isotonic or Platt) from labelled findings."""
        from medinfer.postprocess.calibration import (
            fit_calibration,
            parse_categories,
            read_labelled_findings,
        )

        cats = parse_categories(categories, thresholds)
        values, labels = read_labelled_findings(findings, feature, label_column)
        cal = fit_calibration(values, labels, method, feature=feature, categories=cats)
        cal.save(output)
        typer.echo(f"{cal.method.value} calibration of {feature} from {len(values)} findings "
                   f"({int(labels.sum())} positive) -> {output}")

    @app.command("evaluate-detections")
    def evaluate_detections(
        predictions: Path = typer.Argument(..., help="Folder of <case>_detections.json, one "
                                           "such file, or a CSV (scan_id, x, y, z, confidence)."),
        reference: Path = typer.Option(..., "--reference", "-r", help="CSV of reference "
                                       "findings: scan_id, x, y, z, diameter_mm."),
        output: Path = typer.Option(Path("froc"), "--output", "-o",
                                    help="Folder for froc.json and froc.png."),
        frame: str = typer.Option("RAS", help="Frame of CSV coordinates: RAS or LPS "
                                  "(LUNA16 CSVs are LPS)."),
    ) -> None:
        """FROC curve and CPM score (LUNA16 rules) of detections against a reference."""
        import json

        from medinfer._atomic import write_text_atomic
        from medinfer.postprocess.froc import froc, plot_froc, read_candidates, read_references

        refs = read_references(reference, frame)
        cands, scans = read_candidates(predictions, frame)
        scan_ids = sorted(set(scans) | {r.scan_id for r in refs})
        res = froc(cands, refs, scan_ids)
        output.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output / "froc.json", json.dumps(res.to_dict(), indent=2) + "\n")
        plot_froc(res, output / "froc.png", title=f"FROC ({res.num_scans} scans)")
        rates = ", ".join(f"{k:g}: {v:.3f}" for k, v in res.sensitivity_at.items())
        typer.echo(f"CPM {res.cpm:.4f} ({res.num_detected}/{res.num_references} reference "
                   f"findings hit, {res.num_scans} scans); sensitivity at FPs/scan {rates}")
