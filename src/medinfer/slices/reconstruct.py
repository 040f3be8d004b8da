"""Rebuild per-slice polygon predictions into a 3D label volume on the original grid.

For each patient: read ``{patient_id}_slice{index}.json`` files (schema in
:mod:`medinfer.slices.predictions`), fill the polygons of every class onto the slice
grid (:mod:`medinfer.slices.raster`: pixel centre inside or on the polygon), undo
the export's display rotation/flip (:class:`~medinfer.slices.geometry.SliceMapping`),
stack the slices and write an int16 NIfTI with the original image's affine and
header. Beside the mask: a 3D Slicer colour table (``.ctbl``), a label description
JSON and a summary JSON.

Documented behaviour (never a silently wrong mask):

- **overlaps**: polygons are painted in ascending ``(confidence, class_id, file
  order)``; the last painted wins, i.e. higher confidence wins, at equal (or no)
  confidence the higher class id wins. A missing confidence counts as 1.0.
- **missing slices** (no prediction file for an index): background, listed in the
  summary (``missing_slices``) and in a warning.
- **polygon partly outside the image** (vertex beyond ``[-0.5, W-0.5] x [-0.5,
  H-0.5]``): clipped to the image, warning.
- **polygon with fewer than 3 vertices**: ignored, warning.
- **unknown class id** (not in the label table): error by default
  (``on_unknown_class="error"``); ``"ignore"`` drops the polygon with a warning.
- **malformed JSON / schema violation / wrong image size / slice index outside
  the grid / patient id that disagrees with the file name**: :class:`MedinferError`
  naming the file.
- **no original image found**: the export metadata's affine and shape are used
  (NIfTI header built from the affine), with a warning; neither found: error.
- **original and export metadata disagree** (shape or affine): error.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medinfer._atomic import atomic_path, write_text_atomic
from medinfer.errors import (
    ConfigError,
    GeometryError,
    MedinferError,
    ResourceLimitError,
    parse_enum,
)
from medinfer.slices.defaults import DEFAULT_INFERENCE_DIR, DEFAULT_OUTPUT, DEFAULT_PREDICTIONS
from medinfer.slices.export import metadata_name, read_export_metadata, strip_image_suffix
from medinfer.slices.geometry import SliceAxis, SliceMapping, mapping_from_affine
from medinfer.slices.labels import LabelTable
from medinfer.slices.predictions import (
    NormalizedConvention,
    SlicePrediction,
    find_prediction_files,
    parse_prediction_file,
)
from medinfer.slices.qc import DEFAULT_QC_SLICES, write_qc_overlays
from medinfer.slices.raster import fill_polygon, outside_extent

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_MASK_SUFFIX = "_pred_mask"
#: refuse to allocate masks larger than this (voxels; int16 -> 2 GB)
_MAX_VOXELS = 1_000_000_000


class SliceReconstructionWarning(UserWarning):
    """A reconstruction went on with a documented fallback (missing slices, clipping...)."""


class UnknownClassPolicy(StrEnum):
    """What to do with a class id that is not in the label table."""

    ERROR = "error"
    IGNORE = "ignore"


@dataclass
class PatientResult:
    """Outcome of one patient's reconstruction (all paths absolute or as given)."""

    patient_id: str
    mask_path: Path | None = None
    original_image: Path | None = None
    metadata_path: Path | None = None
    affine_source: str = ""
    num_slices: int = 0
    slices_with_predictions: int = 0
    missing_slices: list[int] = field(default_factory=list)
    num_polygons: int = 0
    voxels_per_label: dict[int, int] = field(default_factory=dict)
    voxel_volume_ml: float = 0.0
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    qc_images: list[Path] = field(default_factory=list)

    def to_dict(self, labels: LabelTable | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "patient_id": self.patient_id,
            "mask": None if self.mask_path is None else str(self.mask_path),
            "original_image": None if self.original_image is None else str(self.original_image),
            "export_metadata": None if self.metadata_path is None else str(self.metadata_path),
            "affine_source": self.affine_source,
            "num_slices": self.num_slices,
            "slices_with_predictions": self.slices_with_predictions,
            "num_missing_slices": len(self.missing_slices),
            "missing_slices": self.missing_slices,
            "num_polygons": self.num_polygons,
            "voxels_per_label": {
                str(k): {
                    "name": labels[k].name if labels is not None and k in labels else None,
                    "voxels": v,
                    "volume_ml": v * self.voxel_volume_ml,
                }
                for k, v in sorted(self.voxels_per_label.items())
            },
            "warnings": self.warnings,
            "qc_images": [str(p) for p in self.qc_images],
        }
        if self.error is not None:
            d["error"] = self.error
        return d


