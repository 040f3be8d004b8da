"""The result type of every predictor: :class:`Prediction`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medinfer.volume import Volume


@dataclass
class LabelStatistics:
    """Per-label summary on the source grid.

    Attributes
    ----------
    value : label value in the label map.
    name : label name from the model card.
    voxels : number of voxels with this label.
    volume_ml : ``voxels`` times the voxel volume (mm^3), divided by 1000 (mL).
    """

    value: int
    name: str
    voxels: int
    volume_ml: float

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "name": self.name, "voxels": self.voxels,
                "volume_ml": self.volume_ml}


@dataclass
class Prediction:
    """What a predictor returns; every Volume is on the **source** grid.

    Attributes
    ----------
    label : label map, shape ``(1, I, J, K)``, uint8 (or uint16 for > 255 labels),
        same affine as the input scan.
    probabilities : optional float32 ``(C, I, J, K)`` class probabilities (softmax or
        sigmoid), same grid.
    heatmap : optional float32 ``(1, I, J, K)`` detection heat map in [0, 1], same grid.
    detections : list of finding dicts (detection models only).
    statistics : per-label statistics, background excluded.
    timings : seconds per stage (``load``, ``preprocess``, ``inference``,
        ``postprocess``, ``export``...).
    model_name, model_version : from the model card.
    """

    label: Volume
    probabilities: Volume | None = None
    heatmap: Volume | None = None
    detections: list[dict[str, Any]] = field(default_factory=list)
    statistics: list[LabelStatistics] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    model_name: str = ""
    model_version: str = ""

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable summary (labels, volumes, timings, detections, geometry)."""
        return {
            "model": self.model_name,
            "model_version": self.model_version,
            "shape": list(self.label.spatial_shape),
            "spacing": [float(s) for s in self.label.spacing],
            "affine": self.label.affine.tolist(),
            "labels": [s.to_dict() for s in self.statistics],
            "detections": self.detections,
            "timings": dict(self.timings),
        }
