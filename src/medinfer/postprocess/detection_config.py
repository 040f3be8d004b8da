"""The detection configuration file (``--config detection.yaml``), validated with pydantic.

Six sections: ``model``, ``input``, ``inference``, ``post_processing``, ``output``,
``visualization``. Every key, its default and its meaning is listed in
``docs/detection.md``. Unknown keys, wrong types and impossible values raise
:class:`medinfer.errors.ConfigError` naming the key as a dotted path, e.g.
``detection.yaml: inference.overlap: must be < 1 (got 1.2)``.

Keys left ``null`` in ``input`` and ``inference`` fall back to the model card.
Command-line flags override the file through :func:`apply_overrides`.

The keys of the PIVOT inference configuration (``docs/compat/pivot.md``: nested
``blending: {method, sigma}``, ``peak_detection``, ``nms``, ``size_filter``,
``confidence_filter``, ``output.save_*`` and ``formats: {detections, heatmap}``,
``input.spacing / clip_range / normalize / normalization_method``, ...) are accepted as
written: :func:`translate_described_keys` turns them into the native keys before
validation, so one validated model serves both spellings.
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


class ConfidenceMethod(StrEnum):
    """How a finding's confidence is read from the heat map: ``mean`` = mean heat over
    the finding's component (voxels ``>= segmentation_threshold`` connected to the peak;
    the peak voxel alone when it is below that threshold), ``peak`` = heat at the peak."""

    MEAN = "mean"
    PEAK = "peak"


class BlendingChoice(StrEnum):
    """Window blending of the sliding-window inference."""

    GAUSSIAN = "gaussian"
    LINEAR = "linear"
    AVERAGE = "average"


#: inference mode: the model card's own enum (``sliding_window`` | ``whole_volume``)
ModeChoice = InferenceMode


class OutputFormat(StrEnum):
    """Per-scan output files (``heatmap``: NIfTI; ``heatmap_npy``: ``.npy`` array
    ``(I, J, K)`` float32 on the scan's voxel grid, file axis order)."""

    JSON = "json"
    CSV = "csv"
    HEATMAP = "heatmap"
    HEATMAP_NPY = "heatmap_npy"
    PNG = "png"
    HTML = "html"
    PDF = "pdf"


class TtaAugmentation(StrEnum):
    """Named TTA augmentations (PIVOT spelling). Axes x, y, z are the model-grid axes
    0, 1, 2 (for a card with ``orientation: RAS``: right, anterior, superior)."""

    FLIP_X = "flip_x"
    FLIP_Y = "flip_y"
    FLIP_Z = "flip_z"
    ROTATE_90_XY = "rotate_90_xy"
    ROTATE_90_XZ = "rotate_90_xz"
    ROTATE_90_YZ = "rotate_90_yz"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, use_enum_values=False)


class ModelSection(_Strict):
    """``model``: which model runs and where."""

    name: str | None = Field(default=None, description="bundled model name or model folder")
    device: str = "auto"
    checkpoint: str | None = Field(
        default=None, description="TorchScript file, state-dict .pt/.pth (with architecture), "
        "model folder or bundled name; wins over name")
    architecture: str | None = Field(
        default=None, description="MONAI network of a state-dict checkpoint: unet, basicunet, "
        "segresnet, dynunet, unetr, swinunetr")
    architecture_kwargs: dict[str, Any] | None = None
    mixed_precision: bool = False


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
    augmentations: list[TtaAugmentation] | None = Field(
        default=None, description="named augmentations; replaces flips / rotations when given")

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
    # performance keys (PIVOT): applied where the device in use has them (see docs)
    cudnn_benchmark: bool | None = None
    num_workers: int | None = Field(default=None, ge=0, le=256)
    prefetch_factor: int | None = Field(default=None, ge=1, le=64)
    clear_cache: bool | None = None

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
        if self.stride is not None and self.overlap is not None and self.patch_size is not None:
            check_stride_overlap(self.stride, self.overlap, self.patch_size)
        return self


