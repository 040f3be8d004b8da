"""Training configuration (``train.yaml``): one validated pydantic model.

Every setting of :func:`medinfer.training.train` lives here; the CLI flags of
``medinfer train`` override the file's values. Unknown keys are refused (a typo must
not silently fall back to a default).
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medinfer.errors import ConfigError
from medinfer.models.card import Network
from medinfer.training.acquisition import AcquisitionSim


class Loss(StrEnum):
    """Segmentation loss: MONAI ``DiceCELoss`` or ``DiceFocalLoss`` (softmax, one-hot)."""

    DICE_CE = "dice_ce"
    DICE_FOCAL = "dice_focal"


class Target(StrEnum):
    """What the network learns: a label map (softmax over classes) or a heat map (one
    sigmoid channel, detection models such as ``demo-nodules``)."""

    SEGMENTATION = "segmentation"
    HEATMAP = "heatmap"


class HeatmapKind(StrEnum):
    """Heat-map target: ``mask`` = lesion occupancy fraction (a soft mask; its 0.5 level set
    is the lesion surface and its sum times the voxel volume the lesion volume); ``gaussian``
    = ``exp(-r^2 / (2 sigma^2))`` around each lesion centre (centre heat only)."""

    MASK = "mask"
    GAUSSIAN = "gaussian"


class HeatmapSpec(BaseModel):
    """``heatmap:`` section (used with ``target: heatmap``).

    Attributes
    ----------
    kind : :class:`HeatmapKind`.
    sigma_mm : standard deviation of the ``gaussian`` target, mm.
    """

    model_config = ConfigDict(extra="forbid")
    kind: HeatmapKind = HeatmapKind.MASK
    sigma_mm: float = Field(default=2.0, gt=0.0, le=50.0)

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, value: Any) -> Any:
        from medinfer.errors import parse_enum

        return parse_enum(HeatmapKind, value, "heatmap.kind")


class SyntheticSource(BaseModel):
    """``synthetic:`` section: training patches rendered on the fly with
    :mod:`medinfer.training.nodules_synth` (synthetic lesions inserted into a host CT),
    instead of an image/label folder (see :mod:`medinfer.training.heatmap`).

    Attributes
    ----------
    atlas : host CT (NIfTI, HU), e.g. ``tests/data/ct/ct_head_brain_atlas_1mm.nii.gz``.
    hard_negatives : fraction of patches centred (+-8 mm) on the host's bright structures
        (70-400 HU: calcifications, vessels), which look like lesions.
    small_lesions : fraction of patches whose lesions are drawn from ``small_range_mm``.
    small_range_mm : equivalent-diameter range of those lesions, mm.
    low_contrast : fraction of patches whose lesion densities are drawn from
        ``low_contrast_hu`` (the faint end of the lesion model).
    low_contrast_hu : density range of those lesions, HU.
    max_lesions : lesions per patch are 1..max_lesions (0 with ``empty_fraction``).
    empty_fraction : fraction of patches without lesions.
    source_spacing_mm : spacing range of the random oblique source grid each patch is
        rendered on before it is resampled to the model grid (as a scan is at inference).
    rotate_fraction : fraction of patches whose model grid is randomly rotated.
    val_patches : fixed validation patches (seeded) for the validation metric (soft Dice).
    buffer : 0 = every step renders its whole batch; N > 0 = a replay buffer of N patches
        of which ``fresh_per_step`` are re-rendered each step and the batch is drawn from
        (rendering costs about 5x a training step on CPU); still seeded per step, and
        rebuilt on resumption by re-rendering the patches of the last N /
        ``fresh_per_step`` steps.
    fresh_per_step : patches re-rendered per step with a buffer.
    """

    model_config = ConfigDict(extra="forbid")
    atlas: Path
    hard_negatives: float = Field(default=0.35, ge=0.0, le=1.0)
    small_lesions: float = Field(default=0.3, ge=0.0, le=1.0)
    small_range_mm: tuple[float, float] = (4.0, 12.0)
    low_contrast: float = Field(default=0.0, ge=0.0, le=1.0)
    low_contrast_hu: tuple[float, float] = (70.0, 90.0)
    max_lesions: int = Field(default=4, ge=1, le=8)
    empty_fraction: float = Field(default=0.15, ge=0.0, le=1.0)
    source_spacing_mm: tuple[float, float] = (0.6, 2.0)
    rotate_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    val_patches: int = Field(default=16, ge=1, le=1024)
    buffer: int = Field(default=0, ge=0, le=100000)
    fresh_per_step: int = Field(default=2, ge=1, le=1024)


class ExportFormat(StrEnum):
    """Exports written next to the state dict: TorchScript ``model.ts``, ONNX ``model.onnx``."""

    TORCHSCRIPT = "torchscript"
    ONNX = "onnx"


class Schedule(StrEnum):
    """Learning-rate schedule over ``max_steps``: cosine annealing or polynomial (0.9)."""

    COSINE = "cosine"
    POLY = "poly"


class TrainConfig(BaseModel):
    """Settings of one training run.

    Attributes
    ----------
    images, labels : folders of images and label maps (nnU-Net ``imagesTr``/``labelsTr``
        naming, ``<case>_img``/``<case>_seg`` pairs in ``images`` alone, or a CSV/JSON
        list given as ``cases``); see :func:`medinfer.training.data.find_pairs`.
    cases : optional CSV/JSON file listing ``image,label[,case]`` rows (paths relative to it).
    out : output folder; becomes a medinfer model folder (``model.yaml`` + weights).
    labels_map : label value -> name; value 0 is background. Default: 0..num_classes-1.
    num_classes : number of output channels (background included) when ``labels_map`` is
        not given; None = largest label value in the data + 1 (resolved by ``train``).
    network : MONAI network class (``UNet``, ``BasicUNet``, ``SegResNet``, ``DynUNet``,
        ``SwinUNETR``); ``network_kwargs`` are passed on (spatial_dims, in/out channels
        are filled in).
    patch_size : training window (voxels, model-grid axes I, J, K); multiples of
        ``pad_multiple``.
    pad_multiple : whole volumes are padded to a multiple of this (network stride, 16).
    orientation, spacing : model grid (3-letter code, mm) or None to keep the source grid.
    normalization : intensity spec of the model card (``percentile``, ``ct_window``,
        ``zscore``, ``none``), see :func:`medinfer.transforms.normalize_intensity`.
    foreground_ratio : probability that a training patch is centred on foreground.
    augment : spatial (rotation +-``rotate_deg``, scaling, anisotropic spacing simulation)
        and intensity (bias field, gamma, noise, contrast) augmentation on/off.
    max_steps, batch_size, lr, weight_decay, schedule, loss, dice_weight, ce_weight :
        optimisation (AdamW).
    val_every : validate (and consider early stopping) every N steps.
    checkpoint_every : write ``checkpoints/last.pt`` every N steps (resume point).
    val_cases : fixed validation case ids; otherwise fold ``fold`` of ``folds``.
    patience : early-stopping patience in validations without improvement; None = read
        ``model_card``'s ``training.early_stopping.patience``; None there = no stopping.
    min_delta : smallest increase of the validation metric that counts as improvement.
    model_card : optional ``model.yaml`` whose ``training`` section gives the patience.
    seed : seed of every random choice (data split, initialisation, patches, augmentation).
    num_threads : torch CPU threads (fixed so that runs are reproducible).
    device : ``auto``, ``cpu`` or ``cuda``; on CUDA the forward pass runs in float16
        autocast with gradient scaling (mixed precision; bit-exact resumption is only
        guaranteed on CPU).
    target : ``segmentation`` (default) or ``heatmap`` (one sigmoid output channel, loss
        ``ce_weight`` x binary cross-entropy + ``dice_weight`` x soft Dice on soft
        targets; :mod:`medinfer.training.heatmap`).
    heatmap : the heat-map target (:class:`HeatmapSpec`).
    synthetic : on-the-fly synthetic-lesion data (:class:`SyntheticSource`) instead of
        ``images``/``labels`` (``target: heatmap`` only).
    acquisition : simulated acquisitions of each training case (rotation, voxel size with
        slice-profile blur, field of view, bias field, gamma, noise, scanner scale, mirror)
        precomputed on the model grid as a bank that patches are drawn from
        (:class:`medinfer.training.acquisition.AcquisitionSim`); None = the cases as they are.
    time_schedule : with ``max_minutes``, the learning-rate schedule runs over whichever
        ends first, ``max_steps`` or the wall-clock budget (the schedule position is
        max(step / max_steps, elapsed / budget); elapsed time is checkpointed, so a resumed
        run continues the schedule; not reproducible step for step).
    in_channels : image channels (files ``<case>_0000``, ``<case>_0001``, ... per case);
        None = as many as the data have.
    export_dir : model folder written at the end (default ``out``; checkpoints and logs
        stay in ``out``).
    export_formats : ``torchscript`` and/or ``onnx`` written alongside the state dict
        (checked equal to it); ``[]`` for a folder that must stay small (the bundled zoo).
    init_weights : state dict to start from (fine-tuning); ignored when resuming.
    card : extra ``model.yaml`` entries merged over the generated card (description,
        inference defaults, output threshold, licence...).
    max_minutes : wall-clock budget of one run (segmentation or heat map; the clock starts
        after data loading): training stops (and
        exports) after the step that exceeds it (not reproducible step for step; the
        learning-rate schedule still runs over ``max_steps``).
    """

    model_config = ConfigDict(extra="forbid", use_enum_values=False)

    images: Path | None = None
    labels: Path | None = None
    cases: Path | None = None
    out: Path | None = None
    name: str = "trained-model"
    labels_map: dict[int, str] | None = None
    num_classes: int | None = Field(default=None, ge=2, le=256)
    network: Network = Network.UNET
    network_kwargs: dict[str, Any] = Field(default_factory=dict)
    patch_size: tuple[int, int, int] = (32, 32, 32)
    pad_multiple: int = Field(default=16, ge=1, le=256)
    orientation: str | None = None
    spacing: tuple[float, float, float] | None = None
    normalization: dict[str, Any] = Field(default_factory=lambda: {
        "method": "percentile", "lower": 1.0, "upper": 99.0, "nonzero": False})
    foreground_ratio: float = Field(default=0.5, ge=0.0, le=1.0)
    augment: bool = True
    rotate_deg: float = Field(default=20.0, ge=0.0, le=180.0)
    max_steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=2, ge=1, le=1024)
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(default=1e-5, ge=0.0)
    schedule: Schedule = Schedule.COSINE
    loss: Loss = Loss.DICE_CE
    dice_weight: float = Field(default=1.0, ge=0.0)
    ce_weight: float = Field(default=1.0, ge=0.0)
    val_every: int = Field(default=50, ge=1)
    checkpoint_every: int = Field(default=50, ge=1)
    val_cases: list[str] | None = None
    folds: int = Field(default=5, ge=2)
    fold: int = Field(default=0, ge=0)
    patience: int | None = Field(default=None, ge=1)
    min_delta: float = Field(default=0.0, ge=0.0)
    model_card: Path | None = None
    seed: int = 0
    num_threads: int = Field(default=1, ge=1, le=256)
    device: str = "auto"
    target: Target = Target.SEGMENTATION
    heatmap: HeatmapSpec = Field(default_factory=HeatmapSpec)
    synthetic: SyntheticSource | None = None
    init_weights: Path | None = None
    card: dict[str, Any] = Field(default_factory=dict)
    max_minutes: float | None = Field(default=None, gt=0.0)
    acquisition: AcquisitionSim | None = None
    in_channels: int | None = Field(default=None, ge=1, le=64)
    time_schedule: bool = False
    export_dir: Path | None = None
    export_formats: list[ExportFormat] = Field(
        default_factory=lambda: [ExportFormat.TORCHSCRIPT, ExportFormat.ONNX])

    @field_validator("target", mode="before")
    @classmethod
    def _target(cls, value: Any) -> Any:
        from medinfer.errors import parse_enum

        return parse_enum(Target, value, "target")

    @field_validator("network", mode="before")
    @classmethod
    def _network(cls, value: Any) -> Any:
        from medinfer.errors import parse_enum

        return parse_enum(Network, value, "network")

    @field_validator("loss", mode="before")
    @classmethod
    def _loss(cls, value: Any) -> Any:
        from medinfer.errors import parse_enum

        return parse_enum(Loss, value, "loss")

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, value: Any) -> Any:
        from medinfer.errors import parse_enum

        return parse_enum(Schedule, value, "schedule")

    @field_validator("export_formats", mode="before")
    @classmethod
    def _export_formats(cls, value: Any) -> Any:
        from medinfer.errors import parse_enum

        if not isinstance(value, list | tuple):
            raise ValueError(f"expected a list of {[f.value for f in ExportFormat]}, "
                             f"got {value!r}")
        return [parse_enum(ExportFormat, v, "export_formats") for v in value]

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(v < 4 or v > 1024 for v in value):
            raise ValueError(f"each size must be in 4..1024 voxels, got {list(value)}")
        return value

    @property
    def class_names(self) -> dict[int, str]:
        """Label value -> name (0 = background), ``num_classes`` entries."""
        if self.labels_map is not None:
            return dict(sorted(self.labels_map.items()))
        n = self.num_classes or 2
        return {0: "background", **{k: f"class {k}" for k in range(1, n)}}

    @property
    def n_classes(self) -> int:
        """Number of network output channels (background included)."""
        return max(self.class_names) + 1

    @classmethod
    def from_mapping(cls, data: Any, source: str = "config") -> TrainConfig:
        """Validate a mapping; :class:`ConfigError` names every wrong key and value."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of settings, got "
                              f"{type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            parts = []
            for e in exc.errors():
                loc = ".".join(str(p) for p in e["loc"])
                msg = str(e["msg"]).removeprefix("Value error, ")
                parts.append(msg if msg.startswith(f"{loc}:") else f"{loc}: {msg}")
            msgs = "; ".join(parts)
            raise ConfigError(f"{source}: {msgs}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str],
                  overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read ``train.yaml``; ``overrides`` (CLI flags, non-None values) win.

        Relative paths in the file are relative to the file's folder.
        """
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: {p} is not a file")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of settings")
        for key in ("images", "labels", "cases", "out", "model_card", "init_weights",
                    "export_dir"):
            if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                data[key] = str(p.parent / data[key])
        syn = data.get("synthetic")
        if isinstance(syn, dict) and isinstance(syn.get("atlas"), str) \
                and not Path(syn["atlas"]).is_absolute():
            data["synthetic"] = {**syn, "atlas": str(p.parent / syn["atlas"])}
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_mapping(data, str(p))

    def to_yaml_dict(self) -> dict[str, Any]:
        """Plain-types mapping (paths as strings, enums as values) for YAML/JSON."""
        return self.model_dump(mode="json")
