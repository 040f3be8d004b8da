"""Tests of the core Volume type: validation and geometry properties."""

import numpy as np
import pytest

from medinfer.errors import GeometryError, MedinferError
from medinfer.volume import Volume


def oblique_lps_affine() -> np.ndarray:
    """LPS-stored, 15 degrees about an oblique axis, anisotropic 0.9 x 1.1 x 2.5 mm."""
    from scipy.spatial.transform import Rotation

    axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    rot = Rotation.from_rotvec(np.deg2rad(15) * axis)
    direction = rot.as_matrix() @ np.diag([-1.0, -1.0, 1.0])
    a = np.eye(4)
    a[:3, :3] = direction @ np.diag([0.9, 1.1, 2.5])
    a[:3, 3] = [12.5, -30.0, 7.25]
    return a


def test_three_d_array_gets_channel_axis_without_copy():
    arr = np.zeros((4, 5, 6), dtype=np.int16)
    v = Volume(arr, np.eye(4))
    assert v.shape == (1, 4, 5, 6)
    assert v.spatial_shape == (4, 5, 6)
    assert np.shares_memory(v.array, arr)


def test_geometry_properties_on_oblique_anisotropic_affine():
    a = oblique_lps_affine()
    v = Volume(np.zeros((2, 3, 4, 5), np.float32), a)
    np.testing.assert_allclose(v.spacing, [0.9, 1.1, 2.5])
    np.testing.assert_allclose(v.origin, [12.5, -30.0, 7.25])
    d = v.direction
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(d * v.spacing, a[:3, :3])
    assert v.num_channels == 2
    assert v.orientation[2] in "SI"


def test_voxel_world_round_trip_and_corners():
    v = Volume(np.zeros((7, 8, 9)), oblique_lps_affine())
    ijk = np.array([[0, 0, 0], [6, 7, 8], [1.5, 2.25, 3.0]])
    xyz = v.voxel_to_world(ijk)
    np.testing.assert_allclose(v.world_to_voxel(xyz), ijk, atol=1e-9)
    corners = v.corners_world()
    assert corners.shape == (8, 3)
    np.testing.assert_allclose(corners[0], v.origin)


def test_orientation_codes():
    assert Volume(np.zeros((2, 2, 2)), np.diag([1.0, 1, 1, 1])).orientation == "RAS"
    assert Volume(np.zeros((2, 2, 2)), np.diag([-1.0, -1, 1, 1])).orientation == "LPS"
    perm = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    assert Volume(np.zeros((2, 2, 2)), perm).orientation == "ASR"


@pytest.mark.parametrize(
    "affine",
    [
        np.eye(3),
        np.diag([1.0, 1.0, 0.0, 1.0]),
        np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], float),
        np.full((4, 4), np.nan),
    ],
)
def test_invalid_affines_raise_geometry_error(affine):
    with pytest.raises(GeometryError):
        Volume(np.zeros((2, 2, 2)), affine)


def test_invalid_array_rank_and_error_hierarchy():
    with pytest.raises(GeometryError, match="shape"):
        Volume(np.zeros((2, 2)), np.eye(4))
    assert issubclass(GeometryError, MedinferError)
    assert issubclass(MedinferError, ValueError)


def test_with_array_checks_grid_and_keeps_affine():
    v = Volume(np.zeros((3, 4, 5)), oblique_lps_affine(), {"modality": "MR"})
    w = v.with_array(np.ones((2, 3, 4, 5), np.float32), kind="prob")
    assert w.same_grid(v) and w.num_channels == 2
    assert w.meta == {"modality": "MR", "kind": "prob"}
    with pytest.raises(GeometryError):
        v.with_array(np.zeros((3, 4, 6)))
