"""Geometry tests of medinfer.transforms.spatial on oblique, anisotropic, non-RAS grids."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.ndimage import affine_transform
from scipy.spatial.transform import Rotation

from medinfer.errors import ConfigError, GeometryError
from medinfer.transforms import (
    CropPadRecord,
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
from medinfer.volume import Volume

ANISO = np.array([0.9, 1.1, 2.5])


def _affine(
    spacing: np.ndarray, flips: tuple[int, int, int] = (1, 1, 1),
    perm: tuple[int, int, int] = (0, 1, 2), angles: tuple[float, float, float] = (0, 0, 0),
    origin: tuple[float, float, float] = (12.5, -30.0, 41.0),
) -> np.ndarray:
    """Voxel -> RAS affine: world axis perm[n] (sign flips[n]) for voxel axis n, rotated."""
    lin = np.zeros((3, 3))
    for n in range(3):
        lin[perm[n], n] = flips[n] * spacing[n]
    rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    a = np.eye(4)
    a[:3, :3] = rot @ lin
    a[:3, 3] = origin
    return a


FRAMES = {
    "RAS_aniso": _affine(ANISO),
    "LPS_aniso": _affine(ANISO, flips=(-1, -1, 1)),
    "LPI": _affine(np.array([1.0, 1.2, 1.5]), flips=(-1, -1, -1)),
    "PIR_permuted": _affine(ANISO, flips=(-1, -1, 1), perm=(1, 2, 0)),
    "oblique15_LPS_aniso": _affine(ANISO, flips=(-1, -1, 1), angles=(15.0, -12.0, 10.0)),
    "oblique20_permuted": _affine(np.array([1.3, 0.8, 2.0]), perm=(2, 0, 1), angles=(0, 20, 5)),
}
SHAPE = (26, 22, 12)


def _f(xyz: np.ndarray) -> np.ndarray:
    """Smooth analytic function of RAS mm (|second derivatives| <= ~1/300 per mm^2)."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    return np.sin(x / 17.0) + np.cos(y / 21.0) + 0.5 * np.sin(z / 15.0 + 0.3)


