"""DICOM Segmentation (SEG) out and back: label maps and probabilities as DICOM SEG.

Writing (:func:`write_dicom_seg`) uses highdicom (``highdicom.seg.Segmentation``,
PS3.3 A.51 Segmentation IOD). The result joins the source study: same
StudyInstanceUID, FrameOfReferenceUID and patient, every frame references the source
image it was derived from (DerivationImageSequence), new Series/SOP Instance UIDs,
SeriesNumber = source series number + 1000 (unless given) and a SeriesDescription that
names the model.

Segment types (``SegmentationType``):

- ``binary`` (default): one 1-bit frame per (slice, segment) where the segment is present;
- ``labelmap``: one 8/16-bit frame per slice holding segment numbers (DICOM 2024c
  LABELMAP SEG; highdicom reads it, dciodvfy does not know it yet);
- ``fractional``: probabilities quantised to 0..255 (FRACTIONAL PROBABILITY), one frame
  per (slice, segment) where the segment's probability is non-zero.

Segments: one per label value present in the label map (empty labels are omitted, so
segment numbers are 1..N in label-value order and need not equal the label values).
The label value is kept in the TrackingIdentifier (``"<model> label <value>"``) so that
:func:`read_dicom_seg` gives back the original values. Each segment carries the label
name, the recommended display colour (CIELab from the card's RGB), the segmented
property category/type codes (:func:`segment_infos`), and the algorithm identification
(model name and version, family "Artificial Intelligence", SegmentAlgorithmType
AUTOMATIC).

Geometry: the label Volume (RAS+) must lie on the grid of the source series up to an
axis permutation / flips (no resampling); otherwise :class:`~medinfer.errors.GeometryError`.
Only single-frame image series are accepted as sources.

Reading (:func:`read_dicom_seg`) uses highdicom too; with ``reference`` (the source
series folder) the label map comes back on exactly the grid
:func:`medinfer.io.dicom.read_dicom` gives for that series.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medinfer.errors import (
    ConfigError,
    GeometryError,
    InvalidImageError,
    SeriesSelectionError,
    parse_enum,
)
from medinfer.io._lps import affine_lps_to_ras, affine_ras_to_lps
from medinfer.volume import Volume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from medinfer.models.card import ModelCard

__all__ = [
    "GENERIC_CATEGORY",
    "GENERIC_TYPE",
    "SegCompression",
    "SegmentInfo",
    "SegmentationType",
    "derived_series",
    "find_label_metadata",
    "label_segment_infos",
    "load_source_datasets",
    "read_dicom_seg",
    "read_label_metadata",
    "on_source_grid",
    "reference_volume",
    "segment_infos",
    "source_grid",
    "write_dicom_seg",
]

#: a code: (CodeValue, CodingSchemeDesignator, CodeMeaning)
Code = tuple[str, str, str]

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.7"
_MAX_METADATA_BYTES = 4 * 1024 * 1024
_MAX_SOURCE_FILES = 20000

# PS3.16 CID 7150 (Segmentation Property Categories)
_ANATOMY: Code = ("91723000", "SCT", "Anatomical Structure")
_TISSUE: Code = ("85756007", "SCT", "Tissue")
_ABNORMAL: Code = ("49755003", "SCT", "Morphologically Altered Structure")
_SUBSTANCE: Code = ("91720002", "SCT", "Body Substance")

#: category and type used for labels without a known code (the name goes in SegmentLabel)
GENERIC_CATEGORY: Code = _TISSUE
GENERIC_TYPE: Code = _TISSUE

#: SNOMED CT codes of the bundled models' labels and common anatomy: code -> (category, meaning)
_SNOMED: dict[str, tuple[Code, str]] = {
    "65216001": (_SUBSTANCE, "Cerebrospinal fluid"),
    "389080000": (_TISSUE, "Grey matter"),
    "389079003": (_TISSUE, "White matter"),
    "52988006": (_ABNORMAL, "Lesion"),
    "27925004": (_ABNORMAL, "Nodule"),
    "108369006": (_ABNORMAL, "Neoplasm"),
    "86049000": (_ABNORMAL, "Malignant neoplasm"),
    "12738006": (_ANATOMY, "Brain"),
    "10200004": (_ANATOMY, "Liver"),
    "78961009": (_ANATOMY, "Spleen"),
    "64033007": (_ANATOMY, "Kidney"),
    "9846003": (_ANATOMY, "Right kidney"),
    "18639004": (_ANATOMY, "Left kidney"),
    "15776009": (_ANATOMY, "Pancreas"),
    "39607008": (_ANATOMY, "Lung"),
    "3341006": (_ANATOMY, "Right lung"),
    "44029006": (_ANATOMY, "Left lung"),
    "80891009": (_ANATOMY, "Heart"),
    "15825003": (_ANATOMY, "Aorta"),
    "69695003": (_ANATOMY, "Stomach"),
    "28231008": (_ANATOMY, "Gallbladder"),
    "89837001": (_ANATOMY, "Urinary bladder"),
    "41216001": (_ANATOMY, "Prostate"),
    "32849002": (_ANATOMY, "Esophagus"),
    "44567001": (_ANATOMY, "Trachea"),
    "71854001": (_ANATOMY, "Colon"),
    "30315005": (_ANATOMY, "Small intestine"),
    "23451007": (_ANATOMY, "Adrenal gland"),
    "69748006": (_ANATOMY, "Thyroid gland"),
    "51282000": (_ANATOMY, "Vertebra"),
    "272673000": (_TISSUE, "Bone"),
    "71616004": (_TISSUE, "Muscle"),
    "421060004": (_ANATOMY, "Vertebral column"),
    "7832008": (_ANATOMY, "Abdominal aorta"),
    "64131007": (_ANATOMY, "Inferior vena cava"),
    "76784001": (_ANATOMY, "Femur"),
    "76752008": (_ANATOMY, "Breast"),
}
_BY_NAME: dict[str, str] = {m.lower(): code for code, (_, m) in _SNOMED.items()}
_BY_NAME.update({"csf": "65216001", "gray matter": "389080000", "tumor": "108369006",
                 "tumour": "108369006", "bladder": "89837001", "spine": "421060004"})


class SegmentationType(StrEnum):
    """DICOM SEG types :func:`write_dicom_seg` writes."""

    BINARY = "binary"
    LABELMAP = "labelmap"
    FRACTIONAL = "fractional"


class SegCompression(StrEnum):
    """Lossless pixel encodings of a SEG (transfer syntaxes)."""

    NONE = "none"
    RLE = "rle"
    JPEG2000 = "jpeg2000"
    JPEGLS = "jpegls"


_TSYNTAX = {
    SegCompression.NONE: "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    SegCompression.RLE: "1.2.840.10008.1.2.5",  # RLE Lossless
    SegCompression.JPEG2000: "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    SegCompression.JPEGLS: "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
}


@dataclass(frozen=True)
class SegmentInfo:
    """What a SEG says about one label.

    Attributes
    ----------
    value : label value in the label map (>= 1).
    name : SegmentLabel (the card's label name).
    color : recommended display colour, RGB 0..255 (written as CIELab).
    category, type : segmented property category / type codes
        ``(CodeValue, CodingSchemeDesignator, CodeMeaning)``.
    tracking_id : TrackingIdentifier; default ``"<model> label <value>"``.
    """

    value: int
    name: str
    color: tuple[int, int, int]
    category: Code
    type: Code
    tracking_id: str | None = None


def _code_for(name: str, snomed: str | None) -> tuple[Code, Code]:
    code = snomed or _BY_NAME.get(name.strip().lower())
    if code is None:
        return GENERIC_CATEGORY, GENERIC_TYPE
    category, meaning = _SNOMED.get(code, (_ANATOMY, name))
    return category, (code, "SCT", meaning)


def segment_infos(
    card: ModelCard, overrides: Mapping[int, Mapping[str, Any]] | None = None
) -> dict[int, SegmentInfo]:
    """Segment descriptions of the card's foreground labels, with ``overrides`` applied.

    Codes: the card's ``snomed`` code (category from a built-in table of the bundled
    models' labels and common anatomy, else "Anatomical Structure"); without a code, the
    label name is looked up in that table; otherwise :data:`GENERIC_CATEGORY` /
    :data:`GENERIC_TYPE` (SCT 85756007 "Tissue") with the name in SegmentLabel.

    Parameters
    ----------
    card : the model card (``labels``: value -> name, colour, optional SNOMED code).
    overrides : label value -> fields of :class:`SegmentInfo` to replace (as returned by
        :func:`read_label_metadata`); values not in the card are added.
    """
    out: dict[int, SegmentInfo] = {}
    for value, spec in card.labels.items():
        if value == 0:
            continue
        category, type_ = _code_for(spec.name, spec.snomed)
        out[value] = SegmentInfo(value, spec.name, tuple(spec.color), category, type_,  # type: ignore[arg-type]
                                 f"{card.name} label {value}")
    for value, fields in (overrides or {}).items():
        base = out.get(value) or SegmentInfo(value, f"label {value}", (255, 0, 0),
                                             GENERIC_CATEGORY, GENERIC_TYPE,
                                             f"{card.name} label {value}")
        if "name" in fields and "type" not in fields and fields["name"] != base.name:
            # renamed without codes: the card's code named another structure
            category, type_ = _code_for(str(fields["name"]), None)
            base = replace(base, category=category, type=type_)
        out[value] = replace(base, **dict(fields))
    return out


# ----------------------------------------------------------------- label metadata files
def _load_json_any(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: no such label metadata file")
    if path.stat().st_size > _MAX_METADATA_BYTES:
        raise ConfigError(f"{path}: label metadata larger than {_MAX_METADATA_BYTES} bytes")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


def _rgb(value: Any, where: str, unit_range: bool) -> tuple[int, int, int]:
    if isinstance(value, Mapping):
        value = value.get("value")
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3
            or not all(isinstance(c, int | float) and not isinstance(c, bool) for c in value)):
        raise ConfigError(f"{where}: expected a colour of 3 numbers, got {value!r}")
    scale = 255.0 if unit_range and all(0.0 <= float(c) <= 1.0 for c in value) else 1.0
    rgb = [round(float(c) * scale) for c in value]
    if not all(0 <= c <= 255 for c in rgb):
        raise ConfigError(f"{where}: colour values must be in 0..255 (or 0..1), got {value!r}")
    return rgb[0], rgb[1], rgb[2]


def _code(value: Any, where: str) -> Code:
    if not isinstance(value, Mapping) or not all(
        isinstance(value.get(k), str) and value.get(k)
        for k in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
    ):
        raise ConfigError(f"{where}: expected an object with CodeValue, CodingSchemeDesignator "
                          f"and CodeMeaning strings, got {value!r}")
    return (value["CodeValue"], value["CodingSchemeDesignator"], value["CodeMeaning"])


def _label_value(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{where}: expected a label value in 1..65535, got {value!r}")
    return value


def read_label_metadata(path: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
    """Label overrides from a MITK label set or a dcmqi segmentation metadata file.

    Accepted formats (recognised by content):

    - MITK ``*.mitklabel.json``: a list of label groups ``[{"labels": [...]}]`` (or an
      object with ``"groups"`` or ``"labels"``); each label has ``value``, ``name``,
      optional ``color`` (``{"value": [r, g, b]}`` in 0..1, or 0..255) and optional
      ``tracking_id``;
    - dcmqi ``seg-metadata.json``: ``{"segmentAttributes": [[{"labelID": 1,
      "SegmentLabel": ..., "recommendedDisplayRGBValue": [r, g, b],
      "SegmentedPropertyCategoryCodeSequence": {...},
      "SegmentedPropertyTypeCodeSequence": {...}, "TrackingIdentifier": ...}]]}``.

    Returns
    -------
    dict
        label value -> fields of :class:`SegmentInfo` (``name``, ``color``, ``category``,
        ``type``, ``tracking_id``) that the file sets.

    Raises
    ------
    ConfigError
        Missing, oversized or invalid file; the message names the file and the field.
    """
    p = Path(path)
    data = _load_json_any(p)
    out: dict[int, dict[str, Any]] = {}
    if isinstance(data, Mapping) and "segmentAttributes" in data:
        groups = data["segmentAttributes"]
        if not isinstance(groups, list):
            raise ConfigError(f"{p}: segmentAttributes must be a list of lists")
        for gi, group in enumerate(groups):
            for si, seg in enumerate(group if isinstance(group, list) else [group]):
                where = f"{p}: segmentAttributes[{gi}][{si}]"
                if not isinstance(seg, Mapping):
                    raise ConfigError(f"{where}: expected an object")
                value = _label_value(seg.get("labelID"), f"{where}.labelID")
                fields: dict[str, Any] = {}
                name = seg.get("SegmentLabel") or seg.get("SegmentDescription")
                if isinstance(name, str) and name:
                    fields["name"] = name
                if "recommendedDisplayRGBValue" in seg:
                    fields["color"] = _rgb(seg["recommendedDisplayRGBValue"],
                                           f"{where}.recommendedDisplayRGBValue", False)
                if "SegmentedPropertyCategoryCodeSequence" in seg:
                    fields["category"] = _code(seg["SegmentedPropertyCategoryCodeSequence"],
                                               f"{where}.SegmentedPropertyCategoryCodeSequence")
                if "SegmentedPropertyTypeCodeSequence" in seg:
                    fields["type"] = _code(seg["SegmentedPropertyTypeCodeSequence"],
                                           f"{where}.SegmentedPropertyTypeCodeSequence")
                if isinstance(seg.get("TrackingIdentifier"), str):
                    fields["tracking_id"] = seg["TrackingIdentifier"]
                out[value] = fields
        return out
    if isinstance(data, Mapping):
        groups = data.get("groups", [data] if "labels" in data else None)
    else:
        groups = data
    if not isinstance(groups, list):
        raise ConfigError(f"{p}: neither a MITK label set (list of groups with 'labels') nor "
                          "a dcmqi segmentation metadata file ('segmentAttributes')")
    for gi, group in enumerate(groups):
        labels = group.get("labels") if isinstance(group, Mapping) else None
        if not isinstance(labels, list):
            raise ConfigError(f"{p}: group {gi}: expected a 'labels' list")
        for li, lab in enumerate(labels):
            where = f"{p}: group {gi} label {li}"
            if not isinstance(lab, Mapping):
                raise ConfigError(f"{where}: expected an object")
            value = _label_value(lab.get("value"), f"{where}.value")
            fields = {}
            if isinstance(lab.get("name"), str) and lab["name"]:
                fields["name"] = lab["name"]
            if "color" in lab:
                fields["color"] = _rgb(lab["color"], f"{where}.color", True)
            if isinstance(lab.get("tracking_id"), str):
                fields["tracking_id"] = lab["tracking_id"]
            out[value] = fields
    return out


def find_label_metadata(case_path: str | os.PathLike[str]) -> Path | None:
    """The label metadata file that belongs to an input, if any.

    Looked for, in order: ``<case>.mitklabel.json`` beside the input (``<case>`` is the
    file name without ``.nii``/``.nii.gz``/``.dcm``, or the folder name), then
    ``seg-metadata.json`` inside an input folder, then ``seg-metadata.json`` beside the
    input.
    """
    p = Path(case_path)
    stem = re.sub(r"(\.nii\.gz|\.nii|\.dcm)$", "", p.name, flags=re.IGNORECASE)
    candidates = [p.parent / f"{stem}.mitklabel.json"]
    if p.is_dir():
        candidates.append(p / "seg-metadata.json")
    candidates.append(p.parent / "seg-metadata.json")
    return next((c for c in candidates if c.is_file()), None)


# ------------------------------------------------------------------------ source series
def load_source_datasets(
    source: str | os.PathLike[str] | Sequence[Dataset], series_uid: str | None = None
) -> list[Dataset]:
    """The headers of one single-frame image series (pixel data not read), in file order.

    Parameters
    ----------
    source : a series folder (searched recursively), one DICOM file, or pydicom Datasets.
    series_uid : SeriesInstanceUID to pick when the folder holds several series.

    Raises
    ------
    InvalidImageError
        No DICOM image found, a multi-frame or non-image source.
    SeriesSelectionError
        Several series and no (or an unknown) ``series_uid``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if isinstance(source, str | os.PathLike):
        root = Path(source)
        files = [root] if root.is_file() else sorted(
            f for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))
        if len(files) > _MAX_SOURCE_FILES:
            raise InvalidImageError(f"{root}: more than {_MAX_SOURCE_FILES} files")
        datasets: list[Dataset] = []
        for f in files:
            try:
                datasets.append(pydicom.dcmread(f, stop_before_pixels=True))
            except (InvalidDicomError, OSError, EOFError, ValueError):
                continue
        where = str(root)
    else:
        datasets = list(source)
        where = "source datasets"
    images = [d for d in datasets if "ImagePositionPatient" in d and "Rows" in d]
    if not images:
        raise InvalidImageError(f"{where}: no DICOM image with ImagePositionPatient found")
    groups: dict[str, list[Dataset]] = {}
    for d in images:
        groups.setdefault(str(d.get("SeriesInstanceUID", "")), []).append(d)
    if series_uid is not None:
        if series_uid not in groups:
            raise SeriesSelectionError(f"{where}: series {series_uid!r} not found; series: "
                                       f"{', '.join(sorted(groups))}")
        chosen = groups[series_uid]
    elif len(groups) > 1:
        raise SeriesSelectionError(f"{where}: {len(groups)} image series; pick one of "
                                   f"{', '.join(sorted(groups))}")
    else:
        chosen = next(iter(groups.values()))
    if any(int(d.get("NumberOfFrames", 1) or 1) > 1 for d in chosen):
        raise InvalidImageError(f"{where}: multi-frame source images are not supported for "
                                "DICOM SEG/RTSTRUCT/SR output; accepted: a single-frame series")
    return chosen


