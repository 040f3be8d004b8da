"""The model card: a validated ``model.yaml`` (see ``docs/model_card.md``).

A model card describes everything medinfer needs to run a trained model on a real
scan: what it segments or detects (labels), what it expects as input (modality,
channels, orientation code, voxel spacing in mm, intensity normalisation), how to
run it (sliding window defaults), how to read its output (softmax / sigmoid) and
where its weights are (TorchScript, ONNX or a PyTorch state dict plus a MONAI
architecture). Every field is documented in ``docs/model_card.md``.

Errors name the offending field with a dotted path, e.g.
``model.yaml: labels.2.color: expected 3 integers in 0..255, got [300, 0, 0]``.
"""

from __future__ import annotations

import os
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medinfer.errors import ConfigError, ModelError, parse_enum

#: a model.yaml larger than this is refused before parsing (it is untrusted input)
MAX_CARD_BYTES = 1_000_000

_ORIENTATION_AXES = ({"R", "L"}, {"A", "P"}, {"S", "I"})


class Task(StrEnum):
    """What the model produces."""

    SEGMENTATION = "segmentation"
    DETECTION = "detection"


class InferenceMode(StrEnum):
    """How the network sees the volume."""

    SLIDING_WINDOW = "sliding_window"
    WHOLE_VOLUME = "whole_volume"


class Blending(StrEnum):
    """How overlapping sliding-window outputs are blended."""

    GAUSSIAN = "gaussian"
    CONSTANT = "constant"


class Activation(StrEnum):
    """Activation that turns logits into probabilities."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class InputMismatch(StrEnum):
    """What to do with a scan that does not fit the card's input contract."""

    WARN = "warn"
    REFUSE = "refuse"


class WeightFormat(StrEnum):
    """On-disk format of the weights file."""

    TORCHSCRIPT = "torchscript"
    ONNX = "onnx"
    STATE_DICT = "state_dict"


class Network(StrEnum):
    """MONAI architectures that a ``state_dict`` card may name."""

    UNET = "UNet"
    SEGRESNET = "SegResNet"
    DYNUNET = "DynUNet"
    BASICUNET = "BasicUNet"
    UNETR = "UNETR"
    SWINUNETR = "SwinUNETR"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


def _enum_validator(enum_type: type[Enum], name: str) -> Any:
    def _check(cls: Any, value: Any) -> Any:
        if isinstance(value, (enum_type, str)):
            try:
                return parse_enum(enum_type, value, name)
            except ConfigError as exc:
                raise ValueError(str(exc).removeprefix(f"{name}: ")) from None
        raise ValueError(f"{name}: expected a string, got {value!r}")

    return _check


class LabelSpec(_Strict):
    """One label of the label map.

    Attributes
    ----------
    name : human-readable name (``"white matter"``).
    color : display colour ``[r, g, b]``, integers in 0..255.
    snomed : optional SNOMED CT code (digits) of the structure, used by DICOM SEG.
    """

    name: str = Field(min_length=1, max_length=200)
    color: tuple[int, int, int] = (255, 0, 0)
    snomed: str | None = Field(default=None, max_length=64)

    @field_validator("color", mode="before")
    @classmethod
    def _color(cls, value: Any) -> Any:
        ok = (
            isinstance(value, (list, tuple))
            and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
        )
        if not ok:
            raise ValueError(f"expected 3 integers in 0..255, got {value!r}")
        return tuple(value)

    @field_validator("snomed", mode="before")
    @classmethod
    def _snomed(cls, value: Any) -> Any:
        if value is None:
            return None
        text = str(value)
        if not text.isdigit():
            raise ValueError(f"expected a SNOMED CT code (digits only), got {value!r}")
        return text