def check_stride_overlap(stride: tuple[int, ...], overlap: float,
                         patch: tuple[int, ...]) -> None:
    """Both ``stride`` and ``overlap`` given: they must mean the same windows, i.e.
    ``stride == round(patch * (1 - overlap))`` along every axis.

    Raises
    ------
    ValueError
        The two disagree (message names both and the stride the overlap implies).
    """
    implied = [max(1, round(p * (1.0 - overlap))) for p in patch]
    if list(stride) != implied:
        raise ValueError(f"stride {list(stride)} and overlap {overlap} are inconsistent for "
                         f"patch_size {list(patch)} (overlap {overlap} means stride {implied}); "
                         "give stride or overlap, or consistent values")


class PostProcessingSection(_Strict):
    """``post_processing``: heat map -> findings."""

    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    min_distance_mm: float = Field(default=5.0, ge=0.0)
    peak_method: PeakMethod = PeakMethod.LOCAL_MAXIMA
    nms_enabled: bool = True
    nms_iou: float = Field(default=0.1, ge=0.0, le=1.0)
    nms_shape: NmsShape = NmsShape.SPHERE
    segmentation_threshold: float = Field(default=0.5, gt=0.0, le=1.0)
    volume_method: VolumeMethod = VolumeMethod.SOFT
    refine: Refine = Refine.CENTROID
    confidence: ConfidenceMethod = ConfidenceMethod.MEAN
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
        data = translate_described_keys(data, source)
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
        data = translate_described_keys(loaded or {}, source)
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


# ------------------------------------------------------------ described (PIVOT) spelling
#: nested described sections: section -> described key -> {described sub-key: native key}
_NESTED: dict[str, dict[str, dict[str, str]]] = {
    "post_processing": {
        "peak_detection": {"threshold": "threshold", "min_distance": "min_distance_mm",
                           "method": "peak_method"},
        "nms": {"enabled": "nms_enabled", "iou_threshold": "nms_iou"},
        "size_filter": {"min_diameter": "min_diameter_mm", "max_diameter": "max_diameter_mm"},
        "confidence_filter": {"min_confidence": "min_confidence"},
    },
}
#: flat renames: section -> {described key: native key}
_RENAMES: dict[str, dict[str, str]] = {
    "input": {"spacing": "target_spacing", "clip_range": "hu_clip"},
    "visualization": {"overlay_alpha": "alpha"},
}
_OUTPUT_SWITCHES = ("save_heatmap", "save_detections", "save_visualization", "save_report")


def _put(section: dict[str, Any], key: str, value: Any, where: str) -> None:
    if key in section and section[key] != value:
        raise ConfigError(f"{where}: {value!r} conflicts with {key}: {section[key]!r} in the "
                          "same section; give one of them")
    section[key] = value


def translate_described_keys(data: Any, source: str = "config") -> Any:
    """Return a copy of ``data`` with the PIVOT spelling turned into native keys.

    The mapping (also in ``docs/compat/pivot.md``): ``input.spacing`` -> ``target_spacing``;
    ``input.clip_range`` -> ``hu_clip``; ``input.normalize`` / ``normalization_method``
    (``minmax``: ``(x - lo) / (hi - lo)`` over ``clip_range``, i.e. ``ct_window``;
    ``zscore``) -> ``normalization``; ``inference.blending: {method, sigma}`` ->
    ``blending`` + ``sigma_scale``; ``inference.device`` / ``mixed_precision`` ->
    ``model.*``; ``post_processing.peak_detection / nms / size_filter /
    confidence_filter`` -> flat keys; ``output.save_*`` + ``formats: {detections:
    json|csv|both, heatmap: nifti|numpy}`` and ``visualization.save_3d`` -> the
    ``output.formats`` list; ``visualization.overlay_alpha`` -> ``alpha``.
    Keys that are neither native nor described are left for validation (unknown key).

    Raises
    ------
    ConfigError
        A described key with an unknown sub-key or value (dotted key named), or a
        described key that contradicts the native key it maps to.
    """
    import copy

    if not isinstance(data, dict):
        return data
    out = copy.deepcopy(data)
    sections = {k: v for k, v in out.items() if isinstance(v, dict)}
    for sec, renames in _RENAMES.items():
        node = sections.get(sec)
        for old, new in renames.items():
            if node is not None and old in node:
                _put(node, new, node.pop(old), f"{source}: {sec}.{old}")
    for sec, nested in _NESTED.items():
        node = sections.get(sec)
        if node is None:
            continue
        for key, subkeys in nested.items():
            if key not in node or not isinstance(node[key], dict):
                continue
            for sub, value in node.pop(key).items():
                if sub not in subkeys:
                    raise ConfigError(f"{source}: {sec}.{key}.{sub}: unknown key; allowed: "
                                      f"{', '.join(subkeys)}")
                _put(node, subkeys[sub], value, f"{source}: {sec}.{key}.{sub}")
    _translate_input(sections.get("input"), source)
    inf = sections.get("inference")
    if inf is not None:
        blend = inf.get("blending")
        if isinstance(blend, dict):
            inf.pop("blending")
            for sub, value in blend.items():
                if sub not in ("method", "sigma"):
                    raise ConfigError(f"{source}: inference.blending.{sub}: unknown key; "
                                      "allowed: method, sigma")
                _put(inf, "blending" if sub == "method" else "sigma_scale", value,
                     f"{source}: inference.blending.{sub}")
        for key in ("device", "mixed_precision"):
            if key in inf:
                model = out.setdefault("model", {})
                if isinstance(model, dict):
                    _put(model, key, inf.pop(key), f"{source}: inference.{key}")
    _translate_output(out, source)
    return out