def source_geometry(datasets: Sequence[Dataset]) -> tuple[list[Dataset], np.ndarray]:
    """Sort single-frame datasets along the slice normal; their voxel -> LPS affine.

    Returns the datasets in slice order and the (4, 4) affine that maps
    ``(slice, row, column)`` indices to LPS mm (highdicom's volume convention).

    Raises
    ------
    GeometryError
        Missing orientation/spacing, mixed orientation or size, uneven slice spacing.
    """
    ds0 = datasets[0]
    try:
        iop = np.asarray([float(x) for x in ds0.ImageOrientationPatient], dtype=np.float64)
        ps = [float(x) for x in ds0.PixelSpacing]
    except (AttributeError, TypeError, ValueError):
        raise GeometryError("source series: ImageOrientationPatient or PixelSpacing missing "
                            "or invalid") from None
    for d in datasets:
        if (d.get("Rows"), d.get("Columns")) != (ds0.Rows, ds0.Columns) or not np.allclose(
                [float(x) for x in d.get("ImageOrientationPatient", [0] * 6)], iop, atol=1e-4):
            raise GeometryError(
                f"source series: mixed geometry (image {d.get('SOPInstanceUID')} has another "
                "size or orientation than the first); a SEG needs one regular grid")
    normal = np.cross(iop[:3], iop[3:])
    try:
        pos = np.asarray([[float(x) for x in d.ImagePositionPatient] for d in datasets])
    except (AttributeError, TypeError, ValueError):
        raise GeometryError("source series: ImagePositionPatient missing or invalid") from None
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    ordered = [datasets[int(i)] for i in order]
    p0 = pos[order[0]]
    if len(ordered) > 1:
        steps = np.diff(dist[order])
        slice_vec = (pos[order[-1]] - p0) / (len(ordered) - 1)
        step = float(np.linalg.norm(slice_vec))
        # positions on one line along the stack, evenly spaced (tolerances as read_dicom)
        off_line = pos[order] - p0 - np.outer(np.arange(len(ordered)), slice_vec)
        if step <= 1e-6 or np.any(steps <= 1e-6) or np.abs(steps - steps.mean()).max() > max(
                0.01 * step, 0.02) or np.linalg.norm(off_line, axis=1).max() > 0.02:
            raise GeometryError(
                "source series: the slices are not evenly spaced along one line (duplicate "
                "positions, gaps or tilt); a SEG needs one regular grid")
    else:
        slice_vec = normal * (float(ds0.get("SpacingBetweenSlices", 0) or 0)
                              or float(ds0.get("SliceThickness", 1) or 1))
    aff = np.eye(4)
    aff[:3, 0] = slice_vec
    aff[:3, 1] = iop[3:] * ps[0]
    aff[:3, 2] = iop[:3] * ps[1]
    aff[:3, 3] = p0
    return ordered, aff


