"""Geometry-aware preprocessing with exact inverses.

Spatial (:mod:`medinfer.transforms.spatial`): reorientation, resampling to a spacing,
crop/pad, the model-grid round trip :func:`to_model_grid` /
:func:`to_source_grid`, and :class:`SlabResampler` (separable resampling of any slab of
output rows from only the input rows it needs; bitwise equal to the whole-array result),
built from per-axis :class:`AxisPlan` s. Intensity (:mod:`medinfer.transforms.intensity`):
:func:`normalize_intensity` (CT window, percentile, z-score).
"""

from medinfer.transforms.intensity import (
    IntensityMethod,
    check_finite,
    normalize_intensity,
    validate_intensity_spec,
)
from medinfer.transforms.spatial import (
    AxisPlan,
    CropPadRecord,
    Interpolation,
    PadMode,
    SlabResampler,
    SpatialRecord,
    crop_or_pad,
    crop_to_nonzero,
    invert_crop_or_pad,
    pad_to_multiple,
    reorient,
    resample_to_grid,
    resample_to_spacing,
    resampled_grid,
    to_model_grid,
    to_source_grid,
    uncrop,
)

__all__ = [
    "AxisPlan",
    "CropPadRecord",
    "IntensityMethod",
    "Interpolation",
    "PadMode",
    "SlabResampler",
    "SpatialRecord",
    "check_finite",
    "crop_or_pad",
    "crop_to_nonzero",
    "invert_crop_or_pad",
    "normalize_intensity",
    "pad_to_multiple",
    "reorient",
    "resample_to_grid",
    "resample_to_spacing",
    "resampled_grid",
    "to_model_grid",
    "to_source_grid",
    "uncrop",
    "validate_intensity_spec",
]