def _ranges(indices: Sequence[int]) -> str:
    """Compact text of sorted indices: ``0-3, 7, 9-10``."""
    out: list[str] = []
    idx = sorted(indices)
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ", ".join(out)


class _Reporter:
    def __init__(self, result: PatientResult) -> None:
        self.result = result

    def warn(self, message: str) -> None:
        self.result.warnings.append(message)
        warnings.warn(message, SliceReconstructionWarning, stacklevel=3)


# --------------------------------------------------------------------- rasterising
def rasterize_slice(
    pred: SlicePrediction,
    height: int,
    width: int,
    labels: LabelTable,
    on_unknown_class: UnknownClassPolicy | str = UnknownClassPolicy.ERROR,
    warn: Any = None,
) -> npt.NDArray[np.int16]:
    """Label image ``(height, width)`` int16 of one slice's polygons (rules: module doc).

    Parameters
    ----------
    pred : parsed prediction file (pixel coordinates).
    height, width : slice grid size; must equal the file's image_height/width.
    labels : allowed class ids.
    on_unknown_class : ``"error"`` or ``"ignore"`` (drop with a warning).
    warn : callable(str) for warnings; default :func:`warnings.warn`.

    Raises
    ------
    MedinferError
        Image size mismatch, or an unknown class id with ``on_unknown_class="error"``.
    """
    policy = parse_enum(UnknownClassPolicy, on_unknown_class, "on_unknown_class")
    if warn is None:

        def warn(msg: str) -> None:
            warnings.warn(msg, SliceReconstructionWarning, stacklevel=2)

    if (pred.image_width, pred.image_height) != (width, height):
        raise MedinferError(
            f"{pred.path}: image size {pred.image_width}x{pred.image_height} (WxH) does not "
            f"match the exported slice grid {width}x{height}; wrong --axis or wrong original?"
        )
    out = np.zeros((height, width), dtype=np.int16)

    def key(p: Any) -> tuple[float, int, int]:
        return (1.0 if p.confidence is None else p.confidence, p.class_id, p.order)

    for poly in sorted(pred.polygons, key=key):
        if poly.class_id not in labels:
            msg = (
                f"{pred.path}: predictions/{poly.order}: class_id {poly.class_id} is not in "
                f"the label table (known: {labels.values})"
            )
            if policy is UnknownClassPolicy.ERROR:
                raise MedinferError(msg + "; pass a label table or on_unknown_class='ignore'")
            warn(msg + "; polygon ignored")
            continue
        if poly.outer.shape[0] < 3:
            warn(
                f"{pred.path}: predictions/{poly.order}: polygon with "
                f"{poly.outer.shape[0]} vertices ignored"
            )
            continue
        if outside_extent(poly.outer, height, width):
            warn(
                f"{pred.path}: predictions/{poly.order}: polygon extends beyond the "
                f"{width}x{height} image; clipped"
            )
        mask = fill_polygon(poly.outer, height, width, [h for h in poly.holes if len(h) >= 3])
        out[mask] = poly.class_id
    return out


# ---------------------------------------------------------------- finding inputs
def _looks_like_dicom_dir(folder: Path, limit: int = 50) -> bool:
    """True if one of the first ``limit`` entries under ``folder`` (recursive, so a series
    in a sub-folder counts) is a DICOM file (suffix or preamble)."""
    for n, child in enumerate(folder.rglob("*")):
        if n >= limit:
            break
        if not child.is_file():
            continue
        if child.suffix.lower() == ".dcm":
            return True
        if child.suffix == "" and child.stat().st_size > 132:
            with child.open("rb") as fh:
                if fh.read(132)[128:] == b"DICM":
                    return True
    return False