def _translate_input(node: dict[str, Any] | None, source: str) -> None:
    if node is None or not ({"normalize", "normalization_method"} & node.keys()):
        return
    normalize = node.pop("normalize", True)
    method = node.pop("normalization_method", "minmax")
    if not isinstance(normalize, bool):
        raise ConfigError(f"{source}: input.normalize: expected true or false, got {normalize!r}")
    if not normalize:
        spec: dict[str, Any] = {"method": "none"}
    elif method == "minmax":
        clip = node.get("hu_clip")
        spec = ({"method": "ct_window", "min_hu": clip[0], "max_hu": clip[1]}
                if isinstance(clip, list | tuple) and len(clip) == 2
                else {"method": "percentile", "lower": 0.0, "upper": 100.0})
    elif method == "zscore":
        spec = {"method": "zscore"}
    else:
        raise ConfigError(f"{source}: input.normalization_method: {method!r} is not one of "
                          "minmax, zscore")
    _put(node, "normalization", spec, f"{source}: input.normalize")


def _translate_output(out: dict[str, Any], source: str) -> None:
    node = out.get("output")
    vis = out.get("visualization")
    save_3d = vis.pop("save_3d", None) if isinstance(vis, dict) else None
    described = isinstance(node, dict) and (
        isinstance(node.get("formats"), dict) or any(k in node for k in _OUTPUT_SWITCHES))
    if not described and save_3d is None:
        return
    if not isinstance(node, dict):
        node = out["output"] = {}
    formats = node.get("formats")
    if isinstance(formats, list):  # native list + visualization.save_3d
        if save_3d is not None:
            node["formats"] = [f for f in formats if f != "html"] + (["html"] if save_3d else [])
        return
    fm = dict(formats or {})
    for sub in fm:
        if sub not in ("detections", "heatmap"):
            raise ConfigError(f"{source}: output.formats.{sub}: unknown key; allowed: "
                              "detections, heatmap")
    det = fm.get("detections", "json")
    heat = fm.get("heatmap", "nifti")
    if det not in ("json", "csv", "both"):
        raise ConfigError(f"{source}: output.formats.detections: {det!r} is not one of "
                          "json, csv, both")
    if heat not in ("nifti", "numpy"):
        raise ConfigError(f"{source}: output.formats.heatmap: {heat!r} is not one of "
                          "nifti, numpy")
    switches = {k: node.pop(k, k != "save_report") for k in _OUTPUT_SWITCHES}
    for k, v in switches.items():
        if not isinstance(v, bool):
            raise ConfigError(f"{source}: output.{k}: expected true or false, got {v!r}")
    new: list[str] = []
    if switches["save_detections"]:
        new += ["json", "csv"] if det == "both" else [det]
    if switches["save_heatmap"]:
        new.append("heatmap" if heat == "nifti" else "heatmap_npy")
    if switches["save_visualization"]:
        new.append("png")
    if switches["save_report"]:
        new.append("pdf")
    if save_3d:
        new.append("html")
    node["formats"] = new