def _world_grid(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _sampled(affine: np.ndarray, shape: tuple[int, int, int] = SHAPE) -> Volume:
    vals = _f(_world_grid(shape, affine)).astype(np.float32)
    return Volume(np.stack([vals, 2.0 * vals + 1.0]), affine)


def _inside(points_xyz: np.ndarray, vol: Volume, margin: float) -> np.ndarray:
    ijk = vol.world_to_voxel(points_xyz)
    hi = np.asarray(vol.spatial_shape) - 1 - margin
    return np.all((ijk >= margin) & (ijk <= hi), axis=-1)


# ------------------------------------------------------------------------- reorient
@pytest.mark.parametrize("frame", sorted(FRAMES))
@pytest.mark.parametrize("code", ["RAS", "LPS", "LPI", "RPI", "PIR", "SLA", "ilp"])
def test_reorient_round_trip_exact(frame: str, code: str) -> None:
    a = FRAMES[frame]
    arr = np.arange(2 * np.prod(SHAPE), dtype=np.int32).reshape(2, *SHAPE)
    v = Volume(arr, a)
    r = reorient(v, code)
    assert r.orientation == code.upper()
    assert r.array.dtype == np.int32
    assert sorted(r.spatial_shape) == sorted(SHAPE)
    # every voxel keeps its world position: look voxels up by their unique value
    for value in (0, 7, 1234, int(np.prod(SHAPE)) - 1):
        src_ijk = np.argwhere(arr[0] == value)[0]
        dst_ijk = np.argwhere(r.array[0] == value)[0]
        np.testing.assert_allclose(v.voxel_to_world(src_ijk), r.voxel_to_world(dst_ijk),
                                   atol=1e-9)
    back = reorient(r, v.orientation)
    assert np.array_equal(back.array, arr)
    np.testing.assert_allclose(back.affine, a, atol=1e-9)


def test_reorient_bad_code() -> None:
    v = Volume(np.zeros(SHAPE), FRAMES["LPI"])
    for bad in ("RAA", "RA", "XYZ", "RASS"):
        with pytest.raises(ConfigError, match="orientation"):
            reorient(v, bad)


# ------------------------------------------------------------------ resample to spacing
def test_resampled_grid_convention() -> None:
    a = FRAMES["oblique15_LPS_aniso"]
    shape, new = resampled_grid(SHAPE, a, (1.5, 1.5, 1.5))
    assert shape == (16, 16, 20)  # round(26*0.9/1.5)=16, round(22*1.1/1.5)=16, 12*2.5/1.5=20
    v = Volume(np.zeros(SHAPE), a)
    w = Volume(np.zeros(shape), new)
    np.testing.assert_allclose(w.spacing, 1.5, atol=1e-12)
    np.testing.assert_allclose(w.direction, v.direction, atol=1e-12)
    centre_v = v.voxel_to_world((np.asarray(SHAPE) - 1) / 2)
    centre_w = w.voxel_to_world((np.asarray(shape) - 1) / 2)
    np.testing.assert_allclose(centre_w, centre_v, atol=1e-9)


def test_resample_to_spacing_keeps_dtype_for_nearest_and_is_exact_without_change() -> None:
    a = FRAMES["PIR_permuted"]
    lab = np.random.default_rng(1).integers(0, 5, size=SHAPE).astype(np.int16)
    v = Volume(lab, a)
    same = resample_to_spacing(v, v.spacing.tolist(), "nearest")
    assert same.array.dtype == np.int16
    assert np.array_equal(same.array[0], lab)
    down = resample_to_spacing(v, (2.0, 2.0, 2.0), "nearest")
    assert down.array.dtype == np.int16
    assert set(np.unique(down.array)) <= set(np.unique(lab))


# ----------------------------------------------------------------- model grid round trip
@pytest.mark.parametrize("frame", sorted(FRAMES))
@pytest.mark.parametrize(
    ("orientation", "spacing"),
    [("RAS", (1.5, 1.5, 1.5)), ("LPS", (0.7, 2.0, 1.2)), ("PIR", None), (None, (1.0, 1.0, 1.0))],
)
def test_round_trip_exact_grid_and_analytic_function(
    frame: str, orientation: str | None, spacing: tuple[float, float, float] | None
) -> None:
    src = _sampled(FRAMES[frame])
    model, rec = to_model_grid(src, orientation, spacing)
    assert model.array.dtype == np.float32
    if orientation is not None:
        assert model.orientation == orientation
    if spacing is not None:
        np.testing.assert_allclose(model.spacing, spacing, atol=1e-9)
    # the model grid carries the function: compare against f at model voxel centres
    mworld = _world_grid(model.spatial_shape, model.affine)
    inside = _inside(mworld, src, margin=0.0)
    assert inside.mean() > 0.5
    err_fwd = np.abs(model.array[0] - _f(mworld))[inside]
    assert err_fwd.max() < 0.02
    back = to_source_grid(model, rec)
    assert back.spatial_shape == src.spatial_shape
    assert back.num_channels == 2
    assert np.array_equal(back.affine, src.affine)
    sworld = _world_grid(src.spatial_shape, src.affine)
    keep = _inside(sworld, model, margin=1.0)
    assert keep.mean() > 0.3
    err = np.abs(back.array - src.array)[:, keep]
    assert err.max() < 0.03
    # channel 1 = 2 * channel 0 + 1 survives linear interpolation
    np.testing.assert_allclose(back.array[1], 2.0 * back.array[0] + 1.0, atol=1e-4)


@pytest.mark.parametrize("frame", sorted(FRAMES))
def test_pure_reorientation_is_exact_both_ways(frame: str) -> None:
    src = Volume(np.random.default_rng(0).random((3, *SHAPE)).astype(np.float32), FRAMES[frame])
    model, rec = to_model_grid(src, "RAS", None)
    assert np.array_equal(model.array, reorient(src, "RAS").array)
    assert [s["op"] for s in rec.steps] == ["reorient"]
    for interp in ("linear", "nearest"):
        back = to_source_grid(model, rec, interpolation=interp)
        assert np.array_equal(back.array, src.array)


def test_identity_is_exact_and_records_no_resampling() -> None:
    a = FRAMES["oblique15_LPS_aniso"]
    src = Volume(np.random.default_rng(3).random((1, *SHAPE)).astype(np.float32), a)
    for orientation, spacing in ((None, None), (src.orientation, src.spacing.tolist())):
        model, rec = to_model_grid(src, orientation, spacing)
        assert np.array_equal(model.array, src.array)
        assert np.array_equal(model.affine, src.affine)
        assert rec.model_shape == rec.source_shape
        assert not [s for s in rec.steps if s["op"] == "resample"]
        back = to_source_grid(model, rec)
        assert np.array_equal(back.array, src.array)


def _blob(affine: np.ndarray, shape: tuple[int, int, int], centre: np.ndarray,
          radius: float) -> np.ndarray:
    d = np.linalg.norm(_world_grid(shape, affine) - centre, axis=-1)
    return (d <= radius).astype(np.uint8) * 3


def _centroid_mm(vol: Volume, weights: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(weights > 0).astype(np.float64)
    w = weights[weights > 0].astype(np.float64)
    return (vol.voxel_to_world(ijk) * w[:, None]).sum(axis=0) / w.sum()


@pytest.mark.parametrize("frame", ["oblique15_LPS_aniso", "oblique20_permuted", "PIR_permuted"])
def test_labelled_blob_stays_in_place(frame: str) -> None:
    a = FRAMES[frame]
    shape = (40, 36, 18)
    src_probe = Volume(np.zeros(shape, dtype=np.uint8), a)
    centre = src_probe.voxel_to_world(np.array([21.3, 16.6, 9.2]))
    lab = _blob(a, shape, centre, radius=7.0)
    src = Volume(lab, a)
    c_src = _centroid_mm(src, lab)
    model, rec = to_model_grid(src, "RAS", (1.2, 1.2, 1.2), interpolation="nearest")
    assert model.array.dtype == np.uint8
    assert set(np.unique(model.array)) == {0, 3}
    tol = 0.5 * float(min(src.spacing))
    assert np.linalg.norm(_centroid_mm(model, model.array[0]) - c_src) < tol
    back = to_source_grid(model, rec, interpolation="nearest")
    assert back.array.dtype == np.uint8
    assert np.array_equal(back.affine, src.affine)
    assert np.linalg.norm(_centroid_mm(back, back.array[0]) - c_src) < tol
    dice = 2 * np.sum((back.array[0] > 0) & (lab > 0)) / (np.sum(back.array[0] > 0) + lab.sum() / 3)
    assert dice > 0.9
    # probabilities (linear) of the same blob
    prob = np.stack([1.0 - lab / 3.0, lab / 3.0]).astype(np.float32)
    pm, prec = to_model_grid(Volume(prob, a), "RAS", (1.2, 1.2, 1.2))
    pb = to_source_grid(pm, prec, interpolation="linear")
    np.testing.assert_allclose(pb.array.sum(axis=0), 1.0, atol=1e-5)
    assert np.linalg.norm(_centroid_mm(pb, pb.array[1]) - c_src) < tol
    assert pb.array[0, 0, 0, 0] == pytest.approx(1.0)  # background stays background


def test_to_source_grid_matches_scipy_oracle_oblique() -> None:
    a = FRAMES["oblique15_LPS_aniso"]
    src = _sampled(a)
    model, rec = to_model_grid(src, "RAS", (1.4, 1.3, 1.6))
    rng = np.random.default_rng(5)
    noisy = model.with_array(rng.random(model.shape).astype(np.float32))
    ours = to_source_grid(noisy, rec).array
    m = np.linalg.solve(noisy.affine, a)
    for c in range(noisy.num_channels):
        ref = affine_transform(noisy.array[c], m[:3, :3], m[:3, 3], output_shape=SHAPE,
                               order=1, mode="nearest")
        np.testing.assert_allclose(ours[c], ref, atol=2e-5)
    # forward as well
    mref = np.linalg.solve(a, model.affine)
    ref = affine_transform(src.array[0], mref[:3, :3], mref[:3, 3],
                           output_shape=model.spatial_shape, order=1, mode="nearest")
    np.testing.assert_allclose(model.array[0], ref, atol=2e-5)


def test_forward_matches_simpleitk_oracle_in_interior() -> None:
    import SimpleITK as sitk

    a = FRAMES["oblique15_LPS_aniso"]
    src = _sampled(a)
    model, _ = to_model_grid(src, "RAS", (1.5, 1.5, 1.5))

    def to_itk(arr: np.ndarray, aff: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0)).astype(np.float64))
        lps = np.diag([-1.0, -1.0, 1.0])
        sp = np.linalg.norm(aff[:3, :3], axis=0)
        img.SetSpacing(sp.tolist())
        img.SetOrigin((lps @ aff[:3, 3]).tolist())
        img.SetDirection((lps @ aff[:3, :3] / sp).ravel().tolist())
        return img

    moving = to_itk(src.array[0], src.affine)
    ref = to_itk(np.zeros(model.spatial_shape), model.affine)
    res = sitk.Resample(moving, ref, sitk.Transform(), sitk.sitkLinear, np.nan)
    out = np.transpose(sitk.GetArrayFromImage(res), (2, 1, 0))
    ok = np.isfinite(out)
    assert ok.mean() > 0.4
    np.testing.assert_allclose(model.array[0][ok], out[ok], atol=1e-4)


