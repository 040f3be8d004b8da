"""Hostile-input corpus: small valid scans and seeded mutations of them.

Builders return the bytes of tiny, valid files (oblique, anisotropic geometry): NIfTI-1
(plain / gzip, scaled or not) and DICOM (single-frame CT slices in explicit, implicit,
big-endian and deflated transfer syntaxes, without preamble, enhanced multi-frame).
:func:`generate` yields ``n`` seeded mutations: NIfTI header field edits (dim, datatype,
bitpix, vox_offset, scl_slope/inter, qform/sform codes, pixdim), gzip / deflate stream
corruption and truncation, DICOM tag edits (NumberOfFrames, Rows/Columns, BitsAllocated,
RescaleSlope "1e308", PixelSpacing 1e300, transfer syntax), byte flips and truncation,
plus the reproducers of issue 18 (tiny inputs that once cost GBs or minutes).

Used by ``tests/fuzz/test_fuzz.py`` (bounded CI run) and ``benchmarks/fuzz.py`` (long run).
"""

from __future__ import annotations

import gzip
import io
import random
import struct
import zlib
from collections.abc import Callable, Iterator

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def oblique_affine() -> np.ndarray:
    """Non-RAS, oblique (17 degrees), anisotropic voxel -> RAS affine."""
    a = np.deg2rad(17.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-1.0, -1.0, 1.0]) @ np.diag([1.3, 0.9, 2.1])
    aff[:3, 3] = [40.0, -12.5, 7.25]
    return aff


