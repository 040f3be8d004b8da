"""Export a 3D scan (or label volume) as 2D PNG slices plus an exact-inversion metadata JSON.

Files written into the output folder:

- ``{patient_id}_slice{index:04d}.png``, one per slice along the slicing axis, shown
  in the display convention of :mod:`medinfer.slices.geometry` (radiological view);
  images: 8-bit grey after an intensity window; labels: pixel value = label id
  (uint8, or uint16 when a label exceeds 255), no windowing;
- ``{patient_id}_export.json``: source path, grid shape, spacing, affine, slicing
  axis, the exact array-axis <-> row/column mapping with flips, pixel -> voxel and
  pixel -> RAS matrices, and the intensity window.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medinfer._atomic import atomic_path, write_text_atomic
from medinfer.errors import ConfigError, InvalidImageError, MedinferError
from medinfer.slices.geometry import SliceAxis, SliceMapping, mapping_from_affine
from medinfer.volume import Volume

#: metadata format tag and version
METADATA_FORMAT = "medinfer-slices-export"
METADATA_VERSION = 1

#: CT window presets, (centre, width) in HU
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "soft-tissue": (50.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "spine": (250.0, 1000.0),
}

_PATIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm")


def metadata_name(patient_id: str) -> str:
    """File name of the export metadata of ``patient_id``: ``{patient_id}_export.json``."""
    return f"{patient_id}_export.json"


def slice_name(patient_id: str, index: int, suffix: str = ".png") -> str:
    """``{patient_id}_slice{index:04d}{suffix}``."""
    return f"{patient_id}_slice{index:04d}{suffix}"


def strip_image_suffix(name: str) -> str:
    """File name without its image suffix (``case01.nii.gz`` -> ``case01``)."""
    low = name.lower()
    for suf in _IMAGE_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def check_patient_id(patient_id: str) -> str:
    """Return ``patient_id`` if it is safe in file names, else raise ConfigError."""
    if not isinstance(patient_id, str) or not _PATIENT_ID_RE.match(patient_id):
        raise ConfigError(
            f"patient id {patient_id!r}: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit); pass --patient-id to choose one"
        )
    return patient_id


@dataclass(frozen=True)
class IntensityWindow:
    """Linear grey mapping ``uint8 = round(255 * clip((v - low) / (high - low), 0, 1))``."""

    name: str
    low: float
    high: float

    def apply(self, values: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        """Map an array of intensities to uint8 (same shape); NaN becomes 0."""
        v = (np.asarray(values, dtype=np.float64) - self.low) / (self.high - self.low)
        v = np.nan_to_num(v, nan=0.0, posinf=1.0, neginf=0.0)
        return np.rint(np.clip(v, 0.0, 1.0) * 255.0).astype(np.uint8)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "low": self.low,
            "high": self.high,
            "center": (self.low + self.high) / 2,
            "width": self.high - self.low,
            "formula": "uint8 = round(255 * clip((v - low) / (high - low), 0, 1))",
        }


def parse_window(window: str | tuple[float, float], data: npt.NDArray[Any]) -> IntensityWindow:
    """Resolve a window specification against the image data.

    Parameters
    ----------
    window : a preset name (:data:`WINDOW_PRESETS`, HU), ``"auto"`` (0.5th-99.5th
        percentile of the data, for MRI or unknown intensities), ``"minmax"``,
        ``"CENTER,WIDTH"`` (e.g. ``"40,80"``) or a tuple ``(center, width)``.
    data : the image intensities (any shape).

    Raises
    ------
    ConfigError
        Unknown preset, unparsable numbers, non-positive width.
    """
    name: str
    if isinstance(window, tuple):
        center, width = float(window[0]), float(window[1])
        name = f"{center:g},{width:g}"
    else:
        key = str(window).strip().lower()
        if key in WINDOW_PRESETS:
            center, width = WINDOW_PRESETS[key]
            name = key
        elif key in ("auto", "minmax"):
            finite = np.asarray(data, dtype=np.float64)
            finite = finite[np.isfinite(finite)]
            if finite.size == 0:
                lo, hi = 0.0, 1.0
            elif key == "auto":
                lo, hi = (float(x) for x in np.percentile(finite, [0.5, 99.5]))
            else:
                lo, hi = float(finite.min()), float(finite.max())
            if hi <= lo:
                hi = lo + 1.0
            return IntensityWindow(key, lo, hi)
        else:
            parts = key.split(",")
            try:
                if len(parts) != 2:
                    raise ValueError
                center, width = float(parts[0]), float(parts[1])
            except ValueError:
                allowed = ", ".join(["auto", "minmax", *WINDOW_PRESETS, "CENTER,WIDTH"])
                raise ConfigError(
                    f"window: {window!r} is not allowed; choose one of {allowed}"
                ) from None
            name = f"{center:g},{width:g}"
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise ConfigError(f"window: centre {center} / width {width}: width must be > 0")
    return IntensityWindow(name, center - width / 2, center + width / 2)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_slices` wrote."""

    patient_id: str
    metadata_path: Path
    slice_paths: tuple[Path, ...]
    mapping: SliceMapping
    metadata: dict[str, Any]


def _write_png(array2d: npt.NDArray[Any], path: Path) -> None:
    from PIL import Image

    arr = np.ascontiguousarray(array2d)
    img = Image.fromarray(arr)  # uint8 -> "L", uint16 -> "I;16"
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _label_array(volume: Volume, source: str) -> npt.NDArray[Any]:
    data = volume.channel(0)
    if data.size == 0:
        raise InvalidImageError(f"{source}: empty label volume")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.rint(data)):
            raise InvalidImageError(
                f"{source}: --labels needs integer label values, found non-integer values"
            )
    lo, hi = float(data.min()), float(data.max())
    if lo < 0 or hi > 65535:
        raise InvalidImageError(
            f"{source}: label values must lie in 0..65535 for PNG, found {lo:g}..{hi:g}"
        )
    return data.astype(np.uint8 if hi <= 255 else np.uint16)


