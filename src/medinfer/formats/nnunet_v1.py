"""nnU-Net v1 model folders run as they are: nnU-Net v1's pipeline on medinfer's engine.

What ``nnUNet_predict`` (nnU-Net 1.7.1, ``nnunet/inference/predict.py``) does with a
3-D model folder, step by step, and where it differs from v2
(:mod:`medinfer.formats.nnunet`):

1. **Geometry in**: the same axis permutation (``transpose_forward`` of ``plans.pkl``
   applied to the SimpleITK array order).
2. **Crop to non-zero** (``preprocessing/cropping.py``): hole-filled mask of voxels
   non-zero in any channel, its bounding box; the "segmentation" of a test case is 0
   inside the mask and -1 outside.
3. **Resampling before normalisation** (``GenericPreprocessor.resample_and_normalize``;
   v2 normalises first): data with order 3, the -1/0 mask with ``resize_segmentation``
   order 1 (threshold 0.5), both with v1's separate-z rule (spacing ratio > 3: in-plane
   slice by slice, order 0 along the low-resolution axis), to the stage's
   ``current_spacing``.
4. **Normalisation** per modality on the resampled data: ``CT`` (clip to the dataset's
   0.5/99.5 foreground percentiles, ``(x - mean) / sd`` of the dataset), ``CT2`` (clip, the
   case's own mean/sd inside the clip range), ``noNorm``, else z-score (inside the
   resampled mask when ``use_mask_for_norm``, outside set to 0; ``std + 1e-8``).
5. **Sliding window** (``network_architecture/neural_network.py``,
   ``_internal_predict_3D_3Dconv_tiled``): padding to the patch (centred), the same steps
   as v2, Gaussian importance map with maximum **1** in float32 (v2: 10, float16),
   mirroring TTA over ``(0, 1, 2)`` averaging the **softmax** of each mirror, blended
   softmax divided by the summed weights; folds: mean of the softmax (v2: of the logits).
6. **Export** (``inference/segmentation_export.py``): the softmax resampled back to the
   cropped shape with order 1 (``interpolation_order`` / ``interpolation_order_z`` /
   ``force_separate_z`` of the plans' ``segmentation_export_params``; separate-z decided
   from the original spacing first; when it is decided from the target spacing, v1 takes
   the axis index in model axis order but applies it to the softmax already transposed
   back to the source order, and so does medinfer), argmax, uncropped. A model-level
   ``postprocessing.json`` (next to ``plans.pkl``) is applied as v1 applies it (keep the
   largest connected component of the listed classes); a fold's own
   ``fold_N/postprocessing.json`` is ignored, as v1's predictor ignores it.

Not done (:class:`~medinfer.errors.ModelError`): 2-D and cascade configurations,
region-based trainers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medinfer.errors import ModelError
from medinfer.formats.nnunet import (
    NnUNetGrid,
    NnUNetPredictor,
    _do_separate_z,
    _nearest_index,
    _resize,
    export_axis_plans,
    gaussian_impulse,
    model_input,
    resample_to_shape,
    separate_z,
    transpose_and_crop,
)
from medinfer.models.nnunet_v1 import (
    NnUNetV1Folder,
    load_nnunet_v1_networks,
    read_nnunet_v1_folder,
)

if TYPE_CHECKING:
    import torch

    from medinfer.prediction import Prediction
    from medinfer.volume import Volume

__all__ = ["NnUNetV1Predictor", "get_gaussian_v1", "preprocess_v1"]


def get_gaussian_v1(patch: Sequence[int], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """nnU-Net v1's ``_get_gaussian``: impulse at ``patch // 2`` filtered with
    :func:`scipy.ndimage.gaussian_filter` (sigma ``patch / 8``, constant mode), maximum 1,
    float32, zeros replaced by the smallest non-zero value."""
    import torch

    g = gaussian_impulse(patch, sigma_scale)
    g = (g / np.max(g) * 1).astype(np.float32)
    g[g == 0] = np.min(g[g != 0])
    return torch.from_numpy(g)


def _resample_mask(mask: np.ndarray, new_shape: Sequence[int], do_sep: bool,
                   axis: int | None) -> np.ndarray:
    """v1's ``resize_segmentation`` (order 1) of the 0/-1 test-case mask; True = inside."""
    shape = np.array(mask.shape)
    new = np.array([int(v) for v in new_shape])
    if np.all(shape == new):
        return mask
    m = mask.astype(np.float64)
    if not do_sep or axis is None:
        return _resize(m, [int(v) for v in new], 1) >= 0.5
    inplane = [int(v) for i, v in enumerate(new) if i != axis]
    slices = []
    for s in range(int(shape[axis])):
        idx: list[Any] = [slice(None)] * 3
        idx[axis] = s
        sl = m[tuple(idx)]
        if sl.min() == sl.max():  # one label only: resize_segmentation keeps it
            slices.append(np.full(inplane, bool(sl.flat[0] > 0.5)))
        else:
            slices.append(_resize(sl, inplane, 1) >= 0.5)
    here = np.stack(slices, axis)
    if shape[axis] == new[axis]:
        return here
    return np.take(here, _nearest_index(int(shape[axis]), int(new[axis])), axis=axis)


