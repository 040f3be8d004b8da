"""Inference: the sliding-window engine, TTA and the :class:`Predictor`.

``sliding_window_inference`` works on ``(N, C, *spatial)`` torch tensors;
``Predictor(card, model).predict(volume)`` turns a scan into a
:class:`~medinfer.prediction.Prediction` on the scan's own grid.
"""

from medinfer.inference.predictor import Predictor, label_statistics
from medinfer.inference.sliding_window import (
    BlendMode,
    RunMode,
    WindowPlan,
    importance_map,
    sliding_window_inference,
    tta_flips,
)

__all__ = [
    "BlendMode",
    "Predictor",
    "RunMode",
    "WindowPlan",
    "importance_map",
    "label_statistics",
    "sliding_window_inference",
    "tta_flips",
]
