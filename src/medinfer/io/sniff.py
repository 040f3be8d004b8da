"""Recognise image files by their content, not by their name.

- gzip: magic bytes ``1f 8b``; the decompressed start is sniffed again.
- NIfTI-1: ``sizeof_hdr`` (int32 at offset 0, either byte order) is 348 and the magic at
  offset 344 is ``n+1\\0`` (single file) or ``ni1\\0`` (header/image pair).
- NIfTI-2: ``sizeof_hdr`` is 540 and the magic at offset 4 is ``n+2\\0`` / ``ni2\\0``.
- DICOM Part 10: 128-byte preamble then ``DICM`` (PS3.10 section 7.1).
- DICOM without preamble/meta (raw data sets, as old scanners wrote them): the first
  element is a tag of group 0x0002 or 0x0008 (either byte order), followed by either
  a valid explicit VR or a plausible implicit-VR 32-bit length (PS3.5 section 7.1).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path

from medinfer.errors import InvalidImageError

GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGICS = (b"n+1\x00", b"ni1\x00")
_NIFTI2_MAGICS = (b"n+2\x00", b"ni2\x00")
# PS3.5 table 6.2-1
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI "
    b"UL UN UR US UT UV".split()
)
#: errors the gzip module raises for corrupt or truncated streams
GZIP_ERRORS: tuple[type[BaseException], ...] = (EOFError, zlib.error, gzip.BadGzipFile, OSError)


@contextmanager
def gzip_errors_as_invalid(path: Path | str) -> Iterator[None]:
    """Turn errors of a corrupt or truncated gzip stream read inside the block into
    :class:`InvalidImageError` naming ``path`` (one message for every reader).
    """
    try:
        yield
    except GZIP_ERRORS as exc:
        raise InvalidImageError(
            f"{path}: corrupt or truncated gzip stream ({type(exc).__name__}: {exc})"
        ) from None


class ImageFormat(StrEnum):
    """Image file formats medinfer reads."""

    NIFTI = "nifti"
    DICOM = "dicom"


def read_head(path: str | os.PathLike[str], n: int) -> tuple[bytes, bool]:
    """First ``n`` bytes of a file, decompressed when it is gzip; and whether it was gzip.

    Raises
    ------
    InvalidImageError
        The file cannot be opened or its gzip stream is corrupt before ``n`` bytes.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(n)
    except OSError as exc:
        raise InvalidImageError(f"{p}: cannot read the file ({exc.strerror or exc})") from None
    if not raw.startswith(GZIP_MAGIC):
        return raw, False
    with gzip_errors_as_invalid(p), gzip.open(p, "rb") as g:
        return g.read(n), True


def nifti_version(head: bytes) -> int | None:
    """1 or 2 if ``head`` (the decompressed start of a file) is a NIfTI header, else None."""
    if len(head) >= 348:
        for fmt in ("<i", ">i"):
            if struct.unpack(fmt, head[:4])[0] == 348 and head[344:348] in _NIFTI1_MAGICS:
                return 1
    if len(head) >= 540:
        for fmt in ("<i", ">i"):
            if struct.unpack(fmt, head[:4])[0] == 540 and head[4:8] in _NIFTI2_MAGICS:
                return 2
    return None


def looks_like_dicom(head: bytes) -> bool:
    """True if ``head`` (at least the first 132 bytes of a file) starts like DICOM.

    Accepts Part 10 files (``DICM`` at offset 128) and raw data sets whose first element
    is a tag of group 0x0002 or 0x0008 (either byte order) with an explicit VR or a plausible
    implicit-VR length. This is a cheap filter; the parser has the final word.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    for order in "<>":
        group, _elem = struct.unpack(order + "HH", head[:4])
        if group not in (0x0002, 0x0008):
            continue
        if head[4:6] in _VRS:
            return True
        (length,) = struct.unpack(order + "I", head[4:8])
        if length < 0x10000 or length == 0xFFFFFFFF:
            return True
    return False


def sniff_format(path: str | os.PathLike[str]) -> ImageFormat:
    """Format of the file or folder at ``path``, decided on content.

    Folders are DICOM (a series folder); files are NIfTI (plain or gzip) or DICOM.

    Raises
    ------
    InvalidImageError
        ``path`` does not exist, is empty, or is neither NIfTI nor DICOM.
    """
    p = Path(path)
    if p.is_dir():
        return ImageFormat.DICOM
    if not p.exists():
        raise InvalidImageError(f"{p}: no such file or folder")
    if not p.is_file():
        raise InvalidImageError(f"{p}: not a regular file or folder")
    head, gz = read_head(p, 544)
    if not head:
        raise InvalidImageError(f"{p}: the file is empty" + (" (after gzip)" if gz else ""))
    if nifti_version(head) is not None:
        return ImageFormat.NIFTI
    if not gz and looks_like_dicom(head):
        return ImageFormat.DICOM
    start = head[:16]
    what = "a gzip file that does not hold a NIfTI image" if gz else "neither NIfTI nor DICOM"
    raise InvalidImageError(
        f"{p}: {what} (starts with {start!r}); accepted: NIfTI-1/2 (.nii, .nii.gz), "
        "a DICOM file, or a folder of DICOM files"
    )
