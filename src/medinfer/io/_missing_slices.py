"""Whether DICOM reads may leave out unreadable files of a series (``--allow-missing-slices``).

By default a file of the chosen series that cannot be read stops the read with an error
naming it (:func:`medinfer.io.dicom.read_dicom`). The choice travels as an argument
(``read_dicom(..., allow_missing_slices=True)``, ``medinfer.io.load(...)``) or, for code
paths that only call ``load(path)`` (batch runners, reader threads, Ray workers, the
server), as the environment variable :data:`ALLOW_MISSING_SLICES_ENV` (``1`` / ``true`` /
``yes``), which the CLI flag sets for the duration of the command.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ALLOW_MISSING_SLICES_ENV", "allow_missing_slices_default", "allowing_missing_slices"]

#: environment variable: ``1`` lets DICOM reads leave out unreadable files of a series
ALLOW_MISSING_SLICES_ENV = "MEDINFER_ALLOW_MISSING_SLICES"


def allow_missing_slices_default() -> bool:
    """The default of ``allow_missing_slices``: the environment variable, else False."""
    value = os.environ.get(ALLOW_MISSING_SLICES_ENV, "").strip().lower()
    return value in ("1", "true", "yes", "on")


@contextmanager
def allowing_missing_slices(allow: bool) -> Iterator[None]:
    """Set :data:`ALLOW_MISSING_SLICES_ENV` while the block runs (when ``allow``).

    The previous value is restored on exit. With ``allow`` False nothing is changed.
    """
    if not allow:
        yield
        return
    old = os.environ.get(ALLOW_MISSING_SLICES_ENV)
    os.environ[ALLOW_MISSING_SLICES_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ALLOW_MISSING_SLICES_ENV, None)
        else:
            os.environ[ALLOW_MISSING_SLICES_ENV] = old
