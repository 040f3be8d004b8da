"""RT Structure Set (RTSTRUCT) out and back: label maps as planar contours.

Writing (:func:`write_rtstruct`, PS3.3 A.19 RT Structure Set IOD): one ROI per label value
present (ROINumber = label value, ROIName = label name, ROIDisplayColor = the card's RGB,
ROIGenerationAlgorithm AUTOMATIC, RTROIInterpretedType ORGAN), CLOSED_PLANAR contours on
the source slices, each referencing its source image.

Contours: on each source slice, the iso-line at 0.5 of the label's binary mask (marching
squares with linear interpolation, ``contourpy``) - it passes half-way between voxel
centres inside and outside, so a voxel centre lies inside the contours exactly when the
voxel is in the mask (up to the corner cases of diagonally touching voxels). Holes are
inner contours; readers combine a slice's contours with the even-odd rule.

Reading (:func:`read_rtstruct`): every contour is mapped into the reference grid and
rasterised with the even-odd rule on voxel centres (each contour must lie in one slice).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medinfer.errors import GeometryError, InvalidImageError
from medinfer.io._lps import affine_lps_to_ras
from medinfer.volume import Volume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from medinfer.models.card import ModelCard

__all__ = ["RTSTRUCT_SOP_CLASS_UID", "read_rtstruct", "write_rtstruct"]

RTSTRUCT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.481.3"
_STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired)
_PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "StudyDescription",
)


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed iso-0.5 contours of a 2-D boolean mask ``(rows, columns)``.

    Returns a list of ``(N, 2)`` float arrays of ``(column, row)`` pixel coordinates
    (open rings: the first point is not repeated). Source: ``contourpy`` marching squares.
    """
    import contourpy

    padded = np.pad(mask.astype(np.float64), 1)
    gen = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    out = []
    for line in gen.lines(0.5):
        pts = np.asarray(line, dtype=np.float64) - 1.0  # undo the padding
        if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
            pts = pts[:-1]
        if len(pts) >= 3:
            out.append(pts)
    return out


