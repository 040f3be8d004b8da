"""nnU-Net v2 model folders run as they are: nnU-Net's pipeline on medinfer's engine.

A model folder ``<Trainer>__<Plans>__<configuration>`` holds ``dataset.json``,
``plans.json`` and ``fold_<f>/checkpoint_final.pth`` (and/or ``checkpoint_best.pth``).
:class:`NnUNetPredictor` reproduces what ``nnUNetv2_predict`` does with it:

1. **Geometry in.** nnU-Net reads images with SimpleITK: the array is indexed
   ``[k, j, i]`` (ITK order, the reverse of the NIfTI voxel axes) with the spacing
   reversed accordingly; then ``transpose_forward`` of the plans is applied
   (``DefaultPreprocessor.run_case_npy``). Here the same axis permutation is applied to
   the medinfer array ``(C, I, J, K)`` directly: model axis ``m`` is source voxel axis
   ``2 - transpose_forward[m]``.
2. **Crop to non-zero** (``preprocessing/cropping/cropping.py``): bounding box of the
   hole-filled mask of voxels non-zero in any channel; outside-mask voxels form the
   "-1" region used by ``use_mask_for_norm``.
3. **Normalisation** per channel (``default_normalization_schemes.py``):
   ``CTNormalization`` (clip to the fingerprint's foreground 0.5/99.5 percentiles, then
   ``(x - mean) / std`` of the foreground), ``ZScoreNormalization`` (inside the non-zero
   mask only, outside set to 0, when ``use_mask_for_norm``), ``NoNormalization``,
   ``RescaleTo01Normalization``, ``RGBTo01Normalization``.
4. **Resampling** to the configuration's spacing (``default_resampling.py``,
   ``resample_data_or_seg_to_shape``): new shape ``round(n * s / s')``; skimage
   ``resize`` semantics (``scipy.ndimage.zoom``, ``grid_mode=True``, edge mode, output
   clipped to the input range), order 3; with the separate-z rule (spacing ratio > 3)
   order 3 in-plane slice by slice and order 0 along the low-resolution axis.
5. **Sliding window** (``inference/sliding_window_prediction.py``,
   ``predict_from_raw_data.py``): padding to at least the patch (centred, odd voxel
   after), steps from ``compute_steps_for_sliding_window`` (step 0.5 of the patch),
   Gaussian importance map (``compute_gaussian``: sigma = patch / 8, maximum scaled to 10,
   float16), mirroring TTA over the checkpoint's ``inference_allowed_mirroring_axes``
   (all combinations, averaged), logits accumulated in float16 (as nnU-Net) or float32,
   folds averaged (mean of the logits, as ``predict_logits_from_preprocessed_data``).
6. **Export** (``inference/export_prediction.py``): logits resampled back to the cropped
   source shape with the probabilities' resampling (order 1, order 0 along z when
   separate-z; ``align_corners=False`` geometry with scale ``n'/n``), then argmax (or
   sigmoid > 0.5 per region, painted in ``regions_class_order``), uncropped, transposed
   back. Steps 5 and 6 are streamed slab by slab (:func:`medinfer.inference.stream_logits`,
   :class:`medinfer.inference.SlabExporter`):
   the full-volume logits are never held.

Layering: the folder, checkpoints and networks come from :mod:`medinfer.models.nnunet`
(the loader); windows, TTA, slab-wise accumulation and export use only the engine's
public API (:mod:`medinfer.inference`).

The returned label map has exactly the input's shape and affine (RAS+), which is also
where ``nnUNetv2_predict`` puts its output through SimpleITK.

2-D configurations (``2d``): the same steps with the slice axis (model axis 0) kept at
its spacing, a 2-D sliding window per slice (:mod:`medinfer.formats.nnunet_2d`).

Cascades (a configuration with ``previous_stage``, e.g. ``3d_cascade_fullres``): the
previous stage's label map of the case is given (``predict(..., previous_stage=)``,
``-prev_stage_predictions``), cropped with the image, resampled and appended as one-hot
input channels of the foreground labels (:mod:`medinfer.formats.nnunet_cascade`).

"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medinfer.errors import ConfigError, InvalidImageError, ModelError
from medinfer.models.nnunet import (
    NnUNetFolder,
    display_card,
    load_nnunet_networks,
    read_nnunet_folder,
)

if TYPE_CHECKING:
    import torch

    from medinfer.prediction import Prediction
    from medinfer.volume import Volume

__all__ = [
    "NnUNetGrid",
    "NnUNetPredictor",
    "compute_gaussian",
    "compute_steps",
    "export_axis_plans",
    "export_plans",
    "preprocess",
    "resample_to_shape",
    "separate_z",
]

#: nnU-Net's anisotropy threshold (``nnunetv2.configuration.ANISO_THRESHOLD``)
ANISO_THRESHOLD = 3.0


# ================================================================ nnU-Net's building blocks
def compute_steps(image_size: Sequence[int], patch: Sequence[int], step_size: float = 0.5
                  ) -> list[list[int]]:
    """Window starts per axis (``compute_steps_for_sliding_window`` of nnU-Net).

    ``num = ceil((size - patch) / (patch * step)) + 1`` windows, spread evenly:
    ``round(i * (size - patch) / (num - 1))``. ``image_size >= patch`` required.
    """
    if not 0 < step_size <= 1:
        raise ConfigError(f"step_size: expected 0 < step_size <= 1, got {step_size}")
    steps = []
    for size, p in zip(image_size, patch, strict=True):
        target = p * step_size
        num = int(np.ceil((size - p) / target)) + 1
        max_step = size - p
        actual = max_step / (num - 1) if num > 1 else 99999999999
        steps.append([int(np.round(actual * i)) for i in range(num)])
    return steps


def gaussian_impulse(patch: Sequence[int], sigma_scale: float) -> np.ndarray:
    """A unit impulse at ``patch // 2`` filtered with :func:`scipy.ndimage.gaussian_filter`
    (sigma ``patch * sigma_scale``, constant mode): float64, shape ``patch``, not scaled.

    The common start of nnU-Net v2's ``compute_gaussian`` and v1's ``_get_gaussian``.
    """
    from scipy.ndimage import gaussian_filter

    tmp = np.zeros(tuple(patch))
    tmp[tuple(p // 2 for p in patch)] = 1
    return np.asarray(gaussian_filter(tmp, [p * sigma_scale for p in patch], 0,
                                      mode="constant", cval=0))


def compute_gaussian(patch: Sequence[int], sigma_scale: float = 1.0 / 8,
                     value_scaling_factor: float = 10.0) -> torch.Tensor:
    """nnU-Net's importance map (``compute_gaussian``), float16, shape ``patch``.

    A unit impulse at ``patch // 2`` filtered with :func:`scipy.ndimage.gaussian_filter`
    (sigma ``patch * sigma_scale``, constant mode), scaled to a maximum of
    ``value_scaling_factor``, cast to float16, zeros replaced by the smallest non-zero.
    """
    import torch

    t = torch.from_numpy(gaussian_impulse(patch, sigma_scale))
    t /= torch.max(t) / value_scaling_factor
    t = t.to(torch.float16)
    mask = t == 0
    t[mask] = torch.min(t[~mask])
    return t


def _do_separate_z(spacing: Sequence[float]) -> bool:
    return bool(np.max(spacing) / np.min(spacing) > ANISO_THRESHOLD)


def _lowres_axis(spacing: Sequence[float]) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64)
    return np.where(max(s) / s == 1)[0]


def separate_z(force: bool | None, current: Sequence[float], new: Sequence[float]
               ) -> tuple[bool, int | None]:
    """``determine_do_sep_z_and_axis`` of nnU-Net: (resample z separately?, which axis)."""
    axis: np.ndarray | None
    if force is not None:
        do = bool(force)
        axis = _lowres_axis(current) if force else None
    elif _do_separate_z(current):
        do, axis = True, _lowres_axis(current)
    elif _do_separate_z(new):
        do, axis = True, _lowres_axis(new)
    else:
        do, axis = False, None
    if axis is not None:
        if len(axis) != 1:
            return False, None
        return do, int(axis[0])
    return do, None


def _resize(img: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """skimage ``resize(img, shape, order, mode='edge', anti_aliasing=False)`` (float64)."""
    from scipy import ndimage as ndi

    factors = np.divide(img.shape, shape)
    zoom = [1 / f for f in factors]
    out = ndi.zoom(img, zoom, order=order, mode="nearest", cval=0, grid_mode=True)
    if order > 0:
        np.clip(out, img.min(), img.max(), out=out)
    return out


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index per output index of nnU-Net's order-0 resampling along one axis.

    Taken from :func:`scipy.ndimage.map_coordinates` itself (order 0, mode ``nearest``,
    coordinates ``(i + 0.5) * n_in / n_out - 0.5``) so that ties round as in nnU-Net.
    """
    from scipy.ndimage import map_coordinates

    scale = float(n_in) / n_out
    coords = scale * (np.arange(n_out) + 0.5) - 0.5
    idx = map_coordinates(np.arange(n_in, dtype=np.float64), coords[None], order=0,
                          mode="nearest")
    return np.rint(idx).astype(np.intp)


