"""Per-slice polygon prediction files: schema, validation, parsing.

One JSON file per slice, ``{patient_id}_slice{index:04d}.json``, validated against
the JSON Schema shipped as ``medinfer/slices/prediction.schema.json`` (draft
2020-12)::

    {"patient_id": "case01", "slice_index": 12, "image_width": 256, "image_height": 256,
     "normalized": false,
     "predictions": [{"class_id": 1, "confidence": 0.93,
                      "polygon": [[x, y], ...], "holes": [[[x, y], ...]]}]}

Coordinates: pixel coordinates of the exported PNG, ``x`` = column, ``y`` = row,
pixel centres at integer coordinates. With ``"normalized": true`` coordinates are
fractions of the image size (YOLO-seg style). Convention ``"center"`` (default):
``x_px = x * W``, ``y_px = y * H`` in the pixel-centre frame, which is what
Ultralytics' ``masks.xyn`` holds (contour pixel indices divided by the image size);
convention ``"edge"``: 0 and 1 are the outer image edges, ``x_px = x * W - 0.5``.
``holes`` is a medinfer extension (rings removed from the polygon).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medinfer.errors import MedinferError, ResourceLimitError

#: prediction file names: ``{patient_id}_slice{index}.json`` (index with >= 4 digits)
PREDICTION_FILE_RE = re.compile(r"^(?P<pid>.+)_slice(?P<index>\d+)\.json$")

#: refuse prediction files larger than this (bytes)
MAX_PREDICTION_FILE_BYTES = 64 * 1024 * 1024


class NormalizedConvention(StrEnum):
    """Meaning of normalised coordinates 0..1 (see the module docstring)."""

    CENTER = "center"
    EDGE = "edge"


@dataclass(frozen=True)
class SlicePolygon:
    """One predicted region on a slice, in pixel coordinates (x = column, y = row).

    ``outer`` and each hole are float64 arrays ``(n, 2)``; ``order`` is the position
    in the file (0-based); ``confidence`` is None when the file gives none.
    """

    class_id: int
    outer: npt.NDArray[np.float64]
    holes: tuple[npt.NDArray[np.float64], ...] = ()
    confidence: float | None = None
    order: int = 0


@dataclass(frozen=True)
class SlicePrediction:
    """The parsed content of one prediction file."""

    path: Path
    patient_id: str
    slice_index: int
    image_width: int
    image_height: int
    normalized: bool
    polygons: tuple[SlicePolygon, ...] = field(default_factory=tuple)


@lru_cache(maxsize=1)
def prediction_schema() -> dict[str, Any]:
    """The JSON Schema of prediction files (``prediction.schema.json``), as a dict."""
    text = (
        resources.files("medinfer.slices")
        .joinpath("prediction.schema.json")
        .read_text(encoding="utf-8")
    )
    schema: dict[str, Any] = json.loads(text)
    return schema


@lru_cache(maxsize=1)
def _validator() -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(prediction_schema())


def _ring_ok(ring: Any) -> bool:
    if type(ring) is not list:
        return False
    for pt in ring:
        if type(pt) is not list or len(pt) != 2:
            return False
        if type(pt[0]) not in (int, float) or type(pt[1]) not in (int, float):
            return False
    return True


def _skeleton_if_rings_valid(data: Any) -> Any:
    """``data`` with every polygon/hole ring replaced by ``[]`` and identical predictions
    merged, or None if any ring is not a list of ``[number, number]`` (or the structure
    is unexpected). Valid exactly when ``data`` is valid."""
    if not isinstance(data, dict) or not isinstance(data.get("predictions"), list):
        return None
    preds: dict[str, Any] = {}
    for pred in data["predictions"]:
        if not isinstance(pred, dict):
            return None
        new = dict(pred)
        if "polygon" in pred:
            if not _ring_ok(pred["polygon"]):
                return None
            new["polygon"] = []
        if "holes" in pred:
            holes = pred["holes"]
            if type(holes) is not list or not all(_ring_ok(h) for h in holes):
                return None
            new["holes"] = [[] for _ in holes]
        preds.setdefault(json.dumps(new, sort_keys=True), new)
    out = dict(data)
    out["predictions"] = list(preds.values())
    return out


def validate_prediction(data: Any, source: str = "prediction") -> None:
    """Validate parsed JSON against :func:`prediction_schema`.

    Raises
    ------
    MedinferError
        First schema violation, with its JSON path and ``source`` in the message.
    """
    validator = _validator()
    # jsonschema walks every [x, y] point through $refs (seconds for a few 10^4 points).
    # When all rings are plainly lists of two JSON numbers - exactly what the "ring"
    # schema accepts - validate a copy with the rings emptied and duplicates merged;
    # if that copy (or a ring) is invalid, validate the whole document so that the
    # error message points at the offending item.
    skeleton = _skeleton_if_rings_valid(data)
    if skeleton is not None and validator.is_valid(skeleton):
        return
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        raise MedinferError(
            f"{source}: does not follow the slice prediction schema at {where}: {err.message}"
        )


def parse_prediction_file(
    path: str | Path,
    convention: NormalizedConvention | str = NormalizedConvention.CENTER,
) -> SlicePrediction:
    """Read, validate and convert one prediction file to pixel coordinates.

    Parameters
    ----------
    path : the ``.json`` file.
    convention : how ``"normalized": true`` coordinates map to pixels (module docstring).

    Raises
    ------
    MedinferError
        Unreadable or malformed JSON, schema violation, non-finite coordinates or
        confidence, or a ``patient_id`` / ``slice_index`` that disagrees with the file
        name; the message names the file.
    ResourceLimitError
        File larger than 64 MiB.
    """
    from medinfer.errors import parse_enum

    conv = parse_enum(NormalizedConvention, convention, "normalized convention")
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_PREDICTION_FILE_BYTES:
        raise ResourceLimitError(
            f"{p}: prediction file of {size} bytes exceeds {MAX_PREDICTION_FILE_BYTES}"
        )
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedinferError(f"{p}: malformed JSON ({exc})") from None
    validate_prediction(data, source=str(p))
    m = PREDICTION_FILE_RE.match(p.name)
    if m is not None:
        if data["patient_id"] != m.group("pid"):
            raise MedinferError(
                f"{p}: patient_id {data['patient_id']!r} does not match the file name "
                f"(expected {m.group('pid')!r})"
            )
        if int(data["slice_index"]) != int(m.group("index")):
            raise MedinferError(
                f"{p}: slice_index {data['slice_index']} does not match the file name "
                f"(expected {int(m.group('index'))})"
            )
    width, height = int(data["image_width"]), int(data["image_height"])
    normalized = bool(data.get("normalized", False))
    if normalized:
        scale = np.array([width, height], dtype=np.float64)
        offset = -0.5 if conv is NormalizedConvention.EDGE else 0.0
    else:
        scale, offset = np.ones(2), 0.0

    def ring(points: list[list[float]], where: str) -> npt.NDArray[np.float64]:
        arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if not np.all(np.isfinite(arr)):
            raise MedinferError(f"{p}: {where} has non-finite coordinates")
        return arr * scale + offset

    polygons = []
    for n, pred in enumerate(data["predictions"]):
        conf = pred.get("confidence")
        if conf is not None and not math.isfinite(conf):
            raise MedinferError(f"{p}: predictions/{n}/confidence is not finite")
        polygons.append(
            SlicePolygon(
                class_id=int(pred["class_id"]),
                outer=ring(pred["polygon"], f"predictions/{n}/polygon"),
                holes=tuple(
                    ring(h, f"predictions/{n}/holes/{k}")
                    for k, h in enumerate(pred.get("holes", []))
                ),
                confidence=None if conf is None else float(conf),
                order=n,
            )
        )
    return SlicePrediction(
        path=p,
        patient_id=str(data["patient_id"]),
        slice_index=int(data["slice_index"]),
        image_width=width,
        image_height=height,
        normalized=normalized,
        polygons=tuple(polygons),
    )


def find_prediction_files(folder: str | Path) -> dict[str, dict[int, Path]]:
    """Prediction files under ``folder`` (recursive), grouped ``patient_id -> index -> path``.

    Raises
    ------
    MedinferError
        ``folder`` is not a folder, or two files give the same patient and slice
        index (e.g. ``a_slice0001.json`` and ``a_slice00001.json`` or two sub-folders).
    """
    root = Path(folder)
    if not root.is_dir():
        raise MedinferError(f"predictions folder {root}: no such folder")
    found: dict[str, dict[int, Path]] = {}
    for f in sorted(root.rglob("*_slice*.json")):
        m = PREDICTION_FILE_RE.match(f.name)
        if m is None or not f.is_file() or f.name.startswith("."):
            continue
        pid, idx = m.group("pid"), int(m.group("index"))
        slot = found.setdefault(pid, {})
        if idx in slot:
            raise MedinferError(
                f"patient {pid!r}: two prediction files for slice {idx}: {slot[idx]} and {f}"
            )
        slot[idx] = f
    return found
