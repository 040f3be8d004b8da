"""Reading back medinfer's DICOM results (SEG, RTSTRUCT, SR) as Volumes on a source grid.

:func:`medinfer.io.load` calls :func:`read_dicom_result` for single DICOM files; it
returns ``None`` for anything that is not a derived object, which is then read as an image.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from medinfer.errors import ConfigError, InvalidImageError, MedinferError
from medinfer.volume import Volume

__all__ = ["read_dicom_result"]

#: SOP Class UIDs -> kind
_KINDS = {
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7": "seg",  # Label Map Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.481.3": "rtstruct",  # RT Structure Set Storage
    "1.2.840.10008.5.1.4.1.1.88.33": "sr",  # Comprehensive SR Storage
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",  # Comprehensive 3D SR Storage
}


def read_dicom_result(
    path: str | os.PathLike[str],
    *,
    reference: str | os.PathLike[str] | Volume | None = None,
    series_uid: str | None = None,
) -> Volume | None:
    """Read a DICOM SEG / RTSTRUCT / SR file as a label Volume; ``None`` for other files.

    Parameters
    ----------
    path : one DICOM file.
    reference : the source series folder (or its Volume): the result comes back on its
        grid. Required for RTSTRUCT and SR (they carry no voxel grid).
    series_uid : SeriesInstanceUID in a reference folder with several series.

    Returns
    -------
    Volume or None
        SEG: :func:`medinfer.io.dicom_seg.read_dicom_seg`; RTSTRUCT:
        :func:`medinfer.io.rtstruct.read_rtstruct` (contours rasterised);
        SR: :func:`medinfer.io.dicom_sr.read_dicom_sr_volume` (finding n marked as value n
        at its point).

    Raises
    ------
    ConfigError
        An RTSTRUCT or SR without ``reference``.
    InvalidImageError
        An unreadable file of one of those kinds.
    """
    from pydicom.errors import BytesLengthException, InvalidDicomError

    p = Path(path)
    from medinfer.io._dicom_guard import dcmread_bounded

    parse_errors = (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError,
                    IndexError, AttributeError, NotImplementedError, OverflowError,
                    struct.error, zlib.error, BytesLengthException)
    try:
        # force: DICOM without preamble (raw data sets) reach here too; bounded: hostile
        # lengths and deflate streams cost no more than the file holds
        head = dcmread_bounded(p, stop_before_pixels=True, force=True)
    except MedinferError:
        raise
    except parse_errors as exc:
        raise InvalidImageError(f"{p}: not a readable DICOM file ({exc})") from None
    try:
        kind = _KINDS.get(str(head.get("SOPClassUID", "")))
    except parse_errors as exc:  # elements are parsed lazily
        raise InvalidImageError(f"{p}: unreadable SOPClassUID ({exc})") from None
    if kind is None:
        return None
    if kind == "seg":
        from medinfer.io.dicom_seg import read_dicom_seg

        return read_dicom_seg(p, reference=reference, series_uid=series_uid)
    if reference is None:
        raise ConfigError(f"{p}: a DICOM {kind.upper()} has no voxel grid; pass "
                          "reference=<source series folder>")
    if kind == "rtstruct":
        from medinfer.io.rtstruct import read_rtstruct

        return read_rtstruct(p, reference=reference, series_uid=series_uid)
    from medinfer.io.dicom_sr import read_dicom_sr_volume

    return read_dicom_sr_volume(p, reference=reference, series_uid=series_uid)