def resample_to_shape(data: np.ndarray, new_shape: Sequence[int],
                      current_spacing: Sequence[float], new_spacing: Sequence[float],
                      *, order: int = 3, order_z: int = 0, force_separate_z: bool | None = None
                      ) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for images (``is_seg=False``).

    Parameters
    ----------
    data : ``(C, *spatial)`` array in nnU-Net (model) axis order; output keeps its dtype.
    new_shape : target spatial shape.
    current_spacing, new_spacing : mm, same axis order.
    order : spline order (in-plane order when resampling z separately).
    order_z : order along the low-resolution axis with separate-z (0 or 1).
    force_separate_z : None = decide from the spacings (ratio > 3).

    Notes
    -----
    Per channel in float64: ``scipy.ndimage.zoom`` with ``grid_mode=True`` and edge mode,
    clipped to the input range (skimage ``resize``); with separate-z each slice along
    the low-resolution axis is resized in 2-D, then that axis is resampled with
    ``map_coordinates`` of order ``order_z`` (order 0 done as an exact gather).
    """
    from scipy.ndimage import map_coordinates

    shape = np.array(data.shape[1:])
    new = np.array([int(v) for v in new_shape])
    if np.all(shape == new):
        return data
    do_sep, axis = separate_z(force_separate_z, current_spacing, new_spacing)
    out = np.zeros((data.shape[0], *new), dtype=data.dtype)
    for c in range(data.shape[0]):
        d = data[c].astype(np.float64, copy=False)
        if not do_sep or axis is None:
            out[c] = _resize(d, [int(v) for v in new], order)
            continue
        tmp = new.copy()
        tmp[axis] = shape[axis]
        inplane = [int(v) for i, v in enumerate(new) if i != axis]
        here = np.zeros(tmp)
        for s in range(shape[axis]):
            idx: list[Any] = [slice(None)] * 3
            idx[axis] = s
            here[tuple(idx)] = _resize(d[tuple(idx)], inplane, order)
        if shape[axis] == new[axis]:
            out[c] = here
        elif order_z == 0:
            out[c] = np.take(here, _nearest_index(int(shape[axis]), int(new[axis])), axis=axis)
        else:
            scale = np.array(here.shape, dtype=np.float64) / new
            grids = np.mgrid[:new[0], :new[1], :new[2]].astype(np.float64)
            for a in range(3):
                grids[a] = scale[a] * (grids[a] + 0.5) - 0.5
            out[c] = map_coordinates(here, grids, order=order_z, mode="nearest")
    return out


def _normalise(data: np.ndarray, mask: np.ndarray, folder: NnUNetFolder) -> None:
    """nnU-Net's per-channel normalisation, in place on float32 ``data`` (C, ...)."""
    cfg = folder.configuration
    schemes = cfg.get("normalization_schemes", [])
    use_mask = cfg.get("use_mask_for_norm", [False] * len(schemes))
    props_all = folder.plans.get("foreground_intensity_properties_per_channel", {})
    if len(schemes) != data.shape[0]:
        raise ModelError(f"{folder.path}/plans.json: {len(schemes)} normalization scheme(s) "
                         f"for {data.shape[0]} input channel(s)")
    for c, scheme in enumerate(schemes):
        image = data[c]
        if scheme == "CTNormalization":
            p = props_all.get(str(c))
            if not isinstance(p, dict):
                raise ModelError(f"{folder.path}/plans.json: CTNormalization of channel {c} "
                                 "needs foreground_intensity_properties_per_channel")
            np.clip(image, p["percentile_00_5"], p["percentile_99_5"], out=image)
            image -= p["mean"]
            image /= max(p["std"], 1e-8)
        elif scheme == "ZScoreNormalization":
            if use_mask[c]:
                mean = image[mask].mean()
                std = image[mask].std()
                image[mask] = (image[mask] - mean) / (max(std, 1e-8))
            else:
                mean = image.mean()
                std = image.std()
                image -= mean
                image /= max(std, 1e-8)
        elif scheme == "NoNormalization":
            pass
        elif scheme == "RescaleTo01Normalization":
            image -= image.min()
            image /= np.clip(image.max(), a_min=1e-8, a_max=None)
        elif scheme == "RGBTo01Normalization":
            if image.min() < 0 or image.max() > 255:
                raise InvalidImageError(f"channel {c}: RGB input must lie in 0..255")
            image /= 255.0
        else:
            raise ModelError(
                f"{folder.path}/plans.json: normalization scheme {scheme!r} of channel {c} is "
                "not supported (CTNormalization, ZScoreNormalization, NoNormalization, "
                "RescaleTo01Normalization, RGBTo01Normalization)"
            )


