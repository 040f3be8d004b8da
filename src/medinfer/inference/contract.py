"""Does a scan fit the model card's input contract? (modality, intensities, slices)

Models are trained on one kind of scan; a CT through an MR model (or a single 2-D slice
through a 3-D model) gives confident nonsense with exit code 0. Before inference,
:func:`check_input_contract` compares the scan with ``card.input``:

* **Modality**: the DICOM ``Modality`` of the scan (``meta["modality"]``) against
  ``input.modality``. Without one (NIfTI), the intensities decide where they are
  unambiguous: a scan whose 1st percentile is at most -500 holds air in Hounsfield
  units, so it is a CT (given to an MR model: a mismatch); a scan for a CT model whose
  minimum is above -200 holds no air or fat in HU, so it is not a CT in Hounsfield
  units (another modality, or rescale slope/intercept not applied).
* **Slices**: every spatial axis must have at least ``input.min_slices`` voxels (3 by
  default): a single 2-D slice does not fit a 3-D model.

Each mismatch is logged as a warning (``logging`` at WARNING, shown on stderr by the
CLI). With ``input.mismatch: refuse`` in the card it is an
:class:`~medinfer.errors.InvalidImageError` (CLI exit 2, HTTP 422) unless ``force``
(``medinfer predict --force``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from medinfer.errors import InvalidImageError

if TYPE_CHECKING:
    from medinfer.models.card import ModelCard
    from medinfer.volume import Volume

__all__ = ["check_input_contract", "input_contract_issues"]

log = logging.getLogger(__name__)

#: 1st percentile at or below this (HU) means the scan holds air: a CT in HU
CT_AIR_HU = -500.0
#: a CT in HU has air (-1000) or at least fat (-100) somewhere below this
CT_MIN_BELOW_HU = -200.0
#: voxels sampled for the percentile (deterministic stride)
_SAMPLE = 1_000_000


def _p1_and_min(volume: Volume) -> tuple[float, float]:
    flat = volume.array[0].reshape(-1)
    step = max(1, flat.size // _SAMPLE)
    sample = np.asarray(flat[::step], dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return float("nan"), float("nan")
    return float(np.percentile(sample, 1.0)), float(sample.min())


def input_contract_issues(volume: Volume, card: ModelCard) -> list[str]:
    """The ways ``volume`` does not fit ``card.input`` (empty list: it fits).

    Parameters
    ----------
    volume : the scan on its source grid, ``(C, I, J, K)``, intensities as stored
        after rescale (HU for CT).
    card : the model card.

    Returns
    -------
    list of str, one sentence per mismatch (modality, intensities, slice count).
    """
    spec = card.input
    expected = spec.modality.strip().upper()
    issues: list[str] = []
    stated = volume.meta.get("modality")
    if isinstance(stated, str) and stated.strip():
        if stated.strip().upper() != expected:
            issues.append(f"the scan's DICOM Modality is {stated.strip()!r}, the model "
                          f"expects {expected!r}")
    elif np.issubdtype(volume.array.dtype, np.number):
        p1, vmin = _p1_and_min(volume)
        if expected != "CT" and p1 <= CT_AIR_HU:
            issues.append(f"the intensities look like a CT in Hounsfield units (1st "
                          f"percentile {p1:g} <= {CT_AIR_HU:g}: air), the model expects "
                          f"{expected!r}")
        elif expected == "CT" and vmin > CT_MIN_BELOW_HU:
            issues.append(f"the intensities do not look like a CT in Hounsfield units "
                          f"(minimum {vmin:g} > {CT_MIN_BELOW_HU:g}: no air or fat), the "
                          f"model expects 'CT' (another modality, or rescale not applied?)")
    shape = volume.spatial_shape
    if min(shape) < spec.min_slices:
        kind = "a single 2-D slice" if min(shape) == 1 else f"only {min(shape)} slices"
        issues.append(f"the scan is {kind} (shape {list(shape)}), the model needs at least "
                      f"{spec.min_slices} voxels along every axis (a 3-D volume)")
    return issues


def check_input_contract(volume: Volume, card: ModelCard, *, force: bool = False) -> list[str]:
    """Warn about (or, if the card says ``mismatch: refuse``, refuse) a misfit scan.

    Returns
    -------
    list of str, the issues found (each also logged as a warning).

    Raises
    ------
    InvalidImageError
        ``card.input.mismatch`` is ``refuse``, there are issues and not ``force``; the
        message names the scan, the issues and ``--force``.
    """
    from medinfer.models.card import InputMismatch

    issues = input_contract_issues(volume, card)
    if not issues:
        return issues
    source = volume.meta.get("source", "input")
    text = "; ".join(issues)
    if card.input.mismatch is InputMismatch.REFUSE and not force:
        raise InvalidImageError(
            f"{source}: does not fit model {card.name!r}: {text}. The model card refuses "
            f"such scans (input.mismatch: refuse); use --force (force=True) to run anyway"
        )
    log.warning("%s: does not fit model %r: %s%s", source, card.name, text,
                " (run anyway: --force)" if force else "")
    return issues
