"""medinfer.transforms.intensity against hand-computed values."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medinfer.errors import ConfigError, InvalidImageError
from medinfer.transforms import intensity, normalize_intensity, validate_intensity_spec
from medinfer.volume import Volume


def _affine() -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("z", 12, degrees=True).as_matrix() @ np.diag([-0.9, -1.1, 2.5])
    a[:3, 3] = [4.0, 5.0, -6.0]
    return a


def _vol(values: list[float] | np.ndarray, dtype: Any = np.int16) -> Volume:
    arr = np.asarray(values, dtype=dtype).reshape(1, -1, 1, 1)
    return Volume(arr, _affine(), {"modality": "CT"})


def test_ct_window_hand_values() -> None:
    v = _vol([-2000, -1000, -300, 0, 400, 3000])
    out = normalize_intensity(v, {"method": "ct_window", "min_hu": -1000, "max_hu": 400})
    assert out.array.dtype == np.float32
    np.testing.assert_allclose(out.array.ravel(), [0, 0, 0.5, 1000 / 1400, 1, 1], atol=1e-6)
    assert np.array_equal(out.affine, v.affine)
    assert out.meta["modality"] == "CT"


def test_percentile_hand_values() -> None:
    vals = np.arange(101, dtype=np.float32)  # percentile p of 0..100 is p
    out = normalize_intensity(_vol(vals, np.float32),
                              {"method": "percentile", "lower": 10, "upper": 90})
    expected = (np.clip(vals, 10, 90) - 10) / 80
    np.testing.assert_allclose(out.array.ravel(), expected, atol=1e-6)
    # defaults 0.5 / 99.5: lo = 0.5, hi = 99.5
    out = normalize_intensity(_vol(vals, np.float32), {"method": "percentile"})
    np.testing.assert_allclose(out.array.ravel(), (np.clip(vals, 0.5, 99.5) - 0.5) / 99.0,
                               atol=1e-6)


def test_percentile_nonzero_uses_only_nonzero_voxels() -> None:
    vals = np.concatenate([np.zeros(300), np.arange(1, 102)]).astype(np.float32)  # 1..101
    out = normalize_intensity(
        _vol(vals, np.float32),
        {"method": "percentile", "lower": 0, "upper": 100, "nonzero": True},
    )
    # lo = 1, hi = 101 from the non-zero voxels; zeros clip to lo -> 0
    np.testing.assert_allclose(out.array.ravel(), (np.clip(vals, 1, 101) - 1) / 100, atol=1e-6)
    with_zeros = normalize_intensity(
        _vol(vals, np.float32), {"method": "percentile", "lower": 50, "upper": 100}
    )
    # over all voxels the median is 0 -> lo = 0
    np.testing.assert_allclose(with_zeros.array.ravel(), vals / 101, atol=1e-6)


def test_percentile_subsampled_on_large_volumes_is_close(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    vals = rng.normal(100, 20, size=(1, 40, 40, 40)).astype(np.float32)
    v = Volume(vals, _affine())
    spec = {"method": "percentile", "lower": 1, "upper": 99}
    exact = normalize_intensity(v, spec).array
    monkeypatch.setattr(intensity, "PERCENTILE_EXACT_MAX", 5000)
    approx = normalize_intensity(v, spec).array
    again = normalize_intensity(v, spec).array
    assert np.array_equal(approx, again)  # deterministic
    assert not np.array_equal(approx, exact)  # the subsample path was taken
    np.testing.assert_allclose(approx, exact, atol=0.03)
    # sparse foreground with nonzero=True: the step follows the non-zero count
    sparse = np.where(rng.random(vals.shape) < 0.1, vals, 0.0).astype(np.float32)
    sv = Volume(sparse, _affine())
    nz_spec = {"method": "percentile", "lower": 1, "upper": 99, "nonzero": True}
    monkeypatch.setattr(intensity, "PERCENTILE_EXACT_MAX", 10**9)
    nz_exact = normalize_intensity(sv, nz_spec).array
    monkeypatch.setattr(intensity, "PERCENTILE_EXACT_MAX", 2000)
    nz_approx = normalize_intensity(sv, nz_spec).array
    assert not np.array_equal(nz_approx, nz_exact)
    np.testing.assert_allclose(nz_approx, nz_exact, atol=0.05)


def test_zscore_hand_values_and_nonzero_mask() -> None:
    vals = np.array([0, 0, 2, 4, 6], dtype=np.float32)
    out = normalize_intensity(_vol(vals, np.float32), {"method": "zscore"})
    mean, std = vals.mean(), vals.std()
    np.testing.assert_allclose(out.array.ravel(), (vals - mean) / std, atol=1e-6)
    out = normalize_intensity(_vol(vals, np.float32), {"method": "zscore", "nonzero": True})
    # non-zero: mean 4, std sqrt(8/3); outside the mask -> 0
    s = np.sqrt(8 / 3)
    np.testing.assert_allclose(out.array.ravel(), [0, 0, -2 / s, 0, 2 / s], atol=1e-6)
    # a constant channel is an error, not a silently zeroed channel (issue 17 item 9a)
    with pytest.raises(InvalidImageError, match="no intensity range"):
        normalize_intensity(_vol([5, 5, 5], np.float32), {"method": "zscore"})


def test_per_channel_and_none() -> None:
    arr = np.stack([np.arange(10.0), 100.0 * np.arange(10.0) + 7]).reshape(2, 10, 1, 1)
    v = Volume(arr, _affine())
    out = normalize_intensity(v, {"method": "percentile", "lower": 0, "upper": 100})
    np.testing.assert_allclose(out.array[0], out.array[1], atol=1e-6)
    z = normalize_intensity(v, {"method": "zscore"})
    np.testing.assert_allclose(z.array[0], z.array[1], atol=1e-5)
    n = normalize_intensity(v, {"method": "none"})
    assert n.array.dtype == np.float32
    np.testing.assert_allclose(n.array, arr, rtol=1e-6)


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({}, "intensity.method"),
        ({"method": "minmax"}, "intensity.method"),
        ({"method": "ct_window", "min_hu": -1000}, "intensity.max_hu"),
        ({"method": "ct_window", "min_hu": 400, "max_hu": -1000}, "intensity.max_hu"),
        ({"method": "ct_window", "min_hu": "low", "max_hu": 1}, "intensity.min_hu"),
        ({"method": "ct_window", "min_hu": 0, "max_hu": 1, "lower": 2}, "intensity.lower"),
        ({"method": "percentile", "lower": 60, "upper": 40}, "intensity.upper"),
        ({"method": "percentile", "upper": 101}, "intensity.upper"),
        ({"method": "percentile", "nonzero": "yes"}, "intensity.nonzero"),
        ({"method": "zscore", "nonzero": 1}, "intensity.nonzero"),
        ({"method": "zscore", "min_hu": 1}, "intensity.min_hu"),
    ],
)
def test_bad_spec_names_the_key(spec: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        normalize_intensity(_vol([1, 2, 3]), spec)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_intensity_spec(spec)


def test_validate_fills_defaults() -> None:
    assert validate_intensity_spec({"method": "PERCENTILE"}) == {
        "method": "percentile", "lower": 0.5, "upper": 99.5, "nonzero": False,
    }
    assert validate_intensity_spec({"method": "ct_window", "min_hu": -100, "max_hu": 200}) == {
        "method": "ct_window", "min_hu": -100.0, "max_hu": 200.0,
    }


def test_bad_method_lists_allowed_values() -> None:
    with pytest.raises(ConfigError, match="'ct_window', 'percentile', 'zscore', 'none'"):
        normalize_intensity(_vol([1, 2]), {"method": "minmax"})
    with pytest.raises(ConfigError, match="intensity"):
        normalize_intensity(_vol([1, 2]), ["zscore"])  # type: ignore[arg-type]