def _candidate_images(folder: Path, names: set[str]) -> list[Path]:
    found = []
    for p in sorted(folder.rglob("*")):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.name.lower().endswith(_IMAGE_SUFFIXES):
            stem = strip_image_suffix(p.name)
        elif p.is_dir() and p.name in names and _looks_like_dicom_dir(p):
            stem = p.name
        else:
            continue
        if stem.endswith(_MASK_SUFFIX):
            continue
        if stem in names:
            found.append(p)
    return found


def find_original_image(
    patient_id: str,
    inference_dir: str | os.PathLike[str] | None,
    metadata: dict[str, Any] | None = None,
) -> Path | None:
    """Locate the original scan of ``patient_id``.

    Search order: in ``inference_dir`` (recursive) an image file (``.nii``, ``.nii.gz``,
    ``.nrrd``, ``.mha``, ``.mhd``) or a DICOM folder (holding ``.dcm`` files or files
    with the DICM preamble) named
    ``{patient_id}``, ``{patient_id}_0000`` (nnU-Net) or the metadata's source file
    name; then the metadata's ``source`` path itself. Files ending in ``_pred_mask``
    are never taken.

    Raises
    ------
    MedinferError
        Several different files match (ambiguous); the message lists them.
    """
    names = {patient_id, f"{patient_id}_0000"}
    src = metadata.get("source") if metadata else None
    if src:
        names.add(strip_image_suffix(Path(src).name))
    if inference_dir is not None and Path(inference_dir).is_dir():
        found = _candidate_images(Path(inference_dir), names)
        if len(found) > 1:
            exact = [p for p in found if strip_image_suffix(p.name) == patient_id]
            if len(exact) == 1:
                return exact[0]
            listed = ", ".join(str(p) for p in found)
            raise MedinferError(
                f"patient {patient_id!r}: several candidate original images in "
                f"{inference_dir}: {listed}; pass --original-image"
            )
        if found:
            return found[0]
    if src and Path(src).exists():
        return Path(src)
    return None


def find_metadata(patient_id: str, folders: Sequence[str | os.PathLike[str] | None]) -> Path | None:
    """The export metadata ``{patient_id}_export.json`` found in ``folders`` (recursive).

    An image export (``"content": "image"``) is preferred over a label export; among
    equals the first folder, then the shallowest path wins.
    """
    name = metadata_name(patient_id)
    found: list[Path] = []
    for folder in folders:
        if folder is None or not Path(folder).is_dir():
            continue
        hits = [p for p in Path(folder).rglob(name) if p.is_file()]
        found.extend(sorted(hits, key=lambda p: (len(p.parts), str(p))))
    for p in found:
        try:
            if json.loads(p.read_text(encoding="utf-8")).get("content") == "image":
                return p
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
    return found[0] if found else None


# ------------------------------------------------------------------ writing
def _write_mask(
    mask: npt.NDArray[np.int16], affine: npt.NDArray[np.float64], original: Path | None, out: Path
) -> Path:
    """Write the int16 mask; NIfTI originals lend their header (sform/qform codes, units)."""
    import nibabel as nib

    from medinfer import io
    from medinfer.volume import Volume

    if (
        original is not None
        and original.is_file()
        and original.name.lower().endswith((".nii", ".nii.gz"))
    ):
        src = nib.load(str(original))
        if isinstance(src, nib.Nifti1Image | nib.Nifti2Image) and np.allclose(
            src.affine, affine, atol=1e-5
        ):
            hdr = src.header.copy()
            img = type(src)(mask, None, header=hdr)
            img.set_data_dtype(np.int16)
            img.header.set_slope_inter(1.0, 0.0)
            img.header.set_intent("label")
            img.header["cal_min"] = 0
            img.header["cal_max"] = float(mask.max()) if mask.size else 0.0
            img.header["descrip"] = b"medinfer slices reconstruct"
            with atomic_path(out) as tmp:
                nib.save(img, str(tmp))
            return out
    return io.save(Volume(mask, affine, {"intent": "label"}), out)


# ------------------------------------------------------------------ one patient
def _output_paths(output: Path, patient_id: str, single: bool) -> Path:
    if single and output.name.lower().endswith((".nii", ".nii.gz")):
        return output
    return output / f"{patient_id}{_MASK_SUFFIX}.nii.gz"