def preprocess_v1(volume: Volume, folder: NnUNetV1Folder) -> tuple[np.ndarray, NnUNetGrid]:
    """Bring a scan into a v1 model's grid as ``GenericPreprocessor.preprocess_test_case``.

    Parameters
    ----------
    volume : ``(C, I, J, K)``, C = ``num_modalities``; affine voxel -> RAS+ mm (only the
        spacing matters).
    folder : the v1 model folder.

    Returns
    -------
    (data, grid)
        ``data`` float32 ``(C, *grid.model_shape)``.

    Raises
    ------
    InvalidImageError
        Wrong number of channels.
    ModelError
        Unknown normalisation scheme or missing intensity properties.
    """
    data, mask, perm, spacing, bbox = transpose_and_crop(
        volume, folder.plans, folder.num_input_channels,
        f"nnU-Net v1 model {folder.path.name!r}")
    data[np.isnan(data)] = 0
    crop_shape = data.shape[1:]
    target = [float(v) for v in folder.stage_plans["current_spacing"]]
    new_shape = [int(v) for v in np.round((np.array(spacing) / np.array(target)).astype(float)
                                          * np.array(crop_shape)).astype(int)]
    do_sep, axis = separate_z(None, spacing, target)
    data = resample_to_shape(data, new_shape, spacing, target, order=3, order_z=0,
                             force_separate_z=None)
    mask = _resample_mask(mask, new_shape, do_sep, axis)
    _normalise_v1(data, mask, folder)
    return model_input(data, perm, bbox, crop_shape, new_shape, spacing, target)


def _normalise_v1(data: np.ndarray, mask: np.ndarray, folder: NnUNetV1Folder) -> None:
    plans = folder.plans
    schemes = plans.get("normalization_schemes", {})
    use_mask = plans.get("use_mask_for_norm", {})
    props = plans.get("dataset_properties", {}).get("intensityproperties") or {}
    for c in range(data.shape[0]):
        scheme = schemes.get(c)
        x = data[c]
        if scheme in ("CT", "CT2"):
            p = props.get(c)
            if not isinstance(p, dict):
                raise ModelError(f"{folder.path}/plans.pkl: {scheme} normalisation of modality {c} "
                                 "needs dataset_properties.intensityproperties")
            lb, ub = p["percentile_00_5"], p["percentile_99_5"]
            if scheme == "CT":
                clipped = np.clip(x, lb, ub)
                x[...] = (clipped - p["mean"]) / p["sd"]
            else:
                inside = (x > lb) & (x < ub)
                clipped = np.clip(x, lb, ub)
                x[...] = (clipped - clipped[inside].mean()) / clipped[inside].std()
            if use_mask.get(c):
                x[~mask] = 0
        elif scheme == "noNorm":
            pass
        elif scheme is not None:
            if use_mask.get(c):
                x[mask] = (x[mask] - x[mask].mean()) / (x[mask].std() + 1e-8)
                x[~mask] = 0
            else:
                x[...] = (x - x.mean()) / (x.std() + 1e-8)
        else:
            raise ModelError(f"{folder.path}/plans.pkl: no normalization scheme for modality {c}")


def _postprocess(labels: np.ndarray, pp: dict[str, Any], voxel_ml: float, source: str
                 ) -> None:
    """v1's ``remove_all_but_the_largest_connected_component`` (in place), as applied by
    ``load_remove_save`` with a model-level ``postprocessing.json``."""
    import ast

    from scipy.ndimage import label

    classes = pp.get("for_which_classes", [])
    min_sizes: Any = pp.get("min_valid_object_sizes")
    if not isinstance(classes, list):
        raise ModelError(f"{source}: 'for_which_classes' must be a list")
    if isinstance(min_sizes, str):  # v1 stores the repr of a dict ({1: 12.5, (1, 2): 3.0})
        try:
            min_sizes = ast.literal_eval(min_sizes)  # literals only, never code
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise ModelError(f"{source}: 'min_valid_object_sizes' is not a literal dict"
                             ) from None
    sizes_by_class: dict[Any, Any] = {}
    if isinstance(min_sizes, dict):
        for k, v in min_sizes.items():
            ck = tuple(int(x) for x in k) if isinstance(k, (list, tuple)) else int(k)
            sizes_by_class[ck] = v
    for c in classes:
        vals = tuple(int(v) for v in c) if isinstance(c, (list, tuple)) else (int(c),)
        mask = np.isin(labels, vals)
        lmap, num = label(mask.astype(int))
        if num == 0:
            continue
        sizes = np.bincount(lmap.ravel())[1:] * voxel_ml * 1000.0  # mm^3 as v1
        biggest = sizes.max()
        key: Any = vals if isinstance(c, (list, tuple)) else vals[0]
        for obj, size in enumerate(sizes, start=1):
            if size == biggest:
                continue
            remove = True
            if sizes_by_class.get(key) is not None:
                remove = size < float(sizes_by_class[key])
            if remove:
                labels[(lmap == obj) & mask] = 0