class InputSpec(_Strict):
    """Input contract: what the network was trained on.

    Attributes
    ----------
    modality : DICOM modality code of the expected scan (``"MR"``, ``"CT"``, ...).
    channels : number of input channels C.
    orientation : three-letter orientation code (nibabel convention, e.g. ``"RAS"``)
        of the model grid, or ``None`` to keep the scan's orientation.
    spacing : voxel size of the model grid in mm along its axes 0, 1, 2, or ``None``
        to keep the scan's spacing.
    normalization : intensity normalisation spec passed to
        :func:`medinfer.transforms.normalize_intensity`; ``method`` is one of
        ``ct_window`` (``min_hu``, ``max_hu``), ``percentile`` (``lower``, ``upper``,
        ``nonzero``), ``zscore`` (``nonzero``), ``none``.
    min_slices : fewest voxels along every spatial axis a scan must have (default 3: a
        single 2-D slice does not fit a 3-D model).
    mismatch : ``warn`` (default) or ``refuse``: what happens when a scan does not fit
        the contract (DICOM Modality or intensities of another modality, fewer than
        ``min_slices`` slices); see :func:`medinfer.inference.contract.check_input_contract`.
        ``--force`` runs refused scans anyway.
    """

    modality: str = Field(default="MR", min_length=1, max_length=16)
    channels: int = Field(default=1, ge=1, le=64)
    orientation: str | None = "RAS"
    spacing: tuple[float, float, float] | None = None
    normalization: dict[str, Any] = Field(default_factory=lambda: {"method": "none"})
    min_slices: int = Field(default=3, ge=1, le=4096)
    mismatch: InputMismatch = InputMismatch.WARN

    _mismatch = field_validator("mismatch", mode="before")(
        _enum_validator(InputMismatch, "mismatch"))

    @field_validator("orientation")
    @classmethod
    def _orientation(cls, value: str | None) -> str | None:
        if value is None:
            return None
        code = value.upper()
        groups = sorted(
            next((n for n, ax in enumerate(_ORIENTATION_AXES) if c in ax), -1) for c in code
        )
        if len(code) != 3 or groups != [0, 1, 2]:
            raise ValueError(
                f"expected a 3-letter orientation code with one of R/L, A/P, S/I each "
                f"(e.g. 'RAS', 'LPS'), got {value!r}"
            )
        return code

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, value: tuple[float, float, float] | None) -> Any:
        if value is not None and not all(0.0 < s < 100.0 for s in value):
            raise ValueError(f"expected 3 spacings in mm, each in (0, 100), got {list(value)}")
        return value

    @field_validator("normalization")
    @classmethod
    def _normalization(cls, value: dict[str, Any]) -> dict[str, Any]:
        method = value.get("method")
        allowed = ("ct_window", "percentile", "zscore", "none")
        if method not in allowed:
            raise ValueError(
                f"method: {method!r} is not allowed; choose one of {', '.join(map(repr, allowed))}"
            )
        required = {"ct_window": ("min_hu", "max_hu"), "percentile": ("lower", "upper")}
        for key in required.get(str(method), ()):
            if not isinstance(value.get(key), (int, float)) or isinstance(value.get(key), bool):
                raise ValueError(f"{key}: a number is required for method {method!r}")
        return dict(value)


class InferenceSpec(_Strict):
    """Inference defaults (each can be overridden by the caller).

    Attributes
    ----------
    mode : ``sliding_window`` or ``whole_volume``.
    patch_size : window size in voxels along the model grid axes 0, 1, 2.
    overlap : fraction of the window shared by neighbours, ``0 <= overlap < 1``.
    blending : ``gaussian`` (importance map as in MONAI / nnU-Net) or ``constant``.
    sigma_scale : Gaussian sigma as a fraction of the window size (nnU-Net: 0.125).
    tta_axes : spatial axes (subset of 0, 1, 2) mirrored for test-time augmentation;
        empty = no TTA. All 2^n flip combinations are averaged.
    batch_size : number of windows per network call.
    size_divisible : in ``whole_volume`` mode the volume is padded to a multiple of
        this in each axis (e.g. 16 for a 4-level U-Net).
    """

    mode: InferenceMode = InferenceMode.SLIDING_WINDOW
    patch_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = Field(default=0.5, ge=0.0, lt=1.0)
    blending: Blending = Blending.GAUSSIAN
    sigma_scale: float = Field(default=0.125, gt=0.0, le=10.0)
    tta_axes: tuple[int, ...] = ()
    batch_size: int = Field(default=1, ge=1, le=1024)
    size_divisible: int = Field(default=1, ge=1, le=1024)

    _mode = field_validator("mode", mode="before")(_enum_validator(InferenceMode, "mode"))
    _blend = field_validator("blending", mode="before")(_enum_validator(Blending, "blending"))

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(1 <= p <= 1024 for p in value):
            raise ValueError(f"expected 3 window sizes in 1..1024 voxels, got {list(value)}")
        return value

    @field_validator("tta_axes")
    @classmethod
    def _tta(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(a not in (0, 1, 2) for a in value) or len(set(value)) != len(value):
            raise ValueError(f"expected distinct spatial axes from 0, 1, 2, got {list(value)}")
        return tuple(sorted(value))


class OutputSpec(_Strict):
    """Output contract: how logits become probabilities and labels.

    Attributes
    ----------
    activation : ``softmax`` (channel k = label value k; argmax gives the label map) or
        ``sigmoid`` (channel c = c-th non-background label in ascending value order;
        a voxel gets the label of the most probable channel at or above ``threshold``).
    threshold : probability threshold for ``sigmoid`` outputs and detection heat maps.
    """

    activation: Activation = Activation.SOFTMAX
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)

    _act = field_validator("activation", mode="before")(_enum_validator(Activation, "activation"))