def write_rtstruct(
    label: Volume,
    source: str | os.PathLike[str] | Sequence[Dataset],
    card: ModelCard,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[int, Mapping[str, Any]] | str | os.PathLike[str] | None = None,
    series_uid: str | None = None,
    series_number: int | None = None,
    series_description: str | None = None,
) -> Path:
    """Write a label map as an RTSTRUCT of the source series.

    Parameters
    ----------
    label : ``(1, I, J, K)`` integer label map, affine voxel -> RAS+ mm, on the source grid
        (axis order and flips may differ; no resampling).
    source : the source series folder (or one file) or its pydicom Datasets (single-frame).
    card : model card (names, colours).
    path : output file (written atomically).
    metadata : label overrides (see :func:`medinfer.io.dicom_seg.read_label_metadata`).
    series_uid : series to pick from a source folder with several.
    series_number : default source SeriesNumber + 2000.
    series_description : default ``"RTSTRUCT <model> <version>"``.

    Raises
    ------
    GeometryError
        The label grid is not the source grid; mixed source geometry.
    InvalidImageError
        No usable source series; an empty or non-integer label map.
    SeriesSelectionError
        Several series and no ``series_uid``.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from medinfer import __version__
    from medinfer._atomic import atomic_path
    from medinfer.io.dicom_seg import (
        _label_values,
        derived_series,
        label_segment_infos,
        on_source_grid,
        source_grid,
    )

    infos = label_segment_infos(label, card, metadata)
    ordered, geom = source_grid(source, series_uid)
    arr = on_source_grid(np.asarray(label.array[0]), label.affine, geom, str(path))
    present = _label_values(arr)
    if not present:
        raise InvalidImageError(f"{path}: the label map is empty; an RTSTRUCT needs a contour")
    ds0 = ordered[0]
    aff = geom.affine  # (slice, row, column) -> LPS

    now = _dt.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS_UID
    ds.SOPInstanceUID = generate_uid()
    for kw in _PATIENT_STUDY_KEYWORDS:
        setattr(ds, kw, ds0.get(kw, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber, ds.SeriesDescription = derived_series(
        ds0, card, "RTSTRUCT", 2000, series_number, series_description)
    ds.SeriesDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.OperatorsName = ""
    ds.Manufacturer = "medinfer"
    ds.ManufacturerModelName = card.name[:64]
    ds.SoftwareVersions = f"medinfer {__version__}"
    ds.InstanceNumber = 1
    ds.StructureSetLabel = card.name[:16]
    ds.StructureSetName = f"{card.name} {card.version}"[:64]
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    for_uid = str(ds0.get("FrameOfReferenceUID", ""))
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""

    def image_ref(d: Dataset) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = d.SOPClassUID
        item.ReferencedSOPInstanceUID = d.SOPInstanceUID
        return item

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = ds0.SeriesInstanceUID
    series_ref.ContourImageSequence = DicomSequence([image_ref(d) for d in ordered])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_COMPONENT_SOP_CLASS
    study_ref.ReferencedSOPInstanceUID = ds0.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    for_ref = Dataset()
    for_ref.FrameOfReferenceUID = for_uid
    for_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([for_ref])

    rois, contours, observations = [], [], []
    for n, value in enumerate(present, 1):
        info = infos.get(value)
        name = info.name if info else f"label {value}"
        color = info.color if info else (255, 0, 0)
        roi = Dataset()
        roi.ROINumber = value
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = name[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{card.name} {card.version}"[:64]
        rois.append(roi)
        items = []
        for s, d in enumerate(ordered):
            mask = arr[s] == value
            if not mask.any():
                continue
            for ring in mask_contours(mask):
                # pixel (column c, row r) on slice s -> LPS via the source grid affine
                idx = np.column_stack([np.full(len(ring), float(s)), ring[:, 1], ring[:, 0],
                                       np.ones(len(ring))])
                lps = (idx @ aff.T)[:, :3]
                c = Dataset()
                c.ContourImageSequence = DicomSequence([image_ref(d)])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(ring)
                c.ContourData = [f"{v:.4f}" for v in lps.reshape(-1)]
                items.append(c)
        rc = Dataset()
        rc.ROIDisplayColor = list(color)
        rc.ReferencedROINumber = value
        rc.ContourSequence = DicomSequence(items)
        contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber = n
        obs.ReferencedROINumber = value
        obs.RTROIInterpretedType = "ORGAN"
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out = Path(path)
    with atomic_path(out) as tmp:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    return out


def _even_odd_fill(shape: tuple[int, int], poly: np.ndarray) -> np.ndarray:
    """Boolean ``shape`` (n_i, n_j): grid points (i, j) inside ``poly`` ``(N, 2)`` of (i, j),
    even-odd rule (crossing number along +i)."""
    inside = np.zeros(shape, dtype=bool)
    lo = np.floor(poly.min(axis=0)).astype(int)
    hi = np.ceil(poly.max(axis=0)).astype(int)
    i0, j0 = max(lo[0], 0), max(lo[1], 0)
    i1, j1 = min(hi[0], shape[0] - 1), min(hi[1], shape[1] - 1)
    if i0 > i1 or j0 > j1:
        return inside
    ii = np.arange(i0, i1 + 1, dtype=np.float64)[:, None]
    jj = np.arange(j0, j1 + 1, dtype=np.float64)[None, :]
    acc = np.zeros((len(ii), jj.shape[1]), dtype=bool)
    a = poly
    b = np.roll(poly, -1, axis=0)
    for (ai, aj), (bi, bj) in zip(a, b, strict=True):
        if aj == bj:
            continue
        crosses = (aj > jj) != (bj > jj)  # edge spans this j (half-open)
        t = (jj - aj) / (bj - aj)
        i_cross = ai + t * (bi - ai)
        acc ^= crosses & (ii < i_cross)
    inside[i0:i1 + 1, j0:j1 + 1] = acc
    return inside


def read_rtstruct(
    path: str | os.PathLike[str],
    *,
    reference: str | os.PathLike[str] | Volume,
    series_uid: str | None = None,
) -> Volume:
    """Rasterise an RTSTRUCT onto the reference series grid.

    Parameters
    ----------
    path : the RTSTRUCT file.
    reference : the source series folder, or its Volume from
        :func:`medinfer.io.dicom.read_dicom`.
    series_uid : series to pick from a reference folder with several.

    Returns
    -------
    Volume
        ``(1, I, J, K)`` uint8/uint16 label map on the reference grid; voxel value = ROI
        number (= medinfer's label value); a voxel centre inside a slice's contours of an
        ROI (even-odd rule) gets that ROI (later ROIs win on overlap).
        ``meta["rois"]``: ``{number, name, color}``.

    Raises
    ------
    InvalidImageError
        Not a readable RTSTRUCT.
    GeometryError
        A contour that does not lie in one slice of the reference grid.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from medinfer.io.dicom_seg import reference_volume

    p = Path(path)
    try:
        ds = pydicom.dcmread(p)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise InvalidImageError(f"{p}: not a readable DICOM file ({exc})") from None
    if str(ds.get("SOPClassUID", "")) != RTSTRUCT_SOP_CLASS_UID:
        raise InvalidImageError(f"{p}: not an RT Structure Set (SOP class "
                                f"{ds.get('SOPClassUID', '?')})")
    ref = reference_volume(reference, series_uid)
    shape = ref.spatial_shape
    inv = np.linalg.inv(ref.affine)
    names = {int(r.ROINumber): str(r.get("ROIName", "")) for r in
             ds.get("StructureSetROISequence", [])}
    rois = []
    top = max([0, *names, *(int(rc.ReferencedROINumber) for rc in
                            ds.get("ROIContourSequence", []))])
    out = np.zeros(shape, dtype=np.uint8 if top <= 255 else np.uint16)
    for rc in ds.get("ROIContourSequence", []):
        number = int(rc.ReferencedROINumber)
        rois.append({"number": number, "name": names.get(number, ""),
                     "color": [int(c) for c in rc.get("ROIDisplayColor", [])]})
        per_slice: dict[int, np.ndarray] = {}
        for c in rc.get("ContourSequence", []):
            pts = np.asarray([float(v) for v in c.ContourData], dtype=np.float64).reshape(-1, 3)
            ras = affine_lps_to_ras(np.eye(4))[:3, :3] @ pts.T  # LPS -> RAS: flip x, y
            ijk = (inv[:3, :3] @ ras).T + inv[:3, 3]
            k = np.rint(ijk[:, 2])
            if np.ptp(ijk[:, 2]) > 0.1 or not 0 <= k[0] < shape[2]:
                raise GeometryError(f"{p}: ROI {number}: a contour does not lie in one slice "
                                    "of the reference series")
            kk = int(k[0])
            filled = _even_odd_fill(shape[:2], ijk[:, :2])
            per_slice[kk] = per_slice.get(kk, np.zeros(shape[:2], bool)) ^ filled
        for kk, m in per_slice.items():
            out[:, :, kk][m] = number
    meta = {"format": "rtstruct", "source": str(p), "rois": rois,
            "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
            "series_instance_uid": str(ds.get("SeriesInstanceUID", ""))}
    return Volume(out, ref.affine, meta)
