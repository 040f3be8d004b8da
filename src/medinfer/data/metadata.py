"""Dataset metadata: which images a training data folder holds, and their modality.

Folder layout::

    <data_dir>/
      raw/<study>/<image>          a NIfTI file (.nii, .nii.gz), a single DICOM file, or
                                   a DICOM folder (one series; nested folders allowed)
      metadata.json                written by DatasetMetadata.save
      processed/...                the cache (see medinfer.data.cache)

Hidden names (starting with ``.``) and files that are neither NIfTI nor DICOM are
ignored. The metadata holds file-system facts only; images are not decoded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from medinfer._atomic import write_text_atomic
from medinfer._jsonio import read_json_object
from medinfer.errors import ConfigError, parse_enum

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
RAW_DIR = "raw"
_FORMAT = "medinfer.data.metadata"
_VERSION = 1
#: refuse metadata files larger than this (bytes)
MAX_METADATA_BYTES = 512 * 1024 * 1024


class Mode(StrEnum):
    """Imaging modality of an image, which selects the intensity normalisation."""

    CT = "ct"
    MRI = "mri"


class SourceKind(StrEnum):
    """How an image is stored under ``raw/<study>/``."""

    NIFTI = "nifti"
    DICOM_FILE = "dicom_file"
    DICOM_FOLDER = "dicom_folder"


@dataclass(frozen=True)
class ImageEntry:
    """One image of the dataset.

    Attributes
    ----------
    study : study identifier (the folder name under ``raw/``).
    image : image name (file or folder name inside the study folder).
    path : path relative to the data folder, POSIX separators (``raw/<study>/<image>``).
    mode : ``"ct"`` or ``"mri"``.
    kind : ``"nifti"``, ``"dicom_file"`` or ``"dicom_folder"``.
    """

    study: str
    image: str
    path: str
    mode: str
    kind: str

    @property
    def key(self) -> tuple[str, str]:
        """``(study, image)``."""
        return (self.study, self.image)


def _is_dicom_file(p: Path) -> bool:
    if p.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with p.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def classify_source(p: Path) -> SourceKind | None:
    """Return how ``p`` stores an image, or None if it is not an image we read."""
    name = p.name.lower()
    if p.is_dir():
        return SourceKind.DICOM_FOLDER
    if name.endswith((".nii", ".nii.gz")):
        return SourceKind.NIFTI
    if _is_dicom_file(p):
        return SourceKind.DICOM_FILE
    return None


def _source_files(p: Path) -> list[Path]:
    if p.is_dir():
        return sorted(
            f
            for f in p.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
    return [p]


def source_signature(path: str | os.PathLike[str]) -> str:
    """Cheap change detector of a source file or folder: SHA-256 over names, sizes, mtimes (ns).

    Raises
    ------
    FileNotFoundError
        The source does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(2, "no such file or folder", str(p))
    h = hashlib.sha256()
    for f in _source_files(p):
        st = f.stat()
        rel = f.relative_to(p).as_posix() if p.is_dir() else f.name
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def source_digest(path: str | os.PathLike[str]) -> str:
    """Content hash of a source file or folder: SHA-256 over relative names and bytes."""
    p = Path(path)
    h = hashlib.sha256()
    for f in _source_files(p):
        rel = f.relative_to(p).as_posix() if p.is_dir() else ""
        h.update(rel.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\1")
    return h.hexdigest()


def _dicom_modality(p: Path) -> str | None:
    import pydicom

    for f in _source_files(p)[:8]:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True, force=False)
        except Exception:
            continue
        mod = str(getattr(ds, "Modality", "")).upper()
        if mod:
            return mod
    return None


def _resolve_mode(
    entry_rel: str, src: Path, kind: SourceKind, mapping: Mapping[str, str] | None
) -> Mode:
    if mapping:
        for pattern, mode in mapping.items():
            if (
                fnmatch.fnmatchcase(entry_rel.lower(), pattern.lower())
                or entry_rel.split("/")[0] == pattern
            ):
                return parse_enum(Mode, mode, f"mode_mapping[{pattern!r}]")
    if kind is not SourceKind.NIFTI:
        modality = _dicom_modality(src)
        if modality == "CT":
            return Mode.CT
        if modality in ("MR", "MRI"):
            return Mode.MRI
    raise UnmatchedModeError(entry_rel)


class UnmatchedModeError(ConfigError):
    """No ``mode_mapping`` pattern matches an image and it has no DICOM Modality CT/MR.

    ``image`` is the image path relative to ``raw/`` (``<study>/<image>``); ``study`` its
    study folder. The message shows the Python form of a fix; the command line
    (``medinfer data metadata``) shows its ``-m PATTERN=MODE`` form instead.
    """

    def __init__(self, image: str) -> None:
        self.image = image
        self.study = image.split("/")[0]
        super().__init__(
            f"mode_mapping: no pattern matches image {image!r} (and no DICOM Modality CT/MR "
            f"to fall back on); give a pattern such as {{'*': 'ct'}} or "
            f"{{'{self.study}': 'mri'}}"
        )

    def cli_message(self) -> str:
        """The same, with the command line's ``-m`` syntax."""
        return (f"--mode: no pattern matches image {self.image!r} (and no DICOM Modality "
                f"CT/MR to fall back on); give one, e.g. -m ct (all images), -m '*=ct' or "
                f"-m '{self.study}/*=mri'")