@dataclass(frozen=True)
class NnUNetGrid:
    """Geometry bookkeeping of one case (model axis order).

    ``perm[m]``: source voxel axis of model axis ``m``; ``bbox``: crop per model axis
    ``(lo, hi)`` in source voxels; ``crop_shape``; ``model_shape`` after resampling;
    ``spacing``: source spacing in model order; ``target_spacing``.
    """

    perm: tuple[int, int, int]
    bbox: tuple[tuple[int, int], ...]
    crop_shape: tuple[int, int, int]
    model_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    target_spacing: tuple[float, float, float]


def preprocess(volume: Volume, folder: NnUNetFolder, previous_stage: np.ndarray | None = None
               ) -> tuple[np.ndarray, NnUNetGrid]:
    """Bring a scan into the model's grid exactly as nnU-Net's ``DefaultPreprocessor``.

    Parameters
    ----------
    volume : ``(C, I, J, K)``, any dtype, affine voxel -> RAS+ mm (only the spacing, the
        column norms, matters; orientation is kept, as in nnU-Net).
    folder : the model folder.
    previous_stage : cascades: the previous stage's integer label map ``(I, J, K)`` on
        the scan's grid; it is cropped with the image (and widens the normalisation mask,
        ``seg >= 0``), resampled and appended as one-hot channels of the foreground labels
        (:mod:`medinfer.formats.nnunet_cascade`, as ``run_case`` with a ``seg_file``).

    Returns
    -------
    (data, grid)
        ``data`` float32 ``(C, *grid.model_shape)`` (C + foreground labels for a cascade);
        ``grid`` for the export.

    Raises
    ------
    InvalidImageError
        Wrong number of channels.
    """
    cfg = folder.configuration
    data, mask, perm, spacing, bbox = transpose_and_crop(
        volume, folder.plans, folder.num_input_channels, f"nnU-Net model {folder.path.name!r}")
    crop_shape = data.shape[1:]
    target = [float(v) for v in cfg["spacing"]]
    if len(target) == 2:  # 2-D: the slice axis keeps its spacing (DefaultPreprocessor)
        target = [spacing[0], *target]
    new_shape = [int(round(s / t * n)) for s, t, n in zip(spacing, target, crop_shape,
                                                        strict=True)]
    seg = None
    if previous_stage is not None:
        from medinfer.formats.nnunet_cascade import crop_previous_stage

        seg, mask = crop_previous_stage(previous_stage, perm, bbox, mask)
    _normalise(data, mask, folder)
    kw = dict(cfg.get("resampling_fn_data_kwargs", {}))
    if cfg.get("resampling_fn_data", "resample_data_or_seg_to_shape") != \
            "resample_data_or_seg_to_shape":
        raise ModelError(f"{folder.path}/plans.json: resampling_fn_data "
                         f"{cfg.get('resampling_fn_data')!r} is not supported")
    data = resample_to_shape(data, new_shape, spacing, target, order=int(kw.get("order", 3)),
                             order_z=int(kw.get("order_z", 0)),
                             force_separate_z=kw.get("force_separate_z"))
    if seg is not None:
        from medinfer.formats.nnunet_cascade import v2_previous_stage_channels

        data = np.concatenate([data, v2_previous_stage_channels(
            seg, new_shape, spacing, target, folder)])
    return model_input(data, perm, bbox, crop_shape, new_shape, spacing, target)


