"""Geometry-aware preprocessing with exact inverses.

Spatial (:mod:`medinfer.transforms.spatial`): reorientation, resampling to a spacing,
crop/pad, and the model-grid round trip :func:`to_model_grid` /
:func:`to_source_grid`. Intensity (:mod:`medinfer.transforms.intensity`):
:func:`normalize_intensity` (CT window, percentile, z-score).
"""

from medinfer.transforms.intensity import (
    IntensityMethod,
    normalize_intensity,
    validate_intensity_spec,
)
from medinfer.transforms.spatial import (
    CropPadRecord,
    Interpolation,
    PadMode,
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
    "CropPadRecord",
    "IntensityMethod",
    "Interpolation",
    "PadMode",
    "SpatialRecord",
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
