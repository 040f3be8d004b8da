"""``medinfer slices export`` and ``medinfer slices reconstruct``.

Input errors raise :class:`medinfer.errors.MedinferError` (exit code 2 in
:func:`medinfer.cli.main`); documented fallbacks print ``medinfer: warning: ...`` on
stderr and are recorded in the summary JSON.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from medinfer.slices.defaults import DEFAULT_INFERENCE_DIR, DEFAULT_OUTPUT, DEFAULT_PREDICTIONS

slices_app = typer.Typer(
    name="slices",
    help="Export 3D scans as 2D PNG slices; rebuild per-slice polygon predictions into 3D masks.",
    no_args_is_help=True,
)


@contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                sys.stderr.write(f"medinfer: warning: {w.message}\n")
            sys.stderr.flush()


@slices_app.command("export")
def export_cmd(
    scan: Path = typer.Argument(..., help="Scan (NIfTI, ...) or label volume with --labels."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for PNGs + metadata JSON."),
    axis: str = typer.Option("axial", "--axis", help="axial | coronal | sagittal."),
    window: str = typer.Option(
        "auto",
        "--window",
        help="auto | minmax | brain | subdural | soft-tissue | mediastinum | liver | lung | "
        "bone | spine | CENTER,WIDTH (e.g. --window=40,80).",
    ),
    labels: bool = typer.Option(
        False, "--labels", help="Label volume: pixel value = label id, no windowing."
    ),
    patient_id: str | None = typer.Option(
        None, "--patient-id", "--patient_id", help="File name prefix (default: scan file name)."
    ),
) -> None:
    """Write {patient_id}_slice{index:04d}.png and {patient_id}_export.json."""
    from medinfer.slices.export import export_slices

    with _warnings_to_stderr():
        res = export_slices(
            scan, output, axis=axis, window=window, labels=labels, patient_id=patient_id
        )
    m = res.mapping
    typer.echo(
        f"{res.patient_id}: {len(res.slice_paths)} {m.axis.value} slices "
        f"{m.width}x{m.height} -> {output} (metadata {res.metadata_path.name})"
    )


@slices_app.command("reconstruct")
def reconstruct_cmd(
    predictions: Path = typer.Option(
        Path(DEFAULT_PREDICTIONS),
        "--predictions",
        help="Folder of per-slice JSON files {patient_id}_slice{index}.json.",
    ),
    output: Path = typer.Option(
        Path(DEFAULT_OUTPUT),
        "--output",
        "-o",
        help="Output folder (or a .nii.gz file with --patient_id).",
    ),
    inference_dir: Path = typer.Option(
        Path(DEFAULT_INFERENCE_DIR),
        "--inference_dir",
        "--inference-dir",
        help="Folder with the original scans ({id}.nii.gz, {id}.nii, DICOM folder {id}/) "
        "and/or export metadata.",
    ),
    patient_id: str | None = typer.Option(
        None, "--patient_id", "--patient-id", help="Only this patient (default: all found)."
    ),
    original_image: Path | None = typer.Option(
        None,
        "--original_image",
        "--original-image",
        help="Original scan of --patient_id (skips the search).",
    ),
    metadata: Path | None = typer.Option(
        None, "--metadata", help="Export metadata JSON of --patient_id (default: searched)."
    ),
    label_table: Path | None = typer.Option(
        None,
        "--label_table",
        "--label-table",
        help="Label table JSON/YAML (default: spine labels 0-4).",
    ),
    axis: str | None = typer.Option(
        None, "--axis", help="Slicing axis when no export metadata exists (default axial)."
    ),
    on_unknown_class: str = typer.Option(
        "error",
        "--on_unknown_class",
        "--on-unknown-class",
        help="error | ignore (warn and drop the polygon).",
    ),
    normalized_convention: str = typer.Option(
        "center",
        "--normalized_convention",
        "--normalized-convention",
        help="For normalized coordinates: center (x*W, Ultralytics) | edge (x*W-0.5).",
    ),
    qc: bool = typer.Option(
        True, "--qc/--no-qc", help="Write QC overlay PNGs to qc/ in the output folder."
    ),
) -> None:
    """Rebuild {patient_id}_pred_mask.nii.gz (int16, original grid) from polygon predictions."""
    from medinfer.slices.reconstruct import reconstruct

    kwargs: dict[str, Any] = {
        "output": output,
        "inference_dir": inference_dir,
        "patient_id": patient_id,
        "original_image": original_image,
        "metadata": metadata,
        "labels": label_table,
        "axis": axis,
        "on_unknown_class": on_unknown_class,
        "normalized_convention": normalized_convention,
        "qc": qc,
    }
    with _warnings_to_stderr():
        results = reconstruct(predictions, **kwargs)
    for r in results:
        typer.echo(
            f"{r.patient_id}: {r.mask_path} ({r.slices_with_predictions}/{r.num_slices} slices, "
            f"{len(r.missing_slices)} missing, {len(r.warnings)} warnings, "
            f"{len(r.qc_images)} QC images)"
        )


def main(argv: list[str] | None = None, prog_name: str = "medinfer slices") -> None:
    """Run the ``slices`` commands alone (``python -m medinfer.slices``, and
    ``python -m medinfer.slices.reconstruct`` with ``argv = ["reconstruct", ...]``).

    Input errors exit with code 2 and one ``medinfer: error: ...`` line on stderr, as
    :func:`medinfer.cli.main`.
    """
    from medinfer.errors import MedinferError

    args = sys.argv[1:] if argv is None else argv
    try:
        slices_app(args=args, prog_name=prog_name)
    except MedinferError as exc:
        sys.stderr.write(f"medinfer: error: {exc}\n")
        raise SystemExit(2) from None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        sys.stderr.write(f"medinfer: error: {exc.strerror or exc}: {exc.filename}\n")
        raise SystemExit(2) from None


def register(app: typer.Typer) -> None:
    """Add the ``slices`` command group to the root app."""
    app.add_typer(slices_app, name="slices")