def _to_hd_volume(array_ijk: np.ndarray, affine_ras: np.ndarray, for_uid: str | None) -> Any:
    """A medinfer (I, J, K) array + RAS affine as a highdicom Volume (K, J, I) + LPS affine."""
    import highdicom as hd

    lps = affine_ras_to_lps(affine_ras)
    return hd.Volume(np.ascontiguousarray(np.transpose(array_ijk, (2, 1, 0))),
                     lps[:, [2, 1, 0, 3]], coordinate_system="PATIENT",
                     frame_of_reference_uid=for_uid or None)


def _match(label: Any, geometry: Any, what: str) -> Any:
    try:
        matched = label.match_geometry(geometry, tol=1e-3)
    except (RuntimeError, ValueError):
        raise GeometryError(
            f"{what}: the label map's grid (shape {label.spatial_shape}) is not the grid of "
            f"the source series (shape {geometry.spatial_shape}) up to axis order and flips; "
            "resample the result onto the source grid first") from None
    if sorted(label.spatial_shape) != sorted(geometry.spatial_shape):
        raise GeometryError(
            f"{what}: the label map (shape {label.spatial_shape}) does not cover the source "
            f"series grid (shape {geometry.spatial_shape}) exactly")
    return matched


def _label_values(lab: np.ndarray) -> list[int]:
    """Sorted non-zero values of an integer label map.

    8/16-bit maps: bincount over chunks of the array in memory order (no sort, no copy
    of the whole map: several times faster than ``np.unique`` on 10^8 voxels).

    Raises
    ------
    InvalidImageError
        Negative values.
    """
    flat = lab.ravel(order="K")
    if lab.dtype.kind == "b":
        return [1] if flat.any() else []
    if lab.dtype.kind == "i" and flat.size and int(flat.min()) < 0:
        raise InvalidImageError(f"label map: negative label values ({int(flat.min())})")
    if lab.dtype.itemsize > 2:
        return [int(v) for v in np.unique(flat) if v != 0]
    size = 1 << (8 * lab.dtype.itemsize)
    counts = np.zeros(size, dtype=np.int64)
    chunk = 1 << 22
    for start in range(0, flat.size, chunk):
        counts += np.bincount(flat[start:start + chunk], minlength=size)
    return [int(v) for v in np.flatnonzero(counts) if v != 0]


