"""``medinfer detect``: the PIVOT command line (``python -m src.inference.main``).

::

    medinfer detect --checkpoint M --input scan.nii.gz --output results/ [--config F]
    medinfer detect --checkpoint M --input-dir scans/ --output-dir results/ \\
        --batch-size 4 --num-workers 8

``python -m medinfer detect ...`` and ``python -m medinfer.compat.pivot.main ...`` (the
PIVOT flags without the sub-command) are the same command. Per scan ``<case>`` it writes
``<case>_detections.json``, ``<case>_heatmap.nii.gz``, ``<case>_visualization.png`` and
what the config's ``output`` section adds (see :mod:`medinfer.detection`); a folder run
also writes ``batch_summary.json`` / ``.csv``. Argument handling only: the work is
:func:`medinfer.detection.predict_detection`.

This module also offers the PIVOT ``src.inference.main`` Python names
(:class:`InferencePipeline`, :func:`batch_inference`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from medinfer.compat.pivot import InferencePipeline, batch_inference

__all__ = ["InferencePipeline", "batch_inference", "main", "register"]

#: the PIVOT quick start writes these three files per scan
QUICKSTART_FORMATS = ("json", "heatmap", "png")


def _findings_table(row: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{row['scan_id']}: {row['num_detections']} finding(s)",
                  title_justify="left")
    for col in ("id", "RAS x, y, z (mm)", "diameter (mm)", "confidence", "risk"):
        table.add_column(col)
    for d in row["detections"]:
        c = d["coordinates"]
        table.add_row(str(d["id"]), f"{c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f}",
                      f"{d['diameter_mm']:.1f}", f"{d['confidence']:.3f}",
                      str(d["triage"]["risk_category"] or "-"))
    return table


def run_detect(*, checkpoint: str | None, inputs: list[Path], output_dir: Path,
               config: Path | None, batch_size: int | None, num_workers: int | None,
               device: str, verbose: bool) -> dict[str, Any]:
    """Run the detection on ``inputs`` with a progress bar; print each scan's findings
    table and the batch summary (stdout). Returns the batch summary."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from medinfer.detection import predict_detection

    out, err = Console(), Console(stderr=True)
    overrides: dict[str, Any] = {"batch_size": batch_size}
    if config is None:
        overrides["output.formats"] = list(QUICKSTART_FORMATS)
        overrides["output.confidence_distribution"] = False
    rows: list[dict[str, Any]] = []

    def on_case(row: dict[str, Any]) -> None:
        rows.append(row)
        out.print(_findings_table(row))
        if verbose:
            out.print("  " + ", ".join(Path(p).name for p in row["outputs"].values()))

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), console=err,
                  transient=not verbose) as bar:
        task = bar.add_task("detect", total=1.0)

        def progress(stage: str, frac: float) -> None:
            bar.update(task, completed=frac, description=stage)

        summary = predict_detection(inputs, checkpoint, config, output_dir, device, overrides,
                                    progress, num_workers=num_workers, on_case=on_case)
    out.print(f"Processed {summary['num_scans']} scans")
    out.print(f"Total detections: {summary['total_detections']}")
    out.print(f"Average processing time: {summary['avg_time']:.2f}s")
    out.print(f"Outputs written to {Path(output_dir).resolve()}")
    return summary


def register(app: typer.Typer) -> None:
    """Add ``detect`` to the root app."""

    @app.command("detect")
    def detect(
        checkpoint: str | None = typer.Option(
            None, "--checkpoint", "--model", "-m",
            help="TorchScript file, state dict .pt/.pth (with model.architecture in --config), "
                 "model folder or bundled model name (demo-nodules). Default: the config's "
                 "model.checkpoint / model.name."),
        input_: list[Path] | None = typer.Option(
            None, "--input", "-i", help="Scan file (NIfTI, DICOM folder ...); repeatable."),
        output: Path | None = typer.Option(None, "--output", "-o", help="Results folder."),
        input_dir: Path | None = typer.Option(
            None, "--input-dir", help="Folder of scans (batch)."),
        output_dir: Path | None = typer.Option(
            None, "--output-dir", help="Results folder of a batch (same as --output)."),
        config: Path | None = typer.Option(
            None, "--config", "-c", help="Detection config YAML (PIVOT or medinfer keys)."),
        batch_size: int | None = typer.Option(
            None, "--batch-size", min=1, help="Windows per network call (inference.batch_size)."),
        num_workers: int | None = typer.Option(
            None, "--num-workers", min=1, max=256,
            help="Threads reading and writing scans while the network runs."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
        verbose: bool = typer.Option(False, "--verbose", "-v",
                                     help="Keep the progress bar; list the files written."),
    ) -> None:
        """Detect findings (PIVOT CLI): JSON, heat map and figure per scan."""
        from medinfer.errors import ConfigError

        inputs = list(input_ or []) + ([input_dir] if input_dir is not None else [])
        if not inputs:
            raise ConfigError("detect: give --input SCAN or --input-dir FOLDER")
        if output is not None and output_dir is not None and output != output_dir:
            raise ConfigError(f"detect: --output {output} and --output-dir {output_dir} "
                              "differ; give one")
        dest = output or output_dir
        if dest is None:
            raise ConfigError("detect: give --output (or --output-dir) FOLDER")
        run_detect(checkpoint=checkpoint, inputs=inputs, output_dir=dest, config=config,
                   batch_size=batch_size, num_workers=num_workers, device=device,
                   verbose=verbose)


def main(argv: list[str] | None = None) -> None:
    """``python -m medinfer.compat.pivot.main FLAGS`` = ``medinfer detect FLAGS``."""
    from medinfer.cli import main as cli_main

    cli_main(["detect", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
