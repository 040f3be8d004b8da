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

2-D models (``-m 2d``, 2-D ``plans.pkl``): the 2-D ``Generic_UNet``, ``PreprocessorFor2D``
(slice axis = model axis 0 keeps its spacing, :func:`v1_target_spacing`), a 2-D sliding
window per slice with mirroring over ``(0, 1)`` (:mod:`medinfer.formats.nnunet_2d`), the
same export.

Cascades: ``3d_lowres`` is stage 0 of a two-stage ``plans.pkl``; the
``3d_cascade_fullres`` model (``nnUNetTrainerV2CascadeFullRes``) also takes the one-hot
``3d_lowres`` map, which it predicts itself unless given, built as v1's ``predict_cases``
builds it (:func:`medinfer.formats.nnunet_cascade.v1_previous_stage_channels`).

Region-based trainers (:data:`medinfer.models.nnunet_v1.V1_REGION_TRAINERS`, e.g.
``nnUNetTrainerV2BraTSRegions``): sigmoid outputs averaged over mirrors and folds, exported
as ``save_segmentation_nifti_from_softmax`` with ``region_class_order`` (probabilities
resampled, each region's label painted where > 0.5, in ``regions_class_order``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medinfer.errors import ModelError
from medinfer.formats.nnunet import (
    NnUNetGrid,
    NnUNetPredictor,
    _do_separate_z,
    _nearest_index,
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

__all__ = ["NnUNetV1Predictor", "get_gaussian_v1", "preprocess_v1", "v1_target_spacing"]


def get_gaussian_v1(patch: Sequence[int], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """nnU-Net v1's ``_get_gaussian``: impulse at ``patch // 2`` filtered with
    :func:`scipy.ndimage.gaussian_filter` (sigma ``patch / 8``, constant mode), maximum 1,
    float32, zeros replaced by the smallest non-zero value."""
    import torch

    g = gaussian_impulse(patch, sigma_scale)
    g = (g / np.max(g) * 1).astype(np.float32)
    g[g == 0] = np.min(g[g != 0])
    return torch.from_numpy(g)


def _resize_mask(m: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """batchgenerators' ``resize_segmentation`` (order 1) of a 0/-1 mask (``m`` float64,
    1 = inside): each label's indicator resized (skimage ``resize``, order 1, edge, clipped),
    the larger score wins, an exact tie goes to the nearest-neighbour label (order-0
    resize), as ``_resample_seg_by_argmax`` with ``seg_tiebreak='nearest'`` (batchgenerators
    0.25.5, installed beside nnU-Net v1 today; older releases gave ties to the inside):
    :func:`medinfer.formats.nnunet_cascade.resize_segmentation` of the 0 / -1 map."""
    from medinfer.formats.nnunet_cascade import resize_segmentation

    seg = np.where(m > 0.5, 0, -1).astype(np.int8)
    return np.asarray(resize_segmentation(seg, shape, 1) == 0)


def _resample_mask(mask: np.ndarray, new_shape: Sequence[int], do_sep: bool,
                   axis: int | None) -> np.ndarray:
    """v1's ``resize_segmentation`` (order 1) of the 0/-1 test-case mask; True = inside."""
    shape = np.array(mask.shape)
    new = np.array([int(v) for v in new_shape])
    if np.all(shape == new):
        return mask
    m = mask.astype(np.float64)
    if not do_sep or axis is None:
        return _resize_mask(m, [int(v) for v in new])
    inplane = [int(v) for i, v in enumerate(new) if i != axis]
    slices = []
    for s in range(int(shape[axis])):
        idx: list[Any] = [slice(None)] * 3
        idx[axis] = s
        slices.append(_resize_mask(m[tuple(idx)], inplane))
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
    target = v1_target_spacing(folder, spacing)
    new_shape = [int(v) for v in np.round((np.array(spacing) / np.array(target)).astype(float)
                                          * np.array(crop_shape)).astype(int)]
    do_sep, axis = separate_z(None, spacing, target)
    data = resample_to_shape(data, new_shape, spacing, target, order=3, order_z=0,
                             force_separate_z=None)
    mask = _resample_mask(mask, new_shape, do_sep, axis)
    _normalise_v1(data, mask, folder)
    return model_input(data, perm, bbox, crop_shape, new_shape, spacing, target)


def v1_target_spacing(folder: NnUNetV1Folder, spacing: Sequence[float]) -> list[float]:
    """The spacing a v1 stage resamples to (mm, model axis order).

    ``current_spacing`` of the stage; with v1's 2-D preprocessor (``PreprocessorFor2D``,
    the default of 2-D plans) the slice axis (model axis 0) keeps the case's own
    ``spacing[0]`` (``PreprocessorFor2D.resample_and_normalize``), so only the in-plane
    axes are resampled.

    Raises
    ------
    ModelError
        A 2-D stage whose ``preprocessor_name`` is not ``PreprocessorFor2D`` or
        ``GenericPreprocessor``.
    """
    target = [float(v) for v in folder.stage_plans["current_spacing"]]
    if len(folder.stage_plans.get("patch_size", ())) != 2:
        return target
    name = folder.plans.get("preprocessor_name") or "PreprocessorFor2D"
    if name == "PreprocessorFor2D":
        target[0] = float(spacing[0])
    elif name != "GenericPreprocessor":
        raise ModelError(f"{folder.path}/plans.pkl: preprocessor {name!r} of a 2-D model is not "
                         "supported (PreprocessorFor2D, GenericPreprocessor)")
    return target


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
    tta : mirroring over ``(0, 1, 2)``, ``(0, 1)`` for 2-D models (v1 default on).
    step_size : window step / patch (default 0.5).
    save_probabilities : also return the softmax ``(K, I, J, K)`` float32 on the source
        grid (0 outside the crop, as v1's export leaves it; background 1 there).
    batch_size, voxel_budget : see :class:`~medinfer.formats.nnunet.NnUNetPredictor`;
        ``voxel_budget`` None = ``2**19`` input voxels per network call with TTA (one
        ``16 x 64 x 64`` window's 8 mirrors: peak memory 476 vs 764 MiB with ``2**21``,
        same speed and labels, ``benchmarks/nnunet_predict.py --v1``), ``2**21`` without.
    lowres_model_dir : cascades: the ``3d_lowres`` model folder (default: where v1 finds
        it, :attr:`lowres_model_dir`).

    Raises
    ------
    ModelError
        Unreadable or unsafe folder, weights that do not fit.
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
        voxel_budget: int | None = None,
        lowres_model_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        from medinfer._jsonio import read_json_object
        from medinfer.models.loaders import resolve_device

        self.folder = read_nnunet_v1_folder(  # type: ignore[assignment]
            model_dir, [str(f) for f in folds] if folds is not None else None, checkpoint)
        self.device = resolve_device(device)
        self.model = load_nnunet_v1_networks(self.v1, self.device)  # type: ignore[assignment]
        self.mirror_axes = (0, 1, 2) if len(self._patch_size()) == 3 else (0, 1)  # v1 2-D: (0, 1)
        if voxel_budget is None:  # TTA: one window's 8 mirrors per call (peak memory)
            voxel_budget = 2**19 if tta else 2**21
        self._set_run_options(tta, step_size, "float32", save_probabilities, batch_size,
                              voxel_budget)
        self._folds = [str(f) for f in folds] if folds is not None else None
        self._lowres_dir = Path(lowres_model_dir) if lowres_model_dir is not None else None
        self._lowres: NnUNetV1Predictor | None = None
        self.name = self.v1.path.name
        self.version = self.v1.path.parent.name
        pp_file = self.v1.path / "postprocessing.json"
        self.postprocessing = (read_json_object(pp_file, max_bytes=1_000_000, error=ModelError)
                               if pp_file.is_file() else None)

    @property
    def v1(self) -> NnUNetV1Folder:
        """The parsed v1 folder."""
        return self.folder  # type: ignore[return-value]

    def _set_previous_stage(self, volume: Volume,
                            previous_stage: Volume | np.ndarray | None) -> None:
        from medinfer.formats.nnunet_cascade import check_previous_stage

        if not self.v1.is_cascade:
            if previous_stage is not None:
                raise ModelError(f"{self.v1.path}: previous_stage given, but "
                                 f"{self.v1.trainer_name} is not a cascade model")
            self._previous_labels = None
            return
        if previous_stage is None:
            previous_stage = self.lowres_predictor().predict(volume).label
        arr = previous_stage if isinstance(previous_stage, np.ndarray) else previous_stage.array
        self._previous_labels = check_previous_stage(arr, volume.spatial_shape,
                                                     "previous_stage")

    def _preprocess(self, volume: Volume) -> tuple[np.ndarray, NnUNetGrid]:
        data, grid = preprocess_v1(volume, self.v1)
        if self._previous_labels is not None:  # cascade: + one-hot previous stage
            from medinfer.formats.nnunet_cascade import v1_previous_stage_channels

            extra = v1_previous_stage_channels(self._previous_labels, grid,
                                               self.v1.num_classes)
            data = np.concatenate([data, extra])
        return data, grid

    @property
    def lowres_model_dir(self) -> Path:
        """The ``3d_lowres`` model folder of a cascade: the folder given, else where v1
        looks for it, ``<RESULTS_FOLDER>/nnUNet/3d_lowres/<Task>/<previous trainer>__<Plans>``
        (next to this ``3d_cascade_fullres`` folder)."""
        if self._lowres_dir is not None:
            return self._lowres_dir
        p = Path(self.v1.path)
        plans_id = p.name.split("__")[-1]
        trainer = self.v1.previous_trainer
        return p.parents[2] / "3d_lowres" / p.parent.name / f"{trainer}__{plans_id}"

    def lowres_predictor(self) -> NnUNetV1Predictor:
        """The ``3d_lowres`` predictor of a cascade (made on first use), run as
        ``nnUNet_predict -m 3d_cascade_fullres`` without ``-l`` runs it: the same folds,
        TTA and step size, checkpoint ``model_final_checkpoint``.

        Raises
        ------
        ModelError
            Not a cascade; the low-resolution model folder is missing or unreadable.
        """
        if not self.v1.is_cascade:
            raise ModelError(f"{self.v1.path}: not the full-resolution stage of a cascade")
        if self._lowres is None:
            d = self.lowres_model_dir
            if not d.is_dir():
                raise ModelError(f"{self.v1.path}: cascade needs the 3d_lowres model folder {d} "
                                 "(not found; give the low-resolution segmentations instead)")
            self._lowres = NnUNetV1Predictor(
                d, folds=self._folds, device=str(self.device), tta=self.tta,
                step_size=self.step_size, batch_size=self.batch_size)
        return self._lowres

    def _patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.v1.stage_plans["patch_size"])

    def _importance_map(self, patch: Sequence[int]) -> torch.Tensor:
        return get_gaussian_v1(patch)

    def _num_heads(self) -> int:
        return self.v1.num_classes

    def _label_names(self) -> dict[int, str]:
        return self.v1.label_names

    def _regions(self) -> list[int] | None:
        rco = self.v1.regions_class_order
        return list(rco) if rco is not None else None

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

    def predict(self, volume: Volume, progress: Any = None, *,
                previous_stage: Volume | np.ndarray | None = None) -> Prediction:
        """Segment ``volume`` (see :meth:`NnUNetPredictor.predict`), then apply the
        model-level ``postprocessing.json`` when there is one.

        Parameters
        ----------
        volume, progress : see :meth:`NnUNetPredictor.predict`.
        previous_stage : cascades only: the ``3d_lowres`` label map of this scan
            (``(1, I, J, K)`` Volume or ``(I, J, K)`` integer array on the scan's voxel
            grid, as ``nnUNet_predict -l`` reads it); None = predicted here with
            :meth:`lowres_predictor` (as ``nnUNet_predict`` without ``-l``).

        Raises
        ------
        InvalidImageError
            ``previous_stage`` not on the scan's voxel grid or not a label map.
        ModelError
            Cascade without ``previous_stage`` and without its ``3d_lowres`` folder;
            ``previous_stage`` given to a model that is not a cascade.
        """
        import dataclasses

        from medinfer.prediction import LabelStatistics

        pred = super().predict(volume, progress, previous_stage=previous_stage)
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