def test_general_oblique_path_matches_scipy() -> None:
    a = FRAMES["LPS_aniso"]
    src = _sampled(a)
    target = _affine(
        np.array([1.2, 1.2, 1.2]), angles=(0.0, 10.0, 25.0), origin=(-5.0, -40.0, 35.0)
    )
    shape = (18, 20, 22)
    ours = resample_to_grid(src, shape, target).array
    m = np.linalg.solve(a, target)
    for c in range(2):
        ref = affine_transform(src.array[c], m[:3, :3], m[:3, 3], output_shape=shape,
                               order=1, mode="nearest")
        np.testing.assert_allclose(ours[c], ref, atol=1e-4)
    lab = Volume(np.random.default_rng(0).integers(0, 4, size=SHAPE).astype(np.uint8), a)
    nn = resample_to_grid(lab, shape, target, interpolation="nearest").array
    assert nn.dtype == np.uint8
    ref = affine_transform(lab.array[0], m[:3, :3], m[:3, 3], output_shape=shape, order=0,
                           mode="nearest")
    assert np.mean(nn[0] == ref) > 0.98  # only ties at exact half-voxel positions may differ


def test_integer_input_linear_gives_float32_and_nearest_keeps_labels() -> None:
    a = FRAMES["LPI"]
    lab = np.random.default_rng(2).integers(0, 3, size=SHAPE).astype(np.int16)
    model, rec = to_model_grid(Volume(lab, a), "RAS", (2.0, 2.0, 2.0), interpolation="nearest")
    assert model.array.dtype == np.int16
    back = to_source_grid(model, rec, interpolation="nearest")
    assert back.array.dtype == np.int16
    assert set(np.unique(back.array)) <= {0, 1, 2}
    lin = to_source_grid(model, rec)
    assert lin.array.dtype == np.float32


