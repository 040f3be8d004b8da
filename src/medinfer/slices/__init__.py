"""Volume <-> 2D slice export and polygon reconstruction (slice-wise 2D models).

- :func:`export_slices`: a 3D scan or label volume -> PNG slices in radiological display
  orientation (derived from the affine) + ``{patient_id}_export.json`` that inverts it;
- :func:`reconstruct`: per-slice polygon predictions (JSON, schema
  ``prediction.schema.json``) -> int16 NIfTI label volume on the original grid, with a
  3D Slicer colour table, a label description and a summary.

Command line: ``medinfer slices reconstruct``, ``python -m medinfer slices reconstruct``,
``python -m medinfer.slices reconstruct`` or ``python -m medinfer.slices.reconstruct``
(the same options). See ``docs/slices.md`` and ``docs/compat/slices.md``.
"""

import warnings

from medinfer.slices.export import ExportResult, IntensityWindow, export_slices, parse_window
from medinfer.slices.geometry import SliceAxis, SliceMapping, mapping_from_affine
from medinfer.slices.labels import Label, LabelTable
from medinfer.slices.predictions import (
    NormalizedConvention,
    SlicePolygon,
    SlicePrediction,
    parse_prediction_file,
    prediction_schema,
    validate_prediction,
)
from medinfer.slices.qc import write_qc_overlays
from medinfer.slices.raster import fill_polygon
from medinfer.slices.reconstruct import (
    PatientResult,
    SliceReconstructionWarning,
    UnknownClassPolicy,
    rasterize_slice,
    reconstruct,
    reconstruct_patient,
)

__all__ = [
    "ExportResult",
    "IntensityWindow",
    "Label",
    "LabelTable",
    "NormalizedConvention",
    "PatientResult",
    "SliceAxis",
    "SliceMapping",
    "SlicePolygon",
    "SlicePrediction",
    "SliceReconstructionWarning",
    "UnknownClassPolicy",
    "export_slices",
    "fill_polygon",
    "mapping_from_affine",
    "parse_prediction_file",
    "parse_window",
    "prediction_schema",
    "rasterize_slice",
    "reconstruct",
    "reconstruct_patient",
    "validate_prediction",
    "write_qc_overlays",
]

# ``python -m medinfer.slices.reconstruct`` imports this package (and with it the module)
# before running the module as __main__; runpy's warning about that is harmless here
warnings.filterwarnings(
    "ignore",
    message=r"'medinfer\.slices\.reconstruct' found in sys\.modules",
    category=RuntimeWarning,
)
