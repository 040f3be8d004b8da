"""Display geometry of exported slices: which array axes become PNG rows and columns.

The mapping is derived from the affine (the world orientation of the voxel axes),
never from the array order, so a scan stored as RAS, LPS, PIL or oblique gives the
same picture on screen. Slices are not resampled: the mapping is a permutation of
the three voxel axes plus optional flips of the in-plane axes, hence exactly
invertible.

Display convention (the one radiologists and 3D Slicer use; world frame RAS+):

========  ==============  ======================  ======================
axis      slice normal    image columns go to     image rows go to
========  ==============  ======================  ======================
axial     S/I             patient left  (L)       posterior (P)
coronal   A/P             patient left  (L)       inferior  (I)
sagittal  R/L             posterior     (P)       inferior  (I)
========  ==============  ======================  ======================

i.e. axial and coronal slices in *radiological view* (patient's right on image
left, anterior / superior at the top) and sagittal slices with the face on the
image left and the head at the top. The slice index of an exported file is the
voxel index along the slicing array axis (no reordering), so
``{patient_id}_slice0007.png`` is array index 7 along that axis.

For oblique affines each voxel axis is assigned to its nearest world axis with
:func:`nibabel.orientations.io_orientation`; the picture is then the true view up to
the obliquity angle (no resampling, by design: the export must invert exactly).

Pixel coordinates: ``x`` = column, ``y`` = row, pixel centres at integer
coordinates; the image spans ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from medinfer.errors import GeometryError, parse_enum
from medinfer.volume import validate_affine


class SliceAxis(StrEnum):
    """Slicing direction: the world axis normal to the exported slices."""

    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"


#: RAS world axes: 0 = x (R+), 1 = y (A+), 2 = z (S+)
_WORLD_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))

#: axis -> (normal world axis, (column world axis, sign), (row world axis, sign));
#: sign -1 means "the index increases towards the negative RAS direction".
_VIEWS: dict[SliceAxis, tuple[int, tuple[int, int], tuple[int, int]]] = {
    SliceAxis.AXIAL: (2, (0, -1), (1, -1)),  # cols -> L, rows -> P
    SliceAxis.CORONAL: (1, (0, -1), (2, -1)),  # cols -> L, rows -> I
    SliceAxis.SAGITTAL: (0, (1, -1), (2, -1)),  # cols -> P, rows -> I
}


def _letter(world_axis: int, sign: float) -> str:
    return _WORLD_LETTERS[world_axis][1 if sign > 0 else 0]


@dataclass(frozen=True)
class SliceMapping:
    """Exact index mapping between a voxel grid ``(I, J, K)`` and a stack of PNG slices.

    Attributes
    ----------
    axis : the slicing direction.
    shape : spatial shape ``(I, J, K)`` of the voxel grid.
    slice_axis, row_axis, col_axis : which array axis (0, 1, 2 of ``(I, J, K)``) is
        the slice index, the PNG row (y) and the PNG column (x).
    flip_rows, flip_cols : True if the PNG row / column index runs against the array
        index: ``array_index = n - 1 - png_index``.

    A PNG pixel ``(x=col, y=row)`` of slice ``s`` is voxel ``v`` with
    ``v[slice_axis] = s``, ``v[row_axis] = H - 1 - row if flip_rows else row`` and
    ``v[col_axis] = W - 1 - col if flip_cols else col``
    (see :meth:`pixel_to_voxel`).
    """

    axis: SliceAxis
    shape: tuple[int, int, int]
    slice_axis: int
    row_axis: int
    col_axis: int
    flip_rows: bool
    flip_cols: bool

    def __post_init__(self) -> None:
        if sorted((self.slice_axis, self.row_axis, self.col_axis)) != [0, 1, 2]:
            raise GeometryError(
                "slice mapping: slice/row/col axes must be a permutation of 0, 1, 2, got "
                f"{(self.slice_axis, self.row_axis, self.col_axis)}"
            )
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise GeometryError(f"slice mapping: invalid grid shape {self.shape}")

    # ---------------------------------------------------------------- sizes
    @property
    def num_slices(self) -> int:
        """Number of slices (size of the slicing array axis)."""
        return int(self.shape[self.slice_axis])

    @property
    def height(self) -> int:
        """PNG height H in pixels (rows)."""
        return int(self.shape[self.row_axis])

    @property
    def width(self) -> int:
        """PNG width W in pixels (columns)."""
        return int(self.shape[self.col_axis])

    # ------------------------------------------------------------- arrays
    @property
    def _perm(self) -> tuple[int, int, int]:
        return (self.slice_axis, self.row_axis, self.col_axis)

    def to_slices(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Reorder a 3-D array ``(I, J, K)`` into display slices ``(N, H, W)`` (a view)."""
        a = np.asarray(array)
        if a.shape != self.shape:
            raise GeometryError(f"to_slices: array shape {a.shape} != grid shape {self.shape}")
        out = np.transpose(a, self._perm)
        if self.flip_rows:
            out = out[:, ::-1, :]
        if self.flip_cols:
            out = out[:, :, ::-1]
        return out

    def from_slices(self, stack: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Inverse of :meth:`to_slices`: display stack ``(N, H, W)`` -> array ``(I, J, K)``."""
        s = np.asarray(stack)
        expected = (self.num_slices, self.height, self.width)
        if s.shape != expected:
            raise GeometryError(f"from_slices: stack shape {s.shape} != expected {expected}")
        if self.flip_rows:
            s = s[:, ::-1, :]
        if self.flip_cols:
            s = s[:, :, ::-1]
        return np.transpose(s, tuple(int(i) for i in np.argsort(self._perm)))

    def pixel_to_voxel(self) -> npt.NDArray[np.float64]:
        """4x4 matrix mapping ``(x=col, y=row, slice, 1)`` to voxel ``(i, j, k, 1)``."""
        m = np.zeros((4, 4), dtype=np.float64)
        m[3, 3] = 1.0
        m[self.col_axis, 0] = -1.0 if self.flip_cols else 1.0
        m[self.col_axis, 3] = self.width - 1 if self.flip_cols else 0.0
        m[self.row_axis, 1] = -1.0 if self.flip_rows else 1.0
        m[self.row_axis, 3] = self.height - 1 if self.flip_rows else 0.0
        m[self.slice_axis, 2] = 1.0
        return m

    # ------------------------------------------------------- serialisation
    def to_dict(self, affine: npt.ArrayLike | None = None) -> dict[str, Any]:
        """JSON-ready description; with ``affine`` also world directions and pixel->RAS."""
        d: dict[str, Any] = {
            "axis": self.axis.value,
            "grid_shape": list(self.shape),
            "slice_array_axis": self.slice_axis,
            "row_array_axis": self.row_axis,
            "col_array_axis": self.col_axis,
            "flip_rows": self.flip_rows,
            "flip_cols": self.flip_cols,
            "num_slices": self.num_slices,
            "image_height": self.height,
            "image_width": self.width,
            "slice_index": "voxel index along slice_array_axis",
            "pixel_to_voxel": self.pixel_to_voxel().tolist(),
            "pixel_convention": (
                "x = column, y = row, pixel centres at integer coordinates; "
                "voxel = pixel_to_voxel @ (x, y, slice, 1)"
            ),
        }
        if affine is not None:
            a = validate_affine(affine)
            p2w = a @ self.pixel_to_voxel()
            d["pixel_to_world_ras"] = p2w.tolist()
            d["image_right_direction"] = _nearest_letter(p2w[:3, 0])
            d["image_down_direction"] = _nearest_letter(p2w[:3, 1])
            d["slice_increase_direction"] = _nearest_letter(p2w[:3, 2])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "metadata") -> SliceMapping:
        """Rebuild a mapping written by :meth:`to_dict`.

        Raises
        ------
        GeometryError
            Missing or invalid keys (the message names ``source``).
        """
        try:
            return cls(
                axis=parse_enum(SliceAxis, d["axis"], f"{source}: axis"),
                shape=tuple(int(s) for s in d["grid_shape"]),  # type: ignore[arg-type]
                slice_axis=int(d["slice_array_axis"]),
                row_axis=int(d["row_array_axis"]),
                col_axis=int(d["col_array_axis"]),
                flip_rows=bool(d["flip_rows"]),
                flip_cols=bool(d["flip_cols"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, GeometryError):
                raise
            raise GeometryError(f"{source}: invalid slice mapping ({exc!r})") from None


def _nearest_letter(vec: npt.NDArray[np.float64]) -> str:
    ax = int(np.argmax(np.abs(vec)))
    return _letter(ax, float(vec[ax]))


def mapping_from_affine(
    affine: npt.ArrayLike, shape: tuple[int, int, int], axis: SliceAxis | str = "axial"
) -> SliceMapping:
    """Display mapping for a grid of spatial ``shape`` ``(I, J, K)`` with voxel->RAS ``affine``.

    Parameters
    ----------
    affine : (4, 4) voxel -> RAS+ mm.
    shape : spatial grid shape ``(I, J, K)``.
    axis : ``"axial"``, ``"coronal"`` or ``"sagittal"`` (see the module table).

    Raises
    ------
    GeometryError
        Invalid affine or shape; :class:`~medinfer.errors.ConfigError` for an unknown axis.

    Notes
    -----
    Voxel axes are matched to world axes with
    :func:`nibabel.orientations.io_orientation` (greedy, largest direction cosine
    first), so an oblique grid is shown in its nearest standard view.
    """
    import nibabel.orientations as nio

    ax = parse_enum(SliceAxis, axis, "axis")
    a = validate_affine(affine)
    ornt = nio.io_orientation(a)  # row v: (world axis, sign) of voxel axis v
    world_of = {int(ornt[v, 0]): v for v in range(3)}
    sign_of = [float(ornt[v, 1]) for v in range(3)]
    normal, (cw, cs), (rw, rs) = _VIEWS[ax]
    col_axis = world_of[cw]
    row_axis = world_of[rw]
    return SliceMapping(
        axis=ax,
        shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        slice_axis=world_of[normal],
        row_axis=row_axis,
        col_axis=col_axis,
        flip_rows=sign_of[row_axis] != rs,
        flip_cols=sign_of[col_axis] != cs,
    )
