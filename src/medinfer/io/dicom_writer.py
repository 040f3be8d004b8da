"""Export a :class:`Volume` as a single-frame DICOM series (one file per slice).

Geometry (PS3.3 C.7.6.2, Image Plane module). With the volume's voxel -> LPS affine
``A = affine_ras_to_lps(volume.affine)``:

- Columns = I size, Rows = J size; a slice's pixel (row r, column c) is voxel (c, r, k);
- ImageOrientationPatient = (A[:, 0] / |A[:, 0]|, A[:, 1] / |A[:, 1]|);
- PixelSpacing = (|A[:, 1]|, |A[:, 0]|) (between rows, between columns);
- ImagePositionPatient of slice k = A @ (0, 0, k, 1); SliceThickness and
  SpacingBetweenSlices = |A[:, 2]|; SliceLocation = position along the slice normal.

Any orientation and obliquity is accepted, but DICOM can only describe grids whose I and
J axes are orthogonal and whose K axis is parallel to I x J (no shear, no tilt): other
affines raise :class:`~medinfer.errors.GeometryError` (resample first). When K points
against I x J (a left-handed voxel grid, e.g. LAS), the files are valid, and a reader
that sorts slices along the normal (all of them, including :func:`read_dicom`) returns
the slices in reverse order; the world geometry is the same.

Pixel encoding: integers (and bool) that fit are stored as they are: uint8 in 16 unsigned
bits (the CT and MR IODs require BitsAllocated 16; BitsStored 8 for MR, 16 for CT),
other unsigned values up to 65535 in 16 unsigned bits, signed values within int16 in 16
signed bits; slope 1, intercept 0. Float data whose values are all integers in that
range are stored the same way. Other data are stored as uint16 with RescaleIntercept =
minimum and RescaleSlope = (maximum - minimum) / 65535 (quantisation error at most half
a slope step); NaN or infinite values raise :class:`~medinfer.errors.InvalidImageError`.

Conformance: the files pass ``dciodvfy`` (dicom3tools) without errors: ImageType has its
value 3, Type 2C Laterality and PatientPosition are present (empty: unknown), and MR files
carry RescaleSlope/Intercept only when they are not the identity.

Files: ``IM00000.dcm``, ``IM00001.dcm``... Explicit VR Little Endian, with File Meta
Information (PS3.10). With ``shuffle_seed`` the file names and InstanceNumbers follow a
random permutation of the slice order (to test readers that must not trust them).
The series is written into a hidden sibling folder that is renamed onto ``folder`` when
complete, so ``folder`` never holds a partial series.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from medinfer._atomic import _UMASK
from medinfer.errors import ConfigError, GeometryError, InvalidImageError, parse_enum
from medinfer.io._lps import affine_ras_to_lps
from medinfer.volume import Volume

__all__ = ["DicomModality", "write_dicom_series"]

_ORTHO_TOL = 1e-6


class DicomModality(StrEnum):
    """Modalities (and SOP classes) :func:`write_dicom_series` can write."""

    MR = "MR"
    CT = "CT"


_SOP_CLASS = {DicomModality.MR: MRImageStorage, DicomModality.CT: CTImageStorage}


def write_dicom_series(
    volume: Volume,
    folder: str | os.PathLike[str],
    *,
    modality: DicomModality | str = "MR",
    shuffle_seed: int | None = None,
    series_description: str = "medinfer export",
    series_number: int = 1,
    patient_id: str = "ANONYMOUS",
    patient_name: str = "Anonymous^",
    study_description: str = "",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
) -> list[Path]:
    """Write a 1-channel ``volume`` as a DICOM series in ``folder`` (one file per slice).

    Parameters
    ----------
    volume : ``(1, I, J, K)``, any numeric dtype, affine voxel -> RAS+ mm (converted to
        LPS here); I and J orthogonal and K parallel to I x J (see the module docstring).
    folder : output folder; must not exist or be empty.
    modality : ``"MR"`` (MR Image Storage) or ``"CT"`` (CT Image Storage, RescaleType HU).
    shuffle_seed : if given, file names and InstanceNumbers are a random permutation of
        the slice order (seeded); else they follow the slice order.
    series_description, series_number, patient_id, patient_name, study_description :
        header values.
    study_instance_uid, series_instance_uid, frame_of_reference_uid : reuse these UIDs
        (e.g. to add a series to an existing study / frame of reference); new UIDs are
        generated when ``None``.

    Returns
    -------
    list of Path
        The files written, in slice (K) order.

    Raises
    ------
    GeometryError
        The affine has shear or tilt that a DICOM series cannot represent.
    InvalidImageError
        More than one channel, non-finite values, or a non-numeric dtype.
    ConfigError
        ``folder`` exists and is not empty, or ``modality`` is not MR/CT.
    """
    mod = parse_enum(DicomModality, modality, "modality")
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: the output folder exists and is not empty; choose a new one")
    if volume.num_channels != 1:
        raise InvalidImageError(
            f"write_dicom_series: the volume has {volume.num_channels} channels; a DICOM "
            "series holds one (write channels one by one)"
        )
    geo = _geometry(volume.affine)
    data = volume.array[0]
    encoded, slope, intercept, bits_alloc, signed = _encoding(data)
    bits_stored = bits_alloc
    if bits_alloc == 8:
        # CT and MR Image modules: BitsAllocated 16 (C.8.2.1, C.8.3.1); MR keeps
        # BitsStored 8 (read back as uint8), CT needs BitsStored 12 to 16
        encoded, bits_alloc = encoded.astype(np.uint16), 16
        bits_stored = 16 if mod is DicomModality.CT else 8
    n_i, n_j, n_k = volume.spatial_shape
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    perm = (
        np.random.default_rng(shuffle_seed).permutation(n_k)
        if shuffle_seed is not None
        else np.arange(n_k)
    )
    lo, hi = (float(np.min(data)), float(np.max(data))) if data.size else (0.0, 0.0)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    # mkdtemp makes 0700; the series folder gets the umask's permissions like every output
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        names: list[Path] = []
        for k in np.argsort(perm):  # write in file-name order, not slice order
            k = int(k)
            ds = _slice_dataset(
                mod=mod,
                geo=geo,
                k=k,
                rows=n_j,
                cols=n_i,
                pixels=np.ascontiguousarray(encoded[:, :, k].T),
                bits_alloc=bits_alloc,
                bits_stored=bits_stored,
                signed=signed,
                slope=slope,
                intercept=intercept,
                window=(lo, hi),
                instance_number=int(perm[k]) + 1,
                uids=(study_uid, series_uid, for_uid),
                text=(series_description, patient_id, patient_name, study_description),
                series_number=series_number,
                when=(date, time),
            )
            ds.save_as(tmp / f"IM{int(perm[k]):05d}.dcm", enforce_file_format=True)
        names = [out / f"IM{int(perm[k]):05d}.dcm" for k in range(n_k)]
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


def _geometry(affine_ras: np.ndarray) -> dict[str, Any]:
    a = affine_ras_to_lps(affine_ras)
    cols = a[:3, :3]
    sx, sy, sz = (float(np.linalg.norm(cols[:, i])) for i in range(3))
    row, col, kdir = cols[:, 0] / sx, cols[:, 1] / sy, cols[:, 2] / sz
    if abs(float(row @ col)) > _ORTHO_TOL:
        raise GeometryError(
            "write_dicom_series: the I and J axes of the affine are not orthogonal "
            f"(cosine {float(row @ col):.3g}); a DICOM image plane cannot hold sheared "
            "pixels. Resample the volume first"
        )
    normal = np.cross(row, col)
    if np.linalg.norm(np.cross(kdir, normal)) > _ORTHO_TOL:
        angle = float(np.degrees(np.arccos(min(1.0, abs(float(kdir @ normal))))))
        raise GeometryError(
            "write_dicom_series: the K axis is not perpendicular to the I-J plane "
            f"({angle:.3g} degrees off, sheared or tilted grid); a DICOM series would be "
            "read as gantry-tilted. Resample the volume first"
        )
    return {"affine": a, "row": row, "col": col, "normal": normal, "spacing": (sx, sy, sz)}


def _encoding(data: np.ndarray) -> tuple[np.ndarray, float, float, int, bool]:
    """(stored array, slope, intercept, BitsAllocated, signed) for ``data`` (I, J, K)."""
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if data.dtype.kind not in "uif":
        raise InvalidImageError(
            f"write_dicom_series: cannot store dtype {data.dtype}; accepted: bool, int, float"
        )
    if data.size == 0:
        return data.astype(np.uint16), 1.0, 0.0, 16, False
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise InvalidImageError("write_dicom_series: the volume holds NaN or infinite values")
    lo, hi = data.min(), data.max()
    integral = data.dtype.kind in "iu" or bool(np.all(data == np.round(data)))
    if integral:
        lo_i, hi_i = int(lo), int(hi)
        if data.dtype == np.uint8:
            return data, 1.0, 0.0, 8, False
        signed_src = data.dtype.kind == "i" or data.dtype.kind == "f"
        if signed_src and lo_i >= -32768 and hi_i <= 32767 and (lo_i < 0 or data.dtype.kind == "i"):
            return data.astype(np.int16), 1.0, 0.0, 16, True
        if lo_i >= 0 and hi_i <= 65535:
            return data.astype(np.uint16), 1.0, 0.0, 16, False
    lo_f, hi_f = float(lo), float(hi)
    intercept = float(format_number_as_ds(lo_f))
    span = hi_f - intercept
    slope = float(format_number_as_ds(span / 65535.0)) if span > 0 else 1.0
    if slope <= 0:
        slope = 1.0
    raw = np.rint((data.astype(np.float64) - intercept) / slope)
    # DS rounding (16 characters) of slope/intercept can push the extremes a hair out of
    # range; clipping there changes values by ~1e-10 of the range
    return np.clip(raw, 0, 65535).astype(np.uint16), slope, intercept, 16, False


def _ds(x: float) -> str:
    return format_number_as_ds(float(x))


def _slice_dataset(
    *,
    mod: DicomModality,
    geo: dict[str, Any],
    k: int,
    rows: int,
    cols: int,
    pixels: np.ndarray,
    bits_alloc: int,
    bits_stored: int,
    signed: bool,
    slope: float,
    intercept: float,
    window: tuple[float, float],
    instance_number: int,
    uids: tuple[str, str, str],
    text: tuple[str, str, str, str],
    series_number: int,
    when: tuple[str, str],
) -> Dataset:
    study_uid, series_uid, for_uid = uids
    series_description, patient_id, patient_name, study_description = text
    date, time = when
    sop_class = _SOP_CLASS[mod]
    sop_uid = generate_uid()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDINFER"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    # value 3: CT "AXIAL" (enumerated, C.8.2.1.1.1; any slice plane), MR "OTHER" (defined
    # term, C.8.3.1.1.1)
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if mod is DicomModality.CT else "OTHER"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.Modality = mod.value
    ds.Manufacturer = "medinfer"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    sx, sy, sz = geo["spacing"]
    ds.SliceThickness = _ds(sz)
    if mod is DicomModality.MR:
        ds.ScanningSequence = "RM"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.SpacingBetweenSlices = _ds(sz)
        ds.EchoTime = ""
        ds.RepetitionTime = ""
        ds.EchoTrainLength = ""
    else:
        ds.KVP = ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ""
    ds.SeriesNumber = int(series_number)
    # Type 2C in General Series (C.7.3.1): Laterality when the body part is paired, and
    # PatientPosition for CT and MR; not known here, so present and empty (Type 2)
    ds.Laterality = ""
    ds.PatientPosition = ""
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    a = geo["affine"]
    ipp = a[:3, :3] @ np.array([0.0, 0.0, float(k)]) + a[:3, 3]
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.ImageOrientationPatient = [_ds(v) for v in (*geo["row"], *geo["col"])]
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(float(ipp @ geo["normal"]))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds(sy), _ds(sx)]
    ds.BitsAllocated = bits_alloc
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    lo, hi = window
    ds.WindowCenter = _ds((lo + hi) / 2.0)
    ds.WindowWidth = _ds(max(hi - lo, 1.0))
    if mod is DicomModality.CT or slope != 1.0 or intercept != 0.0:
        # the MR IOD has no Modality LUT module: written only where the values need it
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        ds.RescaleType = "HU" if mod is DicomModality.CT else "US"
    dtype = {(8, False): "<u1", (16, False): "<u2", (16, True): "<i2"}[(bits_alloc, signed)]
    data = np.asarray(pixels, dtype=dtype).tobytes()
    ds.PixelData = data + b"\x00" if len(data) % 2 else data  # even length (PS3.5 7.1.1)
    return ds
