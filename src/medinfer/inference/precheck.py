"""Cheap checks of ``medinfer predict`` inputs, run before torch or a model is loaded.

Rejecting a text file named ``.nii.gz`` used to take seconds and hundreds of MB because
the model was loaded first. :func:`precheck_inputs` looks only at file content (format
sniffing, :func:`medinfer.io.sniff.sniff_format`) and at NIfTI headers (dims, datatype,
size limit, :func:`medinfer.io.nifti.check_nifti_header`); it imports neither torch nor
any model code. DICOM folders are left to the reader (series selection needs the files).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medinfer.errors import MedinferError

__all__ = ["precheck_inputs"]


def precheck_inputs(inputs: Sequence[Path]) -> list[tuple[Path, MedinferError]]:
    """Check every input file's content; raise when no input could possibly run.

    Parameters
    ----------
    inputs : the ``medinfer predict`` inputs (files and folders), expanded into cases as
        :func:`medinfer.inference.cli.discover_cases` does.

    Returns
    -------
    list of ``(path, error)`` for the input files that failed (only when others passed:
    those cases then fail on their own, with the same message, under ``--keep-going``).

    Raises
    ------
    MedinferError
        An input does not exist, or every case failed the checks (the first case's
        error: e.g. :class:`~medinfer.errors.InvalidImageError` for a file that is
        neither NIfTI nor DICOM, :class:`~medinfer.errors.ResourceLimitError` for a
        header announcing more voxels than the size limit).
    """
    from medinfer.inference.cli import discover_cases
    from medinfer.io.nifti import check_nifti_header
    from medinfer.io.sniff import ImageFormat, sniff_format

    cases = discover_cases(list(inputs))
    failed: list[tuple[Path, MedinferError]] = []
    for case in cases:
        if not case.path.is_file():
            continue
        try:
            if sniff_format(case.path) is ImageFormat.NIFTI:
                check_nifti_header(case.path)
        except MedinferError as exc:
            failed.append((case.path, exc))
    if cases and len(failed) == len(cases):
        raise failed[0][1]
    return failed
