"""The one image type of medinfer: :class:`Volume`.

A Volume is a channel-first voxel array plus a 4x4 affine that maps voxel indices
to world coordinates in **RAS+ millimetres** (the NIfTI convention: +x Right,
+y Anterior, +z Superior). LPS (DICOM, ITK) is converted at the I/O boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from medinfer.errors import GeometryError

#: tolerance for "is this affine singular"
_DET_EPS = 1e-9
#: largest accepted voxel step (mm): 100 m; PixelSpacing 1e300 is a corrupt header
_MAX_STEP_MM = 1e5


def validate_affine(affine: npt.ArrayLike, name: str = "affine") -> npt.NDArray[np.float64]:
    """Return ``affine`` as a float64 (4, 4) array after validation.

    Raises
    ------
    GeometryError
        If the shape is not (4, 4), the last row is not ``[0, 0, 0, 1]``, a value is
        not finite, the 3x3 linear part is singular, or a voxel step is longer than
        100 m (infinite or absurd determinant).
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise GeometryError(f"{name}: expected shape (4, 4), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise GeometryError(f"{name}: contains non-finite values")
    if not np.allclose(a[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        raise GeometryError(f"{name}: last row must be [0, 0, 0, 1], got {a[3].tolist()}")
    with np.errstate(over="ignore", invalid="ignore"):
        det = abs(float(np.linalg.det(a[:3, :3])))
        steps = np.linalg.norm(a[:3, :3], axis=0)
    if det < _DET_EPS:
        raise GeometryError(f"{name}: the 3x3 part is singular (zero spacing or collinear axes)")
    if not np.isfinite(det) or float(steps.max()) > _MAX_STEP_MM:
        raise GeometryError(
            f"{name}: voxel steps {steps.tolist()} mm (determinant {det:.3g}) are absurd; "
            f"accepted: at most {_MAX_STEP_MM:g} mm per voxel"
        )
    out = a.copy()
    out[3] = [0.0, 0.0, 0.0, 1.0]
    return out


@dataclass(frozen=True, eq=False)
class Volume:
    """An image on a voxel grid with its world geometry.

    Parameters
    ----------
    array : numpy array, shape ``(C, I, J, K)`` (channel first; voxel axes I, J, K in
        file order). A 3-D array ``(I, J, K)`` is accepted and gets a channel axis
        (a view, no copy). Any numeric dtype.
    affine : (4, 4) float64, maps voxel index ``(i, j, k, 1)`` to RAS+ mm.
    meta : source header facts (DICOM UIDs, modality, rescale, NIfTI codes...).

    Raises
    ------
    GeometryError
        Invalid affine (see :func:`validate_affine`) or an array with fewer than 3 or
        more than 4 dimensions.

    Notes
    -----
    Volumes are immutable in the sense that operations return new Volumes; the
    array itself is not copied or frozen, so callers must not mutate shared arrays.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim == 3:
            arr = arr[np.newaxis]
        if arr.ndim != 4:
            raise GeometryError(
                f"Volume array: expected 3-D (I, J, K) or 4-D (C, I, J, K), got shape {arr.shape}"
            )
        object.__setattr__(self, "array", arr)
        object.__setattr__(self, "affine", validate_affine(self.affine))
        object.__setattr__(self, "meta", dict(self.meta))

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, ...]:
        """Full array shape ``(C, I, J, K)``."""
        return tuple(int(s) for s in self.array.shape)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """Voxel grid shape ``(I, J, K)``."""
        s = self.array.shape
        return int(s[1]), int(s[2]), int(s[3])

    @property
    def num_channels(self) -> int:
        """Number of channels C."""
        return int(self.array.shape[0])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along I, J, K in mm, shape (3,), float64 (column norms of the affine)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def origin(self) -> np.ndarray:
        """World position (RAS+ mm) of the centre of voxel (0, 0, 0), shape (3,)."""
        return self.affine[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """Unit direction cosines of the voxel axes in RAS+, shape (3, 3), columns = I, J, K."""
        return self.affine[:3, :3] / self.spacing[np.newaxis, :]

    @property
    def orientation(self) -> str:
        """Three-letter orientation code (nibabel convention), e.g. ``"RAS"`` or ``"LPI"``.

        Letter n names the world direction towards which voxel axis n increases.
        """
        import nibabel.orientations as nio

        return "".join(nio.aff2axcodes(self.affine))

    def voxel_to_world(self, ijk: npt.ArrayLike) -> np.ndarray:
        """Map voxel indices ``(..., 3)`` (float allowed) to RAS+ mm ``(..., 3)``."""
        p = np.asarray(ijk, dtype=np.float64)
        return p @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, xyz: npt.ArrayLike) -> np.ndarray:
        """Map RAS+ mm points ``(..., 3)`` to continuous voxel indices ``(..., 3)``."""
        p = np.asarray(xyz, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return p @ inv[:3, :3].T + inv[:3, 3]

    def corners_world(self) -> np.ndarray:
        """RAS+ mm of the centres of the 8 corner voxels, shape (8, 3)."""
        i, j, k = (s - 1 for s in self.spatial_shape)
        idx = np.array(
            [[a, b, c] for a in (0, i) for b in (0, j) for c in (0, k)], dtype=np.float64
        )
        return self.voxel_to_world(idx)

    def same_grid(self, other: Volume, atol: float = 1e-5) -> bool:
        """True if ``other`` has the same spatial shape and (to ``atol``) the same affine."""
        return self.spatial_shape == other.spatial_shape and bool(
            np.allclose(self.affine, other.affine, atol=atol)
        )

    # --------------------------------------------------------------- constructors
    def with_array(self, array: np.ndarray, **meta_updates: Any) -> Volume:
        """New Volume on the same grid with another array (same spatial shape required)."""
        arr = np.asarray(array)
        arr4 = arr[np.newaxis] if arr.ndim == 3 else arr
        if arr4.ndim != 4 or tuple(arr4.shape[1:]) != self.spatial_shape:
            raise GeometryError(
                f"with_array: array shape {arr.shape} does not match grid {self.spatial_shape}"
            )
        meta = dict(self.meta)
        meta.update(meta_updates)
        return Volume(arr4, self.affine, meta)

    def channel(self, index: int) -> np.ndarray:
        """The 3-D array ``(I, J, K)`` of channel ``index`` (a view)."""
        return self.array[index]

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return (
            f"Volume(shape={self.shape}, dtype={self.array.dtype}, spacing=({sp}) mm, "
            f"orientation={self.orientation})"
        )
