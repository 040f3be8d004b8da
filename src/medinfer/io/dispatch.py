"""Format dispatch for :func:`load` and :func:`save` (decided on content, not suffix)."""

from __future__ import annotations

import os
from pathlib import Path

from medinfer.errors import ConfigError
from medinfer.io.sniff import ImageFormat, sniff_format
from medinfer.volume import Volume

__all__ = ["load", "save"]


def load(
    path: str | os.PathLike[str],
    *,
    series_uid: str | None = None,
    max_bytes: int | None = None,
    reference: str | os.PathLike[str] | Volume | None = None,
    allow_missing_slices: bool | None = None,
) -> Volume:
    """Load a scan as a :class:`Volume` (array ``(C, I, J, K)``, affine voxel -> RAS+ mm).

    The format is recognised from the content (:func:`medinfer.io.sniff.sniff_format`):
    a folder is read as DICOM (recursively, :func:`medinfer.io.dicom.read_dicom`); a file
    holding a NIfTI-1/2 header (plain or gzip, whatever its name) as NIfTI
    (:func:`medinfer.io.nifti.read_nifti`); a DICOM file as a one-file series.

    Parameters
    ----------
    path : file or folder.
    series_uid : SeriesInstanceUID to pick from a DICOM folder with several series
        (ignored for NIfTI).
    max_bytes : limit on the array size, checked before allocating (default 4 GiB or
        ``MEDINFER_MAX_IMAGE_BYTES``).
    reference : for a DICOM SEG / RTSTRUCT / SR file: the source series folder (or its
        Volume); the label map comes back on its grid
        (:func:`medinfer.io.dicom_results.read_dicom_result`). ``series_uid`` then picks
        the series in that folder.
    allow_missing_slices : DICOM: leave out files of the series that cannot be read
        instead of raising (:func:`medinfer.io.dicom.read_dicom`; default: the
        ``MEDINFER_ALLOW_MISSING_SLICES`` environment variable, else False).

    Raises
    ------
    InvalidImageError
        Missing path, empty file or folder, unknown format, corrupt or truncated data.
    ResourceLimitError
        The header announces more than ``max_bytes``.
    SeriesSelectionError
        A DICOM folder with several series and no (or an unknown) ``series_uid``.
    GeometryError
        Invalid or unsupported geometry (e.g. DICOM gaps or gantry tilt).
    """
    p = Path(path)
    fmt = sniff_format(p)
    if fmt is ImageFormat.NIFTI:
        from medinfer.io.nifti import read_nifti

        return read_nifti(p, max_bytes=max_bytes)
    if p.is_file():
        from medinfer.io.dicom_results import read_dicom_result

        derived = read_dicom_result(p, reference=reference, series_uid=series_uid)
        if derived is not None:
            return derived
    if reference is not None:
        raise ConfigError(f"{p}: reference= applies to DICOM SEG, RTSTRUCT and SR files only")
    from medinfer.io.dicom import read_dicom

    return read_dicom(
        p, series_uid=series_uid, max_bytes=max_bytes, allow_missing_slices=allow_missing_slices
    )


def save(
    volume: Volume,
    path: str | os.PathLike[str],
    *,
    format: ImageFormat | str | None = None,
) -> Path:
    """Write ``volume`` atomically and return the path written.

    ``.nii`` / ``.nii.gz`` -> NIfTI (:func:`medinfer.io.nifti.write_nifti`: label maps as
    uint8/uint16, source codes and scaling reused). ``format="dicom"`` -> a single-frame
    DICOM series in the folder ``path`` (:func:`medinfer.io.dicom.write_dicom_series`,
    defaults: MR, new UIDs).

    Raises
    ------
    ConfigError
        Unknown suffix or format (the message lists the accepted ones), or a DICOM output
        folder that is not empty.
    """
    from medinfer.errors import parse_enum

    p = Path(path)
    if format is None:
        if p.name.lower().endswith((".nii", ".nii.gz")):
            fmt = ImageFormat.NIFTI
        else:
            raise ConfigError(
                f"{p}: cannot tell the output format from the name; use a .nii or .nii.gz "
                "file name, or format='dicom' for a DICOM series folder"
            )
    else:
        fmt = parse_enum(ImageFormat, format, "format")
    if fmt is ImageFormat.NIFTI:
        from medinfer.io.nifti import write_nifti

        return write_nifti(volume, p)
    from medinfer.io.dicom import write_dicom_series

    write_dicom_series(volume, p)
    return p