class WeightsSpec(_Strict):
    """Where the weights are.

    Attributes
    ----------
    format : ``torchscript``, ``onnx`` or ``state_dict``.
    file : file name relative to the model folder (must stay inside it).
    sha256 : optional hex digest; when given the file is checked before loading.
    """

    format: WeightFormat
    file: str = Field(min_length=1, max_length=500)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")

    _fmt = field_validator("format", mode="before")(_enum_validator(WeightFormat, "format"))

    @field_validator("file")
    @classmethod
    def _file(cls, value: str) -> str:
        p = Path(value)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(f"must be a relative path inside the model folder, got {value!r}")
        return value


class ArchitectureSpec(_Strict):
    """The network to build for a ``state_dict`` card.

    Attributes
    ----------
    network : MONAI class name: ``UNet``, ``SegResNet`` or ``DynUNet``.
    kwargs : keyword arguments of that class (e.g. ``spatial_dims``, ``in_channels``,
        ``out_channels``, ``channels``, ``strides``, ``num_res_units``).
    """

    network: Network
    kwargs: dict[str, Any] = Field(default_factory=dict)

    _net = field_validator("network", mode="before")(_enum_validator(Network, "network"))


class ModelCard(_Strict):
    """A validated ``model.yaml``.

    Attributes
    ----------
    name : short model name (``demo-brain``).
    version : version string (``"1.0.0"``).
    task : ``segmentation`` or ``detection`` (a heat-map model).
    description : free text.
    labels : label value (int, 0 = background) -> :class:`LabelSpec`. For
        ``softmax`` output the values must be exactly ``0..K-1`` (K output channels).
    input : :class:`InputSpec`.
    inference : :class:`InferenceSpec`.
    output : :class:`OutputSpec`.
    weights : :class:`WeightsSpec`.
    architecture : :class:`ArchitectureSpec`, required when ``weights.format`` is
        ``state_dict``.
    provenance : free mapping (training data, script, command, date, authors).
    license : licence of the weights (SPDX identifier or text); ``licence`` is accepted
        as its spelling in the UNet3D model card.
    maintainers : who to contact (names, e-mails or mappings), shown at ``/v1/models``.
    serving : free mapping describing the service (app, port, endpoint), shown as is.
    training : free mapping of training settings (``early_stopping: {patience: N}`` ...);
        see :attr:`early_stopping_patience`.
    post_processing : ``task: detection`` only: the model's defaults for the detection
        config's ``post_processing`` section (same keys and checks, ``docs/detection.md``);
        a run's config and flags override them key by key. A relative ``calibration`` path
        is relative to the ``model.yaml``'s folder (made absolute by :meth:`from_yaml`).
    """

    name: str = Field(min_length=1, max_length=100)
    version: str = Field(default="0.0.0", min_length=1, max_length=50)
    task: Task = Task.SEGMENTATION
    description: str = ""
    labels: dict[int, LabelSpec]
    input: InputSpec = Field(default_factory=InputSpec)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    weights: WeightsSpec
    architecture: ArchitectureSpec | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)
    license: str = ""
    maintainers: list[Any] = Field(default_factory=list)
    serving: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    post_processing: dict[str, Any] = Field(default_factory=dict)

    @field_validator("post_processing")
    @classmethod
    def _post_processing(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            return value
        # the detection config's own section validates the keys (imported here: that
        # module imports this one)
        from medinfer.postprocess.detection_config import PostProcessingSection

        try:
            section = PostProcessingSection.model_validate(value)
        except ValidationError as exc:
            raise ValueError(_format_errors(exc)) from None
        return section.model_dump(mode="json", include=set(value))

    @model_validator(mode="after")
    def _post_processing_task(self) -> ModelCard:
        if self.post_processing and self.task is not Task.DETECTION:
            raise ValueError("post_processing: only a task: detection model has a "
                             "post-processing section (heat map -> findings)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _licence(cls, data: Any) -> Any:
        if isinstance(data, dict) and "licence" in data:
            data = dict(data)
            value = data.pop("licence")
            if "license" in data and data["license"] != value:
                raise ValueError("licence and license differ; give one")
            data["license"] = value
        return data

    @field_validator("maintainers", mode="before")
    @classmethod
    def _maintainers(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, dict)) else value

    @property
    def early_stopping_patience(self) -> int | None:
        """``training.early_stopping.patience`` (or ``training.patience``), if given."""
        es = self.training.get("early_stopping")
        value = es.get("patience") if isinstance(es, dict) else self.training.get("patience")
        return int(value) if isinstance(value, int | float) else None

    _task = field_validator("task", mode="before")(_enum_validator(Task, "task"))

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[int, LabelSpec]) -> dict[int, LabelSpec]:
        if not value:
            raise ValueError("at least one label is required")
        bad = [v for v in value if not 0 <= v <= 65535]
        if bad:
            raise ValueError(f"label values must be in 0..65535, got {bad}")
        return dict(sorted(value.items()))

    @model_validator(mode="after")
    def _consistency(self) -> ModelCard:
        if self.weights.format is WeightFormat.STATE_DICT and self.architecture is None:
            raise ValueError("architecture: required when weights.format is 'state_dict'")
        if self.output.activation is Activation.SOFTMAX:
            values = sorted(self.labels)
            if values != list(range(len(values))):
                raise ValueError(
                    f"labels: with softmax output the label values must be 0..K-1, got {values}"
                )
        return self

    # ----------------------------------------------------------------- helpers
    @property
    def num_classes(self) -> int:
        """Number of network output channels K implied by the labels and activation."""
        if self.output.activation is Activation.SOFTMAX:
            return len(self.labels)
        if self.task is Task.DETECTION:
            return 1
        return len(self.foreground_values)

    @property
    def foreground_values(self) -> list[int]:
        """Label values other than 0, ascending."""
        return [v for v in self.labels if v != 0]

    def colors(self) -> dict[int, tuple[int, int, int]]:
        """Label value -> ``(r, g, b)`` for every label."""
        return {v: spec.color for v, spec in self.labels.items()}

    # ------------------------------------------------------------- constructors
    @classmethod
    def from_dict(cls, data: Any, source: str = "model.yaml") -> ModelCard:
        """Validate a parsed mapping.

        Raises
        ------
        ModelError
            Naming ``source`` and each bad field as a dotted path.
        """
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise ModelError(f"{source}: expected a mapping at the top level, got {kind}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ModelError(f"{source}: {_format_errors(exc)}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> ModelCard:
        """Read and validate a ``model.yaml``.

        Raises
        ------
        ModelError
            Missing or too large file (> 1 MB), invalid YAML, or invalid fields (the
            message names the field, e.g. ``labels.2.color``).
        """
        p = Path(path)
        if not p.is_file():
            raise ModelError(f"{p}: model card not found (expected a model.yaml file)")
        size = p.stat().st_size
        if size > MAX_CARD_BYTES:
            raise ModelError(f"{p}: model card is {size} bytes; at most {MAX_CARD_BYTES} accepted")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ModelError(f"{p}: not valid YAML ({exc.__class__.__name__}: {exc})") from None
        post = data.get("post_processing") if isinstance(data, dict) else None
        if isinstance(post, dict) and isinstance(post.get("calibration"), str):
            cal = Path(post["calibration"]).expanduser()
            if not cal.is_absolute():  # the card's own files live beside it
                data = {**data, "post_processing": {**post, "calibration":
                                                    str((p.parent / cal).resolve())}}
        return cls.from_dict(data, source=str(p))


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = str(err["msg"])
        for prefix in ("Value error, ", "Assertion failed, "):
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (see docs/model_card.md for the accepted fields)"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
