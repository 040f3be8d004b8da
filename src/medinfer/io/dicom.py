"""DICOM reading: a file or a folder (recursive) -> one series -> a :class:`Volume`.

Pipeline of :func:`read_dicom`
------------------------------
1. **Scan.** Walk the folder (sorted, recursive, without following folder links; hidden
   files skipped). Each file is sniffed (:func:`medinfer.io.sniff.looks_like_dicom`) and
   its header read with ``stop_before_pixels``. Skipped and counted: non-DICOM files,
   DICOMDIR files (Media Storage Directory, PS3.10 section 7.2), DICOM objects without an
   image (no Rows/Columns: SR, RT structure sets, presentation states) and Segmentation
   objects (PS3.3 A.51, read by the SEG reader), unreadable files (DICOM files that do not
   parse, and files named ``.dcm`` / ``.dicom`` / ``.ima`` that are not DICOM; see
   "Unreadable files" below: they stop the read of the series they may belong to).
2. **Group** by SeriesInstanceUID (0020,000E). With several series and no ``series_uid``
   a :class:`~medinfer.errors.SeriesSelectionError` lists them (description, modality,
   slice count, UID); :func:`list_series` gives the same list as data. Files repeating a
   SOPInstanceUID already seen are ignored (copies of the same instance).
3. **Frames.** Single-frame files give one frame each (Image Plane module, PS3.3
   C.7.6.2: ImagePositionPatient, ImageOrientationPatient, PixelSpacing). Enhanced
   multi-frame files (PS3.3 C.7.6.16: PerFrameFunctionalGroupsSequence and
   SharedFunctionalGroupsSequence) give one frame per item, reading
   PlanePositionSequence, PlaneOrientationSequence, PixelMeasuresSequence and
   PixelValueTransformationSequence per frame, falling back to the shared groups.
   Legacy multi-frame files with GridFrameOffsetVector (RT Dose, PS3.3 C.8.8.3.2) are
   supported too. Siemens MOSAIC images (``MOSAIC`` in ImageType) give one frame per
   tile, placed as dcm2niix does (:mod:`medinfer.io._mosaic`; mosaics that do not divide
   into whole tiles are refused); a series of several MOSAIC images (fMRI, diffusion) is
   read as one volume per image, stacked as channels ``(T, I, J, K)`` like a 4-D NIfTI,
   ``meta["mosaic_volumes"]`` = T.
4. **Geometry** (all in LPS, the DICOM patient frame). Every frame must have the same
   Rows, Columns, PixelSpacing and ImageOrientationPatient. The slice normal is the
   cross product of the row and column direction cosines; frames are sorted by their
   position projected onto the normal (never by file name or InstanceNumber; the method
   of dcm2niix, ITK's GDCM series sorter and highdicom). Then:

   - duplicate positions (distance < ``position_tolerance_mm``: several echoes, time
     points or stacks in one series) -> :class:`~medinfer.errors.GeometryError`;
   - non-uniform spacing: every gap between neighbours must be within
     ``max(position_tolerance_mm, spacing_rtol * mean gap)`` of the mean gap (catches
     missing slices and variable-thickness stacks) -> ``GeometryError``;
   - gantry tilt / sheared stacks: each slice's offset from the first slice *within
     the slice plane* (its position minus the part along the normal) must stay below
     ``position_tolerance_mm``; otherwise the stacking direction is not the slice normal
     (CT gantry tilt) -> ``GeometryError`` giving the angle. medinfer does not resample
     tilted series; convert them with ``dcm2niix`` (which can de-tilt) first.

   Defaults: ``position_tolerance_mm = 0.02`` and ``spacing_rtol = 0.01``; both are
   arguments of :func:`read_dicom`.
5. **Pixels.** The output size (Rows x Columns x frames x output item size) is checked
   against the byte limit (:mod:`medinfer.io._limits`) before pixel data are read.
   RescaleSlope / RescaleIntercept (PS3.3 C.11.1.1.2; per frame for enhanced objects;
   DoseGridScaling for RT Dose) are applied per frame. The output is integer (the
   smallest of uint8/uint16/int16/int32/int64 holding the rescaled range of the stored
   bits) when every slope and intercept is integral, else float32. 32/64-bit integer
   results whose actual values fit 16 bits are narrowed to int16/uint16 (e.g. CT stored
   as signed 16 bits with intercept -1024 comes back as int16 HU).

Unreadable files
----------------
A file of the chosen series that cannot be read is an error naming it
(:class:`~medinfer.errors.InvalidImageError`), never a volume with a slice fewer: a
file whose header cannot be parsed (e.g. an unreadable first file) counts as the
chosen series' when the SeriesInstanceUID in what can be parsed of it is that
series' (or names no other series found), or when not even that can be read; a file
whose pixel data cannot be decoded (e.g. a truncated last file) always does. With
``allow_missing_slices=True`` (CLI ``--allow-missing-slices``) such files are left
out with a warning and listed in ``meta["skipped_files"]``; the remaining slices must
still form a regular stack (a gap in the middle stays a ``GeometryError``).

Axes and frames
---------------
The array is ``(1, I, J, K)``: I runs along a row (the column index, DICOM direction
cosine "row" = IOP[0:3], spacing PixelSpacing[1]), J down a column (the row index,
IOP[3:6], spacing PixelSpacing[0]), K over the sorted slices (increasing position along
the normal). The voxel -> LPS affine (PS3.3 C.7.6.2.1.1) is converted to RAS+ with
:func:`affine_lps_to_ras` (negate x and y). A series whose slices were written with K
against the normal therefore comes back with the slice order of increasing normal
position, which describes the same world geometry.

``Volume.meta`` keys: ``format`` (``"dicom"``), ``source``, ``modality``,
``sop_class_uid``, ``series_instance_uid``, ``study_instance_uid``,
``frame_of_reference_uid``, ``sop_instance_uids`` (one per slice, in K order; for a
multi-frame file the same UID repeats) and ``frame_numbers`` (1-based frame per slice,
``None`` for single-frame files), ``series_description``, ``series_number``,
``study_description``, ``study_date``, ``patient_id``, ``manufacturer``,
``body_part_examined``, ``photometric_interpretation``, ``rescale_slope`` /
``rescale_intercept`` (a number, or one per slice when they differ), ``rescale_type``,
``pixel_spacing`` (row, column; mm), ``slice_spacing`` (mm), ``slice_thickness``,
``image_orientation_patient``, ``window_center`` / ``window_width``, ``n_files``,
``skipped_files`` (files left out with ``allow_missing_slices``; empty otherwise).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medinfer.errors import (
    GeometryError,
    InvalidImageError,
    ResourceLimitError,
    SeriesSelectionError,
)
from medinfer.io._dicom_guard import check_pixel_bytes, dcmread_bounded, rescale_into
from medinfer.io._dtypes import fits, smallest_int_dtype
from medinfer.io._limits import check_array_size, check_frame_count
from medinfer.io._lps import affine_lps_to_ras, affine_ras_to_lps
from medinfer.io._missing_slices import allow_missing_slices_default
from medinfer.io._mosaic import (
    MosaicLayout,
    detile,
    first_tile_position,
    is_mosaic,
    mosaic_layout,
)
from medinfer.io.dicom_writer import write_dicom_series
from medinfer.io.sniff import looks_like_dicom
from medinfer.volume import Volume

__all__ = [
    "MAX_FILES",
    "SeriesInfo",
    "affine_lps_to_ras",
    "affine_ras_to_lps",
    "list_series",
    "read_dicom",
    "write_dicom_series",
]

log = logging.getLogger(__name__)

#: the most files a folder scan looks at before giving up
MAX_FILES = 200_000
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_RTDOSE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.2"
#: file suffixes of DICOM files: such a file that is not readable DICOM counts as unreadable
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: errors a DICOM parser raises on corrupt input
_PARSE_ERRORS: tuple[type[BaseException], ...] = (
    InvalidDicomError,
    OSError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    struct.error,
    NotImplementedError,
    OverflowError,
    RuntimeError,
    zlib.error,
    BytesLengthException,
)


# ---------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class SeriesInfo:
    """One image series found under a path (what a user needs to pick it).

    ``n_slices`` counts frames (one per single-frame file, NumberOfFrames per
    multi-frame file); ``rows`` / ``columns`` are those of the first file.
    """

    series_instance_uid: str
    modality: str
    series_description: str
    series_number: int | None
    study_instance_uid: str
    patient_id: str
    n_files: int
    n_slices: int
    rows: int
    columns: int
    sop_class_uid: str

    def describe(self) -> str:
        """One line: description, modality, slices, size, series number, UID."""
        desc = self.series_description or "(no description)"
        number = f", series {self.series_number}" if self.series_number is not None else ""
        files = f" in {self.n_files} files" if self.n_files != self.n_slices else ""
        return (
            f"{desc!r}: {self.modality or '?'}, {self.n_slices} slice"
            f"{'s' if self.n_slices != 1 else ''}{files}, {self.rows}x{self.columns}"
            f"{number}, UID {self.series_instance_uid or '(none)'}"
        )


@dataclass
class _Entry:
    path: Path
    ds: Dataset  # header only (stop_before_pixels)
    mosaic: MosaicLayout | None = None  # set by _frames_of for Siemens MOSAIC images


@dataclass
class _ScanReport:
    files: int = 0
    hidden: int = 0
    non_dicom: int = 0
    dicomdir: int = 0
    non_image: int = 0
    segmentation: int = 0
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    #: (path, SOPClassUID, SeriesInstanceUID) of the DICOM objects without an image
    non_image_files: list[tuple[Path, str, str]] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.files} files looked at"]
        for name, n in (
            ("not DICOM", self.non_dicom),
            ("DICOMDIR", self.dicomdir),
            ("DICOM without an image", self.non_image),
            ("DICOM SEG", self.segmentation),
            ("unreadable", len(self.unreadable)),
            ("hidden", self.hidden),
        ):
            if n:
                parts.append(f"{n} {name}")
        return ", ".join(parts)


def list_series(path: str | os.PathLike[str]) -> list[SeriesInfo]:
    """The image series under ``path`` (a DICOM file or a folder, searched recursively).

    Sorted by study, series number and UID. Headers only; no pixel data are read.

    Raises
    ------
    InvalidImageError
        ``path`` does not exist, or is a file that is not a readable DICOM image.
    ResourceLimitError
        The folder holds more than :data:`MAX_FILES` files.
    """
    entries, _ = _scan(Path(path))
    return [_series_info(uid, group) for uid, group in _group(entries).items()]


def _series_info(uid: str, group: Sequence[_Entry]) -> SeriesInfo:
    ds = group[0].ds
    n_slices = sum(_n_frames(e.ds) for e in group)
    number = _int_or_none(ds, "SeriesNumber")
    return SeriesInfo(
        series_instance_uid=uid,
        modality=_str(ds, "Modality"),
        series_description=_str(ds, "SeriesDescription"),
        series_number=number,
        study_instance_uid=_str(ds, "StudyInstanceUID"),
        patient_id=_str(ds, "PatientID"),
        n_files=len(group),
        n_slices=n_slices,
        rows=_int_or_none(ds, "Rows") or 0,
        columns=_int_or_none(ds, "Columns") or 0,
        sop_class_uid=_str(ds, "SOPClassUID"),
    )


# ------------------------------------------------------------------------------ scan
def _iter_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _scan(path: Path) -> tuple[list[_Entry], _ScanReport]:
    """Headers of the DICOM image files at ``path`` (a file or a folder)."""
    report = _ScanReport()
    if not path.exists():
        raise InvalidImageError(f"{path}: no such file or folder")
    if path.is_file():
        entry, reason = _read_header(path, report)
        if entry is None:
            raise InvalidImageError(f"{path}: {reason}")
        return [entry], report
    if not path.is_dir():
        raise InvalidImageError(f"{path}: not a regular file or folder")
    entries: list[_Entry] = []
    for f in _iter_files(path):
        report.files += 1
        if report.files > MAX_FILES:
            raise ResourceLimitError(
                f"{path}: more than {MAX_FILES:,} files; point medinfer at the series folder"
            )
        if f.name.startswith("."):
            report.hidden += 1
            continue
        entry, _ = _read_header(f, report)
        if entry is not None:
            entries.append(entry)
    return entries, report


def _read_header(f: Path, report: _ScanReport) -> tuple[_Entry | None, str]:
    """(entry, "") for a DICOM image file, else (None, why it was skipped)."""
    try:
        if not f.is_file():
            report.non_dicom += 1
            return None, "not a regular file"
        with open(f, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        report.unreadable.append((f, str(exc)))
        return None, f"cannot read the file ({exc.strerror or exc})"
    if not looks_like_dicom(head):
        if f.suffix.lower() in _DICOM_SUFFIXES:
            # named as DICOM but unreadable as DICOM: a damaged slice, not a stray file
            why = f"named {f.suffix} but not readable as DICOM (starts with {head[:16]!r})"
            report.unreadable.append((f, why))
            return None, why
        report.non_dicom += 1
        return None, f"not a DICOM file (starts with {head[:16]!r})"
    try:
        ds = dcmread_bounded(
            f, stop_before_pixels=True, force=head[128:132] != b"DICM", defer_size="1 MB"
        )
        sop_class = str(ds.get("SOPClassUID", "") or "")
        media_class = str(getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID", ""))
        is_dir = (
            f.name.upper() == "DICOMDIR"
            or _DICOMDIR_SOP_CLASS in (sop_class, media_class)
            or "DirectoryRecordSequence" in ds
        )
        has_image = "Rows" in ds and "Columns" in ds
    except _PARSE_ERRORS as exc:
        report.unreadable.append((f, f"{type(exc).__name__}: {exc}"))
        log.warning("%s: skipped, unreadable DICOM (%s: %s)", f, type(exc).__name__, exc)
        return None, f"unreadable DICOM ({type(exc).__name__}: {exc})"
    if is_dir:
        report.dicomdir += 1
        return None, "a DICOMDIR (an index of a file set), not an image"
    if not sop_class and not has_image:
        why = "no data set after the file meta information (truncated or empty file)"
        report.unreadable.append((f, why))
        log.warning("%s: skipped, %s", f, why)
        return None, f"unreadable DICOM ({why})"
    if sop_class == _SEG_SOP_CLASS:
        report.segmentation += 1
        return None, "a DICOM Segmentation object, not an image series"
    if not has_image:
        report.non_image += 1
        report.non_image_files.append((f, sop_class, _str(ds, "SeriesInstanceUID")))
        return None, f"a DICOM object without an image (SOP class {sop_class or '?'})"
    return _Entry(f, ds), ""


def _group(entries: Iterable[_Entry]) -> dict[str, list[_Entry]]:
    groups: dict[str, list[_Entry]] = defaultdict(list)
    seen: set[str] = set()
    for e in entries:
        sop = _str(e.ds, "SOPInstanceUID")
        if sop and sop in seen:
            log.info("%s: skipped, SOPInstanceUID %s seen before", e.path, sop)
            continue
        if sop:
            seen.add(sop)
        groups[_str(e.ds, "SeriesInstanceUID")].append(e)
    infos = {uid: _series_info(uid, g) for uid, g in groups.items()}
    order = sorted(
        groups,
        key=lambda u: (
            infos[u].study_instance_uid,
            infos[u].series_number if infos[u].series_number is not None else -1,
            u,
        ),
    )
    return {u: groups[u] for u in order}


# --------------------------------------------------------------------------- reading
@dataclass
class _Frame:
    entry: _Entry
    index: int | None  # 0-based frame in a multi-frame file, None for single-frame
    position: np.ndarray | None  # (3,) LPS mm, centre of the first transmitted pixel
    orientation: np.ndarray | None  # (6,) row then column direction cosines, LPS
    pixel_spacing: np.ndarray | None  # (2,) (between rows, between columns) mm
    slice_thickness: float | None
    spacing_between_slices: float | None
    slope: float
    intercept: float

    def where(self) -> str:
        return f"{self.entry.path}" + ("" if self.index is None else f" frame {self.index + 1}")


def read_dicom(
    path: str | os.PathLike[str],
    *,
    series_uid: str | None = None,
    max_bytes: int | None = None,
    position_tolerance_mm: float = 0.02,
    spacing_rtol: float = 0.01,
    allow_missing_slices: bool | None = None,
) -> Volume:
    """Read one DICOM series (or one DICOM file) as a :class:`Volume`.

    Parameters
    ----------
    path : a DICOM file (that file only: one slice, or every frame of a multi-frame
        file), or a folder searched recursively.
    series_uid : the SeriesInstanceUID to load; required when ``path`` holds several
        image series.
    max_bytes : limit on the returned array's size (default 4 GiB or
        ``MEDINFER_MAX_IMAGE_BYTES``), checked before pixel data are read.
    position_tolerance_mm, spacing_rtol : geometry tolerances (module docstring, step 4).
    allow_missing_slices : load the series without its files that cannot be read (see
        "Unreadable files" in the module docstring) instead of raising; the skipped files
        are listed in ``meta["skipped_files"]`` and in a warning. ``None`` (default):
        the environment variable ``MEDINFER_ALLOW_MISSING_SLICES`` (set by the CLI's
        ``--allow-missing-slices``), else False.

    Returns
    -------
    Volume
        ``array`` ``(1, I, J, K)`` (I along rows, J down columns, K over slices in
        increasing position along the slice normal), integer dtype or float32 after
        rescale (HU for CT); ``affine`` voxel -> RAS+ mm; ``meta`` as in the module
        docstring. A single slice gets the K spacing SpacingBetweenSlices, else
        SliceThickness, else 1 mm.

    Raises
    ------
    InvalidImageError
        No DICOM image under ``path`` (an empty folder, only non-DICOM files), an
        unreadable or truncated file of the chosen series (named in the message; unless
        ``allow_missing_slices``), pixel data that cannot be decoded (compressed
        transfer syntax without a decoder), colour images, Modality LUT sequences.
    SeriesSelectionError
        Several series and no ``series_uid``, or ``series_uid`` not found; the message
        lists the series found.
    GeometryError
        Missing or inconsistent geometry, duplicate positions, non-uniform slice
        spacing, gantry tilt (see the module docstring).
    ResourceLimitError
        The volume would exceed ``max_bytes``, or the folder holds too many files.
    """
    p = Path(path)
    if allow_missing_slices is None:
        allow_missing_slices = allow_missing_slices_default()
    entries, report = _scan(p)
    if not entries:
        raise InvalidImageError(f"{p}: no DICOM images found ({report.summary()})")
    groups = _group(entries)
    chosen = _choose(p, groups, series_uid)
    skipped = _unreadable_of_series(p, report, groups, chosen, allow_missing_slices)
    # lower bound from the headers before any per-frame work (NumberOfFrames may lie)
    first = chosen[0]
    check_array_size(
        (_int(first, "Columns"), _int(first, "Rows"), sum(_n_frames(e.ds) for e in chosen)),
        max(1, (_int_or_none(first.ds, "BitsAllocated") or 8) // 8),
        str(p),
        max_bytes,
    )
    check_frame_count(sum(_n_frames(e.ds) for e in chosen), str(p))
    for e in chosen:
        check_pixel_bytes(e.ds, e.path, _n_frames(e.ds), _int(e, "Rows"), _int(e, "Columns"))
    if len(chosen) > 1 and all(is_mosaic(e.ds) for e in chosen):
        return _read_mosaic_volumes(p, chosen, max_bytes, position_tolerance_mm, spacing_rtol)
    frames = [fr for e in chosen for fr in _frames_checked(e)]
    try:
        order, affine_lps, slice_spacing = _stack_geometry(
            frames, position_tolerance_mm, spacing_rtol
        )
    except GeometryError as exc:
        if not report.unreadable:
            raise
        bad, why = report.unreadable[0]
        raise GeometryError(
            f"{exc} (note: {len(report.unreadable)} unreadable file(s) were skipped, e.g. "
            f"{bad}: {why})"
        ) from None
    frames = [frames[i] for i in order]
    rows, cols = _frame_size(frames[0].entry)
    out_dtype = _output_dtype(frames)
    check_array_size((cols, rows, len(frames)), out_dtype.itemsize, str(p), max_bytes)
    array_kji, undecoded = _read_pixels(
        frames, rows, cols, out_dtype, max_bytes, str(p), skip_bad=allow_missing_slices
    )
    if undecoded:  # allow_missing_slices: drop the files whose pixels cannot be decoded
        keep = [k for k, f in enumerate(frames) if f.entry.path not in undecoded]
        if not keep:
            raise InvalidImageError(f"{p}: no file of the series could be decoded")
        frames = [frames[k] for k in keep]
        order2, affine_lps, slice_spacing = _stack_geometry(
            frames, position_tolerance_mm, spacing_rtol
        )
        frames = [frames[i] for i in order2]
        array_kji = array_kji[np.asarray(keep)[order2]]
        chosen = [e for e in chosen if e.path not in undecoded]
        skipped.extend(undecoded.items())
    for path, why in skipped:
        log.warning("%s: skipped (allow_missing_slices): %s", path, why)
    array_kji = _narrow(array_kji)
    array = np.transpose(array_kji, (2, 1, 0))  # (I=column index, J=row index, K)
    meta = _meta(p, frames, chosen, slice_spacing)
    meta["skipped_files"] = [str(path) for path, _ in skipped]
    return Volume(array, affine_lps_to_ras(affine_lps), meta)


def _series_uid_of_unreadable(f: Path) -> str | None:
    """SeriesInstanceUID of a file whose full header cannot be parsed, if readable.

    Parses only up to the Relationship module (group 0x0020), so a file cut short
    after its SeriesInstanceUID still names its series; ``None`` when even that fails.
    """
    from pydicom.filereader import read_partial

    try:
        with open(f, "rb") as fh:
            ds = read_partial(
                fh, stop_when=lambda tag, vr, length: tag > 0x0020000E, force=True
            )
            uid = ds.get("SeriesInstanceUID")
    except _PARSE_ERRORS:
        return None
    return str(uid).strip() if uid else None


def _unreadable_of_series(
    p: Path,
    report: _ScanReport,
    groups: dict[str, list[_Entry]],
    chosen: Sequence[_Entry],
    allow: bool,
) -> list[tuple[Path, str]]:
    """The unreadable files that may belong to the chosen series; raises unless ``allow``.

    A file counts when its SeriesInstanceUID (read as far as the file allows) is the
    chosen series' UID, or cannot be read at all (then it may be any series' slice).
    So does a file of the chosen series and SOP class without Rows/Columns (pydicom
    reads a header cut short as far as it goes).
    """
    uid = _str(chosen[0].ds, "SeriesInstanceUID")
    sop_class = _str(chosen[0].ds, "SOPClassUID")
    mine: list[tuple[Path, str]] = []
    for path, cls, other in report.non_image_files:
        # an image SOP class without Rows/Columns in this series: a header cut short
        # (its SeriesInstanceUID is the chosen one, cut short inside it, or absent)
        if cls in (sop_class, "") and uid.startswith(other):
            mine.append((path, f"SOP class {cls or '?'} without Rows/Columns: the header "
                               "is cut short or damaged"))
    for path, why in report.unreadable:
        found = _series_uid_of_unreadable(path)
        if found is None or found == uid or found not in groups:
            mine.append((path, why))
    if mine and not allow:
        path, why = mine[0]
        more = f" (and {len(mine) - 1} more file(s))" if len(mine) > 1 else ""
        raise InvalidImageError(
            f"{path}: a file of the chosen DICOM series cannot be read ({why}){more}; "
            "the series would load with a slice missing. Repair or remove the file, or "
            "load without it (allow_missing_slices=True, CLI: --allow-missing-slices)"
        )
    return mine


def _choose(p: Path, groups: dict[str, list[_Entry]], series_uid: str | None) -> list[_Entry]:
    def listing(limit: int = 50) -> str:
        lines = [
            f"  {i + 1}. {_series_info(uid, g).describe()}"
            for i, (uid, g) in enumerate(list(groups.items())[:limit])
        ]
        if len(groups) > limit:
            lines.append(f"  ... and {len(groups) - limit} more (medinfer.io.list_series)")
        return "\n".join(lines)

    if series_uid is not None:
        uid = str(series_uid).strip()
        if uid not in groups:
            raise SeriesSelectionError(
                f"{p}: no image series with SeriesInstanceUID {uid!r}; "
                f"{len(groups)} series found:\n{listing()}"
            )
        return groups[uid]
    if len(groups) > 1:
        raise SeriesSelectionError(
            f"{p}: {len(groups)} DICOM image series found; choose one with its UID "
            f"(series_uid=..., CLI: --series UID):\n{listing()}"
        )
    return next(iter(groups.values()))


def _frames_checked(e: _Entry) -> list[_Frame]:
    """:func:`_frames_of`, with header elements that fail to parse (lazily, e.g. a cut
    functional-groups sequence) reported as :class:`InvalidImageError`."""
    try:
        return _frames_of(e)
    except _PARSE_ERRORS as exc:
        if isinstance(exc, InvalidImageError | GeometryError | ResourceLimitError):
            raise
        raise InvalidImageError(
            f"{e.path}: unreadable DICOM header ({type(exc).__name__}: {exc})"
        ) from None


def _frames_of(e: _Entry) -> list[_Frame]:
    ds = e.ds
    if _str(ds, "SOPClassUID") == _SEG_SOP_CLASS:  # pragma: no cover - filtered in scan
        raise InvalidImageError(f"{e.path}: a DICOM Segmentation object, not an image")
    spp = _int_or_none(ds, "SamplesPerPixel") or 1
    if spp != 1:
        raise InvalidImageError(
            f"{e.path}: SamplesPerPixel = {spp} (colour image, "
            f"{_str(ds, 'PhotometricInterpretation')}); only grey-scale images are supported"
        )
    if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
        raise InvalidImageError(
            f"{e.path}: Modality LUT Sequence (0028,3000) is not supported; accepted: "
            "RescaleSlope/RescaleIntercept"
        )
    n = _n_frames(ds)
    if n == 1 and is_mosaic(ds):
        return _mosaic_frames(e)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return _enhanced_frames(e, n)
    if n > 1:
        return _legacy_multiframe(e, n)
    slope, intercept = _rescale(e, ds, ds)
    return [
        _Frame(
            e,
            None,
            _floats(e, ds, "ImagePositionPatient", 3),
            _floats(e, ds, "ImageOrientationPatient", 6),
            _floats(e, ds, "PixelSpacing", 2),
            _float_or_none(e, ds, "SliceThickness"),
            _float_or_none(e, ds, "SpacingBetweenSlices"),
            slope,
            intercept,
        )
    ]


def _enhanced_frames(e: _Entry, n: int) -> list[_Frame]:
    """Frames of an enhanced multi-frame object (PS3.3 C.7.6.16)."""
    ds = e.ds
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_seq[0] if len(shared_seq) else Dataset()
    per = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per) not in (0, n):
        raise InvalidImageError(
            f"{e.path}: PerFrameFunctionalGroupsSequence has {len(per)} items but "
            f"NumberOfFrames is {n}"
        )
    if n > 1 and not len(per):
        # only shared groups: every frame has the same plane position (refused before
        # building one object per frame)
        raise GeometryError(
            f"{e.path}: {n} frames share one position (no PerFrameFunctionalGroupsSequence, "
            "only shared functional groups); not a 3-D stack"
        )

    def item(frame: Dataset, seq: str) -> Dataset | None:
        for src in (frame, shared):
            s = src.get(seq)
            if s is not None and len(s):
                return s[0]
        return None

    frames = []
    for i in range(n):
        fg = per[i] if len(per) else Dataset()
        pos = item(fg, "PlanePositionSequence")
        ori = item(fg, "PlaneOrientationSequence")
        meas = item(fg, "PixelMeasuresSequence")
        pvt = item(fg, "PixelValueTransformationSequence")
        slope, intercept = _rescale(e, pvt if pvt is not None else ds, ds)
        frames.append(
            _Frame(
                e,
                i,
                _floats(e, pos, "ImagePositionPatient", 3) if pos is not None else None,
                _floats(e, ori, "ImageOrientationPatient", 6) if ori is not None else None,
                _floats(e, meas, "PixelSpacing", 2) if meas is not None else None,
                _float_or_none(e, meas, "SliceThickness") if meas is not None else None,
                _float_or_none(e, meas, "SpacingBetweenSlices") if meas is not None else None,
                slope,
                intercept,
            )
        )
    return frames


def _frame_size(e: _Entry) -> tuple[int, int]:
    """(rows, columns) of one frame: a tile for MOSAIC images, else Rows x Columns."""
    if e.mosaic is not None:
        return e.mosaic.tile_rows, e.mosaic.tile_cols
    return _int(e, "Rows"), _int(e, "Columns")


def _mosaic_frames(e: _Entry) -> list[_Frame]:
    """One frame per tile of a Siemens MOSAIC image (:mod:`medinfer.io._mosaic`)."""
    ds = e.ds
    rows, cols = _int(e, "Rows"), _int(e, "Columns")
    layout = mosaic_layout(ds, str(e.path), rows, cols)
    e.mosaic = layout
    ipp = _floats(e, ds, "ImagePositionPatient", 3)
    iop = _floats(e, ds, "ImageOrientationPatient", 6)
    ps = _floats(e, ds, "PixelSpacing", 2)
    if ipp is None or iop is None or ps is None:
        raise GeometryError(
            f"{e.path}: MOSAIC image without ImagePositionPatient / ImageOrientationPatient "
            "/ PixelSpacing; cannot place its slices"
        )
    row, col = iop[:3], iop[3:]
    normal = layout.normal if layout.normal is not None else np.cross(row, col)
    normal = normal / max(float(np.linalg.norm(normal)), 1e-12)
    thick = _float_or_none(e, ds, "SliceThickness")
    between = _float_or_none(e, ds, "SpacingBetweenSlices")
    spacing = between if between and between > 0 else thick
    if not spacing or not spacing > 0 or not np.isfinite(spacing):
        raise GeometryError(
            f"{e.path}: MOSAIC image without a positive SpacingBetweenSlices or "
            "SliceThickness; the distance between its slices is unknown"
        )
    origin = first_tile_position(ipp, row, col, ps, rows, cols, layout, str(e.path))
    slope, intercept = _rescale(e, ds, ds)
    return [
        _Frame(e, k, origin + k * spacing * normal, iop, ps, thick, between, slope, intercept)
        for k in range(layout.n_images)
    ]


def _read_mosaic_volumes(
    p: Path, chosen: Sequence[_Entry], max_bytes: int | None, tol: float, rtol: float
) -> Volume:
    """A series of several MOSAIC images (fMRI / diffusion): one volume each -> channels.

    Channels follow (AcquisitionNumber, InstanceNumber, file path), as dcm2niix orders
    its 4-D output; every volume must lie on the same grid.
    """
    entries = sorted(
        chosen,
        key=lambda e: (
            _int_or_none(e.ds, "AcquisitionNumber") or 0,
            _int_or_none(e.ds, "InstanceNumber") or 0,
            str(e.path),
        ),
    )
    arrays: list[np.ndarray] = []
    first: tuple[np.ndarray, float, list[_Frame]] | None = None
    for e in entries:
        frames = _frames_of(e)
        order, affine_lps, spacing = _stack_geometry(frames, tol, rtol)
        frames = [frames[i] for i in order]
        if first is None:
            first = (affine_lps, spacing, frames)
        elif len(frames) != len(first[2]) or not np.allclose(affine_lps, first[0], atol=tol):
            raise GeometryError(
                f"{e.path}: the MOSAIC images of the series lie on different grids (e.g. "
                f"{entries[0].path}); not one 4-D series"
            )
        rows, cols = _frame_size(e)
        out_dtype = _output_dtype(frames)
        check_array_size(
            (cols, rows, len(frames) * len(entries)), out_dtype.itemsize, str(p), max_bytes
        )
        arr, _ = _read_pixels(frames, rows, cols, out_dtype, max_bytes, str(p))
        arrays.append(arr)
    assert first is not None  # chosen is never empty
    dtype = np.result_type(*arrays)
    array = _narrow(np.stack([np.transpose(a, (2, 1, 0)) for a in arrays]).astype(dtype))
    meta = _meta(p, first[2], entries, first[1])
    meta["skipped_files"] = []
    meta["mosaic_volumes"] = len(entries)
    return Volume(array, affine_lps_to_ras(first[0]), meta)


def _legacy_multiframe(e: _Entry, n: int) -> list[_Frame]:
    """Frames of a multi-frame object with GridFrameOffsetVector (RT Dose, C.8.8.3.2)."""
    ds = e.ds
    offsets = ds.get("GridFrameOffsetVector")
    ipp = _floats(e, ds, "ImagePositionPatient", 3)
    iop = _floats(e, ds, "ImageOrientationPatient", 6)
    if offsets is None or ipp is None or iop is None:
        raise GeometryError(
            f"{e.path}: multi-frame image ({n} frames) without per-frame positions "
            "(no functional groups, no GridFrameOffsetVector); cannot build a 3-D geometry"
        )
    try:
        off = np.array([float(x) for x in offsets], dtype=np.float64)
    except (TypeError, ValueError):
        raise GeometryError(f"{e.path}: GridFrameOffsetVector is not numeric") from None
    if off.size != n:
        raise GeometryError(
            f"{e.path}: GridFrameOffsetVector has {off.size} values for {n} frames"
        )
    normal = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise GeometryError(f"{e.path}: ImageOrientationPatient rows are parallel")
    normal /= norm
    if off[0] != 0.0:  # offsets are absolute positions along the normal
        off = off - float(ipp @ normal)
    slope, intercept = _rescale(e, ds, ds)
    if _str(ds, "SOPClassUID") == _RTDOSE_SOP_CLASS and "RescaleSlope" not in ds:
        slope = _float_or_none(e, ds, "DoseGridScaling") or 1.0
    spacing = _floats(e, ds, "PixelSpacing", 2)
    thick = _float_or_none(e, ds, "SliceThickness")
    return [
        _Frame(e, i, ipp + off[i] * normal, iop, spacing, thick, None, slope, intercept)
        for i in range(n)
    ]


def _rescale(e: _Entry, src: Dataset, top: Dataset) -> tuple[float, float]:
    slope = _float_or_none(e, src, "RescaleSlope")
    intercept = _float_or_none(e, src, "RescaleIntercept")
    if slope is None and src is not top:
        slope = _float_or_none(e, top, "RescaleSlope")
        intercept = _float_or_none(e, top, "RescaleIntercept")
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0.0:
        raise InvalidImageError(
            f"{e.path}: RescaleSlope {slope} / RescaleIntercept {intercept} are invalid; "
            "the slope must be finite and non-zero"
        )
    return slope, intercept


# --------------------------------------------------------------------------- geometry
def _stack_geometry(
    frames: Sequence[_Frame], tol_mm: float, spacing_rtol: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """(sort order, voxel -> LPS affine, slice spacing mm) of a stack of frames."""
    first = frames[0]
    for fr in frames:
        missing = [
            name
            for name, v in (
                ("ImagePositionPatient", fr.position),
                ("ImageOrientationPatient", fr.orientation),
                ("PixelSpacing", fr.pixel_spacing),
            )
            if v is None
        ]
        if missing:
            raise GeometryError(
                f"{fr.where()}: no {' / '.join(missing)}; the image has no 3-D patient "
                "geometry (a projection radiograph or secondary capture?) and cannot be "
                "loaded as a volume"
            )
    sizes = Counter((_int(f.entry, "Rows"), _int(f.entry, "Columns")) for f in frames)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c} ({n} slices)" for (r, c), n in sizes.most_common())
        raise GeometryError(f"{first.where()}: the series mixes image sizes: {listed}")
    ori = np.array([f.orientation for f in frames], dtype=np.float64)
    if np.max(np.abs(ori - ori[0])) > 1e-4:
        kinds = Counter(tuple(np.round(o, 3)) for o in ori)
        raise GeometryError(
            f"{first.where()}: the series holds {len(kinds)} different slice orientations "
            "(ImageOrientationPatient), e.g. a localizer with several planes or a radial "
            "acquisition; it is not one 3-D stack"
        )
    ps = np.array([f.pixel_spacing for f in frames], dtype=np.float64)
    if np.max(np.abs(ps - ps[0])) > 1e-4 * max(1.0, float(np.max(ps[0]))):
        raise GeometryError(f"{first.where()}: the series mixes pixel spacings")
    row, col = ori[0, :3].copy(), ori[0, 3:].copy()
    row_n, col_n = np.linalg.norm(row), np.linalg.norm(col)
    if row_n < 1e-6 or col_n < 1e-6:
        raise GeometryError(f"{first.where()}: ImageOrientationPatient has a zero vector")
    row, col = row / row_n, col / col_n
    if abs(float(row @ col)) > 1e-3:
        raise GeometryError(
            f"{first.where()}: ImageOrientationPatient rows are not orthogonal "
            f"(dot product {float(row @ col):.4g})"
        )
    if np.any(ps[0] <= 0) or not np.all(np.isfinite(ps[0])):
        raise GeometryError(f"{first.where()}: PixelSpacing {ps[0].tolist()} is not positive")
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    pos = np.array([f.position for f in frames], dtype=np.float64)
    if not np.all(np.isfinite(pos)):
        raise GeometryError(f"{first.where()}: ImagePositionPatient is not finite")
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    d = dist[order]
    p = pos[order]
    n = len(frames)
    if n == 1:
        spacing = first.spacing_between_slices or first.slice_thickness or 1.0
        if not spacing > 0:
            spacing = 1.0
    else:
        gaps = np.diff(d)
        dup = np.flatnonzero(gaps < tol_mm)
        if dup.size:
            i = int(dup[0])
            involved = len(set(dup.tolist()) | set((dup + 1).tolist()))
            raise GeometryError(
                f"{first.where()}: {involved} slices share "
                f"a position (e.g. {frames[order[i]].where()} and "
                f"{frames[order[i + 1]].where()} at {d[i]:.3f} mm along the normal); the "
                "series holds several echoes, time points or stacks. Split it (dcm2niix "
                "does) or select one acquisition"
            )
        spacing = float((d[-1] - d[0]) / (n - 1))
        allowed = max(tol_mm, spacing_rtol * spacing)
        dev = np.abs(gaps - spacing)
        if float(dev.max()) > allowed:
            i = int(np.argmax(dev))
            raise GeometryError(
                f"{first.where()}: non-uniform slice spacing: gaps between neighbouring "
                f"slices range from {gaps.min():.4g} to {gaps.max():.4g} mm (mean "
                f"{spacing:.4g} mm, tolerance {allowed:.3g} mm), e.g. {gaps[i]:.4g} mm "
                f"between {frames[order[i]].where()} and {frames[order[i + 1]].where()}; "
                "missing slices or a variable-thickness stack. medinfer does not resample "
                "irregular stacks"
            )
        inplane = (p - p[0]) - np.outer(d - d[0], normal)
        drift = np.linalg.norm(inplane, axis=1)
        if float(drift.max()) > tol_mm:
            angle = float(np.degrees(np.arctan2(drift[-1], d[-1] - d[0])))
            raise GeometryError(
                f"{first.where()}: the slices are not stacked along their normal: the "
                f"slice centres move {drift.max():.3g} mm within the slice plane over "
                f"{d[-1] - d[0]:.4g} mm (gantry tilt about {angle:.2f} degrees). medinfer "
                "does not resample tilted series; correct the tilt first (e.g. dcm2niix)"
            )
    affine = np.eye(4)
    affine[:3, 0] = row * ps[0][1]  # I: along a row, spacing between columns
    affine[:3, 1] = col * ps[0][0]  # J: down a column, spacing between rows
    affine[:3, 2] = normal * spacing
    affine[:3, 3] = p[0]
    return order, affine, float(spacing)


# ----------------------------------------------------------------------------- pixels
def _stored_range(e: _Entry) -> tuple[int, int]:
    ds = e.ds
    bits_alloc = _int_or_none(ds, "BitsAllocated") or 16
    bits = _int_or_none(ds, "BitsStored") or bits_alloc
    bits = max(1, min(bits, bits_alloc, 64))
    if (_int_or_none(ds, "PixelRepresentation") or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _output_dtype(frames: Sequence[_Frame]) -> np.dtype[Any]:
    """Integer dtype when every rescale is integral (smallest holding the range), else f32."""
    if any("FloatPixelData" in f.entry.ds or "DoubleFloatPixelData" in f.entry.ds for f in frames):
        return np.dtype(np.float32)
    f32_max = float(np.finfo(np.float32).max)
    for f in frames:
        s_lo, s_hi = _stored_range(f.entry)
        ends = (s_lo * f.slope + f.intercept, s_hi * f.slope + f.intercept)
        if not all(np.isfinite(v) and abs(v) <= f32_max for v in ends):
            raise InvalidImageError(
                f"{f.where()}: RescaleSlope {f.slope:g} / RescaleIntercept {f.intercept:g} "
                f"map the stored range [{s_lo}, {s_hi}] beyond the float32 range; "
                "accepted: rescaled values within +-3.4e38"
            )
    lo, hi = None, None
    for f in frames:
        if not (float(f.slope).is_integer() and float(f.intercept).is_integer()):
            return np.dtype(np.float32)
        s_lo, s_hi = _stored_range(f.entry)
        a, b = s_lo * int(f.slope) + int(f.intercept), s_hi * int(f.slope) + int(f.intercept)
        a, b = min(a, b), max(a, b)
        lo = a if lo is None else min(lo, a)
        hi = b if hi is None else max(hi, b)
    if not fits(np.dtype(np.int64), lo or 0, hi or 0):
        return np.dtype(np.float32)
    return smallest_int_dtype(lo or 0, hi or 0)


def _read_pixels(
    frames: Sequence[_Frame],
    rows: int,
    cols: int,
    out_dtype: np.dtype[Any],
    max_bytes: int | None,
    what: str,
    *,
    skip_bad: bool = False,
) -> tuple[np.ndarray, dict[Path, str]]:
    """(pixel data of the sorted frames (K, rows, columns) rescaled, files not decoded).

    A file whose pixel data cannot be decoded (truncated, corrupt) raises
    :class:`InvalidImageError` naming it; with ``skip_bad`` its frames are left
    uninitialised and it is returned with the reason instead.
    """
    out = np.empty((len(frames), rows, cols), dtype=out_dtype)
    by_file: dict[Path, list[int]] = defaultdict(list)
    bad: dict[Path, str] = {}
    for k, f in enumerate(frames):
        by_file[f.entry.path].append(k)
    for path, ks in by_file.items():
        try:
            pixels = _pixel_array(frames[ks[0]].entry, rows, cols)
        except InvalidImageError as exc:
            if not skip_bad:
                raise InvalidImageError(
                    f"{exc}. The series would load with a slice missing; repair or remove "
                    "the file, or load without it (allow_missing_slices=True, CLI: "
                    "--allow-missing-slices)"
                ) from None
            bad[path] = str(exc)
            continue
        for k in ks:
            f = frames[k]
            raw = pixels[0 if f.index is None else f.index]
            out = rescale_into(out, k, raw, f.slope, f.intercept, max_bytes, what)
        del pixels
        log.debug("read pixels of %s", path)
    return out, bad


def _narrow(a: np.ndarray) -> np.ndarray:
    """32/64-bit integer data whose values fit 16 bits -> int16/uint16 (e.g. CT in HU)."""
    if a.dtype.kind not in "iu" or a.dtype.itemsize < 4 or a.size == 0:
        return a
    lo, hi = int(a.min()), int(a.max())
    target = smallest_int_dtype(lo, hi)
    if target.itemsize < 2:
        target = np.dtype(np.uint16)
    return a.astype(target) if target.itemsize < a.dtype.itemsize else a


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Raw data sets (no File Meta) get the transfer syntax they were parsed with."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit:
        ts = ImplicitVRLittleEndian
    else:
        ts = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts


def _pixel_array(e: _Entry, rows: int, cols: int) -> np.ndarray:
    """Stored pixel values of a file, shape (frames, rows, columns)."""
    n = _n_frames(e.ds)
    try:
        ds = dcmread_bounded(e.path, force=True, defer_size="1 MB")
        _ensure_transfer_syntax(ds)
        arr = np.asarray(ds.pixel_array)
    except _PARSE_ERRORS as exc:
        ts = ""
        meta = getattr(e.ds, "file_meta", None)
        if meta is not None and "TransferSyntaxUID" in meta:
            uid = meta.TransferSyntaxUID  # a corrupt file may hold anything here
            ts = f" (transfer syntax {getattr(uid, 'name', str(uid))})"
        raise InvalidImageError(
            f"{e.path}: cannot decode the pixel data{ts}: {type(exc).__name__}: {exc}. "
            "The file may be truncated, or its compression needs an extra decoder "
            "(pylibjpeg, python-gdcm)"
        ) from None
    if e.mosaic is not None:
        full = (_int(e, "Rows"), _int(e, "Columns"))
        if arr.shape != full:
            raise InvalidImageError(
                f"{e.path}: MOSAIC pixel data of shape {arr.shape}; the header announces "
                f"{full[0]} x {full[1]}"
            )
        arr, n = detile(arr, e.mosaic), e.mosaic.n_images
    if n == 1 and arr.shape == (rows, cols):
        arr = arr[np.newaxis]
    if arr.shape != (n, rows, cols):
        raise InvalidImageError(
            f"{e.path}: pixel data of shape {arr.shape}; the header announces "
            f"{n} frame(s) of {rows} x {cols}"
        )
    return arr


# ------------------------------------------------------------------------------- meta
def _meta(p: Path, frames: Sequence[_Frame], chosen: Sequence[_Entry], spacing: float) -> dict[
    str, Any
]:
    ds = frames[0].entry.ds
    slopes = [f.slope for f in frames]
    inters = [f.intercept for f in frames]
    multi = any(f.index is not None for f in frames)

    def one_or_list(values: list[float]) -> float | list[float]:
        return values[0] if all(v == values[0] for v in values) else values

    return {
        "format": "dicom",
        "source": str(p),
        "modality": _str(ds, "Modality"),
        "sop_class_uid": _str(ds, "SOPClassUID"),
        "series_instance_uid": _str(ds, "SeriesInstanceUID"),
        "study_instance_uid": _str(ds, "StudyInstanceUID"),
        "frame_of_reference_uid": _str(ds, "FrameOfReferenceUID"),
        "sop_instance_uids": [_str(f.entry.ds, "SOPInstanceUID") for f in frames],
        "frame_numbers": [None if f.index is None else f.index + 1 for f in frames]
        if multi
        else None,
        "series_description": _str(ds, "SeriesDescription"),
        "series_number": _int_or_none(ds, "SeriesNumber"),
        "study_description": _str(ds, "StudyDescription"),
        "study_date": _str(ds, "StudyDate"),
        "patient_id": _str(ds, "PatientID"),
        "manufacturer": _str(ds, "Manufacturer"),
        "body_part_examined": _str(ds, "BodyPartExamined"),
        "photometric_interpretation": _str(ds, "PhotometricInterpretation"),
        "rescale_slope": one_or_list(slopes),
        "rescale_intercept": one_or_list(inters),
        "rescale_type": _str(ds, "RescaleType") or ("HU" if _str(ds, "Modality") == "CT" else ""),
        "pixel_spacing": [float(x) for x in frames[0].pixel_spacing]
        if frames[0].pixel_spacing is not None
        else None,
        "slice_spacing": spacing,
        "slice_thickness": frames[0].slice_thickness,
        "image_orientation_patient": [float(x) for x in frames[0].orientation]
        if frames[0].orientation is not None
        else None,
        "window_center": _first_float(ds, "WindowCenter"),
        "window_width": _first_float(ds, "WindowWidth"),
        "n_files": len(chosen),
    }


# ---------------------------------------------------------------------------- helpers
def _n_frames(ds: Dataset) -> int:
    n = _int_or_none(ds, "NumberOfFrames")
    return n if n is not None and n > 0 else 1


def _str(ds: Dataset, keyword: str) -> str:
    try:
        v = ds.get(keyword)
    except _PARSE_ERRORS:
        return ""
    return "" if v is None else str(v).strip()


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    try:
        v = ds.get(keyword)
        return None if v is None or v == "" else int(v)
    except _PARSE_ERRORS:
        return None


def _int(e: _Entry, keyword: str) -> int:
    v = _int_or_none(e.ds, keyword)
    if v is None or v <= 0:
        raise InvalidImageError(f"{e.path}: {keyword} is missing or not a positive integer")
    return v


def _first_float(ds: Dataset, keyword: str) -> float | None:
    try:
        v = ds.get(keyword)
        if v is None or v == "":
            return None
        if isinstance(v, str | bytes) or not hasattr(v, "__len__"):
            return float(v)
        return float(v[0]) if len(v) else None
    except _PARSE_ERRORS:
        return None


def _float_or_none(e: _Entry, ds: Dataset, keyword: str) -> float | None:
    try:
        v = ds.get(keyword)
        if v is None or v == "":
            return None
        out = float(v)
    except _PARSE_ERRORS:
        raise InvalidImageError(f"{e.path}: {keyword} is not a number") from None
    return out


def _floats(e: _Entry, ds: Dataset, keyword: str, n: int) -> np.ndarray | None:
    try:
        v = ds.get(keyword)
        if v is None or v == "":
            return None
        values = [float(x) for x in v]
    except _PARSE_ERRORS:
        raise GeometryError(f"{e.path}: {keyword} is not a list of numbers") from None
    if len(values) != n:
        raise GeometryError(f"{e.path}: {keyword} has {len(values)} values; expected {n}")
    arr = np.array(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise GeometryError(f"{e.path}: {keyword} {values} is not finite")
    return arr