def test_record_json_round_trip_and_validation() -> None:
    src = _sampled(FRAMES["oblique20_permuted"])
    _, rec = to_model_grid(src, "LPS", (1.0, 2.0, 1.5))
    again = SpatialRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert again == rec
    assert hash(again) == hash(rec)
    assert [s["op"] for s in again.steps] == ["reorient", "resample"]
    bad = rec.to_dict()
    del bad["model_affine"]
    with pytest.raises(GeometryError, match="model_affine"):
        SpatialRecord.from_dict(bad)
    bad = rec.to_dict()
    bad["source_shape"] = [3, 0, 2]
    with pytest.raises(GeometryError, match="source_shape"):
        SpatialRecord.from_dict(bad)


def test_bad_arguments_raise_config_error() -> None:
    src = _sampled(FRAMES["LPI"])
    with pytest.raises(ConfigError, match="orientation"):
        to_model_grid(src, "RXS", None)
    with pytest.raises(ConfigError, match="spacing"):
        to_model_grid(src, None, (1.0, -1.0, 1.0))
    with pytest.raises(ConfigError, match="spacing"):
        to_model_grid(src, None, (1.0, 1.0))
    with pytest.raises(ConfigError, match="'linear', 'nearest'"):
        to_model_grid(src, None, None, interpolation="cubic")
    _, rec = to_model_grid(src, None, None)
    with pytest.raises(ConfigError, match="interpolation"):
        to_source_grid(src, rec, interpolation="bilinear")