class NnUNetV1Predictor(NnUNetPredictor):
    """Run an nnU-Net v1 ``<Trainer>__<Plans>`` folder on scans (3-D configurations).

    Parameters
    ----------
    model_dir : ``<RESULTS_FOLDER>/nnUNet/<model>/<TaskXXX_Name>/<Trainer>__<Plans>``.
    folds : folds to ensemble (default: all with the checkpoint).
    checkpoint : checkpoint name without ``.model`` (``model_final_checkpoint``,
        ``model_best``).
    device : ``auto``, ``cpu`` or ``cuda``.
    tta : mirroring over ``(0, 1, 2)`` (v1 default on).
    step_size : window step / patch (default 0.5).
    save_probabilities : also return the softmax ``(K, I, J, K)`` float32 on the source
        grid (0 outside the crop, as v1's export leaves it; background 1 there).
    batch_size, voxel_budget : see :class:`~medinfer.formats.nnunet.NnUNetPredictor`.

    Raises
    ------
    ModelError
        Unreadable or unsafe folder, weights that do not fit, 2-D plans.
    """

    _outputs_probabilities = True

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        folds: Sequence[int | str] | None = None,
        checkpoint: str = "model_final_checkpoint",
        device: str = "auto",
        tta: bool = True,
        step_size: float = 0.5,
        save_probabilities: bool = False,
        batch_size: int | None = None,
        voxel_budget: int = 2**21,
    ) -> None:
        from medinfer._jsonio import read_json_object
        from medinfer.models.loaders import resolve_device

        self.folder = read_nnunet_v1_folder(  # type: ignore[assignment]
            model_dir, [str(f) for f in folds] if folds is not None else None, checkpoint)
        self.device = resolve_device(device)
        self.model = load_nnunet_v1_networks(self.v1, self.device)  # type: ignore[assignment]
        self.mirror_axes = (0, 1, 2)
        self._set_run_options(tta, step_size, "float32", save_probabilities, batch_size,
                              voxel_budget)
        self.name = self.v1.path.name
        self.version = self.v1.path.parent.name
        pp_file = self.v1.path / "postprocessing.json"
        self.postprocessing = (read_json_object(pp_file, max_bytes=1_000_000, error=ModelError)
                               if pp_file.is_file() else None)
        if self.v1.plans.get("regions_class_order") is not None:
            raise ModelError(f"{self.v1.path}: region-based nnU-Net v1 models are not supported")

    @property
    def v1(self) -> NnUNetV1Folder:
        """The parsed v1 folder."""
        return self.folder  # type: ignore[return-value]

    def _preprocess(self, volume: Volume) -> tuple[np.ndarray, NnUNetGrid]:
        return preprocess_v1(volume, self.v1)

    def _patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.v1.stage_plans["patch_size"])

    def _importance_map(self, patch: Sequence[int]) -> torch.Tensor:
        return get_gaussian_v1(patch)

    def _num_heads(self) -> int:
        return self.v1.num_classes

    def _label_names(self) -> dict[int, str]:
        return self.v1.label_names

    def _regions(self) -> list[int] | None:
        return None

    def _export_plans(self, grid: NnUNetGrid) -> list[Any]:
        kw = dict(self.v1.plans.get("segmentation_export_params") or {})
        order = int(kw.get("interpolation_order", 1))
        order_z = int(kw.get("interpolation_order_z", 0))
        if order not in (0, 1) or order_z not in (0, 1):
            raise ModelError(f"{self.v1.path}/plans.pkl: export interpolation order {order} / "
                             f"{order_z} is not supported (0 or 1)")
        force = kw.get("force_separate_z")
        do_sep, axis = separate_z(force, grid.spacing, grid.target_spacing)
        if do_sep and axis is not None and force is None and not _do_separate_z(grid.spacing):
            # v1 takes this axis from 'spacing_after_resampling' (model axis order) but
            # applies it to the softmax already transposed back to the source array order
            tf = [int(t) for t in self.v1.plans.get("transpose_forward", [0, 1, 2])]
            axis = tf.index(axis)
        return export_axis_plans(grid, order, order_z, do_sep, axis)

    def predict(self, volume: Volume, progress: Any = None) -> Prediction:
        """Segment ``volume`` (see :meth:`NnUNetPredictor.predict`), then apply the
        model-level ``postprocessing.json`` when there is one."""
        import dataclasses

        from medinfer.prediction import LabelStatistics

        pred = super().predict(volume, progress)
        if self.postprocessing is None:
            return pred
        labels = pred.label.array[0]
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        _postprocess(labels, self.postprocessing, voxel_ml,
                     str(self.v1.path / "postprocessing.json"))
        names = self._label_names()
        counts = np.bincount(labels.ravel(), minlength=max(names) + 1)
        stats = [LabelStatistics(value=v, name=n, voxels=int(counts[v]),
                                 volume_ml=float(counts[v]) * voxel_ml)
                 for v, n in names.items() if v != 0]
        return dataclasses.replace(pred, statistics=stats)
