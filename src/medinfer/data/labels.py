"""Study-level labels for training: CSV (binary or multi-label) and JSON (multi-class).

Formats
-------
CSV
    A header row with a study column (default ``study``) and one or more label
    columns. One label column gives **binary** labels (values ``0``/``1``,
    ``true``/``false``, ``yes``/``no``); several give **multi-label** vectors (one 0/1
    column per label, column order kept). Empty cells are not allowed.
JSON
    An object ``{"<study>": "<class name>" | <class index>, ...}`` for **single-label
    multi-class** targets, or ``{"classes": [...], "labels": {...}}`` to fix the class
    order. Without ``classes`` the class names are sorted; integer values are class
    indices as they are.

Label values handed to models: binary -> float32 scalar, multi-label -> float32 ``(K,)``,
multi-class -> int64 class index.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from medinfer._jsonio import read_json_object
from medinfer.errors import ConfigError, parse_enum


class LabelKind(StrEnum):
    """What a study label is."""

    BINARY = "binary"
    MULTILABEL = "multilabel"
    MULTICLASS = "multiclass"


_TRUE = {"1", "1.0", "true", "yes", "y", "t"}
_FALSE = {"0", "0.0", "false", "no", "n", "f"}

#: refuse label files larger than this (bytes) before reading them
MAX_LABEL_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class StudyLabels:
    """Labels per study.

    Attributes
    ----------
    kind : :class:`LabelKind`.
    names : label names (multi-label: one per vector entry; binary: the column name;
        multi-class: class names, index = class id).
    values : study -> label (binary: float, multi-label: float32 ``(K,)``, multi-class: int).
    """

    kind: LabelKind
    names: tuple[str, ...]
    values: Mapping[str, Any] = field(default_factory=dict)

    def __contains__(self, study: object) -> bool:
        return study in self.values

    def __len__(self) -> int:
        return len(self.values)

    def get(self, study: str) -> np.ndarray | None:
        """The label of ``study`` as a numpy value (float32 scalar / (K,) / int64), or None."""
        if study not in self.values:
            return None
        v = self.values[study]
        if self.kind is LabelKind.MULTICLASS:
            return np.asarray(v, dtype=np.int64)
        return np.asarray(v, dtype=np.float32)


def _check_size(p: Path) -> None:
    if not p.is_file():
        raise ConfigError(f"study labels: {p} is not a file")
    if p.stat().st_size > MAX_LABEL_FILE_BYTES:
        raise ConfigError(f"study labels: {p} is larger than {MAX_LABEL_FILE_BYTES} bytes")


def _parse_binary(text: str, where: str) -> float:
    t = text.strip().lower()
    if t in _TRUE:
        return 1.0
    if t in _FALSE:
        return 0.0
    raise ConfigError(f"{where}: {text!r} is not a binary label; use 0/1, true/false or yes/no")


def load_study_labels_csv(
    path: str | os.PathLike[str], *, study_column: str = "study"
) -> StudyLabels:
    """Read binary (one label column) or multi-label (several columns) study labels from CSV.

    Raises
    ------
    ConfigError
        Missing study column, no label column, a non-binary value, an empty cell, or a
        study listed twice.
    """
    p = Path(path)
    _check_size(p)
    with p.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if study_column not in header:
            raise ConfigError(f"{p}: no {study_column!r} column; header is {header}")
        label_cols = [h for h in header if h != study_column]
        if not label_cols:
            raise ConfigError(f"{p}: no label column besides {study_column!r}")
        values: dict[str, Any] = {}
        for n, row in enumerate(reader, start=2):
            row = {(k or "").strip(): v for k, v in row.items()}
            study = (row.get(study_column) or "").strip()
            if not study:
                raise ConfigError(f"{p} line {n}: empty {study_column!r}")
            if study in values:
                raise ConfigError(f"{p} line {n}: study {study!r} is listed twice")
            vec = []
            for col in label_cols:
                cell = row.get(col)
                if cell is None or not cell.strip():
                    raise ConfigError(f"{p} line {n}: empty value in column {col!r}")
                vec.append(_parse_binary(cell, f"{p} line {n} column {col!r}"))
            values[study] = vec[0] if len(label_cols) == 1 else np.asarray(vec, dtype=np.float32)
    kind = LabelKind.BINARY if len(label_cols) == 1 else LabelKind.MULTILABEL
    return StudyLabels(kind=kind, names=tuple(label_cols), values=values)


def load_study_labels_json(path: str | os.PathLike[str]) -> StudyLabels:
    """Read single-label multi-class study labels from JSON (see module docstring).

    Raises
    ------
    ConfigError
        Not a JSON object, a value that is neither a class name nor an index, an index
        outside ``classes``, or a class name not in ``classes``.
    """
    p = Path(path)
    _check_size(p)
    doc = read_json_object(p, max_bytes=MAX_LABEL_FILE_BYTES, error=ConfigError)
    classes: list[str] | None = None
    raw = doc
    if "labels" in doc and isinstance(doc.get("labels"), dict):
        raw = doc["labels"]
        if "classes" in doc:
            if not isinstance(doc["classes"], list) or not all(
                isinstance(c, str) for c in doc["classes"]
            ):
                raise ConfigError(f"{p}: 'classes' must be a list of strings")
            classes = list(doc["classes"])
    for study, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ConfigError(
                f"{p}: label of study {study!r} is {v!r}; expected a class name or index"
            )
    if classes is None:
        names = sorted({v for v in raw.values() if isinstance(v, str)})
        n_int = max((v + 1 for v in raw.values() if isinstance(v, int)), default=0)
        if names and n_int:
            raise ConfigError(f"{p}: mixes class names and indices; give 'classes' to order them")
        classes = names if names else [str(i) for i in range(n_int)]
    index = {c: i for i, c in enumerate(classes)}
    values: dict[str, int] = {}
    for study, v in raw.items():
        if isinstance(v, str):
            if v not in index:
                raise ConfigError(f"{p}: class {v!r} of study {study!r} not in classes {classes}")
            values[str(study)] = index[v]
        else:
            if not 0 <= v < len(classes):
                raise ConfigError(
                    f"{p}: class index {v} of study {study!r} outside 0..{len(classes) - 1}"
                )
            values[str(study)] = int(v)
    return StudyLabels(kind=LabelKind.MULTICLASS, names=tuple(classes), values=values)


def load_study_labels(
    path: str | os.PathLike[str],
    *,
    kind: LabelKind | str | None = None,
    study_column: str = "study",
) -> StudyLabels:
    """Read study labels, choosing the format by suffix (``.csv`` or ``.json``).

    Parameters
    ----------
    path : label file.
    kind : optional expected :class:`LabelKind` (``binary``, ``multilabel``,
        ``multiclass``); a mismatch raises.
    study_column : CSV column holding the study identifier.

    Raises
    ------
    ConfigError
        Unknown suffix, invalid content (see the format readers), or a kind mismatch.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        labels = load_study_labels_csv(p, study_column=study_column)
    elif suffix == ".json":
        labels = load_study_labels_json(p)
    else:
        raise ConfigError(f"study labels: {p} has suffix {suffix!r}; expected '.csv' or '.json'")
    if kind is not None:
        want = parse_enum(LabelKind, kind, "label kind")
        if labels.kind is not want:
            raise ConfigError(
                f"study labels: {p} holds {labels.kind.value} labels, not {want.value}"
            )
    return labels