# ------------------------------------------------------------------------------ NIfTI
def nifti_bytes(
    shape: tuple[int, ...] = (6, 5, 4),
    dtype: str = "int16",
    slope: float | None = None,
    inter: float = 0.0,
    gz: bool = False,
    seed: int = 0,
) -> bytes:
    """A valid NIfTI-1 single file (qform and sform code 1)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 100, size=shape).astype(dtype)
    img = nib.Nifti1Image(data, oblique_affine())
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    img.header.set_data_offset(352)
    raw = img.header.binaryblock + b"\x00" * 4 + np.asarray(data).tobytes(order="F")
    # binaryblock reflects set_slope_inter; data stored unscaled
    return gzip.compress(raw, mtime=0) if gz else raw


def set_nifti_field(raw: bytes, field: str, value: float | int) -> bytes:
    """Overwrite one NIfTI-1 header field (little endian) in an uncompressed file."""
    offsets = {
        "dim0": (40, "h"), "dim1": (42, "h"), "dim2": (44, "h"), "dim3": (46, "h"),
        "dim4": (48, "h"), "datatype": (70, "h"), "bitpix": (72, "h"),
        "pixdim1": (80, "f"), "pixdim2": (84, "f"), "pixdim3": (88, "f"),
        "vox_offset": (108, "f"), "scl_slope": (112, "f"), "scl_inter": (116, "f"),
        "xyzt_units": (123, "B"), "qform_code": (252, "h"), "sform_code": (254, "h"),
        "srow_x0": (280, "f"), "srow_y1": (300, "f"), "srow_z2": (320, "f"),
        "quatern_b": (256, "f"), "sizeof_hdr": (0, "i"),
    }
    off, fmt = offsets[field]
    buf = bytearray(raw)
    buf[off : off + struct.calcsize(fmt)] = struct.pack("<" + fmt, value)
    return bytes(buf)


# ------------------------------------------------------------------------------ DICOM
def _base_ds(sop_class: str, ts: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.4"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _encode(ds: Dataset, ts: str) -> bytes:
    buf = io.BytesIO()
    ds.preamble = b"\x00" * 128
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def dicom_slice(
    rows: int = 6,
    cols: int = 5,
    ts: str = ExplicitVRLittleEndian,
    slope: str = "1",
    intercept: str = "-1024",
    spacing: tuple[str, str] = ("0.9", "1.3"),
    preamble: bool = True,
    seed: int = 0,
) -> bytes:
    """One CT slice (oblique orientation), uint16 stored, rescaled to HU."""
    rng = np.random.default_rng(seed)
    ds = _base_ds(CT_IMAGE, ts)
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagePositionPatient = ["-40.0", "12.5", "7.25"]
    c, s = np.cos(np.deg2rad(17.0)), np.sin(np.deg2rad(17.0))
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (c, s, 0.0, -s, c, 0.0)]
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = "2.1"
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    pix = rng.integers(0, 4096, size=(rows, cols)).astype(np.uint16)
    if ts == ExplicitVRBigEndian:
        pix = pix.byteswap()
    ds.PixelData = pix.tobytes()
    if not preamble:
        del ds.file_meta
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)  # raw data set
        return buf.getvalue()
    return _encode(ds, ts)


def enhanced_shared_only(frames: int = 1_000_000) -> bytes:
    """~800-byte enhanced MR, 1x1 frames, only shared functional groups (issue 18.1)."""
    ds = _base_ds(ENHANCED_MR, ExplicitVRLittleEndian)
    ds.Modality = "MR"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 1, 1, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    ori, pos, meas = Dataset(), Dataset(), Dataset()
    ori.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    pos.ImagePositionPatient = ["0", "0", "0"]
    meas.PixelSpacing = ["1", "1"]
    shared.PlaneOrientationSequence = [ori]
    shared.PlanePositionSequence = [pos]
    shared.PixelMeasuresSequence = [meas]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PixelData = b"\x00\x00"
    return _encode(ds, ExplicitVRLittleEndian)


def enhanced_per_frame(frames: int, rows: int = 1, cols: int = 1) -> bytes:
    """Enhanced MR with per-frame positions but pixel data for one frame only."""
    ds = _base_ds(ENHANCED_MR, ExplicitVRLittleEndian)
    ds.Modality = "MR"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    ori, meas = Dataset(), Dataset()
    ori.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    meas.PixelSpacing = ["1", "1"]
    shared.PlaneOrientationSequence = [ori]
    shared.PixelMeasuresSequence = [meas]
    ds.SharedFunctionalGroupsSequence = [shared]
    per = []
    for k in range(frames):
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = ["0", "0", str(k)]
        item.PlanePositionSequence = [pos]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = per
    ds.PixelData = b"\x00" * (2 * rows * cols)
    return _encode(ds, ExplicitVRLittleEndian)


def _zeros(rows: int, cols: int) -> bytes:
    """A deflated CT slice of zeros: a few KB that inflate to rows*cols*2 bytes (18.2)."""
    ds = _base_ds(CT_IMAGE, DeflatedExplicitVRLittleEndian)
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagePositionPatient = ["0", "0", "0"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ["1", "1"]
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    ds.PixelData = bytes(rows * cols * 2)
    return _encode(ds, DeflatedExplicitVRLittleEndian)


def edit_dicom(raw: bytes, **tags: object) -> bytes:
    """Re-encode a DICOM file with some data elements replaced (``None`` deletes)."""
    ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    for key, value in tags.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def corrupt_deflate(raw: bytes) -> bytes:
    """A deflated DICOM whose deflate stream has garbage after the file meta (18.6)."""
    i = raw.find(b"1.2.840.10008.1.2.1.99")
    meta_end = i + 24 if i >= 0 else 200
    return raw[:meta_end] + b"\xff\xfe\xfd" * 40


# ------------------------------------------------------------------------- mutations
def _flip(data: bytes, rng: random.Random, n: int) -> bytes:
    buf = bytearray(data)
    for _ in range(n):
        buf[rng.randrange(len(buf))] = rng.randrange(256)
    return bytes(buf)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(1, max(2, len(data)))]


_NIFTI_EDITS: list[tuple[str, list[float | int]]] = [
    ("dim0", [0, -1, 3, 4, 5, 8, 32767]),
    ("dim1", [0, -5, 1, 32767, 30000]),
    ("dim3", [0, -1, 32767, 1000]),
    ("dim4", [0, 2, 32767]),
    ("datatype", [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2304, 9999]),
    ("bitpix", [0, 1, 7, 8, 16, 64, 128, -8]),
    ("vox_offset", [0.0, 1.0, 351.0, 353.0, -1.0, 1e30, float("nan"), float("inf")]),
    ("scl_slope", [0.0, 2.0, -1.0, 1e38, float("inf"), float("nan"), 1e-45]),
    ("scl_inter", [1e38, float("inf"), -1024.0]),
    ("sform_code", [-1, -32768, 0, 2, 99]),
    ("qform_code", [-1, 0, 99]),
    ("pixdim1", [0.0, -1.0, 1e30, float("inf"), float("nan")]),
    ("srow_x0", [0.0, 3e38, float("inf"), float("nan")]),
    ("srow_z2", [0.0, 1e-30]),
    ("quatern_b", [2.0, float("nan")]),
    ("xyzt_units", [0, 1, 3, 7, 255]),
    ("sizeof_hdr", [540, 0]),
]

_DICOM_EDITS: list[tuple[str, list[object]]] = [
    ("NumberOfFrames", ["0", "-1", "2", "1000000", "2147483647"]),
    ("Rows", [0, 1, 65535]),
    ("Columns", [0, 1, 65535]),
    ("BitsAllocated", [0, 1, 8, 32, 64, 7]),
    ("BitsStored", [0, 64, 1]),
    ("PixelRepresentation", [1, 2]),
    ("RescaleSlope", ["1e308", "0", "-1e308", "nan", "inf", "1e30", "abc", "3.5"]),
    ("RescaleIntercept", ["1e308", "nan", "-2e9"]),
    ("PixelSpacing", [["1e300", "1e300"], ["0", "0"], ["-1", "1"], ["nan", "1"], ["1"]]),
    ("ImageOrientationPatient", [["0"] * 6, ["1", "0", "0", "1", "0", "0"], ["1e308"] * 6]),
    ("ImagePositionPatient", [["inf", "0", "0"], ["1e308", "0", "0"], ["0"]]),
    ("SamplesPerPixel", [3, 0]),
    ("PixelData", [b"", b"\x00", None]),
    ("Modality", [None]),
    ("SOPClassUID", [None, "1.2.840.10008.1.3.10"]),
]


def _base_files() -> list[tuple[str, bytes]]:
    return [
        ("nii", nifti_bytes()),
        ("nii_u8_scaled", nifti_bytes(dtype="uint8", slope=2.0, inter=-3.0)),
        ("nii_f32", nifti_bytes(dtype="float32")),
        ("nii_gz", nifti_bytes(gz=True)),
        ("nii_gz_scaled", nifti_bytes(dtype="uint16", slope=0.5, gz=True)),
        ("dcm_explicit", dicom_slice()),
        ("dcm_implicit", dicom_slice(ts=ImplicitVRLittleEndian)),
        ("dcm_big", dicom_slice(ts=ExplicitVRBigEndian)),
        ("dcm_deflated", dicom_slice(ts=DeflatedExplicitVRLittleEndian)),
        ("dcm_nopreamble", dicom_slice(preamble=False)),
        ("dcm_enhanced", enhanced_per_frame(3, 2, 2)),
    ]


def reproducers() -> list[tuple[str, bytes]]:
    """The issue-18 inputs (each tiny) that once cost GBs, minutes or a traceback."""
    deflated = dicom_slice(ts=DeflatedExplicitVRLittleEndian)
    u8 = nifti_bytes(shape=(10, 10, 9), dtype="uint8", slope=2.0)
    return [
        ("r01_enhanced_1e6_frames", enhanced_shared_only(1_000_000)),
        ("r01_enhanced_per_frame_no_pixels", enhanced_per_frame(500)),
        ("r02_deflate_bomb_8MB", _zeros(2048, 2048)),
        ("r03_gz_scaled_u8", gzip.compress(u8, mtime=0)),
        ("r06_corrupt_deflate", corrupt_deflate(deflated)),
        ("r06_corrupt_gzip", nifti_bytes(gz=True)[:40] + b"\x00" * 60 + nifti_bytes(gz=True)[100:]),
        ("r07_slope_1e308", edit_dicom(dicom_slice(), RescaleSlope="1e308")),
        ("r12_negative_sform", set_nifti_field(nifti_bytes(), "sform_code", -1)),
        ("r12_spacing_1e300", edit_dicom(dicom_slice(), PixelSpacing=["1e300", "1e300"])),
        ("r17_dicom_no_preamble", dicom_slice(preamble=False)),
    ]


def _mutations() -> list[Callable[[bytes, str, random.Random], bytes | None]]:
    def nifti_field(data: bytes, kind: str, rng: random.Random) -> bytes | None:
        if not kind.startswith("nii") or "gz" in kind:
            return None
        field, values = rng.choice(_NIFTI_EDITS)
        return set_nifti_field(data, field, rng.choice(values))

    def nifti_field_gz(data: bytes, kind: str, rng: random.Random) -> bytes | None:
        if not kind.startswith("nii_gz"):
            return None
        inner = gzip.decompress(data)
        field, values = rng.choice(_NIFTI_EDITS)
        return gzip.compress(set_nifti_field(inner, field, rng.choice(values)), mtime=0)

    def dicom_tag(data: bytes, kind: str, rng: random.Random) -> bytes | None:
        if not kind.startswith("dcm") or kind == "dcm_nopreamble":
            return None
        key, values = rng.choice(_DICOM_EDITS)
        try:
            return edit_dicom(data, **{key: rng.choice(values)})
        except (ValueError, TypeError, AttributeError, KeyError, OverflowError, struct.error):
            return None

    def flip(data: bytes, kind: str, rng: random.Random) -> bytes | None:
        return _flip(data, rng, rng.choice([1, 2, 8, 32]))

    def flip_header(data: bytes, kind: str, rng: random.Random) -> bytes | None:
        head = bytearray(data)
        for _ in range(rng.choice([1, 4])):
            i = rng.randrange(min(len(head), 352))
            head[i] = rng.randrange(256)
        return bytes(head)

    def truncate(data: bytes, kind: str, rng: random.Random) -> bytes | None:
        return _truncate(data, rng)

    def gzip_corrupt(data: bytes, kind: str, rng: random.Random) -> bytes | None:
        if not kind.startswith("nii_gz"):
            return None
        body = bytearray(data)
        i = rng.randrange(10, len(body))
        body[i] ^= 1 << rng.randrange(8)
        return bytes(body)

    def deflate_corrupt(data: bytes, kind: str, rng: random.Random) -> bytes | None:
        if kind != "dcm_deflated":
            return None
        i = data.find(b"1.2.840.10008.1.2.1.99") + 24
        body = bytearray(data)
        j = rng.randrange(i, len(body))
        body[j] ^= 1 << rng.randrange(8)
        return bytes(body[: rng.randrange(j, len(body) + 1)])

    def recompress(data: bytes, kind: str, rng: random.Random) -> bytes | None:
        if kind.startswith("nii_gz"):
            return None
        return gzip.compress(data, mtime=0)

    def zlib_noise(data: bytes, kind: str, rng: random.Random) -> bytes | None:
        return b"\x1f\x8b\x08\x00" + zlib.compress(data)[rng.randrange(0, 4) :]

    return [nifti_field, nifti_field_gz, dicom_tag, flip, flip_header, truncate,
            gzip_corrupt, deflate_corrupt, recompress, zlib_noise]


#: a second mutation re-parses what the first one broke; if that fails, it is skipped
_MUTATION_ERRORS: tuple[type[BaseException], ...] = (Exception,)


def generate(n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """``n`` inputs: the reproducers, the valid base files, then seeded mutations."""
    rng = random.Random(seed)
    fixed = reproducers() + _base_files()
    for name, data in fixed[:n]:
        yield name, data
    bases = _base_files()
    muts = _mutations()
    made = len(fixed)
    i = 0
    while made < n:
        kind, data = rng.choice(bases)
        mut = rng.choice(muts)
        out = mut(data, kind, rng)
        if out is None:
            continue
        if rng.random() < 0.15:  # stack a second mutation now and then
            try:
                second = rng.choice(muts)(out, kind, rng)
            except _MUTATION_ERRORS:  # e.g. re-reading a gzip stream the first one broke
                second = None
            out = second if second is not None else out
        i += 1
        made += 1
        yield f"m{i:05d}_{kind}_{mut.__name__}", out
