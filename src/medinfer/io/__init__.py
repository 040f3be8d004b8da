"""Reading and writing scans: NIfTI and DICOM in, NIfTI and DICOM series out.

``load(path)`` and ``save(volume, path)`` dispatch on file content, not only on the
suffix. All Volumes come back with affines in RAS+ mm; LPS exists only inside
:mod:`medinfer.io.dicom` / :mod:`medinfer.io.dicom_writer` and the converters
:func:`affine_lps_to_ras` / :func:`affine_ras_to_lps`.

Heavy modules (pydicom) are imported on first use of the DICOM functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medinfer.io._limits import DEFAULT_MAX_BYTES, MAX_BYTES_ENV
from medinfer.io._lps import affine_lps_to_ras, affine_ras_to_lps
from medinfer.io.dispatch import load, save
from medinfer.io.nifti import read_nifti, write_nifti
from medinfer.io.sniff import ImageFormat, sniff_format

if TYPE_CHECKING:
    from medinfer.io.dicom import SeriesInfo, list_series, read_dicom
    from medinfer.io.dicom_writer import write_dicom_series

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_BYTES_ENV",
    "ImageFormat",
    "SeriesInfo",
    "affine_lps_to_ras",
    "affine_ras_to_lps",
    "list_series",
    "load",
    "read_dicom",
    "read_nifti",
    "save",
    "sniff_format",
    "write_dicom_series",
    "write_nifti",
]

_LAZY = {
    "SeriesInfo": "medinfer.io.dicom",
    "list_series": "medinfer.io.dicom",
    "read_dicom": "medinfer.io.dicom",
    "write_dicom_series": "medinfer.io.dicom_writer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medinfer.io' has no attribute {name!r}")
