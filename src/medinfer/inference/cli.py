"""CLI sub-commands of the inference layer: ``medinfer predict``.

``medinfer predict INPUT... --model PATH_OR_NAME -o OUTDIR`` runs a model on scans and
writes, per case, ``<case>_seg.nii.gz`` (label map on the exact source grid, NIfTI
intent NIFTI_INTENT_LABEL, the source's qform/sform codes), ``<case>_seg.ctbl`` (3D
Slicer colour table: load it with the label map, names and colours from the model card),
``<case>_seg.label.txt`` (ITK-SNAP label description: Segmentation > Import Label
Descriptions), ``<case>_stats.json`` (per-label voxels and mL, timings, model, input
geometry, the list of outputs), and on
request ``<case>_prob.nii.gz`` and ``<case>_overlay.png``. Every file of a case is
written atomically and only once the whole case has succeeded.

Inputs: NIfTI files; folders of NIfTI files (each file one case); DICOM files; DICOM
folders (a folder without NIfTI files directly inside is one DICOM case, read
recursively; ``--series UID`` picks a series). Case names are stable case ids
(:mod:`medinfer.batch`): the file name (``.nii``/``.nii.gz`` stripped) or, for DICOM,
PatientID + StudyDate + SeriesNumber + a hash of the SeriesInstanceUID (``--name-by``);
outputs of an earlier run are never replaced without ``--overwrite``; many cases run
with ``--keep-going``, ``--continue``, ``--num-parts/--part-id``, ``--num-workers``,
``--devices`` or ``--ray`` and leave a run manifest (``run.json``, ``cases.csv``).

Detection models (card ``task: detection``) and ``--config`` runs are delegated to
:func:`medinfer.detection.predict_detection`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from medinfer.batch import BatchResult
    from medinfer.io.dicom_export import DicomOutputOptions
    from medinfer.models.card import ModelCard
    from medinfer.prediction import Prediction
    from medinfer.volume import Volume

log = logging.getLogger(__name__)

DEFAULT_MODEL = "demo-brain"
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class CaseInput:
    """One case to run: a NIfTI file, a DICOM file or a DICOM folder."""

    path: Path
    kind: str  # "nifti" | "dicom"


def _is_nifti_name(p: Path) -> bool:
    return p.name.lower().endswith(_NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """``"brain.nii.gz"`` -> ``"brain"``; other names unchanged."""
    low = name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def discover_cases(inputs: list[Path]) -> list[CaseInput]:
    """Expand CLI inputs into cases (see module docstring), in the given order.

    A folder with NIfTI files directly inside gives one case per file (sorted by name);
    any other folder is one DICOM case.

    Raises
    ------
    InvalidImageError
        An input does not exist.
    """
    from medinfer.errors import InvalidImageError

    cases: list[CaseInput] = []
    for p in inputs:
        if not p.exists():
            raise InvalidImageError(f"{p}: no such file or folder")
        if p.is_dir():
            niftis = sorted(
                c for c in p.iterdir()
                if c.is_file() and not c.name.startswith(".") and _is_nifti_name(c)
            )
            if niftis:
                cases.extend(CaseInput(c, "nifti") for c in niftis)
            else:
                cases.append(CaseInput(p, "dicom"))
        else:
            cases.append(CaseInput(p, "nifti" if _is_nifti_name(p) else "dicom"))
    return cases


def case_summary(case: CaseInput, name: str, volume: Volume, pred: Prediction,
                 card: ModelCard, outputs: dict[str, str]) -> dict[str, Any]:
    """The ``<case>_stats.json`` content (JSON-serialisable)."""
    return {
        "case": name,
        "input": str(case.path),
        "model": {"name": card.name, "version": card.version, "task": card.task.value},
        "labels": [s.to_dict() for s in pred.statistics],
        "timings_s": {k: round(v, 4) for k, v in pred.timings.items()},
        "input_geometry": {
            "shape": list(volume.spatial_shape),
            "channels": volume.num_channels,
            "spacing_mm": [float(s) for s in volume.spacing],
            "orientation": volume.orientation,
            "affine_ras": volume.affine.tolist(),
            "series_instance_uid": volume.meta.get("series_instance_uid"),
        },
        "outputs": outputs,
    }


def write_case(out_dir: Path, name: str, case: CaseInput, volume: Volume,
               pred: Prediction, card: ModelCard, *, overlay: bool,
               extra: dict[str, Any] | None = None,
               dicom: DicomOutputOptions | None = None,
               prob_dtype: str = "uint8") -> dict[str, Path]:
    """Write all outputs of one case; all-or-nothing (temporary files renamed at the end).

    ``dicom``: DICOM SEG / RTSTRUCT outputs (:mod:`medinfer.io.dicom_export`; default: a
    SEG for DICOM inputs). ``prob_dtype``: storage of ``<case>_prob.nii.gz``, ``uint8``
    (``scl_slope`` 1/255, default) or ``float32``
    (:mod:`medinfer.inference.outputs`).

    Returns the written paths by kind (``seg``, ``colour_table``, ``label_description``,
    ``prob``, ``stats``, ``overlay``).
    """
    import json

    from medinfer import io
    from medinfer._atomic import atomic_paths
    from medinfer.inference.outputs import compact_probabilities
    from medinfer.io.nifti import derived_from

    paths = {"seg": out_dir / f"{name}_seg.nii.gz", "stats": out_dir / f"{name}_stats.json",
             "colour_table": out_dir / f"{name}_seg.ctbl",
             "label_description": out_dir / f"{name}_seg.label.txt"}
    if pred.probabilities is not None:
        paths["prob"] = out_dir / f"{name}_prob.nii.gz"
    if overlay:
        paths["overlay"] = out_dir / f"{name}_overlay.png"
    save_overlay_png = _overlay_function() if overlay else None
    from medinfer.io.dicom_export import plan_case_outputs

    dicom_plan = plan_case_outputs(out_dir, name, case.path, case.kind == "dicom", volume, pred,
                                   card, dicom)
    paths.update(dicom_plan.paths)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_paths(paths))  # all files land together or none
        dicom_plan.write(tmp)
        io.save(derived_from(pred.label, volume, label_map=True), tmp["seg"])
        table = card_label_table(card)
        tmp["colour_table"].write_text(table.to_ctbl(), encoding="utf-8")
        tmp["label_description"].write_text(table.to_itksnap(), encoding="utf-8")
        if pred.probabilities is not None:
            io.save(compact_probabilities(derived_from(pred.probabilities, volume),
                                          prob_dtype), tmp["prob"])
        if save_overlay_png is not None:
            save_overlay_png(volume, pred.label, tmp["overlay"], card.colors(),
                             names={v: s.name for v, s in card.labels.items()}, title=name)
        summary = case_summary(case, name, volume, pred, card,
                               {k: p.name for k, p in paths.items()})
        summary.update(extra or {})  # case id, source, model hash, settings (medinfer.batch)
        tmp["stats"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return paths


def card_label_table(card: ModelCard) -> Any:
    """The card's labels (value -> name, colour) as a :class:`~medinfer.slices.labels.LabelTable`.

    It writes the 3D Slicer colour table ``<case>_seg.ctbl`` and the ITK-SNAP label
    description ``<case>_seg.label.txt`` beside each label map.
    """
    from medinfer.slices.labels import LabelTable

    return LabelTable.from_mapping(
        {v: {"name": s.name, "color": list(s.color)} for v, s in card.labels.items()},
        source=f"model card {card.name!r} labels",
    )


def _overlay_function() -> Any:
    from medinfer.errors import ConfigError

    try:
        from medinfer.reporting.overlay import save_overlay_png
    except ImportError as exc:
        raise ConfigError(f"--overlay: the overlay writer is not available ({exc})") from None
    return save_overlay_png


def _label_table(name: str, pred: Prediction) -> Any:
    from rich.table import Table

    table = Table(title=f"{name}: label volumes",
                  caption=f"model {pred.model_name} {pred.model_version}")
    table.add_column("label", justify="right")
    table.add_column("name")
    table.add_column("voxels", justify="right")
    table.add_column("volume (mL)", justify="right")
    for s in pred.statistics:
        table.add_row(str(s.value), s.name, f"{s.voxels:,}", f"{s.volume_ml:.2f}")
    return table


def _timings_line(timings: dict[str, float]) -> str:
    return "timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())


def run_predict(
    inputs: list[Path],
    *,
    model: str | None,
    output_dir: Path,
    series: str | None = None,
    device: str = "auto",
    tta: bool | None = None,
    overlap: float | None = None,
    batch_size: int | None = None,
    save_probabilities: bool = False,
    overlay: bool = False,
    config: Path | None = None,
    verbose: bool = False,
    console: Console | None = None,
    folds: list[str] | None = None,
    checkpoint: str = "final",
    trust_model_code: bool = False,
    stream: bool = True,
    keep_going: bool | None = None,
    skip_existing: bool = False,
    overwrite: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    num_workers: int = 1,
    name_by: str = "uid",
    devices: str | list[str] | None = None,
    ray: str | None = None,
    ray_options: dict[str, Any] | None = None,
    dicom: DicomOutputOptions | None = None,
    force: bool = False,
    prob_dtype: str = "uint8",
) -> BatchResult:
    """The body of ``medinfer predict`` (usable from Python); returns written paths per case.

    ``model`` may also be an nnU-Net v2 model folder (``folds``, ``checkpoint``) or a MONAI
    bundle (needs ``trust_model_code``); see :func:`medinfer.formats.open_predictor`.
    ``stream`` runs medinfer cards through the streaming engine (same labels, peak memory
    of one slab). Cases are pipelined: case n+1 is read and case n-1 written while case n
    is inferred (:func:`medinfer.inference.batch.run_batch`).

    Cohort options (:mod:`medinfer.batch`): ``keep_going`` (default on for more than one
    case: a failed case is recorded, the rest continue), ``skip_existing`` (``--continue``),
    ``overwrite``, ``num_parts`` / ``part_id``, ``num_workers`` (reader / writer threads,
    0 = sequential), ``name_by`` (``uid`` | ``description`` | ``path``), ``devices``
    (``"cuda:0,cuda:1"``: one model per device), ``ray`` (a Ray address, ``""`` = default;
    ``ray_options`` for :func:`medinfer.distributed.run_on_ray`).
    ``dicom``: DICOM SEG / RTSTRUCT / SR outputs (:mod:`medinfer.io.dicom_export`).
    ``force``: run scans that do not fit the model card's input contract (modality,
    intensities, slice count) even where the card refuses them
    (:mod:`medinfer.inference.contract`; mismatches are warned about either way).
    ``prob_dtype``: ``uint8`` (default, ``scl_slope`` 1/255) or ``float32`` storage of
    ``<case>_prob.nii.gz``.
    The returned list has ``.summary`` (counts, manifest path, case rows) and
    ``.exit_code`` (0, 3 some cases failed, 2 all failed).

    Raises
    ------
    MedinferError
        Any bad input (image, model, option); without ``keep_going`` the failing case's
        error (unexpected exceptions as :class:`medinfer.batch.CaseFailedError`); no
        output file of the failing case exists.
    """
    from medinfer.inference.precheck import precheck_inputs

    precheck_inputs(inputs)  # bad files fail here, before torch and the model are loaded
    from medinfer.errors import parse_enum
    from medinfer.inference.outputs import ProbDtype

    prob_dtype = parse_enum(ProbDtype, prob_dtype, "--prob-dtype").value
    from rich.console import Console

    from medinfer.errors import ConfigError
    from medinfer.models.card import Task
    from medinfer.models.loaders import resolve_device, resolve_model
    from medinfer.models.monai_bundle import is_monai_bundle
    from medinfer.models.nnunet import is_nnunet_folder

    out = console or Console()
    err = Console(stderr=True)
    verbose = verbose or log.isEnabledFor(logging.INFO) or logging.getLogger().isEnabledFor(
        logging.INFO)
    resolve_device(device)  # fail early on a bad device
    if Path(output_dir).exists() and not Path(output_dir).is_dir():  # before any work
        raise ConfigError(f"--output: {output_dir} exists and is not a folder; give a folder "
                          "(created if missing)")
    overrides = {
        "series_uid": series, "tta": tta, "overlap": overlap, "batch_size": batch_size,
        "save_probabilities": save_probabilities, "overlay": overlay, "verbose": verbose,
        **({"force": True} if force else {}),
    }
    external = model is not None and (is_nnunet_folder(model) or is_monai_bundle(model))
    card: ModelCard | None = None
    if external:
        if config is not None:
            raise ConfigError("--config: applies to detection models only, not to nnU-Net "
                              "folders or MONAI bundles")
    else:
        if model is not None or config is None:
            card, _ = resolve_model(model or DEFAULT_MODEL)
        if config is not None or (card is not None and card.task is Task.DETECTION):
            _delegate_detection(inputs, model, config, output_dir, device, overrides,
                                console=out, verbose=verbose)
            if card is not None and dicom is not None and dicom.wants_sr():
                from medinfer.io.dicom_export import detection_cases, write_detection_outputs

                write_detection_outputs(detection_cases(inputs), output_dir, card, dicom,
                                        series_uid=series)
            from medinfer.batch import BatchResult

            return BatchResult()

    cases = discover_cases(inputs)
    from medinfer.batch import execute_predict

    predictor_kwargs = {
        "model": model or DEFAULT_MODEL, "device": device, "tta": tta, "overlap": overlap,
        "batch_size": batch_size, "save_probabilities": save_probabilities, "stream": stream,
        "folds": folds, "checkpoint": checkpoint, "trust_model_code": trust_model_code,
        **({"force": True} if force else {}),
    }
    # everything that changes the outputs (--continue redoes a case when these differ)
    settings = {
        "series": series, "tta": tta, "overlap": overlap, "stream": stream,
        "save_probabilities": save_probabilities, "overlay": overlay, "folds": folds,
        "checkpoint": checkpoint, "name_by": str(name_by), "prob_dtype": str(prob_dtype),
        **({"dicom": dicom.settings()} if dicom is not None else {}),
    }
    return execute_predict(
        cases, output_dir, predictor_kwargs=predictor_kwargs, settings=settings,
        series=series, overlay=overlay, keep_going=keep_going, skip_existing=skip_existing,
        overwrite=overwrite, num_parts=num_parts, part_id=part_id, num_workers=num_workers,
        name_by=name_by, devices=devices, ray=ray, ray_options=ray_options, console=out,
        err=err, verbose=verbose, label_table=_label_table,
        write_options={"prob_dtype": prob_dtype,
                       **({"dicom": dicom} if dicom is not None else {})})


def _delegate_detection(inputs: list[Path], model: str | None, config: Path | None,
                        output_dir: Path, device: str, overrides: dict[str, Any],
                        console: Console | None = None, verbose: bool = False) -> None:
    """Run the detection pipeline; print each case's findings and outputs, then totals."""
    from rich.console import Console

    from medinfer.detection import predict_detection

    out = console or Console()

    def on_case(row: dict[str, Any]) -> None:
        outputs = row.get("outputs") or {}
        names = ", ".join(sorted(Path(str(p)).name for p in outputs.values()))
        timing = (f" in {row['processing_time_seconds']:.1f} s"
                  if verbose and row.get("processing_time_seconds") is not None else "")
        out.print(f"{row.get('scan_id')}: {row.get('num_detections', 0)} finding(s){timing} "
                  f"-> {names}", markup=False, highlight=False)

    summary = predict_detection(inputs, model, config, output_dir, device, overrides,
                                on_case=on_case)
    out.print(f"{summary.get('num_scans', 0)} scan(s), {summary.get('total_detections', 0)} "
              f"finding(s); outputs in {Path(output_dir).resolve()}", markup=False,
              highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``predict`` to the root app."""

    @app.command("predict")
    def predict(
        inputs: list[Path] = typer.Argument(
            ..., help="NIfTI files, folders of NIfTI files, DICOM files or DICOM folders."),
        model: str | None = typer.Option(
            None, "--model", "-m",
            help=f"Model folder, its model.yaml, or a bundled name [default: {DEFAULT_MODEL}]."),
        output_dir: Path = typer.Option(..., "--output", "-o", help="Output folder."),
        series: str | None = typer.Option(
            None, "--series", help="SeriesInstanceUID to use from a DICOM folder."),
        allow_missing_slices: bool = typer.Option(
            False, "--allow-missing-slices",
            help="Load a DICOM series without its unreadable files (truncated, corrupt) "
                 "instead of stopping with an error naming them."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        tta: bool | None = typer.Option(
            None, "--tta/--no-tta", help="Mirroring test-time augmentation [default: card]."),
        overlap: float | None = typer.Option(
            None, "--overlap", help="Sliding-window overlap in [0, 1) [default: card]."),
        batch_size: int | None = typer.Option(
            None, "--batch-size", help="Windows per network call [default: card]."),
        save_probabilities: bool = typer.Option(
            False, "--save-probabilities", help="Also write <case>_prob.nii.gz."),
        overlay: bool = typer.Option(False, "--overlay", help="Also write <case>_overlay.png."),
        config: Path | None = typer.Option(
            None, "--config", help="Detection pipeline config (YAML)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Print per-stage timings."),
        folds: list[str] | None = typer.Option(
            None, "--folds",
            help="nnU-Net folds to ensemble, e.g. --folds 0,1,2 (or --folds 0 --folds 1) "
                 "[default: all present]."),
        checkpoint: str = typer.Option(
            "final", "--checkpoint", help="nnU-Net checkpoint: final or best."),
        trust_model_code: bool = typer.Option(
            False, "--trust-model-code",
            help="Allow a MONAI bundle's config to run its code ($ expressions, _target_)."),
        stream: bool = typer.Option(
            True, "--stream/--no-stream",
            help="Streaming engine (same labels, peak memory of one slab) or full volume."),
        keep_going: bool | None = typer.Option(
            None, "--keep-going/--no-keep-going",
            help="Record a failed case and go on (exit 3 when some failed, 2 when all) "
                 "[default: on for more than one case]."),
        skip_existing: bool = typer.Option(
            False, "--continue", "--skip-existing",
            help="Skip cases whose outputs are complete for the same model and settings."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace outputs an earlier run wrote for a case."),
        num_parts: int = typer.Option(
            1, "--num-parts", help="Split the cases into N parts (run each part anywhere)."),
        part_id: int = typer.Option(0, "--part-id", help="Which part to run, 0..N-1."),
        num_workers: int = typer.Option(
            1, "--num-workers",
            help="Reader and writer threads beside inference (0 = one case at a time)."),
        name_by: str = typer.Option(
            "uid", "--name-by",
            help="Case ids: uid (DICOM PatientID_StudyDate_S<n>_<UID hash>; NIfTI file "
                 "name), description (SeriesDescription) or path."),
        devices: str | None = typer.Option(
            None, "--devices", help="Spread cases over devices, e.g. cuda:0,cuda:1."),
        ray: str | None = typer.Option(
            None, "--ray",
            help="Run on a Ray cluster: --ray (a running local cluster or a new one), "
                 "--ray auto or --ray HOST:PORT. Needs medinfer[ray]."),
        output_format: str | None = typer.Option(
            None, "--output-format",
            help="nifti, dicom-seg, rtstruct, dicom-sr or all (comma list); NIfTI is always "
                 "written [default: nifti, plus dicom-seg for DICOM inputs]."),
        seg_type: str = typer.Option(
            "binary", "--seg-type", help="DICOM SEG type: binary or labelmap."),
        seg_compression: str = typer.Option(
            "none", "--seg-compression", help="DICOM SEG pixel encoding: none, rle, jpeg2000 "
                                              "or jpegls (lossless; rle/jpegls: labelmap)."),
        seg_metadata: Path | None = typer.Option(
            None, "--seg-metadata",
            help="Label names/colours/codes for DICOM outputs: a MITK .mitklabel.json or a "
                 "dcmqi seg-metadata.json [default: one found beside the input]."),
        dicom_reference: Path | None = typer.Option(
            None, "--dicom-reference",
            help="The DICOM series a NIfTI input came from (enables DICOM outputs for it; "
                 "the grids must match)."),
        prob_dtype: str = typer.Option(
            "uint8", "--prob-dtype",
            help="Storage of <case>_prob.nii.gz: uint8 (scl_slope 1/255, 4x smaller) or "
                 "float32 (full precision)."),
        force: bool = typer.Option(
            False, "--force",
            help="Run scans that do not fit the model card's input contract (modality, "
                 "intensities, slice count) even where the card refuses them."),
    ) -> None:
        """Run a model on scans; write label maps, statistics and (optionally) more.

        --model may be a medinfer model folder / model.yaml / bundled name, an nnU-Net v2
        model folder (<Trainer>__<Plans>__<configuration>) or a MONAI bundle folder.
        """
        from medinfer.io._missing_slices import allowing_missing_slices

        fold_list = [f for v in folds or [] for f in v.replace(",", " ").split()] or None
        from medinfer.io.dicom_export import DicomOutputOptions

        dicom = DicomOutputOptions.from_cli(output_format, seg_type, seg_compression,
                                            seg_metadata, dicom_reference)
        with allowing_missing_slices(allow_missing_slices):
            result = run_predict(
                inputs, model=model, output_dir=output_dir, series=series, device=device,
                tta=tta, overlap=overlap, batch_size=batch_size,
                save_probabilities=save_probabilities, overlay=overlay, config=config,
                verbose=verbose, folds=fold_list, checkpoint=checkpoint,
                trust_model_code=trust_model_code, stream=stream, keep_going=keep_going,
                skip_existing=skip_existing, overwrite=overwrite, num_parts=num_parts,
                part_id=part_id, num_workers=num_workers, name_by=name_by, devices=devices,
                ray=ray, dicom=dicom, force=force, prob_dtype=prob_dtype)
        if result.exit_code:
            raise typer.Exit(result.exit_code)