def transpose_and_crop(
    volume: Volume, plans: Mapping[str, Any], num_input_channels: int, model: str
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int], tuple[float, ...],
           list[tuple[int, int]]]:
    """The first preprocessing steps of nnU-Net v1 and v2: channel check, ``transpose_forward``
    and crop to the bounding box of the hole-filled non-zero mask.

    Parameters
    ----------
    volume : ``(C, I, J, K)`` scan, affine voxel -> RAS+ mm (only the spacing is used).
    plans : the model's plans (``transpose_forward``, default ``[0, 1, 2]``).
    num_input_channels : channels the model expects.
    model : the model as named in the error message.

    Returns
    -------
    (data, mask, perm, spacing, bbox)
        ``data`` float32 ``(C, *crop)`` in model axis order, ``mask`` bool ``crop`` (the
        filled non-zero mask), ``perm`` source axis of each model axis, ``spacing`` mm per
        model axis, ``bbox`` ``[(lo, hi)]`` per model axis (whole extent if all zero).

    Raises
    ------
    InvalidImageError
        Wrong number of channels.
    """
    from scipy.ndimage import binary_fill_holes

    if volume.num_channels != num_input_channels:
        raise InvalidImageError(
            f"{volume.meta.get('source', 'input')}: scan has {volume.num_channels} channel(s); "
            f"{model} expects {num_input_channels}"
        )
    tf = [int(t) for t in plans.get("transpose_forward", [0, 1, 2])]
    perm = (2 - tf[0], 2 - tf[1], 2 - tf[2])
    data = volume.array.astype(np.float32).transpose(0, *(p + 1 for p in perm))
    spacing = tuple(float(volume.spacing[p]) for p in perm)
    nonzero = binary_fill_holes(np.any(data != 0, axis=0))
    if nonzero.any():
        bbox = []
        for a in range(3):
            other = tuple(b for b in range(3) if b != a)
            nz = np.flatnonzero(nonzero.any(axis=other))
            bbox.append((int(nz[0]), int(nz[-1]) + 1))
    else:
        bbox = [(0, s) for s in nonzero.shape]
    sl = tuple(slice(lo, hi) for lo, hi in bbox)
    data = np.ascontiguousarray(data[(slice(None), *sl)])
    return data, nonzero[sl], perm, spacing, bbox


