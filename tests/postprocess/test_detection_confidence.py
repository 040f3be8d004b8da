"""``post_processing.confidence``: mean heat over the component (default) or the peak value.

An occupancy-fraction heat map is 1.0 at the peak of every lesion larger than a few voxels,
so the peak cannot rank findings; the component mean can (issue 16, demo-nodules)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from medinfer.postprocess.detection import detect_findings
from medinfer.postprocess.detection_config import PostProcessingSection

# oblique, anisotropic, permuted grid
_ROT = np.array([[0.0, 0.0, 1.0], [0.8, 0.6, 0.0], [-0.6, 0.8, 0.0]])
AFFINE = np.eye(4)
AFFINE[:3, :3] = _ROT * np.array([1.2, 0.9, 1.5])
AFFINE[:3, 3] = [-20.0, 13.0, 7.5]


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float,
          edge: float) -> np.ndarray:
    """Soft ball: 1 inside ``radius - edge``, linear ramp to 0 at ``radius + edge`` (voxels)."""
    idx = np.indices(shape).astype(np.float64)
    r = np.sqrt(sum((idx[n] - centre[n]) ** 2 for n in range(3)))
    return np.clip((radius + edge - r) / (2.0 * edge), 0.0, 1.0).astype(np.float32)


def test_mean_confidence_ranks_where_the_peak_saturates() -> None:
    shape = (40, 40, 40)
    big = _ball(shape, (12, 12, 12), 6.0, 1.0)    # large, saturated core
    small = _ball(shape, (30, 30, 30), 2.0, 1.0)  # small: mostly edge, also 1.0 at its centre
    heat = np.maximum(big, small)
    peak = detect_findings(heat, AFFINE, None, PostProcessingSection(confidence="peak"))
    assert [f.confidence for f in peak] == [pytest.approx(1.0)] * 2  # ties: ranks nothing
    mean = detect_findings(heat, AFFINE, None, PostProcessingSection())
    assert len(mean) == 2 and all(0.5 <= f.confidence < 1.0 for f in mean)
    assert mean[0].diameter_mm > mean[1].diameter_mm  # the large one first
    assert mean[0].confidence > mean[1].confidence
    # by hand: mean heat over the component (heat >= 0.5, 26-connected = the ball here)
    sel = big >= 0.5
    assert mean[0].confidence == pytest.approx(float(big[sel].mean()), rel=1e-6)
    assert mean[0].to_dict()["confidence"] == pytest.approx(big[sel].mean(), abs=1e-5)


def test_mean_confidence_below_segmentation_threshold_is_the_peak() -> None:
    heat = np.zeros((20, 20, 20), np.float32)
    heat[10, 10, 10] = 0.4
    heat[10, 10, 11] = 0.3
    fs = detect_findings(heat, AFFINE, None, PostProcessingSection(threshold=0.2))
    assert len(fs) == 1 and fs[0].confidence == pytest.approx(0.4)


def test_confidence_method_is_checked() -> None:
    with pytest.raises(ValidationError, match="confidence"):
        PostProcessingSection(confidence="median")