def source_grid(
    source: str | os.PathLike[str] | Sequence[Dataset], series_uid: str | None = None
) -> tuple[list[Dataset], Any]:
    """Source datasets in slice order and their grid as a ``highdicom.VolumeGeometry``.

    The geometry's array axes are (slice, row, column) of the sorted datasets, its affine
    maps them to LPS mm. Raises as :func:`load_source_datasets` and :func:`source_geometry`.
    """
    import highdicom as hd

    ordered, src_aff = source_geometry(load_source_datasets(source, series_uid))
    ds0 = ordered[0]
    for_uid = str(ds0.get("FrameOfReferenceUID", "")) or None
    geom = hd.VolumeGeometry(src_aff, (len(ordered), int(ds0.Rows), int(ds0.Columns)),
                             coordinate_system="PATIENT", frame_of_reference_uid=for_uid)
    return ordered, geom


def on_source_grid(array_ijk: np.ndarray, affine_ras: np.ndarray, geometry: Any,
                   what: str) -> np.ndarray:
    """A medinfer ``(I, J, K)`` array (RAS+ affine) as ``(slice, row, column)`` of the source.

    Only axis permutations and flips are done (no resampling).

    Raises
    ------
    GeometryError
        The array's grid is not ``geometry`` up to axis order and flips.
    """
    hv = _to_hd_volume(array_ijk, affine_ras, geometry.frame_of_reference_uid)
    return np.asarray(_match(hv, geometry, what).array)


