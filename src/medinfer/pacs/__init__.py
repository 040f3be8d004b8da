"""PACS node: pull studies from a PACS, run a model, push the DICOM results back.

- DICOMweb (:mod:`medinfer.pacs.dicomweb`, ``dicomweb-client``): QIDO-RS search, WADO-RS
  retrieve (streamed to a temporary folder), predict, STOW-RS of the results into the same
  study; ``--watch`` polls QIDO for new series (state in SQLite, restart-safe).
- DIMSE (:mod:`medinfer.pacs.dimse`, ``pynetdicom``): a C-STORE SCP that collects
  instances per series (each on disk before its C-STORE response), runs the model when a
  series has been idle for a while, and C-STOREs the results to a forward destination.

Both need the ``pacs`` extra (``pip install medinfer[pacs]``).
"""

from __future__ import annotations

from medinfer.errors import MedinferError

__all__ = ["PacsError"]


class PacsError(MedinferError):
    """The PACS is unreachable, refuses the credentials, lacks the study, or rejects data."""