@dataclass
class DatasetMetadata:
    """The images of a data folder, with modality, in a stable (sorted) order.

    Attributes
    ----------
    images : list of :class:`ImageEntry`, sorted by ``(study, image)``.
    """

    images: list[ImageEntry]

    @classmethod
    def from_directory(
        cls,
        data_dir: str | os.PathLike[str],
        mode_mapping: Mapping[str, str] | str | None = None,
    ) -> DatasetMetadata:
        """Scan ``<data_dir>/raw/<study>/<image>``.

        Parameters
        ----------
        data_dir : the data folder (must contain ``raw/``).
        mode_mapping : ``"ct"`` / ``"mri"`` for every image, or a mapping from patterns to
            modes; a pattern is a study name or a case-insensitive ``fnmatch`` pattern on
            ``"<study>/<image>"`` (e.g. ``{"*/ct_*": "ct", "*/t1*": "mri"}``); the first
            match wins. Images that no pattern matches take their mode from the DICOM
            ``Modality`` (CT -> ct, MR -> mri).

        Raises
        ------
        ConfigError
            ``raw/`` is missing or empty, a mode is not ``ct``/``mri``, or an image has no mode.
        """
        root = Path(data_dir)
        raw = root / RAW_DIR
        if not raw.is_dir():
            raise ConfigError(f"data folder {root}: no '{RAW_DIR}/' sub-folder")
        mapping: Mapping[str, str] | None
        if isinstance(mode_mapping, str):
            mapping = {"*": parse_enum(Mode, mode_mapping, "mode_mapping").value}
        else:
            mapping = mode_mapping
        entries: list[ImageEntry] = []
        for study_dir in sorted(raw.iterdir()):
            if study_dir.name.startswith(".") or not study_dir.is_dir():
                continue
            for src in sorted(study_dir.iterdir()):
                if src.name.startswith("."):
                    continue
                kind = classify_source(src)
                if kind is None:
                    log.debug("ignoring %s: neither NIfTI nor DICOM", src)
                    continue
                rel = f"{study_dir.name}/{src.name}"
                mode = _resolve_mode(rel, src, kind, mapping)
                entries.append(
                    ImageEntry(
                        study=study_dir.name,
                        image=src.name,
                        path=src.relative_to(root).as_posix(),
                        mode=mode.value,
                        kind=kind.value,
                    )
                )
        if not entries:
            raise ConfigError(f"data folder {root}: no images under {RAW_DIR}/<study>/")
        return cls(entries)

    # ------------------------------------------------------------------ queries
    @property
    def studies(self) -> list[str]:
        """Sorted study identifiers."""
        return sorted({e.study for e in self.images})

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[ImageEntry]:
        return iter(self.images)

    def entry(self, study: str, image: str) -> ImageEntry:
        """The entry of ``(study, image)``; raises ConfigError if absent."""
        for e in self.images:
            if e.study == study and e.image == image:
                return e
        raise ConfigError(f"dataset metadata: no image {image!r} in study {study!r}")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "images": [asdict(e) for e in self.images],
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON atomically; a folder means ``<folder>/metadata.json``. Returns the file."""
        p = Path(path)
        if p.is_dir():
            p = p / METADATA_FILE
        write_text_atomic(p, json.dumps(self.to_dict(), indent=1) + "\n")
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DatasetMetadata:
        """Read JSON written by :meth:`save`; a folder means ``<folder>/metadata.json``.

        Raises
        ------
        ConfigError
            Missing file, invalid JSON, wrong format/version, or invalid entries.
        """
        p = Path(path)
        if p.is_dir():
            p = p / METADATA_FILE
        doc = read_json_object(
            p, max_bytes=MAX_METADATA_BYTES, error=ConfigError,
            missing=f"dataset metadata {p}: not found; build it with `medinfer data metadata`",
        )
        if doc.get("format") != _FORMAT:
            raise ConfigError(f"dataset metadata {p}: 'format' is not {_FORMAT!r}")
        if doc.get("version") != _VERSION:
            raise ConfigError(
                f"dataset metadata {p}: version {doc.get('version')!r}, expected {_VERSION}"
            )
        images = doc.get("images")
        if not isinstance(images, list):
            raise ConfigError(f"dataset metadata {p}: 'images' must be a list")
        entries = []
        for n, item in enumerate(images):
            try:
                e = ImageEntry(
                    **{k: str(item[k]) for k in ("study", "image", "path", "mode", "kind")}
                )
            except (KeyError, TypeError):
                raise ConfigError(
                    f"dataset metadata {p}: images[{n}] needs study, image, path, mode, kind"
                ) from None
            parse_enum(Mode, e.mode, f"images[{n}].mode")
            parse_enum(SourceKind, e.kind, f"images[{n}].kind")
            rel = Path(e.path)
            if rel.is_absolute() or ".." in rel.parts:
                raise ConfigError(
                    f"dataset metadata {p}: images[{n}].path {e.path!r} leaves the data folder"
                )
            for part in (e.study, e.image):
                if part in ("", ".", "..") or "/" in part or "\\" in part:
                    raise ConfigError(
                        f"dataset metadata {p}: images[{n}] has an unsafe name {part!r}"
                    )
            entries.append(e)
        return cls(entries)
