"""Streaming equals ``--no-stream`` on tiny, coarse, anisotropic and oblique grids.

Issue 17 item 9: the streaming export crashed (``IndexError`` in the 1-D passes) when a
coarse source grid was exported in one piece whose first source voxel reads a model row
above 0 (pydicom's ``rtdose.dcm``: 10 x 10 x 15 at 10 x 10 x 5 mm). The property test
draws random source grids (shape, spacing, orientation, obliquity) and model grids and
checks that the streamed labels and probabilities equal the full-volume path bitwise.
"""

from __future__ import annotations

import numpy as np
import pydicom.data
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from medinfer.errors import GeometryError
from medinfer.inference import Predictor
from medinfer.inference.streaming import predict_streaming
from medinfer.io import load
from medinfer.models import ModelCard
from medinfer.transforms import AxisPlan, SlabResampler, resample_to_grid
from medinfer.volume import Volume


def _net(k: int) -> torch.nn.Module:
    torch.manual_seed(k)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, k, 1)
    ).eval()


def _card(k: int, orientation: str, spacing: list[float], patch: list[int]) -> ModelCard:
    return ModelCard.from_dict({
        "name": "grid-probe", "version": "0",
        "labels": {i: {"name": f"c{i}"} for i in range(k)},
        "input": {"orientation": orientation, "spacing": spacing,
                  "normalization": {"method": "zscore"}},
        "inference": {"patch_size": patch, "overlap": 0.5, "blending": "gaussian"},
        "weights": {"format": "torchscript", "file": "unused.ts"},
    })


def _rotation(ax: float, az: float) -> np.ndarray:
    a, b = np.deg2rad(az), np.deg2rad(ax)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rx @ rz


def _assert_stream_equals_full(vol: Volume, card: ModelCard, k: int) -> None:
    pred = Predictor(card, _net(k), device="cpu", save_probabilities=True)
    full = pred.predict(vol)
    streamed = predict_streaming(pred, vol)
    assert streamed.label.shape == full.label.shape == (1, *vol.spatial_shape)
    assert np.array_equal(streamed.label.affine, vol.affine)
    assert np.array_equal(streamed.label.array, full.label.array)
    assert streamed.probabilities is not None and full.probabilities is not None
    assert np.array_equal(streamed.probabilities.array, full.probabilities.array)


grids = st.fixed_dictionaries({
    "shape": st.tuples(*[st.integers(1, 12)] * 3),
    "spacing": st.tuples(*[st.sampled_from([0.7, 1.0, 2.5, 5.0, 10.0])] * 3),
    "perm": st.permutations([0, 1, 2]),
    "flips": st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
    "angles": st.tuples(st.sampled_from([0.0, 12.0]), st.sampled_from([0.0, 25.0])),
    "model_spacing": st.tuples(*[st.sampled_from([1.0, 1.5, 3.0])] * 3),
    "orientation": st.sampled_from(["RAS", "LPS", "PIR"]),
    "seed": st.integers(0, 2**16),
})


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(grids)
def test_streaming_equals_full_volume_on_random_grids(g: dict) -> None:
    direction = np.eye(3)[:, list(g["perm"])] * np.array(g["flips"])
    aff = np.eye(4)
    aff[:3, :3] = _rotation(*g["angles"]) @ direction @ np.diag(g["spacing"])
    aff[:3, 3] = [-17.25, 40.5, 3.0]
    assume(int(np.prod(g["shape"])) > 1)  # one voxel has no intensity range to normalise
    rng = np.random.default_rng(g["seed"])
    vol = Volume(rng.normal(size=(1, *g["shape"])).astype(np.float32), aff, {})
    card = _card(3, g["orientation"], list(g["model_spacing"]), [8, 8, 8])
    _assert_stream_equals_full(vol, card, 3)


def test_streaming_on_pydicom_rtdose() -> None:
    """pydicom's rtdose.dcm (10 x 10 x 15 at 10 x 10 x 5 mm, LPS-stored) crashed before."""
    vol = load(pydicom.data.get_testdata_file("rtdose.dcm"))
    assert vol.spatial_shape == (10, 10, 15)
    _assert_stream_equals_full(vol, _card(4, "RAS", [1.5, 1.5, 1.5], [16, 16, 16]), 4)


def test_slab_resampler_slabs_equal_whole_array() -> None:
    """Public slab API: any slab along any axis equals the whole-array resampling."""
    rng = np.random.default_rng(0)
    src_aff = np.diag([-10.0, -10.0, 5.0, 1.0])
    src_aff[:3, 3] = [3.0, -2.0, 1.0]
    dst_aff = np.diag([1.5, 1.5, 1.5, 1.0])[:, [1, 0, 2, 3]]
    dst_aff[:3, 3] = [-40.0, -40.0, 0.0]
    data = rng.random((2, 10, 10, 15)).astype(np.float32)
    rs = SlabResampler.from_grids((10, 10, 15), src_aff, (40, 30, 50), dst_aff)
    whole = resample_to_grid(Volume(data, src_aff), (40, 30, 50), dst_aff).array
    assert np.array_equal(rs.resample(data), whole)
    for axis in range(3):
        t0, t1 = 3, 17
        lo, hi = rs.source_range(axis, t0, t1)
        r = rs.perm[axis]
        block = np.take(data, np.arange(lo, hi), axis=r + 1)
        part = rs.resample(block, axis=axis, start=t0, stop=t1, block_start=lo)
        assert np.array_equal(part, np.take(whole, np.arange(t0, t1), axis=axis + 1))
    # a block without the rows the slab needs is refused, not silently misread
    lo, hi = rs.source_range(0, 5, 9)
    short = np.take(data, np.arange(lo + 1, hi), axis=rs.perm[0] + 1)
    with pytest.raises(GeometryError, match="does not hold input rows"):
        rs.resample(short, axis=0, start=5, stop=9, block_start=lo + 1)
    gather = AxisPlan(10, np.array([9, 0, 4]))
    assert gather.kind == "take" and gather.need_hi.tolist() == [9, 0, 4]
