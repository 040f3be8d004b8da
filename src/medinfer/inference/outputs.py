"""Compact storage of probability maps written by ``medinfer predict``.

A float32 4-D probability map of a 1-mm brain with 4 classes is about 99 MB. By default
``<case>_prob.nii.gz`` (and the detection pipeline's ``<case>_heatmap.nii.gz``) stores
each value as ``uint8`` with ``scl_slope`` ~ 1/255 (``scl_inter = 0``): every NIfTI
reader (nibabel, ITK, 3D Slicer) applies the scaling and sees values ``k * slope`` in
``[0, 1]`` (``slope`` = the float32 just below 1/255, so 255 maps to at most 1); the
quantisation error is at most ``1 / 510`` (0.002) plus 1e-7. ``--prob-dtype float32``
keeps full precision. The encoding goes through :func:`medinfer.io.nifti.write_nifti`'s
exact source-scaling path (the values handed to the writer are exactly
``uint8 * slope`` in float32, so it stores the integers and the slope).
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np

from medinfer.errors import parse_enum
from medinfer.volume import Volume

__all__ = ["ProbDtype", "UINT8_SLOPE", "compact_probabilities"]

#: the scl_slope of uint8 probability maps: the float32 (as the NIfTI-1 header stores
#: it) just below 1/255, so that 255 * slope <= 1 in any reader's arithmetic
UINT8_SLOPE = float(np.nextafter(np.float32(1.0 / 255.0), np.float32(0.0)))


class ProbDtype(StrEnum):
    """Storage of probability maps: ``uint8`` (scaled by 1/255, default) or ``float32``."""

    UINT8 = "uint8"
    FLOAT32 = "float32"


def compact_probabilities(prob: Volume, dtype: ProbDtype | str = ProbDtype.UINT8) -> Volume:
    """``prob`` prepared for :func:`medinfer.io.save` in the chosen storage.

    Parameters
    ----------
    prob : probabilities ``(K, I, J, K)``, float, values in ``[0, 1]`` (clipped), on the
        source grid (affine and NIfTI codes as for the label map).
    dtype : ``uint8`` or ``float32``.

    Returns
    -------
    Volume
        ``float32``: ``prob`` unchanged. ``uint8``: float32 values ``round(255 p) / 255``
        with ``meta["nifti"]`` asking the writer for uint8 + ``scl_slope`` 1/255.

    Raises
    ------
    ConfigError
        Unknown ``dtype``.
    """
    kind = parse_enum(ProbDtype, dtype, "prob_dtype")
    if kind is ProbDtype.FLOAT32:
        return prob
    src = prob.array
    out = np.empty(src.shape, dtype=np.float32)
    for c in range(src.shape[0]):  # one channel at a time: no full-size float64 temporaries
        raw = np.rint(np.clip(src[c], 0.0, 1.0) * 255.0).astype(np.uint8)
        np.multiply(raw, np.float32(UINT8_SLOPE), out=out[c], dtype=np.float32)
    meta = dict(prob.meta)
    meta["nifti"] = {**(prob.meta.get("nifti") or {}), "scl_slope": UINT8_SLOPE,
                     "scl_inter": 0.0, "datatype": "uint8"}
    return Volume(out, prob.affine, meta)
