"""Small dtype helpers shared by the readers and writers."""

from __future__ import annotations

from typing import Any

import numpy as np


def smallest_int_dtype(lo: int, hi: int) -> np.dtype[Any]:
    """Smallest of uint8, uint16 (``lo >= 0``) / int16, then int32, int64 holding [lo, hi].

    uint64 when a non-negative range exceeds int64. int8 and uint32 are avoided on purpose
    (poorly supported by viewers reading NIfTI).
    """
    lo, hi = int(lo), int(hi)
    candidates: tuple[type[np.integer[Any]], ...] = (
        (np.uint8, np.uint16, np.int32, np.int64) if lo >= 0 else (np.int16, np.int32, np.int64)
    )
    for c in candidates:
        info = np.iinfo(c)
        if info.min <= lo and hi <= info.max:
            return np.dtype(c)
    return np.dtype(np.uint64) if lo >= 0 else np.dtype(np.int64)


def fits(dtype: np.dtype[Any], lo: float, hi: float) -> bool:
    """True if the integer ``dtype`` holds every value of [lo, hi]."""
    info = np.iinfo(dtype)
    return bool(info.min <= lo and hi <= info.max)