def export_slices(
    scan: str | os.PathLike[str] | Volume,
    output_dir: str | os.PathLike[str],
    *,
    axis: SliceAxis | str = SliceAxis.AXIAL,
    window: str | tuple[float, float] = "auto",
    labels: bool = False,
    patient_id: str | None = None,
) -> ExportResult:
    """Write the slices of a scan as PNG files plus ``{patient_id}_export.json``.

    Parameters
    ----------
    scan : a path readable by :func:`medinfer.io.load`, or a :class:`Volume` with one
        channel ``(1, I, J, K)`` (affine voxel -> RAS+ mm).
    output_dir : folder for the PNGs and the metadata (created if missing). Export
        images and label volumes into different folders (same file names).
    axis : ``"axial"`` (default), ``"coronal"`` or ``"sagittal"``; display
        orientation from the affine, see :mod:`medinfer.slices.geometry`.
    window : intensity window for images (:func:`parse_window`); ignored with
        ``labels=True``.
    labels : write a label volume: pixel value = label id (uint8, uint16 above 255).
    patient_id : name prefix of the files; default: the file name without suffix.

    Returns
    -------
    ExportResult : paths, the :class:`SliceMapping` and the metadata dict.

    Raises
    ------
    InvalidImageError
        Unreadable scan, more than one channel, non-integer or out-of-range labels.
    ConfigError
        Bad axis, window or patient id, or the folder already holds an export of the
        other kind (image vs labels) for this patient.
    """
    from medinfer import io

    if isinstance(scan, Volume):
        volume = scan
        src = volume.meta.get("source")
        source_path: str | None = str(Path(src).resolve()) if src else None
    else:
        source_path = str(Path(scan).resolve())
        volume = io.load(scan)
    source = source_path or "volume"
    if patient_id is None:
        if source_path is None:
            raise ConfigError("export_slices: a Volume without meta['source'] needs patient_id")
        patient_id = strip_image_suffix(Path(source_path).name)
    check_patient_id(patient_id)
    if volume.num_channels != 1:
        raise InvalidImageError(
            f"{source}: {volume.num_channels} channels; slices export needs a single-channel "
            "3-D scan"
        )
    mapping = mapping_from_affine(volume.affine, volume.spatial_shape, axis)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / metadata_name(patient_id)
    content = "labels" if labels else "image"
    if meta_path.is_file():
        try:
            previous = json.loads(meta_path.read_text(encoding="utf-8")).get("content")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            previous = None
        if previous is not None and previous != content:
            raise ConfigError(
                f"{meta_path}: folder already holds a {previous!r} export of {patient_id!r}; "
                f"write the {content!r} export into another folder"
            )

    win: IntensityWindow | None
    if labels:
        data = _label_array(volume, source)
        win = None
    else:
        raw = volume.channel(0)
        win = parse_window(window, raw)
        data = win.apply(raw)
    stack = mapping.to_slices(data)
    paths = []
    for index in range(mapping.num_slices):
        p = out / slice_name(patient_id, index)
        _write_png(stack[index], p)
        paths.append(p)

    spacing = volume.spacing
    metadata: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
        "patient_id": patient_id,
        "content": content,
        "source": source_path,
        "shape": list(volume.spatial_shape),
        "spacing_mm": [float(s) for s in spacing],
        "affine": volume.affine.tolist(),
        "frame": "RAS+ mm (voxel (i, j, k, 1) -> world)",
        "orientation": volume.orientation,
        "slicing": mapping.to_dict(volume.affine),
        "display_convention": (
            "axial/coronal radiological view (patient right on image left), "
            "sagittal anterior on image left; superior/anterior up"
        ),
        "pixel_spacing_mm": {
            "column": float(spacing[mapping.col_axis]),
            "row": float(spacing[mapping.row_axis]),
            "slice": float(spacing[mapping.slice_axis]),
        },
        "window": None if win is None else win.to_dict(),
        "png_dtype": str(data.dtype),
        "file_pattern": "{patient_id}_slice{index:04d}.png",
        "files": [p.name for p in paths],
    }
    write_text_atomic(meta_path, json.dumps(metadata, indent=2) + "\n")
    return ExportResult(patient_id, meta_path, tuple(paths), mapping, metadata)


def read_export_metadata(path: str | os.PathLike[str]) -> tuple[dict[str, Any], SliceMapping]:
    """Read ``{patient_id}_export.json``; return the dict and its :class:`SliceMapping`.

    Raises
    ------
    MedinferError
        Malformed JSON, wrong format tag, missing keys, or inconsistent shape/affine
        (message names the file).
    """
    from medinfer.volume import validate_affine

    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedinferError(f"{p}: malformed export metadata JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != METADATA_FORMAT:
        raise MedinferError(f"{p}: not a medinfer slices export metadata file")
    try:
        mapping = SliceMapping.from_dict(data["slicing"], source=str(p))
        validate_affine(data["affine"], name=f"{p}: affine")
        shape = tuple(int(s) for s in data["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, MedinferError):
            raise
        raise MedinferError(f"{p}: invalid export metadata ({exc!r})") from None
    if shape != mapping.shape:
        raise MedinferError(f"{p}: shape {shape} disagrees with slicing grid {mapping.shape}")
    return data, mapping
