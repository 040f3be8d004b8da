"""nnU-Net cascades: the previous stage's segmentation as extra input channels.

The full-resolution stage of an nnU-Net cascade (v1 ``3d_cascade_fullres`` with
``nnUNetTrainerV2CascadeFullRes``; v2 a configuration with ``previous_stage``) takes the
image channels plus a one-hot encoding of the ``3d_lowres`` prediction, brought onto the
model grid. v1 and v2 do this differently, and each is followed here:

- **v1** (``nnunet/inference/predict.py``, ``preprocess_save_to_queue``): the low-resolution
  label map, read from ``<case>.nii.gz`` on the **whole** source grid, transposed with
  ``transpose_forward`` and resized with ``resize_segmentation(order=1)`` straight to the
  shape of the *cropped* and resampled image (v1 does not crop the map first; the same is
  done here), one-hot for the classes ``1 .. num_classes - 1``
  (``to_one_hot(seg, range(1, num_classes))``).
- **v2** (``DefaultPreprocessor.run_case``, ``inference/data_iterators.py``): the map is
  transposed and cropped with the image's bounding box (``crop_to_nonzero``: 0 outside
  the non-zero mask becomes -1, and the normalisation mask is ``seg >= 0``), resampled with
  the configuration's segmentation resampling (``resample_data_or_seg_to_shape`` with
  ``is_seg=True``: ``resize_segmentation`` order 1, separate-z rule with order 0 along
  the low-resolution axis), one-hot of the foreground labels
  (``convert_labelmap_to_one_hot``; -1 in no channel).

``resize_segmentation`` is batchgenerators' (0.25.5, the version nnU-Net installs today):
each label's indicator is resized (skimage ``resize``, order 1, edge mode, clipped), the
label with the largest value wins (the smallest label on equal values) and exact ties go
to the nearest-neighbour label when it is among the tied ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medinfer.errors import InvalidImageError

if TYPE_CHECKING:
    from medinfer.formats.nnunet import NnUNetGrid
    from medinfer.models.nnunet import NnUNetFolder

__all__ = [
    "check_previous_stage",
    "crop_previous_stage",
    "one_hot",
    "resample_seg_to_shape",
    "resize_segmentation",
    "v1_previous_stage_channels",
    "v2_previous_stage_channels",
]


def resize_segmentation(seg: np.ndarray, new_shape: Sequence[int], order: int = 1
                        ) -> np.ndarray:
    """batchgenerators' ``resize_segmentation`` (per-label indicator resize, argmax).

    Parameters
    ----------
    seg : integer label map, any number of axes.
    new_shape : output shape (same number of axes).
    order : spline order of the indicator resize (0: nearest neighbour of the map).

    Returns
    -------
    Label map of ``new_shape``, ``seg.dtype``.
    """
    from medinfer.formats.nnunet import _resize

    new = tuple(int(v) for v in new_shape)
    if tuple(seg.shape) == new:
        return seg.copy()
    if order == 0:
        return _resize(seg.astype(np.float64), new, 0).astype(seg.dtype)
    labels = np.unique(seg)
    if len(labels) == 1:
        return np.full(new, labels[0], dtype=seg.dtype)
    nearest = _resize(seg.astype(np.float64), new, 0)
    nn_idx = np.searchsorted(labels, nearest).clip(0, len(labels) - 1)
    win = np.zeros(new, dtype=np.int32)
    best: np.ndarray | None = None
    nn_score = np.zeros(new, dtype=np.float64)
    for i, c in enumerate(labels):
        score = _resize((seg == c).astype(np.float64), new, order)
        is_nn = nn_idx == i
        nn_score[is_nn] = score[is_nn]
        if best is None:
            best = score
            continue
        better = score > best
        win[better] = i
        np.maximum(best, score, out=best)
    assert best is not None
    tie_to_nn = (nn_score == best) & (nn_score > 0)
    win[tie_to_nn] = nn_idx[tie_to_nn]
    return labels[win].astype(seg.dtype, copy=False)


def resample_seg_to_shape(seg: np.ndarray, new_shape: Sequence[int],
                          current_spacing: Sequence[float], new_spacing: Sequence[float], *,
                          order: int = 1, order_z: int = 0,
                          force_separate_z: bool | None = None) -> np.ndarray:
    """nnU-Net v2's ``resample_data_or_seg_to_shape`` with ``is_seg=True`` for one map.

    Parameters
    ----------
    seg : label map ``(*spatial)`` in model axis order (may hold -1).
    new_shape : target spatial shape.
    current_spacing, new_spacing : mm per model axis.
    order, order_z, force_separate_z : the configuration's ``resampling_fn_seg_kwargs``.

    Returns
    -------
    Label map of ``new_shape`` (``seg.dtype``): :func:`resize_segmentation` in 3-D, or,
    with the separate-z rule, slice by slice in-plane and order ``order_z`` (0: a gather;
    1: per-label indicator > 0.5, ascending labels) along the low-resolution axis.
    """
    from scipy.ndimage import map_coordinates

    from medinfer.formats.nnunet import _nearest_index, separate_z

    shape = np.array(seg.shape)
    new = np.array([int(v) for v in new_shape])
    if np.all(shape == new):
        return seg.copy()
    do_sep, axis = separate_z(force_separate_z, current_spacing, new_spacing)
    if not do_sep or axis is None:
        return resize_segmentation(seg, [int(v) for v in new], order)
    inplane = [int(v) for i, v in enumerate(new) if i != axis]
    slices = []
    for s in range(int(shape[axis])):
        idx: list[Any] = [slice(None)] * 3
        idx[axis] = s
        slices.append(resize_segmentation(seg[tuple(idx)], inplane, order))
    here = np.stack(slices, axis)
    if shape[axis] == new[axis]:
        return here
    if order_z == 0:
        return np.take(here, _nearest_index(int(shape[axis]), int(new[axis])), axis=axis)
    scale = np.array(here.shape, dtype=np.float64) / new
    grids = np.mgrid[:new[0], :new[1], :new[2]].astype(np.float64)
    for a in range(3):
        grids[a] = scale[a] * (grids[a] + 0.5) - 0.5
    out = np.zeros(tuple(int(v) for v in new), dtype=seg.dtype)
    for c in np.unique(here):
        ind = map_coordinates((here == c).astype(np.float64), grids, order=order_z,
                              mode="nearest")
        out[np.round(ind) > 0.5] = c
    return out


def one_hot(seg: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """``(len(classes), *seg.shape)`` float32: channel ``i`` is 1 where ``seg == classes[i]``
    (v1 ``to_one_hot``, v2 ``convert_labelmap_to_one_hot``)."""
    out = np.zeros((len(classes), *seg.shape), dtype=np.float32)
    for i, c in enumerate(classes):
        out[i][seg == c] = 1
    return out


def check_previous_stage(labels: np.ndarray, spatial_shape: Sequence[int], source: str
                         ) -> np.ndarray:
    """The previous stage's label map as an integer array of the scan's voxel shape.

    Parameters
    ----------
    labels : ``(I, J, K)`` or ``(1, I, J, K)`` label map on the scan's grid.
    spatial_shape : the scan's ``(I, J, K)``.
    source : names the map in the error message.

    Raises
    ------
    InvalidImageError
        Another shape (as nnU-Net: "image and segmentation from previous stage don't
        have the same pixel array shape"), several channels, or non-integer labels.
    """
    arr = np.asarray(labels)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if tuple(arr.shape) != tuple(int(v) for v in spatial_shape):
        raise InvalidImageError(f"{source}: previous-stage segmentation has shape "
                                f"{tuple(arr.shape)}; the scan has {tuple(spatial_shape)} "
                                "(they must be on the same voxel grid)")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise InvalidImageError(f"{source}: previous-stage segmentation holds non-integer "
                                    "values (a label map is expected)")
        arr = arr.astype(np.int32)
    elif arr.dtype.kind not in "iub":
        raise InvalidImageError(f"{source}: previous-stage segmentation has dtype {arr.dtype}; "
                                "a label map is expected")
    return arr


def v1_previous_stage_channels(labels: np.ndarray, grid: NnUNetGrid, num_classes: int
                               ) -> np.ndarray:
    """The one-hot previous-stage channels of a v1 cascade, as v1's predictor builds them.

    Parameters
    ----------
    labels : ``(I, J, K)`` integer label map on the scan's whole voxel grid (the
        ``3d_lowres`` prediction).
    grid : the case's :class:`~medinfer.formats.nnunet.NnUNetGrid` (v1 preprocessing).
    num_classes : classes of the model incl. background.

    Returns
    -------
    ``(num_classes - 1, *grid.model_shape)`` float32: the map transposed to model axes,
    resized **uncropped** to the cropped-and-resampled shape with
    :func:`resize_segmentation` (order 1), one-hot of classes ``1 .. num_classes - 1``.
    """
    seg = np.ascontiguousarray(labels.transpose(grid.perm))
    seg = resize_segmentation(seg, grid.model_shape, order=1)
    return one_hot(seg, range(1, num_classes))


def crop_previous_stage(labels: np.ndarray, perm: Sequence[int],
                        bbox: Sequence[tuple[int, int]], mask: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """v2's ``crop_to_nonzero`` of the previous stage's map (``run_case`` with a seg).

    Parameters
    ----------
    labels : ``(I, J, K)`` integer label map on the scan's grid.
    perm, bbox : model axis -> source axis and the crop per model axis
        (:func:`medinfer.formats.nnunet.transpose_and_crop`).
    mask : the hole-filled non-zero mask of the crop (model axis order).

    Returns
    -------
    (seg, norm_mask)
        ``seg`` int32 of the crop's shape with -1 where it is 0 outside ``mask``;
        ``norm_mask`` = ``seg >= 0``, the region v2's normalisation uses.
    """
    seg = labels.transpose(tuple(perm))[tuple(slice(lo, hi) for lo, hi in bbox)]
    seg = seg.astype(np.int32)
    seg[(seg == 0) & ~mask] = -1
    return seg, seg >= 0


def v2_previous_stage_channels(seg: np.ndarray, new_shape: Sequence[int],
                               spacing: Sequence[float], target: Sequence[float],
                               folder: NnUNetFolder) -> np.ndarray:
    """The one-hot previous-stage channels of a v2 cascade.

    Parameters
    ----------
    seg : the cropped map of :func:`crop_previous_stage` (model axis order).
    new_shape : the model grid shape; ``spacing``, ``target``: mm per model axis.
    folder : the v2 model folder (``resampling_fn_seg_kwargs``, foreground labels).

    Returns
    -------
    ``(len(folder.foreground_labels), *new_shape)`` float32.

    Raises
    ------
    ModelError
        A ``resampling_fn_seg`` other than ``resample_data_or_seg_to_shape``.
    """
    from medinfer.errors import ModelError

    cfg = folder.configuration
    name = cfg.get("resampling_fn_seg", "resample_data_or_seg_to_shape")
    if name != "resample_data_or_seg_to_shape":
        raise ModelError(f"{folder.path}/plans.json: resampling_fn_seg {name!r} is not "
                         "supported")
    kw = dict(cfg.get("resampling_fn_seg_kwargs", {}))
    seg = resample_seg_to_shape(seg, new_shape, spacing, target, order=int(kw.get("order", 1)),
                                order_z=int(kw.get("order_z", 0)),
                                force_separate_z=kw.get("force_separate_z"))
    return one_hot(seg, folder.foreground_labels)