def model_input(data: np.ndarray, perm: tuple[int, int, int], bbox: Sequence[tuple[int, int]],
                crop_shape: Sequence[int], new_shape: Sequence[int], spacing: Sequence[float],
                target: Sequence[float]) -> tuple[np.ndarray, NnUNetGrid]:
    """``(data as contiguous float32, NnUNetGrid)``: the end of v1's and v2's preprocessing."""
    grid = NnUNetGrid(perm, tuple(bbox), (crop_shape[0], crop_shape[1], crop_shape[2]),
                      (new_shape[0], new_shape[1], new_shape[2]),
                      (spacing[0], spacing[1], spacing[2]), (target[0], target[1], target[2]))
    return np.ascontiguousarray(data, dtype=np.float32), grid


def export_plans(grid: NnUNetGrid, folder: NnUNetFolder) -> list[Any]:
    """1-D plans model grid -> cropped source grid, per model axis (nnU-Net's export).

    ``resample_data_or_seg_to_shape`` with the probabilities' kwargs (order 1, order_z 0):
    linear at ``x' = (x + 0.5) * n' / n - 0.5`` (align_corners=False, edge clamp), and
    along the low-resolution axis with separate-z an order-0 gather.
    """

    cfg = folder.configuration
    kw = dict(cfg.get("resampling_fn_probabilities_kwargs", {}))
    order = int(kw.get("order", 1))
    order_z = int(kw.get("order_z", 0))
    if order not in (0, 1) or order_z not in (0, 1):
        raise ModelError(f"{folder.path}/plans.json: probability resampling of order {order} / "
                         f"order_z {order_z} is not supported (0 or 1)")
    do_sep, axis = separate_z(kw.get("force_separate_z"), grid.target_spacing, grid.spacing)
    return export_axis_plans(grid, order, order_z, do_sep, axis)


