"""The detection configuration file (``--config detection.yaml``), validated with pydantic.

Six sections: ``model``, ``input``, ``inference``, ``post_processing``, ``output``,
``visualization``. Every key, its default and its meaning is listed in
``docs/detection.md``. Unknown keys, wrong types and impossible values raise
:class:`medinfer.errors.ConfigError` naming the key as a dotted path, e.g.
``detection.yaml: inference.overlap: must be < 1 (got 1.2)``.

Keys left ``null`` in ``input`` and ``inference`` fall back to the model card.
Command-line flags override the file through :func:`apply_overrides`.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medinfer.errors import ConfigError
from medinfer.models.card import InferenceMode

#: a config file larger than this is refused before parsing (untrusted input)
MAX_CONFIG_BYTES = 1_000_000


class PeakMethod(StrEnum):
    """How peaks are found on the heat map."""

    LOCAL_MAXIMA = "local_maxima"
    NMS = "nms"


class NmsShape(StrEnum):
    """Shape of a finding used for 3-D non-maximum suppression."""

    SPHERE = "sphere"
    BOX = "box"


class VolumeMethod(StrEnum):
    """How a finding's volume is measured from its heat-map component."""

    SOFT = "soft"
    BINARY = "binary"


class Refine(StrEnum):
    """Where a finding's coordinates come from."""

    CENTROID = "centroid"
    PEAK = "peak"


class BlendingChoice(StrEnum):
    """Window blending of the sliding-window inference."""

    GAUSSIAN = "gaussian"
    LINEAR = "linear"
    AVERAGE = "average"


#: inference mode: the model card's own enum (``sliding_window`` | ``whole_volume``)
ModeChoice = InferenceMode


class OutputFormat(StrEnum):
    """Per-scan output files."""

    JSON = "json"
    CSV = "csv"
    HEATMAP = "heatmap"
    PNG = "png"
    HTML = "html"
    PDF = "pdf"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, use_enum_values=False)


class ModelSection(_Strict):
    """``model``: which model runs and where."""

    name: str | None = Field(default=None, description="bundled model name or model folder")
    device: str = "auto"


class InputSection(_Strict):
    """``input``: how the scan is prepared (null = the model card's value)."""

    target_spacing: tuple[float, float, float] | None = None
    hu_clip: tuple[float, float] | None = None
    normalization: dict[str, Any] | None = None

    @field_validator("target_spacing")
    @classmethod
    def _spacing(cls, v: tuple[float, float, float] | None) -> Any:
        if v is not None and not all(0.0 < s <= 100.0 for s in v):
            raise ValueError(f"each spacing must be in (0, 100] mm, got {list(v)}")
        return v

    @field_validator("hu_clip")
    @classmethod
    def _clip(cls, v: tuple[float, float] | None) -> Any:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"expected [low, high] with low < high, got {list(v)}")
        return v


class TtaSection(_Strict):
    """``inference.tta``: test-time augmentation."""

    enabled: bool = False
    flips: list[list[int]] = Field(default_factory=lambda: [[0], [1], [2]])
    rotations: list[int] = Field(default_factory=list)
    rotation_axes: tuple[int, int] = (0, 1)
    num_augmentations: int | None = Field(default=None, ge=1, le=64)

    @field_validator("flips")
    @classmethod
    def _flips(cls, v: list[list[int]]) -> list[list[int]]:
        for f in v:
            if any(a not in (0, 1, 2) for a in f) or len(set(f)) != len(f):
                raise ValueError(f"each flip is a list of distinct axes from 0, 1, 2; got {f}")
        return v

    @field_validator("rotations")
    @classmethod
    def _rot(cls, v: list[int]) -> list[int]:
        if any(k not in (1, 2, 3) for k in v):
            raise ValueError(f"rotations are numbers of 90-degree turns in 1, 2, 3; got {v}")
        return v

    @field_validator("rotation_axes")
    @classmethod
    def _rot_axes(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] == v[1] or any(a not in (0, 1, 2) for a in v):
            raise ValueError(f"expected two distinct axes from 0, 1, 2, got {list(v)}")
        return v


class InferenceSection(_Strict):
    """``inference``: how the network is run (null = the model card's value)."""

    mode: ModeChoice | None = None
    patch_size: tuple[int, int, int] | None = None
    overlap: float | None = None
    stride: tuple[int, int, int] | None = None
    batch_size: int | None = Field(default=None, ge=1, le=1024)
    blending: BlendingChoice | None = None
    sigma_scale: float | None = Field(default=None, gt=0.0, le=10.0)
    tta: TtaSection = Field(default_factory=TtaSection)

    @field_validator("overlap")
    @classmethod
    def _overlap(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"must be >= 0 and < 1 (got {v})")
        return v

    @field_validator("stride")
    @classmethod
    def _stride(cls, v: tuple[int, int, int] | None) -> Any:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"each stride must be a positive number of voxels (got {list(v)})")
        return v

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, v: tuple[int, int, int] | None) -> Any:
        if v is not None and not all(1 <= p <= 1024 for p in v):
            raise ValueError(f"each patch size must be in 1..1024 voxels (got {list(v)})")
        return v

    @model_validator(mode="after")
    def _stride_vs_overlap(self) -> InferenceSection:
        if self.stride is not None and self.overlap is not None:
            raise ValueError("give either stride or overlap, not both")
        return self


