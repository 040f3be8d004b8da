"""Study-level labels for training: CSV (binary or multi-label) and JSON (multi-class).

Formats
-------
CSV
    A header row; the first column is the study identifier whatever its header
    (``study_id``, ``study``, ...; or name it with ``study_column``), every other column
    is a label column. One label column of ``0``/``1`` (``true``/``false``,
    ``yes``/``no``) gives **binary** labels, one column of class indices ``0, 1, 2, ...``
    **multi-class** labels; several 0/1 columns give **multi-label** vectors (column
    order kept). Empty cells are not allowed.
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


def _parse_class_index(text: str) -> int | None:
    t = text.strip()
    try:
        v = float(t)
    except ValueError:
        return None
    if not np.isfinite(v) or v < 0 or v != int(v):
        return None
    return int(v)


def load_study_labels_csv(
    path: str | os.PathLike[str], *, study_column: str | None = None
) -> StudyLabels:
    """Read study labels from CSV: binary, multi-label or multi-class.

    Parameters
    ----------
    path : CSV file with a header row.
    study_column : the column holding the study identifier; None (default) = the first
        column, whatever its header (``study_id``, ``study``, ``patient``, ...). Every
        other column is a label column.

    Kinds: one label column of 0/1 values (also ``true``/``false``, ``yes``/``no``) ->
    **binary** (float32 scalar); one label column with non-negative integers beyond 1
    (``0, 1, 2, ...``) -> **multi-class** (int64 class index; classes ``"0"`` ..
    ``str(max)``); several 0/1 columns -> **multi-label** (float32 ``(K,)``, column
    order kept).

    Raises
    ------
    ConfigError
        Missing study column, no label column, a value that fits none of the kinds,
        an empty cell, or a study listed twice.
    """
    p = Path(path)
    _check_size(p)
    with p.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ConfigError(f"{p}: empty CSV; expected a header row") from None
        if not header or not header[0]:
            raise ConfigError(f"{p}: no header; expected e.g. 'study_id,label'")
        col = header[0] if study_column is None else study_column
        if col not in header:
            raise ConfigError(f"{p}: no {col!r} column; header is {header}")
        pos = header.index(col)
        label_cols = [(i, h) for i, h in enumerate(header) if i != pos]
        if not label_cols:
            raise ConfigError(f"{p}: no label column besides {col!r}")
        cells: dict[str, list[str]] = {}
        for n, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ConfigError(
                    f"{p} line {n}: {len(row)} values, the header has {len(header)} columns"
                )
            study = row[pos].strip()
            if not study:
                raise ConfigError(f"{p} line {n}: empty {col!r}")
            if study in cells:
                raise ConfigError(f"{p} line {n}: study {study!r} is listed twice")
            vals = []
            for i, name in label_cols:
                if not row[i].strip():
                    raise ConfigError(f"{p} line {n}: empty value in column {name!r}")
                vals.append(row[i])
            cells[study] = vals
    names = tuple(h for _, h in label_cols)
    if len(label_cols) == 1:
        column = [v[0] for v in cells.values()]
        if all(c.strip().lower() in _TRUE | _FALSE for c in column):
            values: dict[str, Any] = {
                s: _parse_binary(v[0], f"{p} study {s!r}") for s, v in cells.items()
            }
            return StudyLabels(kind=LabelKind.BINARY, names=names, values=values)
        classes = {s: _parse_class_index(v[0]) for s, v in cells.items()}
        bad = [(s, cells[s][0]) for s, c in classes.items() if c is None]
        if bad:
            raise ConfigError(
                f"{p} column {names[0]!r}: study {bad[0][0]!r} has {bad[0][1]!r}; expected 0/1 "
                "(binary) or a class index 0, 1, 2, ... (multi-class)"
            )
        top = max(int(c) for c in classes.values() if c is not None)
        return StudyLabels(
            kind=LabelKind.MULTICLASS,
            names=tuple(str(i) for i in range(top + 1)),
            values={s: int(c) for s, c in classes.items() if c is not None},
        )
    values = {}
    for s, vals in cells.items():
        values[s] = np.asarray(
            [
                _parse_binary(v, f"{p} study {s!r} column {name!r}")
                for v, name in zip(vals, names, strict=True)
            ],
            dtype=np.float32,
        )
    return StudyLabels(kind=LabelKind.MULTILABEL, names=names, values=values)


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
    study_column: str | None = None,
) -> StudyLabels:
    """Read study labels, choosing the format by suffix (``.csv`` or ``.json``).

    Parameters
    ----------
    path : label file.
    kind : optional expected :class:`LabelKind` (``binary``, ``multilabel``,
        ``multiclass``); a mismatch raises.
    study_column : CSV column holding the study identifier; None = the first column.

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
