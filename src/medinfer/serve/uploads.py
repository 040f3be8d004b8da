"""Checking and unpacking uploaded scans before anything large is allocated.

Accepted uploads: a NIfTI-1/2 file (``.nii``), a gzip-compressed NIfTI (``.nii.gz``), a
zip archive of a DICOM series (or of one NIfTI file), or a single DICOM file. The format
is decided from the content (magic bytes), never from the client's file name.

Checks, in order, each raising a :class:`medinfer.errors.MedinferError` subclass:

* upload size <= ``max_upload_bytes`` (:class:`ResourceLimitError`);
* NIfTI: the header is parsed from the first bytes (for gzip: the first bytes of the
  decompressed stream, so a header claiming 10^12 voxels is refused before the data is
  decompressed); voxel count <= ``max_voxels``; the data must be complete (a truncated
  file or gzip stream is an :class:`InvalidImageError`); the decompressed size is capped;
* zip: member count, per-member and total uncompressed size (counted while copying, not
  taken from the directory), no absolute paths, no ``..`` components, no links or special
  files, no encryption (:class:`UnsafeArchiveError`). Members are written under names we
  choose (``m00000.dcm``...), never under their archive names;
* DICOM: header-only read of every file; the summed Rows x Columns x Frames must fit
  ``max_voxels``.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from medinfer.errors import InvalidImageError, ResourceLimitError, UnsafeArchiveError
from medinfer.volume import Volume

_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_EMPTY = b"PK\x05\x06"


class ScanKind(StrEnum):
    """What an upload turned out to be (from its content)."""

    NIFTI = "nifti"
    NIFTI_GZ = "nifti_gz"
    DICOM_ZIP = "dicom_zip"
    DICOM = "dicom"


@dataclass(frozen=True)
class Limits:
    """Size limits for uploads (bytes, voxels, archive members)."""

    max_upload_bytes: int
    max_voxels: int
    max_unpacked_bytes: int
    max_archive_members: int


@dataclass(frozen=True)
class NiftiHeaderInfo:
    """Facts from a NIfTI header: spatial+channel shape, bytes per voxel, data offset."""

    shape: tuple[int, ...]
    bytes_per_voxel: float
    vox_offset: int

    @property
    def voxels(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def data_end(self) -> int:
        """Byte offset of the end of the voxel data (header + extensions + data)."""
        return self.vox_offset + int(self.voxels * self.bytes_per_voxel + 0.999)


@dataclass(frozen=True)
class CheckedScan:
    """An upload that passed the checks; ``path`` is what :func:`medinfer.io.load` reads."""

    kind: ScanKind
    path: Path
    voxels: int


# --------------------------------------------------------------------------- saving
def save_upload(src: BinaryIO, dest: Path, limits: Limits, name: str = "file") -> int:
    """Copy an uploaded stream to ``dest`` (atomically), counting bytes.

    Returns the size in bytes. Raises :class:`ResourceLimitError` beyond
    ``max_upload_bytes`` (the partial copy is removed) and :class:`InvalidImageError`
    for an empty upload.
    """
    from medinfer._atomic import atomic_path

    total = 0
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > limits.max_upload_bytes:
                raise ResourceLimitError(
                    f"upload {name!r}: larger than the limit of {limits.max_upload_bytes} "
                    "bytes (MEDINFER_MAX_UPLOAD_BYTES)"
                )
            out.write(chunk)
    if total == 0:
        dest.unlink(missing_ok=True)
        raise InvalidImageError(f"upload {name!r}: the file is empty")
    return total


# ---------------------------------------------------------------------- NIfTI header
_NIFTI_BITPIX_OK = {1, 8, 16, 24, 32, 64, 128, 192, 256}


def parse_nifti_header(head: bytes, name: str = "upload") -> NiftiHeaderInfo:
    """Parse the size facts of a NIfTI-1 or NIfTI-2 header from its first bytes.

    Parameters
    ----------
    head : at least the first 348 (NIfTI-1) or 540 (NIfTI-2) bytes of the file.

    Raises
    ------
    InvalidImageError
        Not a NIfTI header, or a dimension is zero / negative / more than 7 axes.
    """
    if len(head) < 348:
        raise InvalidImageError(f"{name}: too short for a NIfTI header ({len(head)} bytes)")
    for endian in ("<", ">"):
        (sizeof_hdr,) = struct.unpack(endian + "i", head[:4])
        if sizeof_hdr == 348:
            if head[344:347] not in (b"n+1", b"ni1"):
                raise InvalidImageError(f"{name}: NIfTI-1 magic missing (not a NIfTI file)")
            dims = struct.unpack(endian + "8h", head[40:56])
            (bitpix,) = struct.unpack(endian + "h", head[72:74])
            (vox_offset_f,) = struct.unpack(endian + "f", head[108:112])
            vox_offset = int(vox_offset_f) if vox_offset_f == vox_offset_f else -1
            break
        if sizeof_hdr == 540:
            if len(head) < 540 or head[4:7] != b"n+2":
                raise InvalidImageError(f"{name}: NIfTI-2 magic missing (not a NIfTI file)")
            (bitpix,) = struct.unpack(endian + "h", head[14:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            (vox_offset,) = struct.unpack(endian + "q", head[168:176])
            break
    else:
        raise InvalidImageError(f"{name}: not a NIfTI-1/2 header (sizeof_hdr is not 348/540)")
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise InvalidImageError(f"{name}: NIfTI dim[0] = {ndim}; expected 1..7")
    shape = tuple(int(d) for d in dims[1 : ndim + 1])
    if any(d < 1 for d in shape):
        raise InvalidImageError(f"{name}: NIfTI dimensions {shape} contain zero or negatives")
    if bitpix not in _NIFTI_BITPIX_OK:
        raise InvalidImageError(f"{name}: NIfTI bitpix = {bitpix} is not a valid voxel size")
    if vox_offset < 0:
        raise InvalidImageError(f"{name}: NIfTI vox_offset = {vox_offset} is invalid")
    return NiftiHeaderInfo(shape=shape, bytes_per_voxel=bitpix / 8.0,
                           vox_offset=max(vox_offset, sizeof_hdr))


def _check_voxels(info: NiftiHeaderInfo, limits: Limits, name: str) -> None:
    if info.voxels > limits.max_voxels:
        raise ResourceLimitError(
            f"{name}: the NIfTI header claims {info.voxels} voxels (shape {info.shape}); "
            f"the limit is {limits.max_voxels} (MEDINFER_MAX_VOXELS)"
        )


def check_nifti_gz(path: Path, limits: Limits, name: str = "upload") -> NiftiHeaderInfo:
    """Check a gzip-compressed NIfTI: header first, then the whole stream, size-capped.

    The header is decoded from the first decompressed bytes; the voxel cap is applied
    before the rest is decompressed. The stream is then decompressed chunk by chunk
    (nothing kept) to find truncation or corruption, with the decompressed size capped
    at the size the header implies (plus 64 KiB) and ``max_unpacked_bytes``.

    Raises
    ------
    InvalidImageError : not a NIfTI inside, corrupt or truncated gzip stream.
    ResourceLimitError : too many voxels, or the stream decompresses to too much.
    """
    head = b""
    info: NiftiHeaderInfo | None = None
    produced = 0
    cap = limits.max_unpacked_bytes
    complete = False
    with open(path, "rb") as fh:
        dec = zlib.decompressobj(wbits=31)
        data = fh.read(_CHUNK)
        try:
            while data:
                out = dec.decompress(data, _CHUNK)
                produced += len(out)
                if info is None:
                    head += out[: 540 - len(head)]
                    if len(head) >= 540:
                        info = parse_nifti_header(head, name)
                        _check_voxels(info, limits, name)
                        cap = min(cap, info.data_end + 65536)
                if produced > cap:
                    raise ResourceLimitError(
                        f"{name}: the gzip stream decompresses to more than {cap} bytes "
                        "(more than the header implies, or MEDINFER_MAX_UNPACKED_BYTES)"
                    )
                if dec.eof:
                    rest = dec.unused_data or fh.read(_CHUNK)
                    if not rest:
                        complete = True
                        break
                    if not rest.startswith(b"\x1f"):
                        raise InvalidImageError(f"{name}: trailing data after the gzip stream")
                    dec = zlib.decompressobj(wbits=31)  # next gzip member
                    data = rest
                    continue
                data = dec.unconsumed_tail or fh.read(_CHUNK)
        except zlib.error as exc:
            raise InvalidImageError(f"{name}: corrupt gzip stream ({exc})") from None
    if not complete:
        raise InvalidImageError(f"{name}: truncated gzip stream (the file ends early)")
    if info is None:
        info = parse_nifti_header(head, name)
        _check_voxels(info, limits, name)
    if produced < info.data_end:
        raise InvalidImageError(
            f"{name}: truncated NIfTI: {produced} bytes of {info.data_end} expected"
        )
    return info


def check_nifti(path: Path, limits: Limits, name: str = "upload") -> NiftiHeaderInfo:
    """Check an uncompressed NIfTI file: header, voxel cap, data completeness."""
    with open(path, "rb") as fh:
        head = fh.read(540)
    info = parse_nifti_header(head, name)
    _check_voxels(info, limits, name)
    size = path.stat().st_size
    if size < info.data_end:
        raise InvalidImageError(f"{name}: truncated NIfTI: {size} bytes of {info.data_end} "
                                "expected")
    return info


# ----------------------------------------------------------------------------- zip
def _unsafe_member_reason(info: zipfile.ZipInfo) -> str | None:
    raw = info.filename
    name = raw.replace("\\", "/")
    if "\x00" in raw:
        return "contains a NUL byte"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if any(part == ".." for part in name.split("/")):
        return "contains a '..' component"
    mode = info.external_attr >> 16
    if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "is a link or special file"
    if info.flag_bits & 0x1:
        return "is encrypted"
    return None


def extract_zip(path: Path, target: Path, limits: Limits, name: str = "upload") -> list[Path]:
    """Check and extract a zip archive into ``target`` under generated names.

    Returns the extracted file paths (``m00000<suffix>``...; suffix ``.nii``/``.nii.gz`` for
    NIfTI members, ``.dcm`` otherwise). Directories are skipped.

    Raises
    ------
    UnsafeArchiveError : absolute or ``..`` member, link or special file, encryption,
        too many members, too large when unpacked.
    InvalidImageError : not a readable zip, or no file inside.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidImageError(f"{name}: not a readable zip archive ({exc})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_archive_members:
            raise UnsafeArchiveError(
                f"{name}: {len(infos)} archive members; the limit is "
                f"{limits.max_archive_members} (MEDINFER_MAX_ARCHIVE_MEMBERS)"
            )
        declared = 0
        for info in infos:
            reason = _unsafe_member_reason(info)
            if reason:
                raise UnsafeArchiveError(f"{name}: archive member {info.filename!r} {reason}; "
                                         "refused")
            declared += max(0, int(info.file_size))
        if declared > limits.max_unpacked_bytes:  # refused before a byte is written
            raise UnsafeArchiveError(
                f"{name}: archive unpacks to more than {limits.max_unpacked_bytes} bytes "
                f"(its members declare {declared}; MEDINFER_MAX_UNPACKED_BYTES); refused "
                "before unpacking"
            )
        target.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        total = 0
        for index, info in enumerate(infos):
            if info.is_dir():
                continue
            lower = info.filename.lower()
            suffix = ".nii.gz" if lower.endswith(".nii.gz") else (
                ".nii" if lower.endswith(".nii") else ".dcm")
            out_path = target / f"m{index:05d}{suffix}"
            try:
                with zf.open(info) as src, open(out_path, "wb") as out:
                    member = 0
                    while True:
                        chunk = src.read(_CHUNK)
                        if not chunk:
                            break
                        total += len(chunk)
                        member += len(chunk)
                        if member > info.file_size:
                            raise UnsafeArchiveError(
                                f"{name}: archive member #{index} unpacks to more than the "
                                f"{info.file_size} bytes its header declares; refused"
                            )
                        if total > limits.max_unpacked_bytes:
                            raise UnsafeArchiveError(
                                f"{name}: archive unpacks to more than "
                                f"{limits.max_unpacked_bytes} bytes "
                                "(MEDINFER_MAX_UNPACKED_BYTES)"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
                raise InvalidImageError(f"{name}: archive member #{index} is corrupt ({exc})") \
                    from None
            written.append(out_path)
    if not written:
        raise InvalidImageError(f"{name}: the zip archive holds no files")
    return written


def _check_dicom_files(files: list[Path], limits: Limits, name: str) -> int:
    from pydicom.errors import BytesLengthException, InvalidDicomError

    from medinfer.errors import MedinferError
    from medinfer.io._dicom_guard import check_pixel_bytes, dcmread_bounded
    from medinfer.io._limits import check_frame_count

    voxels = 0
    readable = 0
    frames_total = 0
    for f in files:
        try:
            ds = dcmread_bounded(f, stop_before_pixels=True, force=True, defer_size="1 MB")
            rows = int(getattr(ds, "Rows", 0) or 0)
            cols = int(getattr(ds, "Columns", 0) or 0)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        except MedinferError as exc:  # inflation cap, corrupt deflate stream
            raise type(exc)(str(exc).replace(str(f), name)) from None
        except (InvalidDicomError, OSError, ValueError, EOFError, struct.error, KeyError,
                AttributeError, TypeError, IndexError, NotImplementedError, OverflowError,
                RuntimeError, zlib.error, BytesLengthException):
            continue
        if rows <= 0 or cols <= 0:
            continue
        frames = max(1, frames)
        frames_total += frames
        try:
            check_frame_count(frames_total, name)
            check_pixel_bytes(ds, f, frames, rows, cols)
        except MedinferError as exc:
            raise type(exc)(str(exc).replace(str(f), name)) from None
        readable += 1
        voxels += rows * cols * frames
        if voxels > limits.max_voxels:
            raise ResourceLimitError(
                f"{name}: the DICOM files hold more than {limits.max_voxels} voxels "
                "(MEDINFER_MAX_VOXELS)"
            )
    if readable == 0:
        raise InvalidImageError(f"{name}: no DICOM image found in the upload")
    return voxels


# ------------------------------------------------------------------------ dispatch
def sniff(path: Path) -> ScanKind | None:
    """Decide the upload kind from magic bytes; ``None`` if unrecognised.

    Zip archives are recognised here; everything else with the sniffer the readers use
    (:mod:`medinfer.io.sniff`), so the server accepts exactly what ``medinfer.io.load``
    and the CLI accept (e.g. DICOM without the 128-byte preamble).
    """
    from medinfer.io.sniff import looks_like_dicom, nifti_version

    with open(path, "rb") as fh:
        head = fh.read(544)
    if head.startswith(_GZIP_MAGIC):
        return ScanKind.NIFTI_GZ
    if head.startswith(_ZIP_MAGIC) or head.startswith(_ZIP_EMPTY):
        return ScanKind.DICOM_ZIP
    if nifti_version(head) is not None:
        return ScanKind.NIFTI
    if looks_like_dicom(head):
        return ScanKind.DICOM
    return None


class UnsupportedFormatError(InvalidImageError):
    """The upload is none of NIfTI, NIfTI gz, DICOM zip or DICOM (HTTP 415)."""


_ABS_PATH = re.compile(r"(?<![\w.])/[^\s:'\",;)]+")


def redact_paths(message: str, name: str) -> str:
    """``message`` with every absolute path replaced by ``name`` (the client's input
    name): error messages sent to clients never show server paths."""
    return _ABS_PATH.sub(name, message)


def check_upload(path: Path, workdir: Path, limits: Limits, name: str = "upload") -> CheckedScan:
    """Check the saved upload at ``path``; unpack archives into ``workdir``.

    Returns a :class:`CheckedScan` whose ``path`` is a file or folder that
    :func:`medinfer.io.load` reads. Raises the errors listed in the module docstring and
    :class:`UnsupportedFormatError` for unknown content; messages name ``name``, never
    server paths.
    """
    from medinfer.errors import MedinferError

    try:
        return _check_upload(path, workdir, limits, name)
    except MedinferError as exc:
        raise type(exc)(redact_paths(str(exc), name)) from None


def _check_upload(path: Path, workdir: Path, limits: Limits, name: str) -> CheckedScan:
    size = path.stat().st_size
    if size > limits.max_upload_bytes:
        raise ResourceLimitError(f"{name}: {size} bytes; the limit is "
                                 f"{limits.max_upload_bytes} (MEDINFER_MAX_UPLOAD_BYTES)")
    kind = sniff(path)
    if kind is None:
        raise UnsupportedFormatError(
            f"{name}: not a recognised scan; upload a NIfTI (.nii), gzip NIfTI (.nii.gz), "
            "a zip of a DICOM series or a DICOM file"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    if kind is ScanKind.NIFTI_GZ:
        info = check_nifti_gz(path, limits, name)
        link = workdir / "scan.nii.gz"
        _link_or_copy(path, link)
        return CheckedScan(kind, link, info.voxels)
    if kind is ScanKind.NIFTI:
        info = check_nifti(path, limits, name)
        link = workdir / "scan.nii"
        _link_or_copy(path, link)
        return CheckedScan(kind, link, info.voxels)
    if kind is ScanKind.DICOM:
        folder = workdir / "dicom"
        folder.mkdir(exist_ok=True)
        dst = folder / "m00000.dcm"
        _link_or_copy(path, dst)
        voxels = _check_dicom_files([dst], limits, name)
        return CheckedScan(kind, folder, voxels)
    folder = workdir / "unpacked"
    files = extract_zip(path, folder, limits, name)
    niftis = [f for f in files if f.name.endswith((".nii", ".nii.gz"))]
    if len(niftis) == 1 and len(files) == 1:
        nii = niftis[0]
        info = (check_nifti_gz(nii, limits, name) if nii.name.endswith(".gz")
                else check_nifti(nii, limits, name))
        return CheckedScan(ScanKind.NIFTI_GZ if nii.name.endswith(".gz") else ScanKind.NIFTI,
                           nii, info.voxels)
    voxels = _check_dicom_files(files, limits, name)
    return CheckedScan(kind, folder, voxels)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def load_checked(scan: CheckedScan, limits: Limits, name: str = "upload") -> Volume:
    """Load a checked upload with :func:`medinfer.io.load`, mapping reader failures.

    Raises
    ------
    InvalidImageError : the reader fails (corrupt content behind a valid-looking header).
    ResourceLimitError : the loaded volume has more voxels than ``max_voxels``.
    """
    from medinfer.errors import MedinferError
    from medinfer.io import load

    try:
        volume = load(scan.path)
    except MedinferError as exc:
        raise type(exc)(redact_paths(str(exc), name)) from None
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, TypeError, KeyError,
            IndexError, struct.error, MemoryError) as exc:
        raise InvalidImageError(redact_paths(
            f"{name}: cannot read the scan ({type(exc).__name__}: {exc})", name)) from None
    n = 1
    for s in volume.shape:
        n *= int(s)
    if n > limits.max_voxels:
        raise ResourceLimitError(f"{name}: {n} voxels; the limit is {limits.max_voxels} "
                                 "(MEDINFER_MAX_VOXELS)")
    return volume
