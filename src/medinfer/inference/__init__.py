"""Inference: the sliding-window engine, TTA and the :class:`Predictor`.

``sliding_window_inference`` works on ``(N, C, *spatial)`` torch tensors;
``Predictor(card, model).predict(volume)`` turns a scan into a
:class:`~medinfer.prediction.Prediction` on the scan's own grid.

The building blocks below are the engine's public API for model formats that bring
their own pre-processing and export (:mod:`medinfer.formats`): ``pad_spec``,
``tta_flips``, ``make_tta_runner`` (one TTA forward), ``stream_logits`` (slab-wise
accumulation) and ``SlabExporter`` (slab-wise resampling back to an output grid).
"""

from medinfer.inference.predictor import Predictor, label_statistics
from medinfer.inference.sliding_window import (
    BlendMode,
    RunMode,
    WindowPlan,
    importance_map,
    make_tta_runner,
    pad_spec,
    sliding_window_inference,
    tta_flips,
)
from medinfer.inference.streaming import SlabExporter, stream_logits

__all__ = [
    "BlendMode",
    "Predictor",
    "RunMode",
    "SlabExporter",
    "WindowPlan",
    "importance_map",
    "label_statistics",
    "make_tta_runner",
    "pad_spec",
    "sliding_window_inference",
    "stream_logits",
    "tta_flips",
]