# ---------------------------------------------------------------------------- writer
def label_segment_infos(
    label: Volume,
    card: ModelCard,
    metadata: Mapping[int, Mapping[str, Any]] | str | os.PathLike[str] | None,
) -> dict[int, SegmentInfo]:
    """Check a label map for a derived-object writer and return its segment descriptions.

    Shared by :func:`write_dicom_seg` and :func:`medinfer.io.rtstruct.write_rtstruct`.

    Parameters
    ----------
    label : ``(1, I, J, K)`` integer label map.
    card : model card (label names, colours, codes).
    metadata : label overrides (:func:`read_label_metadata` output, or a path to such a
        file), or None.

    Raises
    ------
    InvalidImageError
        A label map that is not integer or has several channels.
    ConfigError
        Bad metadata file.
    """
    if label.num_channels != 1 or label.array.dtype.kind not in "uib":
        raise InvalidImageError(f"label map: expected one integer channel, got shape "
                                f"{label.shape} {label.array.dtype}")
    if isinstance(metadata, str | os.PathLike):
        metadata = read_label_metadata(metadata)
    return segment_infos(card, metadata)


def derived_series(
    ds0: Dataset,
    card: ModelCard,
    kind: str,
    offset: int,
    series_number: int | None,
    series_description: str | None,
) -> tuple[int, str]:
    """SeriesNumber and SeriesDescription of a derived series (SEG, RTSTRUCT, SR).

    Defaults: source SeriesNumber (0 if absent) + ``offset``; ``"<kind> <model> <version>"``.
    The description is cut to 64 characters (LO).
    """
    number = series_number if series_number is not None else (
        int(ds0.get("SeriesNumber", 0) or 0) + offset)
    description = (series_description or f"{kind} {card.name} {card.version}")[:64]
    return number, description