# ------------------------------------------------------------------------ crop and pad
@pytest.mark.parametrize("shape", [(30, 20, 15), (20, 25, 9), (26, 22, 12)])
def test_crop_or_pad_inverts_exactly_and_keeps_world_positions(
    shape: tuple[int, int, int],
) -> None:
    a = FRAMES["oblique15_LPS_aniso"]
    arr = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + 1.0
    v = Volume(arr, a)
    out, rec = crop_or_pad(v, shape, value=-7.0)
    assert out.spatial_shape == shape
    # a voxel present in both keeps its world position
    value = arr[13, 11, 6]
    o = np.argwhere(out.array[0] == value)[0]
    np.testing.assert_allclose(out.voxel_to_world(o), v.voxel_to_world([13, 11, 6]), atol=1e-9)
    back = invert_crop_or_pad(out, rec, value=0.0)
    assert back.spatial_shape == SHAPE
    assert np.array_equal(back.affine, v.affine)
    kept = np.zeros(SHAPE, dtype=bool)
    sl = tuple(slice(max(0, s), min(n, s + m)) for s, n, m in zip(rec.start, SHAPE, shape,
                                                                   strict=True))
    kept[sl] = True
    assert np.array_equal(back.array[0][kept], arr[kept])
    assert np.all(back.array[0][~kept] == 0.0)
    assert CropPadRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_pad_to_multiple_and_edge_mode() -> None:
    v = Volume(np.random.default_rng(0).random((2, *SHAPE)).astype(np.float32), FRAMES["LPI"])
    out, rec = pad_to_multiple(v, 16)
    assert out.spatial_shape == (32, 32, 16)
    assert rec.start == (-3, -5, -2)
    back = invert_crop_or_pad(out, rec)
    assert np.array_equal(back.array, v.array)
    e, erec = pad_to_multiple(v, (8, 8, 5), mode="edge")
    assert e.spatial_shape == (32, 24, 15)
    assert e.array[0, 0, 1, 0] == v.array[0, 0, 0, 0]
    assert np.array_equal(invert_crop_or_pad(e, erec).array, v.array)
    with pytest.raises(ConfigError, match="multiple"):
        pad_to_multiple(v, 0)
    with pytest.raises(ConfigError, match="mode"):
        crop_or_pad(v, (4, 4, 4), mode="wrap")


def test_crop_to_nonzero_and_uncrop() -> None:
    a = FRAMES["PIR_permuted"]
    arr = np.zeros((2, *SHAPE), dtype=np.int16)
    arr[0, 4:9, 3:20, 2:5] = 5
    arr[1, 10, 1, 7] = -1
    v = Volume(arr, a)
    out, rec = crop_to_nonzero(v)
    assert out.spatial_shape == (7, 19, 6)
    assert rec.start == (4, 1, 2)
    np.testing.assert_allclose(out.origin, v.voxel_to_world([4, 1, 2]), atol=1e-9)
    back = uncrop(out, rec)
    assert np.array_equal(back.array, arr)
    assert back.array.dtype == np.int16
    m, _ = crop_to_nonzero(v, margin=2)
    assert m.spatial_shape == (11, 22, 10)
    empty, erec = crop_to_nonzero(Volume(np.zeros(SHAPE), a))
    assert empty.spatial_shape == SHAPE and erec.start == (0, 0, 0)
    with pytest.raises(GeometryError, match="grid"):
        uncrop(m, rec)


