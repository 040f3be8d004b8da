"""Label tables for reconstructed masks: value -> name, colour; 3D Slicer colour tables.

A label table file is JSON or YAML, either a list::

    {"labels": [{"value": 1, "name": "vertebra", "color": [241, 214, 145]}, ...]}

or a mapping ``value -> name`` or ``value -> {"name": ..., "color": [r, g, b]}``::

    1: vertebra
    2: {name: intervertebral foramen, color: [128, 174, 128]}

Value 0 is always background (added when missing). Colours are 8-bit RGB; labels
without a colour get one from a fixed palette.

The 3D Slicer colour table (``.ctbl``) has one line per label,
``value name R G B A`` (names without spaces, alpha 0 for background, 255 else), as
read by Slicer's ``vtkMRMLColorTableStorageNode``. The ITK-SNAP label description
(:meth:`LabelTable.to_itksnap`) is the text file ITK-SNAP's label editor imports
(Segmentation > Import Label Descriptions).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medinfer._atomic import write_text_atomic
from medinfer.errors import ConfigError

_PALETTE: tuple[tuple[int, int, int], ...] = (
    (241, 214, 145),
    (128, 174, 128),
    (216, 101, 79),
    (111, 184, 210),
    (220, 245, 20),
    (144, 238, 144),
    (183, 156, 220),
    (250, 250, 225),
    (230, 220, 70),
    (200, 200, 235),
)

#: int16 masks hold at most this label value
MAX_LABEL = 32767


@dataclass(frozen=True)
class Label:
    """One label: integer ``value`` in the mask, display ``name``, 8-bit RGB ``color``."""

    value: int
    name: str
    color: tuple[int, int, int]


class LabelTable:
    """Ordered label table (value -> :class:`Label`), value 0 = background."""

    def __init__(self, labels: Mapping[int, Label]) -> None:
        self._labels = dict(sorted(labels.items()))
        if 0 not in self._labels:
            self._labels = {0: Label(0, "background", (0, 0, 0)), **self._labels}

    # -------------------------------------------------------------- access
    def __contains__(self, value: object) -> bool:
        return value in self._labels

    def __iter__(self) -> Iterator[Label]:
        return iter(self._labels.values())

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, value: int) -> Label:
        return self._labels[value]

    @property
    def values(self) -> list[int]:
        """Label values in ascending order (0 first)."""
        return list(self._labels)

    # -------------------------------------------------------- constructors
    @classmethod
    def default(cls) -> LabelTable:
        """Spine default: 0 background, 1 vertebra, 2 intervertebral foramen, 3 sacrum,
        4 spinal canal."""
        names = ["vertebra", "intervertebral foramen", "sacrum", "spinal canal"]
        return cls.from_mapping({i + 1: n for i, n in enumerate(names)})

    @classmethod
    def from_mapping(cls, data: Any, source: str = "label table") -> LabelTable:
        """Build from the parsed JSON / YAML forms described in the module docstring.

        Raises
        ------
        ConfigError
            Wrong structure, non-integer or negative value, value above 32767 (int16
            mask), duplicate value, empty name, or a colour that is not 3 ints 0-255.
        """
        items: list[tuple[Any, Any]]
        if isinstance(data, Mapping) and "labels" in data:
            data = data["labels"]
        if isinstance(data, Mapping):
            items = list(data.items())
        elif isinstance(data, list):
            items = []
            for n, entry in enumerate(data):
                if not isinstance(entry, Mapping) or "value" not in entry:
                    raise ConfigError(
                        f"{source}: labels[{n}] must be an object with 'value' and 'name'"
                    )
                items.append((entry["value"], entry))
        else:
            raise ConfigError(
                f"{source}: expected a mapping value -> name or {{'labels': [...]}}, "
                f"got {type(data).__name__}"
            )
        labels: dict[int, Label] = {}
        for raw_value, entry in items:
            try:
                value = int(str(raw_value).strip())
            except ValueError:
                raise ConfigError(
                    f"{source}: label value {raw_value!r} is not an integer"
                ) from None
            if not 0 <= value <= MAX_LABEL:
                raise ConfigError(
                    f"{source}: label value {value} outside 0..{MAX_LABEL} (int16 mask)"
                )
            if value in labels:
                raise ConfigError(f"{source}: label value {value} given twice")
            if isinstance(entry, Mapping):
                name = entry.get("name")
                color = entry.get("color")
            else:
                name, color = entry, None
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"{source}: label {value} needs a non-empty name, got {name!r}")
            if color is None:
                rgb = (0, 0, 0) if value == 0 else _PALETTE[(value - 1) % len(_PALETTE)]
            else:
                if (
                    not isinstance(color, list | tuple)
                    or len(color) != 3
                    or not all(isinstance(c, int) and 0 <= c <= 255 for c in color)
                ):
                    raise ConfigError(
                        f"{source}: label {value} colour {color!r} must be [r, g, b], ints 0-255"
                    )
                rgb = (int(color[0]), int(color[1]), int(color[2]))
            labels[value] = Label(value, name.strip(), rgb)
        if not labels:
            raise ConfigError(f"{source}: no labels")
        return cls(labels)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LabelTable:
        """Read a ``.json``, ``.yaml`` or ``.yml`` label table.

        Raises
        ------
        ConfigError
            Unreadable file, invalid JSON/YAML or invalid content (message names the file).
        """
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"label table {p}: no such file")
        if p.stat().st_size > 10_000_000:
            raise ConfigError(f"label table {p}: file larger than 10 MB")
        text = p.read_text(encoding="utf-8")
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                data = yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"label table {p}: not valid JSON/YAML ({exc})") from None
        return cls.from_mapping(data, source=f"label table {p}")

    # --------------------------------------------------------------- output
    def to_ctbl(self) -> str:
        """3D Slicer colour table text: ``value name R G B A`` per line."""
        lines = [
            "# Color table file written by medinfer",
            f"# {len(self)} values",
        ]
        for lab in self:
            alpha = 0 if lab.value == 0 else 255
            name = "_".join(lab.name.split())
            r, g, b = lab.color
            lines.append(f"{lab.value} {name} {r} {g} {b} {alpha}")
        return "\n".join(lines) + "\n"

    def to_json_dict(self) -> dict[str, Any]:
        """``{"labels": [{"value", "name", "color"}]}`` (the file form it reads back)."""
        return {
            "labels": [
                {"value": lab.value, "name": lab.name, "color": list(lab.color)} for lab in self
            ]
        }

    def write_ctbl(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_ctbl` atomically."""
        return write_text_atomic(path, self.to_ctbl())

    def to_itksnap(self) -> str:
        """ITK-SNAP label description text (what its label editor exports and imports).

        One line per label: ``IDX R G B A VIS MSH "LABEL"`` with colour 0-255, opacity
        ``A`` in 0..1 (0 for background, 1 else), visibility and mesh flags (0 for
        background, 1 else) and the quoted name (double quotes in names become single
        quotes). Format: ITK-SNAP's ``LabelTableIO`` ("ITK-SnAP Label Description File").
        """
        lines = [
            "################################################",
            "# ITK-SnAP Label Description File",
            "# File format: ",
            "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
            "# Fields: ",
            "#    IDX:   Zero-based index ",
            "#    -R-:   Red color component (0..255)",
            "#    -G-:   Green color component (0..255)",
            "#    -B-:   Blue color component (0..255)",
            "#    -A-:   Label transparency (0.00 .. 1.00)",
            "#    VIS:   Label visibility (0 or 1)",
            "#    MSH:   Label mesh visibility (0 or 1)",
            "#  LABEL:   Label description ",
            "# Written by medinfer",
            "################################################",
        ]
        for lab in self:
            on = 0 if lab.value == 0 else 1
            r, g, b = lab.color
            name = lab.name.replace('"', "'")
            lines.append(
                f"{lab.value:5d} {r:5d} {g:4d} {b:4d} {on:8d} {on:2d} {on:2d}    \"{name}\""
            )
        return "\n".join(lines) + "\n"

    def write_itksnap(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_itksnap` atomically."""
        return write_text_atomic(path, self.to_itksnap())