def export_axis_plans(grid: NnUNetGrid, order: int, order_z: int, do_sep: bool,
                      axis: int | None) -> list[Any]:
    """1-D plans model grid -> cropped source grid (nnU-Net's ``resample_data_or_seg``
    with ``is_seg=False``; v1 and v2 alike): order 0 or 1 (order ``order_z`` along
    ``axis`` when ``do_sep``), linear at ``x' = (x + 0.5) * n' / n - 0.5`` with edge clamp."""
    from medinfer.transforms import AxisPlan, Interpolation

    n_out, n_in = grid.crop_shape, grid.model_shape
    plans = []
    for a in range(3):
        if n_out[a] == n_in[a]:
            plans.append(AxisPlan.identity(n_in[a]))
            continue
        o = order_z if do_sep and axis == a else order
        if o == 0:
            plans.append(AxisPlan(n_in[a], _nearest_index(n_in[a], n_out[a])))
        else:
            coords = (np.arange(n_out[a], dtype=np.float64) + 0.5) * (n_in[a] / n_out[a]) - 0.5
            plans.append(AxisPlan.from_coords(coords, n_in[a], Interpolation.LINEAR))
    return plans


# ========================================================================== predictor
class NnUNetPredictor:
    """Run an nnU-Net v2 model folder on scans (:class:`~medinfer.volume.Volume` in,
    :class:`~medinfer.prediction.Prediction` out, on the exact source grid).

    Parameters
    ----------
    model_dir : the ``<Trainer>__<Plans>__<configuration>`` folder.
    folds : folds to ensemble (default: all with the checkpoint).
    checkpoint : ``final`` or ``best``.
    device : ``auto``, ``cpu`` or ``cuda``.
    tta : mirroring over the checkpoint's allowed axes (nnU-Net default: on).
    step_size : window step as a fraction of the patch (nnU-Net default 0.5).
    accumulate : ``float16`` (nnU-Net's precision: product in float32, sums in float16),
        ``float32`` (fused multiply-add, more precise; faster on CPU, where float16
        arithmetic is emulated) or ``auto`` (default: float16 on CUDA, float32 on CPU).
    save_probabilities : also return the softmax (sigmoid for regions) probabilities
        ``(K, I, J, K)`` float32 on the source grid.
    batch_size : windows per network call; ``None`` = automatic: all mirrored copies of
        a window and several windows go through the network together as long as one
        call holds at most ``voxel_budget`` input voxels (better use of the CPU/GPU for
        small patches; same results up to float rounding of the convolutions), and at
        most ``16 * voxel_budget`` output logits (``K`` classes x voxels) per call.
        2-D configurations: a window is a stack of consecutive slices whose depth is
        set by the same budget (:mod:`medinfer.formats.nnunet_2d`).
    voxel_budget : input voxels per network call for the automatic batching.

    Raises
    ------
    ModelError, ConfigError
        See :func:`read_nnunet_folder`, :func:`load_nnunet_networks`.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        folds: Sequence[int | str] | None = None,
        checkpoint: str = "final",
        device: str = "auto",
        tta: bool = True,
        step_size: float = 0.5,
        accumulate: str = "auto",
        save_probabilities: bool = False,
        batch_size: int | None = None,
        voxel_budget: int = 2**21,
    ) -> None:
        from medinfer.models.loaders import resolve_device

        self.folder = read_nnunet_folder(model_dir, folds, checkpoint)
        self.device = resolve_device(device)
        self.model, self.mirror_axes = load_nnunet_networks(self.folder, self.device)
        self._set_run_options(tta, step_size, accumulate, save_probabilities, batch_size,
                              voxel_budget)
        self.name = self.folder.path.name
        self.version = str(self.folder.dataset.get("name", ""))

    def _set_run_options(self, tta: bool, step_size: float, accumulate: str,
                         save_probabilities: bool, batch_size: int | None,
                         voxel_budget: int) -> None:
        """Check and keep the run options (v1 and v2 alike; see the class docstring)."""
        self.tta = bool(tta)
        if not 0 < step_size <= 1:
            raise ConfigError(f"step_size: expected 0 < step_size <= 1, got {step_size}")
        self.step_size = float(step_size)
        if accumulate not in ("auto", "float16", "float32"):
            raise ConfigError(f"accumulate: {accumulate!r} is not allowed; choose 'auto', "
                              "'float16' or 'float32'")
        self.accumulate = accumulate
        self.save_probabilities = save_probabilities
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size: expected >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.voxel_budget = int(voxel_budget)

    #: the networks give probabilities (v1 ensembles), not logits
    _outputs_probabilities = False

    #: cascades: the previous stage's label map of the case being predicted
    _previous_labels: np.ndarray | None = None

    # hooks that nnU-Net v1 (medinfer.formats.nnunet_v1) overrides
    def _set_previous_stage(self, volume: Volume,
                            previous_stage: Volume | np.ndarray | None) -> None:
        """Check and keep the previous stage's map of a cascade for :meth:`_preprocess`."""
        from medinfer.formats.nnunet_cascade import check_previous_stage

        prev = self.folder.previous_stage
        if prev is None:
            if previous_stage is not None:
                raise ModelError(f"{self.folder.path}: previous_stage given, but configuration "
                                 f"{self.folder.configuration_name!r} is not a cascade")
            self._previous_labels = None
            return
        if previous_stage is None:
            raise ConfigError(f"{self.folder.path}: configuration "
                              f"{self.folder.configuration_name!r} is a cascade; it needs the "
                              f"{prev!r} segmentation of the case (previous_stage=, "
                              "-prev_stage_predictions)")
        arr = previous_stage if isinstance(previous_stage, np.ndarray) else previous_stage.array
        self._previous_labels = check_previous_stage(arr, volume.spatial_shape,
                                                     "previous_stage")

    def _preprocess(self, volume: Volume) -> tuple[np.ndarray, NnUNetGrid]:
        return preprocess(volume, self.folder, self._previous_labels)

    def _patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.folder.configuration["patch_size"])

    def _importance_map(self, patch: Sequence[int]) -> torch.Tensor:
        return compute_gaussian(patch)

    def _num_heads(self) -> int:
        return self.folder.num_heads

    def _label_names(self) -> dict[int, str]:
        return self.folder.label_names

    def _regions(self) -> list[int] | None:
        return self.folder.regions_class_order

    def _export_plans(self, grid: NnUNetGrid) -> list[Any]:
        return export_plans(grid, self.folder)

    @property
    def card(self) -> Any:
        """Display :class:`~medinfer.models.ModelCard` (label names and colours) of the
        output label map; see :func:`display_card`."""
        return display_card(self.name, self._label_names(), "dataset.json", self.version)

    def predict(self, volume: Volume, progress: Callable[[str, float], None] | None = None,
                *, previous_stage: Volume | np.ndarray | None = None) -> Prediction:
        """Segment ``volume``; the label map has exactly its shape and affine.

        Parameters
        ----------
        volume : ``(C, I, J, K)`` with C = the model's input channels, affine voxel ->
            RAS+ mm.
        progress : optional ``progress(stage, fraction)``, stages ``preprocess`` then
            ``inference`` (inference and export are streamed together).
        previous_stage : cascades (a configuration with ``previous_stage``): the previous
            stage's label map of this scan, ``(1, I, J, K)`` Volume or ``(I, J, K)``
            integer array on the scan's voxel grid (what ``-prev_stage_predictions``
            holds); required for them, refused for other models.

        Returns
        -------
        Prediction
            ``label`` uint8 (uint16 above 255 labels) ``(1, I, J, K)``, ``statistics``,
            ``timings``; ``probabilities`` when requested.

        Raises
        ------
        InvalidImageError
            Wrong channels; ``previous_stage`` not on the scan's grid or not a label map.
        ConfigError, ModelError
            A cascade without ``previous_stage``; ``previous_stage`` for another model.
        """
        import torch

        from medinfer.formats.nnunet_2d import slice_windows
        from medinfer.inference import (
            SlabExporter,
            make_tta_runner,
            pad_spec,
            stream_logits,
            tta_flips,
        )
        from medinfer.prediction import LabelStatistics, Prediction
        from medinfer.volume import Volume

        def report(stage: str, frac: float) -> None:
            if progress is not None:
                lo, hi = {"preprocess": (0.0, 0.15), "inference": (0.15, 1.0)}[stage]
                progress(stage, lo + (hi - lo) * min(max(frac, 0.0), 1.0))

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self._set_previous_stage(volume, previous_stage)
        try:
            data, grid = self._preprocess(volume)
        finally:
            self._previous_labels = None
        timings["preprocess"] = time.perf_counter() - t0
        report("preprocess", 1.0)

        t1 = time.perf_counter()
        patch = self._patch_size()
        size = grid.model_shape
        # automatic batching, bounded by input voxels and by output logits per call
        out_budget = 16 * self.voxel_budget // max(self._num_heads(), 1)
        budget = min(self.voxel_budget, out_budget)
        model: Callable[[torch.Tensor], torch.Tensor] = self.model
        mirror_axes = self.mirror_axes if self.tta else ()
        if len(patch) == 2:  # 2-D configuration: stacks of slices (formats.nnunet_2d)
            sw = slice_windows(size, patch, self.step_size, self._importance_map(patch),
                               mirror_axes, budget, self.model)
            patch, pads, starts, weight = sw.patch, sw.pads, sw.starts, sw.weight
            model, mirror_axes = sw.model, sw.mirror_axes
        else:
            pads = pad_spec(size, patch)
            padded = [s + b + a for s, (b, a) in zip(size, pads, strict=True)]
            starts = compute_steps(padded, patch, self.step_size)
            weight = self._importance_map(patch)
        flips = tta_flips(mirror_axes)
        per_window = len(flips) * int(np.prod(patch))
        batch_flips = per_window <= budget
        batch = self.batch_size or (max(1, budget // per_window) if batch_flips else 1)
        run = make_tta_runner(model, flips, amp=self.device.type == "cuda",
                              batch_flips=batch_flips)

        names = self._label_names()
        rco = self._regions()
        dtype = np.uint8 if max(names) < 255 else np.uint16
        labels = np.zeros(volume.spatial_shape, dtype=dtype)
        view = labels.transpose(grid.perm)[tuple(slice(lo, hi) for lo, hi in grid.bbox)]
        k = self._num_heads()
        probs: np.ndarray | None = None
        prob_view: np.ndarray | None = None
        if self.save_probabilities:
            probs = np.zeros((k, *volume.spatial_shape), dtype=np.float32)
            if rco is None:
                probs[0] = 1.0  # outside the crop: background (revert_cropping_on_probabilities)
            prob_view = probs.transpose(0, *(p + 1 for p in grid.perm))[
                (slice(None), *(slice(lo, hi) for lo, hi in grid.bbox))]

        def to_labels(logits: np.ndarray) -> np.ndarray:
            if int(logits.shape[0]) != k:
                raise ModelError(f"{self.name}: network gives {logits.shape[0]} channels, "
                                 f"dataset.json implies {k}")
            t = torch.from_numpy(logits)
            if rco is None:
                return t.argmax(0).numpy().astype(dtype)
            seg = np.zeros(logits.shape[1:], dtype=dtype)
            # v1 region models output sigmoid probabilities already (v1 export: > 0.5)
            sig = logits if self._outputs_probabilities else torch.sigmoid(t).numpy()
            for i, c in enumerate(rco):
                seg[sig[i] > 0.5] = c
            return seg

        def to_probabilities(logits: np.ndarray) -> np.ndarray:
            if self._outputs_probabilities:
                return logits
            t = torch.from_numpy(logits)
            return (torch.sigmoid(t) if rco is not None else torch.softmax(t, 0)).numpy()

        exporter = SlabExporter(grid.crop_shape, [0, 1, 2], self._export_plans(grid),
                                to_labels, view, prob_out=prob_view,
                                to_probabilities=to_probabilities, model_rows=size[0])
        half = self.accumulate == "float16" or (self.accumulate == "auto"
                                                 and self.device.type == "cuda")
        acc = torch.float16 if half else torch.float32
        x = torch.from_numpy(data)
        stream_logits(x, run, patch, starts, weight, exporter, pads=pads,
                      batch_size=batch, accumulate_dtype=acc, fused=not half,
                      device=self.device, progress=lambda f: report("inference", f))
        timings["inference"] = time.perf_counter() - t1  # with the slab-wise export
        t2 = time.perf_counter()
        label = Volume(labels[None], volume.affine, {"model": self.name})
        counts = np.bincount(labels.ravel(), minlength=max(names) + 1)
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        stats = [LabelStatistics(value=v, name=n, voxels=int(counts[v]),
                                 volume_ml=float(counts[v]) * voxel_ml)
                 for v, n in names.items() if v != 0]
        timings["postprocess"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        return Prediction(
            label=label,
            probabilities=Volume(probs, volume.affine, {}) if probs is not None else None,
            statistics=stats, timings=timings, model_name=self.name,
            model_version=self.version,
        )


