"""Reading and writing scans: NIfTI and DICOM in, NIfTI (and DICOM SEG) out.

``load(path)`` and ``save(volume, path)`` dispatch on file content, not only on the
suffix. All Volumes come back with affines in RAS+ mm.
"""

from medinfer.io.dispatch import load, save

__all__ = ["load", "save"]