class PostProcessingSection(_Strict):
    """``post_processing``: heat map -> findings."""

    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    min_distance_mm: float = Field(default=5.0, ge=0.0)
    peak_method: PeakMethod = PeakMethod.LOCAL_MAXIMA
    nms_iou: float = Field(default=0.1, ge=0.0, le=1.0)
    nms_shape: NmsShape = NmsShape.SPHERE
    segmentation_threshold: float = Field(default=0.5, gt=0.0, le=1.0)
    volume_method: VolumeMethod = VolumeMethod.SOFT
    refine: Refine = Refine.CENTROID
    min_diameter_mm: float = Field(default=0.0, ge=0.0)
    max_diameter_mm: float | None = Field(default=None, gt=0.0)
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    max_detections: int = Field(default=100, ge=1, le=100000)
    calibration: str | None = None

    @model_validator(mode="after")
    def _sizes(self) -> PostProcessingSection:
        if self.max_diameter_mm is not None and self.max_diameter_mm < self.min_diameter_mm:
            raise ValueError("max_diameter_mm must be >= min_diameter_mm")
        return self


class OutputSection(_Strict):
    """``output``: which files are written."""

    formats: list[OutputFormat] = Field(default_factory=lambda: list(OutputFormat))
    batch_summary: bool = True
    confidence_distribution: bool = True


class VisualizationSection(_Strict):
    """``visualization``: PNG / HTML / PDF appearance."""

    colormap: str = "hot"
    alpha: float = Field(default=0.45, ge=0.0, le=1.0)
    num_slices: int = Field(default=6, ge=1, le=50)
    window_hu: tuple[float, float] = (-20.0, 180.0)
    dpi: int = Field(default=100, ge=30, le=600)
    html_max_points: int = Field(default=60000, ge=1000, le=2_000_000)

    @field_validator("colormap")
    @classmethod
    def _cmap(cls, v: str) -> str:
        import matplotlib

        if v not in matplotlib.colormaps:
            raise ValueError(f"unknown matplotlib colormap {v!r} (e.g. 'hot', 'viridis', 'jet')")
        return v

    @field_validator("window_hu")
    @classmethod
    def _win(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError(f"expected [low, high] with low < high, got {list(v)}")
        return v


class DetectionConfig(_Strict):
    """The whole detection configuration (see ``docs/detection.md``)."""

    model: ModelSection = Field(default_factory=ModelSection)
    input: InputSection = Field(default_factory=InputSection)
    inference: InferenceSection = Field(default_factory=InferenceSection)
    post_processing: PostProcessingSection = Field(default_factory=PostProcessingSection)
    output: OutputSection = Field(default_factory=OutputSection)
    visualization: VisualizationSection = Field(default_factory=VisualizationSection)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> DetectionConfig:
        """Validate a parsed mapping; :class:`ConfigError` names ``source`` and each key."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a mapping at the top level, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {_format_errors(exc)}") from None


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here; see docs/detection.md for the valid keys)"
        elif "input" in err and err["type"] not in ("missing", "value_error"):
            msg = f"{msg} (got {err['input']!r})"
        parts.append(f"{loc or '<root>'}: {msg}")
    return "; ".join(parts)


def load_detection_config(
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> DetectionConfig:
    """Read a detection config (YAML) and apply command-line overrides.

    Parameters
    ----------
    path : the YAML file, or None for all defaults.
    overrides : see :func:`apply_overrides`.

    Raises
    ------
    ConfigError
        Missing / too large / invalid YAML file, unknown key, wrong type, impossible value
        (the message names the key as a dotted path).
    """
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: config file is {size} bytes; at most {MAX_CONFIG_BYTES}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc.__class__.__name__})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        data = loaded or {}
    data = apply_overrides(data, overrides or {})
    return DetectionConfig.from_dict(data, source=source)


_SECTIONS = ("model", "input", "inference", "post_processing", "output", "visualization")


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``overrides`` applied (CLI flags win over the file).

    Keys are dotted paths (``"post_processing.threshold"``, ``"inference.tta.enabled"``) or
    bare field names that exist in exactly one section (``"threshold"``, ``"overlap"``,
    ``"device"``). ``None`` values are ignored (flag not given). The key ``"tta"`` with a
    boolean sets ``inference.tta.enabled``; ``"model"`` with a string sets ``model.name``.

    Raises
    ------
    ConfigError
        A key that names no field, or a bare name found in several sections.
    """
    import copy

    out = copy.deepcopy(data)
    fields = {s: set(DetectionConfig.model_fields[s].annotation.model_fields)  # type: ignore[union-attr]
              for s in _SECTIONS}
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "tta" and isinstance(value, bool):
            path = ["inference", "tta", "enabled"]
        elif key == "model" and isinstance(value, str):
            path = ["model", "name"]
        elif "." in key:
            path = key.split(".")
            if path[0] not in _SECTIONS:
                raise ConfigError(f"override {key!r}: unknown section {path[0]!r}; "
                                  f"choose one of {', '.join(_SECTIONS)}")
        else:
            hits = [s for s in _SECTIONS if key in fields[s]]
            if len(hits) != 1:
                where = "no section" if not hits else f"several sections ({', '.join(hits)})"
                raise ConfigError(f"override {key!r}: found in {where}; use section.key")
            path = [hits[0], key]
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[path[-1]] = list(value) if isinstance(value, tuple) else value
    return out