def _mask_stem(mask_path: Path) -> Path:
    name = mask_path.name
    for suf in (".nii.gz", ".nii"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
    return mask_path.with_name(name)


def reconstruct_patient(
    patient_id: str,
    prediction_files: dict[int, Path],
    mask_path: str | os.PathLike[str],
    *,
    original_image: str | os.PathLike[str] | None = None,
    inference_dir: str | os.PathLike[str] | None = None,
    metadata_path: str | os.PathLike[str] | None = None,
    labels: LabelTable | None = None,
    axis: SliceAxis | str | None = None,
    on_unknown_class: UnknownClassPolicy | str = UnknownClassPolicy.ERROR,
    normalized_convention: NormalizedConvention | str = NormalizedConvention.CENTER,
    qc_dir: str | os.PathLike[str] | None = None,
    qc_slices: int = DEFAULT_QC_SLICES,
) -> PatientResult:
    """Rebuild and write one patient's mask (see :func:`reconstruct` for the rules).

    ``qc_dir``: folder for the QC overlay PNGs (:mod:`medinfer.slices.qc`); None = none.
    Returns a :class:`PatientResult`; raises :class:`MedinferError` on any error.
    """
    from medinfer import io

    table = labels if labels is not None else LabelTable.default()
    result = PatientResult(patient_id=patient_id)
    rep = _Reporter(result)
    meta: dict[str, Any] | None = None
    mapping: SliceMapping | None = None
    if metadata_path is not None:
        result.metadata_path = Path(metadata_path)
        meta, mapping = read_export_metadata(metadata_path)
        if meta.get("patient_id") not in (None, patient_id):
            rep.warn(
                f"{metadata_path}: metadata is for patient {meta.get('patient_id')!r}, "
                f"used for {patient_id!r}"
            )
        if axis is not None and parse_enum(SliceAxis, axis, "axis") is not mapping.axis:
            raise ConfigError(
                f"axis {axis!r} disagrees with the export metadata {metadata_path} "
                f"({mapping.axis.value!r})"
            )
    original: Path | None
    if original_image is not None:
        original = Path(original_image)
        if not original.exists():
            raise MedinferError(f"original image {original}: no such file or folder")
    else:
        original = find_original_image(patient_id, inference_dir, meta)
    result.original_image = original

    vol = None
    if original is not None:
        vol = io.load(original)
        affine = vol.affine
        shape = vol.spatial_shape
        result.affine_source = f"original image {original}"
        if mapping is not None and meta is not None:
            meta_aff = np.asarray(meta["affine"], dtype=np.float64)
            if tuple(mapping.shape) != shape or not np.allclose(meta_aff, affine, atol=1e-4):
                raise GeometryError(
                    f"patient {patient_id!r}: original image {original} (shape {shape}) does "
                    f"not match the export metadata {metadata_path} (shape "
                    f"{list(mapping.shape)}, affine differs: "
                    f"{not np.allclose(meta_aff, affine, atol=1e-4)})"
                )
        else:
            mapping = mapping_from_affine(affine, shape, axis or SliceAxis.AXIAL)
    elif mapping is not None and meta is not None:
        affine = np.asarray(meta["affine"], dtype=np.float64)
        shape = mapping.shape
        result.affine_source = f"export metadata {metadata_path}"
        rep.warn(
            f"patient {patient_id!r}: original image not found (searched "
            f"{inference_dir or 'no inference folder'} and the metadata source "
            f"{meta.get('source')!r}); using the affine of {metadata_path}, NIfTI header "
            "fields other than the affine are not copied"
        )
    else:
        raise MedinferError(
            f"patient {patient_id!r}: neither the original image nor the export metadata "
            f"{metadata_name(patient_id)} found (inference folder: {inference_dir}); pass "
            "--original-image or --inference-dir"
        )

    n, h, w = mapping.num_slices, mapping.height, mapping.width
    if n * h * w > _MAX_VOXELS:
        raise ResourceLimitError(
            f"patient {patient_id!r}: grid {mapping.shape} has {n * h * w} voxels, more than "
            f"{_MAX_VOXELS}"
        )
    bad = sorted(i for i in prediction_files if i >= n)
    if bad:
        raise MedinferError(
            f"patient {patient_id!r}: prediction files for slices {_ranges(bad)} but the "
            f"{mapping.axis.value} grid has {n} slices (0-{n - 1}): "
            f"{prediction_files[bad[0]]}"
        )
    stack = np.zeros((n, h, w), dtype=np.int16)
    parsed: dict[int, SlicePrediction] = {}
    for index in sorted(prediction_files):
        pred = parse_prediction_file(prediction_files[index], normalized_convention)
        stack[index] = rasterize_slice(pred, h, w, table, on_unknown_class, warn=rep.warn)
        result.num_polygons += len(pred.polygons)
        parsed[index] = pred
    result.num_slices = n
    result.slices_with_predictions = len(prediction_files)
    result.missing_slices = [i for i in range(n) if i not in prediction_files]
    if result.missing_slices:
        rep.warn(
            f"patient {patient_id!r}: no prediction file for {len(result.missing_slices)} of "
            f"{n} slices ({_ranges(result.missing_slices)}); filled as background"
        )
    mask = np.ascontiguousarray(mapping.from_slices(stack))
    values, counts = np.unique(mask, return_counts=True)
    result.voxels_per_label = {int(v): int(c) for v, c in zip(values, counts, strict=True)}
    result.voxel_volume_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0

    out = Path(mask_path)
    _write_mask(mask, affine, original, out)
    result.mask_path = out
    stem = _mask_stem(out)
    table.write_ctbl(stem.with_suffix(".ctbl"))
    description = {
        **table.to_json_dict(),
        "mask": out.name,
        "colour_table": stem.with_suffix(".ctbl").name,
        "dtype": "int16",
        "background": 0,
    }
    write_text_atomic(
        stem.with_name(stem.name + "_labels.json"), json.dumps(description, indent=2) + "\n"
    )
    if qc_dir is not None:
        image_slices = mapping.to_slices(vol.channel(0)) if vol is not None else None
        result.qc_images = write_qc_overlays(
            patient_id, stack, parsed, table, qc_dir, image_slices, qc_slices
        )
    write_text_atomic(
        stem.with_name(stem.name + "_summary.json"),
        json.dumps(result.to_dict(table), indent=2) + "\n",
    )
    return result


# ------------------------------------------------------------------ public API
def reconstruct(
    predictions: str | os.PathLike[str] = DEFAULT_PREDICTIONS,
    *,
    output: str | os.PathLike[str] = DEFAULT_OUTPUT,
    inference_dir: str | os.PathLike[str] | None = DEFAULT_INFERENCE_DIR,
    patient_id: str | None = None,
    original_image: str | os.PathLike[str] | None = None,
    metadata: str | os.PathLike[str] | None = None,
    labels: LabelTable | str | os.PathLike[str] | None = None,
    axis: SliceAxis | str | None = None,
    on_unknown_class: UnknownClassPolicy | str = UnknownClassPolicy.ERROR,
    normalized_convention: NormalizedConvention | str = NormalizedConvention.CENTER,
    qc: bool = True,
    qc_slices: int = DEFAULT_QC_SLICES,
) -> list[PatientResult]:
    """Rebuild 3D int16 label volumes from per-slice polygon prediction files.

    Parameters
    ----------
    predictions : folder with ``{patient_id}_slice{index}.json`` files, the index with
        any zero padding (``_slice90``, ``_slice0090``; searched recursively; schema:
        ``medinfer/slices/prediction.schema.json``). Default
        ``outputs/inference/predictions``.
    output : folder for ``{patient_id}_pred_mask.nii.gz`` (+ ``.ctbl``,
        ``_labels.json``, ``_summary.json``); in single-patient mode also a file
        name ending in ``.nii``/``.nii.gz``. Batch mode also writes ``summary.json``.
    inference_dir : folder searched for original scans (``{id}.nii.gz``, ``{id}.nii``,
        ``.nrrd``/``.mha``/``.mhd``, a DICOM folder ``{id}/``, also ``{id}_0000`` or the
        export metadata's source name) and for the export metadata
        ``{patient_id}_export.json``. Default ``data/inference`` (skipped when absent).
    patient_id : single-patient mode; default: every patient found (batch mode).
    original_image : the original scan (single-patient mode; overrides the search).
    metadata : explicit export metadata JSON (single-patient mode); default: searched
        in ``inference_dir`` and ``predictions``.
    labels : :class:`LabelTable` or a JSON/YAML file; default spine table
        (0 background, 1 vertebra, 2 intervertebral foramen, 3 sacrum, 4 spinal canal).
    axis : slicing axis when no export metadata is found (default axial); checked
        against the metadata when both are given.
    on_unknown_class : ``"error"`` (default) or ``"ignore"`` (warning, polygon dropped).
    normalized_convention : ``"center"`` (default, ``x_px = x * W``) or ``"edge"``
        (``x_px = x * W - 0.5``) for files with ``"normalized": true``.
    qc : write quality-control overlay PNGs (:mod:`medinfer.slices.qc`) to ``qc/`` in
        the output folder (beside the mask file in single-file mode):
        ``qc/{patient_id}_slice{index:04d}_qc.png``.
    qc_slices : slices per patient in the QC overlays.

    Returns
    -------
    list of :class:`PatientResult` (mask path, missing slices, voxel counts, warnings).

    Raises
    ------
    MedinferError
        No prediction files (or none for ``patient_id``), single-patient options in
        batch mode, or any per-patient error (see the module docstring). In batch mode
        all patients are attempted first; the error then lists every failed patient
        (the others' masks are written) and ``summary.json`` records the failures.

    Warnings
    --------
    SliceReconstructionWarning for missing slices, clipped polygons, ignored
    polygons and a missing original image.
    """
    table = (
        labels
        if isinstance(labels, LabelTable)
        else LabelTable.default()
        if labels is None
        else LabelTable.from_file(labels)
    )
    pred_dir = Path(predictions)
    groups = find_prediction_files(pred_dir)
    out = Path(output)
    search = [inference_dir, pred_dir]
    common: dict[str, Any] = {
        "inference_dir": inference_dir,
        "labels": table,
        "axis": axis,
        "on_unknown_class": on_unknown_class,
        "normalized_convention": normalized_convention,
        "qc_slices": qc_slices,
    }
    if patient_id is not None:
        if patient_id not in groups:
            known = ", ".join(sorted(groups)) or "none"
            raise MedinferError(
                f"patient {patient_id!r}: no prediction files {patient_id}_sliceNNNN.json in "
                f"{pred_dir} (patients found: {known})"
            )
        meta = Path(metadata) if metadata is not None else find_metadata(patient_id, search)
        mask_path = _output_paths(out, patient_id, single=True)
        res = reconstruct_patient(
            patient_id,
            groups[patient_id],
            mask_path,
            original_image=original_image,
            metadata_path=meta,
            qc_dir=mask_path.parent / "qc" if qc else None,
            **common,
        )
        return [res]
    if out.name.lower().endswith((".nii", ".nii.gz")):
        raise ConfigError(
            f"output {out}: batch mode writes one mask per patient into a folder; a file "
            "name needs --patient-id"
        )
    if original_image is not None or metadata is not None:
        raise ConfigError("--original-image / --metadata need --patient-id (single-patient mode)")
    if not groups:
        raise MedinferError(
            f"predictions folder {pred_dir}: no files named {{patient_id}}_sliceNNNN.json"
        )
    results: list[PatientResult] = []
    failures: list[str] = []
    for pid in sorted(groups):
        try:
            res = reconstruct_patient(
                pid,
                groups[pid],
                _output_paths(out, pid, single=False),
                metadata_path=find_metadata(pid, search),
                qc_dir=out / "qc" if qc else None,
                **common,
            )
        except MedinferError as exc:
            res = PatientResult(patient_id=pid, error=str(exc))
            failures.append(f"{pid}: {exc}")
            log.error("patient %s failed: %s", pid, exc)
        results.append(res)
    summary = {
        "predictions": str(pred_dir),
        "inference_dir": None if inference_dir is None else str(inference_dir),
        "num_patients": len(results),
        "num_failed": len(failures),
        "patients": [r.to_dict(table) for r in results],
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if failures:
        raise MedinferError(
            f"{len(failures)} of {len(results)} patients failed (see {out / 'summary.json'}): "
            + "; ".join(failures)
        )
    return results


if __name__ == "__main__":  # ``python -m medinfer.slices.reconstruct [options]``
    import sys

    from medinfer.slices.cli import main

    main(["reconstruct", *sys.argv[1:]], prog_name="python -m medinfer.slices")