def test_to_source_grid_from_cropped_model_grid_uses_volume_affine() -> None:
    src = _sampled(FRAMES["oblique15_LPS_aniso"])
    model, rec = to_model_grid(src, "RAS", (1.5, 1.5, 1.5))
    padded, prec = pad_to_multiple(model, 8, mode="edge")
    back_direct = to_source_grid(model, rec)
    back_padded = to_source_grid(padded, rec)
    np.testing.assert_allclose(back_padded.array, back_direct.array, atol=1e-6)
    back_inv = to_source_grid(invert_crop_or_pad(padded, prec), rec)
    assert np.array_equal(back_inv.array, back_direct.array)


def test_to_source_grid_memory_is_about_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    import tracemalloc

    from medinfer.transforms import spatial

    monkeypatch.setattr(spatial, "_SLAB_BYTES", 2**20)
    a = FRAMES["oblique15_LPS_aniso"]
    shape = (160, 128, 64)
    src = Volume(np.zeros((1, *shape), dtype=np.uint8), a)
    probe, rec = to_model_grid(src, "RAS", (1.3, 1.3, 1.3), interpolation="nearest")
    model = probe.with_array(np.random.default_rng(0).random(probe.shape).astype(np.float32))
    out_bytes = 4 * int(np.prod(shape))
    tracemalloc.start()
    try:
        back = to_source_grid(model, rec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert back.array.dtype == np.float32
    assert out_bytes <= peak < out_bytes + 4 * 2**20  # no float64 or full-size temporaries


def test_single_slice_volume() -> None:
    a = FRAMES["LPS_aniso"]
    img = np.random.default_rng(0).random((1, 30, 24, 1)).astype(np.float32)
    v = Volume(img, a)
    model, rec = to_model_grid(v, "RAS", (1.0, 1.0, 1.0))
    assert model.spatial_shape[2] == 3  # floor(1 * 2.5 / 1.0 + 0.5)
    # one source slice: the model slices are its copies (edge clamp along K)
    assert np.array_equal(model.array[..., 0], model.array[..., 2])
    back = to_source_grid(model, rec)
    assert back.spatial_shape == (30, 24, 1)
    assert np.array_equal(back.affine, v.affine)


def test_oblique_and_separable_paths_agree() -> None:
    from medinfer.transforms import spatial

    a = FRAMES["PIR_permuted"]
    src = _sampled(a)
    model, rec = to_model_grid(src, "RAS", (1.4, 1.3, 1.6))
    m = np.linalg.solve(model.affine, a)
    perm = spatial._separable_perm(m[:3, :3], SHAPE)
    assert perm is not None
    lin = spatial.Interpolation.LINEAR
    sep = spatial._resample_separable(model.array, perm, m, SHAPE, lin, np.dtype(np.float32))
    gen = spatial._resample_general(model.array, m, SHAPE, lin, np.dtype(np.float32))
    np.testing.assert_allclose(gen, sep, atol=1e-5)
    # nearest: same rounding rule in both paths, exact for labels beyond float32 range
    labels = np.random.default_rng(0).integers(0, 2**40, size=model.spatial_shape)
    lv = Volume(labels.astype(np.int64), model.affine)
    nn = spatial.Interpolation.NEAREST
    sep_n = spatial._resample_separable(lv.array, perm, m, SHAPE, nn, np.dtype(np.int64))
    gen_n = spatial._resample_general(lv.array, m, SHAPE, nn, np.dtype(np.int64))
    assert np.array_equal(sep_n, gen_n)
    assert set(np.unique(gen_n)) <= set(np.unique(labels))
