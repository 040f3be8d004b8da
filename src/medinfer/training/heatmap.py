"""Heat-map (detection) training: ``medinfer train`` with ``target: heatmap``.

The network has one output channel; its sigmoid is the heat map that
:mod:`medinfer.detection` turns into findings. Loss: ``ce_weight`` x binary cross-entropy
with logits on soft targets + ``dice_weight`` x soft Dice (MONAI ``DiceLoss`` with
``sigmoid=True``, batch-wise, smoothing 1) — the loss of the first ``demo-nodules`` model.

Data (``synthetic:`` section, :class:`~medinfer.training.config.SyntheticSource`): every
training patch is rendered on the fly from the host CT with synthetic lesions of
:mod:`medinfer.training.nodules_synth`, in two steps, as the inference engine sees a scan:

1. a random oblique *source* grid (spacing ``source_spacing_mm`` per axis, any
   orientation) around a patch centre with 0..``max_lesions`` lesions is rendered
   (int16 HU, noise 3-10 HU; :func:`~medinfer.training.nodules_synth.render_scan`);
2. it is resampled trilinearly onto the *model-grid* patch (``patch_size`` voxels of
   ``spacing`` mm, axis-aligned or randomly rotated with ``rotate_fraction``) and
   normalised with ``normalization`` (:func:`medinfer.transforms.normalize_intensity`).

Patch centres are deep-tissue points of the atlas, or (``hard_negatives``) bright host
structures (70-400 HU: calcifications, dense vessels), which must be learned as negatives.
The target on the model grid is the lesion occupancy fraction (``heatmap.kind: mask``) or
a Gaussian of ``heatmap.sigma_mm`` around each lesion centre (``gaussian``); random flips
along the three axes are applied to patch and target alike.

Reproducibility as for segmentation (:mod:`medinfer.training.loop`): the patches of step
``s`` come from the random generator seeded with ``(seed, s)`` only, so a killed run
resumes from ``checkpoints/last.pt`` with the same step and loss sequence. Validation:
``val_patches`` fixed patches (seed ``(seed, 2**31)``), metric = global soft Dice of the
sigmoid output and the target (higher is better; ``best.pt`` and early stopping use it).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medinfer._atomic import write_text_atomic
from medinfer.errors import ConfigError
from medinfer.training.config import HeatmapKind, SyntheticSource, TrainConfig

log = logging.getLogger(__name__)

#: host-CT intensity range (HU) of the bright structures used as hard negatives
BRIGHT_HU = (70.0, 400.0)
#: seed component of the validation patches
_VAL_STREAM = 2**31


@functools.lru_cache(maxsize=2)
def _atlas(path: str, mtime_ns: int) -> Any:
    """The :class:`~medinfer.training.nodules_synth.LesionAtlas` of a file (cached: its
    tissue distance map takes seconds)."""
    from medinfer.training.nodules_synth import LesionAtlas

    return LesionAtlas.from_file(path)


class SyntheticPatches:
    """Renders (input, target) model-grid patches with synthetic lesions.

    Parameters
    ----------
    config : the training config (``synthetic``, ``patch_size``, ``spacing``,
        ``normalization``, ``heatmap``).
    """

    def __init__(self, config: TrainConfig) -> None:
        if config.synthetic is None:
            raise ConfigError("synthetic: required for target: heatmap (on-the-fly synthetic "
                              "lesions; image/label folders are not supported for heat maps)")
        self.config = config
        self.source: SyntheticSource = config.synthetic
        atlas_path = Path(self.source.atlas)
        if not atlas_path.is_file():
            raise ConfigError(f"synthetic.atlas: {atlas_path} is not a file")
        self.atlas = _atlas(str(atlas_path.resolve()), atlas_path.stat().st_mtime_ns)
        if config.spacing is None:
            raise ConfigError("spacing: target: heatmap needs the model-grid spacing (mm)")
        self.spacing = np.asarray(config.spacing, dtype=np.float64)
        self.patch = tuple(int(p) for p in config.patch_size)
        idx = np.argwhere((self.atlas.array > BRIGHT_HU[0]) & (self.atlas.array < BRIGHT_HU[1]))
        self.bright = self.atlas.ct.voxel_to_world(idx)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One ``(input, target)`` pair, each float32 ``patch_size`` (model-grid axes)."""
        from medinfer.training.nodules_synth import (
            DENSITY_RANGE_HU,
            SyntheticLesion,
            grid_points,
            random_grid,
            random_rotation,
            render_scan,
        )
        from medinfer.transforms import normalize_intensity
        from medinfer.volume import Volume

        src = self.source
        atlas = self.atlas
        if src.hard_negatives > 0 and len(self.bright) and rng.random() < src.hard_negatives:
            centre = self.bright[rng.integers(len(self.bright))] + rng.uniform(-8.0, 8.0, 3)
        else:
            centre = atlas._cand_world[rng.integers(len(atlas._cand_world))]
        n = 0 if rng.random() < src.empty_fraction else int(rng.integers(1, src.max_lesions + 1))
        small = src.small_lesions > 0 and rng.random() < src.small_lesions
        ext_mm = np.asarray(self.patch, dtype=np.float64) * self.spacing
        lesions = atlas.sample_lesions(
            rng, n, region=(centre, float(ext_mm.min()) / 3.0),
            diameter_range=src.small_range_mm if small else (4.0, 25.0))
        if src.low_contrast > 0 and rng.random() < src.low_contrast:
            lo, hi = src.low_contrast_hu
            lesions = [SyntheticLesion(les.center, les.radii, les.rotation,
                                       float(rng.uniform(max(lo, DENSITY_RANGE_HU[0]),
                                                         min(hi, DENSITY_RANGE_HU[1]))))
                       for les in lesions]
        rot_m = random_rotation(rng) if rng.random() < src.rotate_fraction else np.eye(3)
        aff_m = np.eye(4)
        aff_m[:3, :3] = rot_m * self.spacing[None, :]
        half = (np.asarray(self.patch, dtype=np.float64) - 1.0) / 2.0
        aff_m[:3, 3] = centre - aff_m[:3, :3] @ half
        rot_s = random_rotation(rng)
        extent = np.abs(rot_s.T @ rot_m) @ ext_mm + 8.0
        aff_s, shape_s = random_grid(rng, centre, extent, src.source_spacing_mm, rotation=rot_s)
        scan = render_scan(atlas, lesions, aff_s, shape_s, rng)
        pts = grid_points(aff_m, self.patch)
        inv = np.linalg.inv(aff_s)
        vox = pts @ inv[:3, :3].T + inv[:3, 3]
        img = ndimage.map_coordinates(np.asarray(scan.image.array[0], dtype=np.float32),
                                      np.moveaxis(vox, -1, 0), order=1, mode="nearest")
        x = normalize_intensity(Volume(img[None], aff_m), self.config.normalization)
        target = heatmap_target(lesions, aff_m, self.patch, self.config)
        xa = np.asarray(x.array[0], dtype=np.float32)
        for ax in range(3):  # flips: the task is mirror-symmetric
            if rng.random() < 0.5:
                xa, target = np.flip(xa, ax), np.flip(target, ax)
        return np.ascontiguousarray(xa), np.ascontiguousarray(target)

    def batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` pairs stacked as ``(n, 1, *patch_size)`` float32 arrays."""
        pairs = [self.sample(rng) for _ in range(n)]
        return (np.stack([p[0] for p in pairs])[:, None], np.stack([p[1] for p in pairs])[:, None])


class ReplayBuffer:
    """The replay buffer of ``synthetic.buffer`` patches (see
    :class:`~medinfer.training.config.SyntheticSource`).

    Slot ``n`` starts with the patch of generator ``(seed, 2**31 + 1, n)``; step ``s``
    re-renders slots ``(s f + k) mod N`` (``k < f``) from the step's generator and then
    draws the batch (without replacement) from all slots, so the batches of a step depend
    on ``(seed, s)`` and the previous steps only, and :meth:`restore` rebuilds the
    buffer of any step exactly.
    """

    def __init__(self, data: SyntheticPatches, seed: int, size: int, fresh: int) -> None:
        self.data, self.seed, self.size, self.fresh = data, seed, size, fresh
        self.x: list[np.ndarray] = []
        self.y: list[np.ndarray] = []

    def _initial(self) -> None:
        pairs = [self.data.sample(np.random.default_rng([self.seed, _VAL_STREAM + 1, n]))
                 for n in range(self.size)]
        self.x = [p[0] for p in pairs]
        self.y = [p[1] for p in pairs]

    def _refresh(self, step: int, rng: np.random.Generator) -> None:
        for k in range(self.fresh):
            slot = (step * self.fresh + k) % self.size
            self.x[slot], self.y[slot] = self.data.sample(rng)

    def restore(self, step: int) -> None:
        """The buffer as it was before ``step`` (re-renders about ``size`` patches)."""
        back = -(-self.size // self.fresh)  # steps that rewrite every slot
        if step >= back:  # every initial slot has been overwritten since
            self.x = [np.empty(0, np.float32)] * self.size
            self.y = [np.empty(0, np.float32)] * self.size
        else:
            self._initial()
        first = max(0, step - back)
        for s in range(first, step):
            rng = np.random.default_rng([self.seed, s])
            rng.integers(2**31)  # the step's torch seed, drawn first (see train_heatmap)
            self._refresh(s, rng)

    def batch(self, step: int, rng: np.random.Generator, n: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """Refresh the step's slots, then ``n`` patches ``(n, 1, *patch)`` float32."""
        if not self.x:
            self.restore(step)
        self._refresh(step, rng)
        idx = rng.choice(self.size, size=min(n, self.size), replace=False)
        return (np.stack([self.x[int(i)] for i in idx])[:, None],
                np.stack([self.y[int(i)] for i in idx])[:, None])


def heatmap_target(lesions: list[Any], affine: np.ndarray, shape: tuple[int, ...],
                   config: TrainConfig) -> np.ndarray:
    """Heat-map target of ``lesions`` on a grid (``affine`` voxel -> RAS+ mm), float32
    ``shape``: the maximum over lesions of their occupancy fraction (``mask``) or of
    ``exp(-|x - c|^2 / (2 sigma^2))`` (``gaussian``, ``heatmap.sigma_mm``)."""
    from medinfer.training.nodules_synth import grid_points, lesion_fraction

    target = np.zeros(shape, dtype=np.float32)
    if config.heatmap.kind is HeatmapKind.GAUSSIAN:
        if lesions:
            pts = grid_points(affine, shape)
            s2 = 2.0 * config.heatmap.sigma_mm ** 2
            for les in lesions:
                g = np.exp(-np.sum((pts - les.center) ** 2, axis=-1) / s2).astype(np.float32)
                target = np.maximum(target, g)
        return target
    for les in lesions:
        res = lesion_fraction(les, affine, shape)
        if res is not None:
            sl, f = res
            target[sl] = np.maximum(target[sl], f)
    return target


def _loss_fn(config: TrainConfig) -> Any:
    import torch
    from monai.losses import DiceLoss

    dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)
    bce = torch.nn.BCEWithLogitsLoss()

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return config.ce_weight * bce(logits, target) + config.dice_weight * dice(logits, target)

    return loss


def soft_dice(net: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Global soft Dice ``2 sum(p t) / (sum p + sum t)`` of ``sigmoid(net(x))`` and ``y``
    (arrays ``(N, 1, *patch)``), evaluated in eval mode without gradients."""
    import torch

    was = net.training
    net.eval()
    dev = next(net.parameters()).device
    with torch.no_grad():
        p = torch.sigmoid(net(torch.from_numpy(x).to(dev))).cpu().numpy()
    net.train(was)
    den = float(p.sum() + y.sum())
    return 1.0 if den == 0 else float(2.0 * (p * y).sum() / den)


def train_heatmap(cfg: TrainConfig, *, resume: bool = True, validator: Any = None,
                  callback: Any = None, export: bool = True) -> Any:
    """Train a heat-map network (see the module doc); called by
    :func:`medinfer.training.train` for ``target: heatmap``.

    Returns
    -------
    :class:`medinfer.training.loop.TrainResult`

    Raises
    ------
    ConfigError
        No ``synthetic`` source, missing atlas or spacing, a checkpoint of another
        configuration, unreadable ``init_weights``.
    """
    import torch

    from medinfer.models.loaders import resolve_device
    from medinfer.training.loop import build, load_best, run_steps

    assert cfg.out is not None  # checked by train()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    data = SyntheticPatches(cfg)
    write_text_atomic(out / "train_config.json", json.dumps(cfg.to_yaml_dict(), indent=1) + "\n")
    val_x, val_y = data.batch(np.random.default_rng([cfg.seed, _VAL_STREAM]),
                              cfg.synthetic.val_patches if cfg.synthetic else 1)
    device = resolve_device(cfg.device)
    net = build(cfg).to(device)
    dumped = cfg.to_yaml_dict()
    core = {k: dumped[k] for k in ("network", "network_kwargs", "patch_size", "seed", "loss",
                                   "lr", "batch_size", "schedule", "normalization", "spacing",
                                   "target", "heatmap", "synthetic", "ce_weight",
                                   "dice_weight")}
    syn = cfg.synthetic
    buffer = ReplayBuffer(data, cfg.seed, syn.buffer, syn.fresh_per_step) \
        if syn is not None and syn.buffer > 0 else None

    def make_batch(step: int, rng: np.random.Generator) -> tuple[Any, Any]:
        torch.manual_seed(int(rng.integers(2**31)))
        if buffer is not None:
            xb, yb = buffer.batch(step, rng, cfg.batch_size)
        else:
            xb, yb = data.batch(rng, cfg.batch_size)
        return torch.from_numpy(xb).to(device), torch.from_numpy(yb).to(device)

    def validate(net: Any, step: int) -> float:
        return float(validator(net, step)) if validator is not None \
            else soft_dice(net, val_x, val_y)

    result = run_steps(cfg, net, _loss_fn(cfg), out=out, core=core, device=device,
                       make_batch=make_batch, validate=validate, resume=resume,
                       callback=callback)
    if export:
        from medinfer.training.export import export_model_folder
        from medinfer.training.figures import CURVES_PNG, training_curves

        load_best(net, out)
        export_model_folder(net, cfg, Path(cfg.export_dir) if cfg.export_dir else out,
                            result=result)
        training_curves(result.log, out / CURVES_PNG)
    return result