def write_dicom_seg(
    label: Volume,
    source: str | os.PathLike[str] | Sequence[Dataset],
    card: ModelCard,
    path: str | os.PathLike[str],
    *,
    seg_type: SegmentationType | str = "binary",
    probabilities: Volume | None = None,
    compression: SegCompression | str = "none",
    metadata: Mapping[int, Mapping[str, Any]] | str | os.PathLike[str] | None = None,
    series_uid: str | None = None,
    series_number: int | None = None,
    series_description: str | None = None,
) -> Path:
    """Write a label map (or probabilities) as a DICOM SEG of the source series.

    Parameters
    ----------
    label : label map ``(1, I, J, K)`` integer, affine voxel -> RAS+ mm, on the source
        series grid (axis order and flips may differ; no resampling is done).
    source : the source series folder (or one file), or its pydicom Datasets (pixel data
        not needed). Single-frame image series only.
    card : model card (label names, colours, codes, model name/version).
    path : output file (written atomically).
    seg_type : ``"binary"`` (default), ``"labelmap"`` or ``"fractional"``.
    probabilities : for ``fractional``: ``(C, I, J, K)`` float in [0, 1] on the label's
        grid, channel c = label value c (channel 0, background, is not written; a
        1-channel map is label value 1). Quantised to 0..255.
    compression : ``"none"``, ``"rle"``, ``"jpeg2000"`` or ``"jpegls"`` (lossless).
    metadata : label overrides (:func:`read_label_metadata` output, or a path to such a
        file).
    series_uid : SeriesInstanceUID to pick from a source folder with several series.
    series_number : default source SeriesNumber + 1000 (or 1000).
    series_description : default ``"SEG <model> <version>"``.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    GeometryError
        The label grid is not the source grid; the source series has mixed geometry.
    ConfigError
        Unknown option value, compression codec not installed or not allowed for the SEG
        type (the message names what is available), bad metadata file, missing
        ``probabilities`` for ``fractional``.
    InvalidImageError
        No usable source series; a label map that is not integer or has several channels.
    SeriesSelectionError
        Several series in ``source`` and no ``series_uid``.

    Notes
    -----
    Segment descriptions: :func:`segment_infos`. Encoding: highdicom
    (https://highdicom.readthedocs.io), PS3.3 A.51 / C.8.20.
    """
    import highdicom as hd
    from pydicom.pixels import get_encoder
    from pydicom.sr.codedict import codes

    from medinfer import __version__
    from medinfer._atomic import atomic_path
    from medinfer.io._seg_encode import save_multiframe

    stype = parse_enum(SegmentationType, seg_type, "seg_type")
    comp = parse_enum(SegCompression, compression, "seg_compression")
    tsyntax = _TSYNTAX[comp]
    if comp is not SegCompression.NONE:
        enc = get_encoder(tsyntax)
        if not enc.is_available:
            missing = "; ".join(enc.missing_dependencies)
            raise ConfigError(f"seg_compression: {comp.value!r} needs a codec that is not "
                              f"installed ({missing}); use 'none', 'rle' or 'jpegls'")
        if stype is SegmentationType.BINARY:
            raise ConfigError(f"seg_compression: {comp.value!r} cannot encode 1-bit BINARY "
                              "frames (DICOM allows none); use 'none' with binary, or "
                              "--seg-type labelmap / fractional with 'rle' or 'jpegls'")
    infos = label_segment_infos(label, card, metadata)

    ordered, geom = source_grid(source, series_uid)
    ds0 = ordered[0]
    lab = np.asarray(label.array[0])
    present = _label_values(lab)
    if stype is SegmentationType.FRACTIONAL:
        if probabilities is None:
            raise ConfigError("seg_type 'fractional': needs the probabilities (run with "
                              "--save-probabilities)")
        if not probabilities.same_grid(label):
            raise GeometryError("probabilities: not on the label map's grid")
        first = 1 if probabilities.num_channels > 1 else 0
        channels = list(range(first, probabilities.num_channels))
        q = [np.rint(np.clip(np.nan_to_num(probabilities.array[c]), 0, 1) * 255).astype(np.uint8)
             for c in channels]
        values = [c if first else 1 for c in channels]
        keep = [i for i, a in enumerate(q) if a.any()]
        present = [values[i] for i in keep]
        planes = [on_source_grid(q[i], label.affine, geom, str(path)) for i in keep]
    else:
        planes = []
    for v in present:
        if v not in infos:
            infos[v] = SegmentInfo(v, f"label {v}", (255, 0, 0), GENERIC_CATEGORY, GENERIC_TYPE,
                                   f"{card.name} label {v}")
    algo = hd.AlgorithmIdentificationSequence(
        name=card.name, family=codes.cid7162.ArtificialIntelligence, version=str(card.version))
    descriptions = []
    for number, v in enumerate(present, 1):
        info = infos[v]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=info.name[:64],
            segmented_property_category=hd.sr.CodedConcept(*info.category),
            segmented_property_type=hd.sr.CodedConcept(*info.type),
            algorithm_type="AUTOMATIC", algorithm_identification=algo,
            tracking_uid=hd.UID(), tracking_id=info.tracking_id or f"{card.name} label {v}",
            display_color=hd.color.CIELabColor.from_rgb(*info.color)))
    if stype is SegmentationType.FRACTIONAL:
        shape = (len(ordered), int(ds0.Rows), int(ds0.Columns))
        pixels = np.stack(planes, axis=-1) if planes else np.zeros((*shape, 0), np.uint8)
        pixel_array: Any = pixels.astype(np.float32) / 255.0
    else:
        arr = on_source_grid(lab, label.affine, geom, str(path))
        dtype = np.uint8 if len(present) < 256 else np.uint16
        if present == list(range(1, len(present) + 1)):  # values are the segment numbers
            pixel_array = arr.astype(dtype, copy=False)
        else:
            seg_numbers = np.zeros(int(max(present, default=0)) + 1, dtype=dtype)
            for number, v in enumerate(present, 1):
                seg_numbers[v] = number
            pixel_array = seg_numbers[arr]
    if not descriptions:
        raise InvalidImageError(f"{path}: the label map is empty; a DICOM SEG needs at least "
                                "one segment")
    number, description = derived_series(ds0, card, "SEG", 1000, series_number,
                                         series_description)
    kwargs: dict[str, Any] = {}
    if stype is SegmentationType.FRACTIONAL:
        kwargs.update(fractional_type="PROBABILITY", max_fractional_value=255)
    try:
        seg = hd.seg.Segmentation(
            source_images=ordered, pixel_array=pixel_array,
            segmentation_type=stype.value.upper(), segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=number, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="medinfer",
            manufacturer_model_name=card.name[:64], software_versions=f"medinfer {__version__}",
            device_serial_number="0", content_label="SEGMENTATION",
            content_description=description, content_creator_name="medinfer^",
            transfer_syntax_uid=tsyntax, omit_empty_frames=True, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot encode the DICOM SEG ({stype.value}, "
                          f"{comp.value}): {exc}") from None
    seg.SeriesDescription = description
    for kw in ("StudyID", "AccessionNumber"):
        if kw in ds0 and kw not in seg:
            setattr(seg, kw, ds0.get(kw))
    out = Path(path)
    with atomic_path(out) as tmp:
        save_multiframe(seg, tmp)
    return out


# ---------------------------------------------------------------------------- reader
_TRACK_RE = re.compile(r"label (\d+)\s*$")


def segment_label_values(seg: Any) -> dict[int, int]:
    """Segment number -> label value (from ``"... label <v>"`` TrackingIdentifiers, else
    the segment number)."""
    out: dict[int, int] = {}
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        if number == 0:  # the LABELMAP background segment
            continue
        m = _TRACK_RE.search(str(item.get("TrackingID", "")))
        out[number] = int(m.group(1)) if m else number
    return out


def read_dicom_seg(
    path: str | os.PathLike[str],
    *,
    reference: str | os.PathLike[str] | Volume | None = None,
    series_uid: str | None = None,
) -> Volume:
    """Read a DICOM SEG (BINARY, LABELMAP or FRACTIONAL) as a label Volume.

    Parameters
    ----------
    path : the SEG file.
    reference : the source series (folder, or its :class:`Volume` from
        :func:`medinfer.io.dicom.read_dicom`): the labels come back on exactly its grid.
        Without it, the grid is the SEG's own (frames that hold no segment may be cropped).
    series_uid : SeriesInstanceUID to pick from a reference folder with several series.

    Returns
    -------
    Volume
        ``(1, I, J, K)`` uint8 (uint16 above 255) label values (TrackingIdentifier
        ``"... label <v>"``, else segment numbers; overlapping segments: the highest
        segment number wins; FRACTIONAL: value > 0.5), affine voxel -> RAS+ mm;
        ``meta["segments"]`` lists ``{value, number, name}``.

    Raises
    ------
    InvalidImageError
        Not a readable DICOM SEG.
    GeometryError
        The SEG does not lie on the reference grid.
    """
    import highdicom as hd
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    try:
        seg = hd.seg.segread(p)
    except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError) as exc:
        raise InvalidImageError(f"{p}: not a readable DICOM SEG ({exc})") from None
    values = segment_label_values(seg)
    numbers = sorted(values)
    stype = str(seg.SegmentationType)
    try:
        if stype == "FRACTIONAL":
            hv = seg.get_volume(combine_segments=False, rescale_fractional=True)
            arr = hv.array
            lab = np.zeros(arr.shape[:3], dtype=np.uint16)
            for idx, n in enumerate(numbers):
                lab[arr[..., idx] > 0.5] = n
            hv = hv.with_array(lab) if arr.ndim == 4 else hv
        else:
            hv = seg.get_volume(combine_segments=True, relabel=False, skip_overlap_checks=True,
                                dtype=np.uint16)
    except (ValueError, RuntimeError) as exc:
        raise InvalidImageError(f"{p}: cannot build a volume from the SEG frames ({exc})") from None
    if reference is not None:
        ref = reference_volume(reference, series_uid)
        template = _to_hd_volume(np.zeros(ref.spatial_shape, np.uint8), ref.affine,
                                 hv.frame_of_reference_uid)
        try:
            hv = hv.match_geometry(template.get_geometry(), tol=1e-3)
        except (RuntimeError, ValueError):
            raise GeometryError(f"{p}: the SEG frames do not lie on the grid of the reference "
                                "series") from None
    lut = np.zeros(max(numbers, default=0) + 1, dtype=np.uint16)
    for n, v in values.items():
        lut[n] = v
    lab_kji = lut[np.asarray(hv.array, dtype=np.int64)]
    lab_ijk = np.transpose(lab_kji, (2, 1, 0))
    if lab_ijk.max(initial=0) <= 255:
        lab_ijk = lab_ijk.astype(np.uint8)
    lps = hv.affine[:, [2, 1, 0, 3]]
    meta = {
        "format": "dicom-seg",
        "source": str(p),
        "study_instance_uid": str(seg.StudyInstanceUID),
        "series_instance_uid": str(seg.SeriesInstanceUID),
        "frame_of_reference_uid": str(seg.get("FrameOfReferenceUID", "")),
        "segmentation_type": stype,
        "segments": [{"value": values[n], "number": n,
                      "name": str(seg.get_segment_description(n).segment_label)}
                     for n in numbers],
    }
    affine = ref.affine if reference is not None else affine_lps_to_ras(lps)
    return Volume(lab_ijk, affine, meta)


def reference_volume(reference: str | os.PathLike[str] | Volume,
                     series_uid: str | None = None) -> Volume:
    """The reference series as a Volume: ``reference`` itself, or the series read from a
    folder/file with :func:`medinfer.io.dicom.read_dicom` (RAS+, ``(C, I, J, K)``).

    Shared by the SEG, RTSTRUCT and SR readers. Raises as ``read_dicom``.
    """
    if isinstance(reference, Volume):
        return reference
    from medinfer.io.dicom import read_dicom

    return read_dicom(reference, series_uid=series_uid)


def is_dicom_seg(ds: Dataset) -> bool:
    """True for Segmentation Storage and Label Map Segmentation Storage instances."""
    return str(ds.get("SOPClassUID", "")) in (SEG_SOP_CLASS_UID, LABELMAP_SEG_SOP_CLASS_UID)
