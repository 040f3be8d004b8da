"""uint8 cache of prepared images, built in parallel processes, crash-safe and resumable.

Layout (``<data_dir>/processed/``, the NeuroVFM layout)::

    processed/<study>/
        <stem>.pt                      MRI: uint8 tensor [1, D, H, W]
        <stem>_brain.pt                CT: one uint8 tensor [1, D, H, W] per window
        <stem>_blood.pt
        <stem>_bone.pt
        <stem>_mask.pt                 uint8 tensor [N]: 1 = background token, 0 = foreground
                                       (C order over the token grid, shared by all windows)
        <stem>.json                    commit record with the geometry (written last)
    processed/.build.lock              held (flock) while a build runs

``<stem>`` is the image name without its suffix (``T1.nii.gz`` -> ``T1``, a DICOM
folder ``ct_scan/`` -> ``ct_scan``); if two images of a study share a stem, both use
their full name. Tensors are plain ``torch.save`` files of uint8 tensors, read with
``torch.load(weights_only=True)``. The commit record holds the view, grid shape, token
grid, affine (index (d, h, w) -> RAS+ mm), source facts and file sizes.

Caches written by medinfer before this layout (``processed/<study>/<image>/`` with
``brain.npy ... mask.npy meta.json``, format version 1) are still read by
:meth:`CacheManager.load_image`, :meth:`CacheManager.load_mask` and
:class:`~medinfer.data.ImageDataset`; :meth:`CacheManager.build_cache` rewrites such
entries in the current layout.

Values are stored as ``round(255 * v)`` for ``v`` in [0, 1] and read back as
``k * float32(1/255)`` (float32; quantisation error <= 1/510).

Crash safety
------------
Every file is written to a hidden temporary name in the same folder and renamed
(:func:`medinfer._atomic.atomic_path`). ``<stem>.json`` is the commit record: it is
removed before an image is rebuilt and written after all its arrays, so an entry without
it is incomplete and is rebuilt; readers refuse it. A killed build leaves at
most hidden temporary files (removed by the next build) and incomplete entries (rebuilt
by the next build).

Rebuild rules
-------------
An entry is up to date when its ``meta.json`` names the same preparation parameters
(:meth:`PrepareConfig.digest`) and the same source: the stat signature (names, sizes,
mtimes) matches, or, if it does not, the SHA-256 content digest still matches (then only
the signature is refreshed). Images that cannot be used are recorded with
``"status": "unusable"`` and the reason, and are retried only when the source or the
parameters change (or with ``force``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from medinfer._atomic import write_bytes_atomic, write_text_atomic
from medinfer.data.metadata import DatasetMetadata, ImageEntry, source_digest, source_signature
from medinfer.data.prepare import (
    PrepareConfig,
    PreparedVolume,
    load_image,
    prepare_volume_or_reason,
)
from medinfer.errors import ConfigError, InvalidImageError, MedinferError, parse_enum

log = logging.getLogger(__name__)

PROCESSED_DIR = "processed"
META_FILE = "meta.json"
MASK_FILE = "mask.npy"
LOCK_FILE = ".build.lock"
_FORMAT = "medinfer.data.cache"
#: version of the commit record: 2 = NeuroVFM ``.pt`` layout, 1 = the earlier ``.npy`` one
_VERSION = 2
_V1 = 1
_MASK_SUFFIX = "_mask"
#: uint8 -> float32 scale (k -> k * float32(1 / 255), 255 -> exactly 1.0)
_SCALE = np.float32(1.0 / 255.0)
_MAX_META_BYTES = 16 * 1024 * 1024


def quantize(values: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint8 ``round(255 v)`` (values outside are clipped)."""
    return np.clip(np.rint(np.asarray(values, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def dequantize(values: np.ndarray) -> np.ndarray:
    """uint8 -> float32 ``k * float32(1 / 255)`` (within 1 ulp of k / 255; 0 -> 0, 255 -> 1)."""
    return np.multiply(np.asarray(values, dtype=np.uint8), _SCALE, dtype=np.float32)


class OnError(StrEnum):
    """What :meth:`CacheManager.build_cache` does when images fail."""

    RAISE = "raise"
    SKIP = "skip"


@dataclass
class BuildReport:
    """Counts of one :meth:`CacheManager.build_cache` run.

    Attributes
    ----------
    built : images prepared and written.
    unusable : images recorded as unusable (reason in their ``meta.json``).
    up_to_date : images already cached for the current source and parameters.
    failed : ``"study/image"`` -> error message for unexpected errors (not cached;
        retried next run).
    """

    built: int = 0
    unusable: int = 0
    up_to_date: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "built": self.built,
            "unusable": self.unusable,
            "up_to_date": self.up_to_date,
            "failed": dict(self.failed),
        }


class CacheBuildError(MedinferError):
    """Images that failed in :meth:`CacheManager.build_cache`; ``report`` has the rest."""

    def __init__(self, message: str, report: BuildReport) -> None:
        super().__init__(message)
        self.report = report


# ============================================================================ helpers
def _load_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Read a uint8 array of the version-1 cache layout."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InvalidImageError(f"cache file {path}: unreadable ({exc})") from None
    if arr.dtype != np.uint8 or arr.shape != shape:
        raise InvalidImageError(
            f"cache file {path}: {arr.dtype} {arr.shape}, expected uint8 {shape}"
        )
    return arr


def _read_meta(path: Path, version: int = _VERSION) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > _MAX_META_BYTES:
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("version") != version:
        return None
    return doc


def image_stem(image: str) -> str:
    """Cache file stem of an image name: without ``.nii.gz`` / ``.nii`` / ``.dcm``."""
    low = image.lower()
    for suf in (".nii.gz", ".nii", ".dcm"):
        if low.endswith(suf) and len(image) > len(suf):
            return image[: -len(suf)]
    return image


def channel_file(stem: str, channel: str, mode: str) -> str:
    """File name of one channel: ``<stem>.pt`` (MRI) or ``<stem>_<window>.pt`` (CT)."""
    return f"{stem}.pt" if mode == "mri" else f"{stem}_{channel}.pt"


def mask_file(stem: str) -> str:
    """File name of the token mask: ``<stem>_mask.pt``."""
    return f"{stem}{_MASK_SUFFIX}.pt"


def _save_pt(path: Path, arr: np.ndarray) -> int:
    import io

    import torch

    buf = io.BytesIO()  # archive name "archive", not the (random) temporary file name
    torch.save(torch.from_numpy(np.ascontiguousarray(arr)), buf)
    write_bytes_atomic(path, buf.getvalue())
    return path.stat().st_size


def _load_pt(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    import pickle

    import torch

    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise InvalidImageError(f"cache file {path}: unreadable ({exc})") from None
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or tuple(t.shape) != shape:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise InvalidImageError(f"cache file {path}: {got}, expected uint8 {shape}")
    return t.numpy()


def _files_complete(folder: Path, meta: dict[str, Any]) -> bool:
    files = meta.get("files", {})
    if not isinstance(files, dict):
        return False
    for name, size in files.items():
        try:
            if (folder / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _meta_for(
    entry: ImageEntry, stem: str, signature: str, digest: str, config: PrepareConfig
) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "study": entry.study,
        "image": entry.image,
        "stem": stem,
        "source": entry.path,
        "mode": entry.mode,
        "source_signature": signature,
        "source_digest": digest,
        "config_digest": config.digest(),
    }


def _own_files(stem: str, config: PrepareConfig) -> list[str]:
    names = {channel_file(stem, "mri", "mri"), mask_file(stem)}
    names.update(channel_file(stem, w, "ct") for w in config.ct_windows)
    return sorted(names)


def _write_entry(
    folder: Path, stem: str, prepared: PreparedVolume, base: dict[str, Any], config: PrepareConfig
) -> None:
    files: dict[str, int] = {}
    channel_files: dict[str, str] = {}
    for name, arr in prepared.channels.items():
        fname = channel_file(stem, name, prepared.mode)
        channel_files[name] = fname
        files[fname] = _save_pt(folder / fname, quantize(arr)[None])
    files[mask_file(stem)] = _save_pt(
        folder / mask_file(stem), prepared.background.astype(np.uint8).reshape(-1)
    )
    for stale in _own_files(stem, config):
        if stale not in files:
            with contextlib.suppress(FileNotFoundError):
                (folder / stale).unlink()
    meta = dict(base)
    meta.update(
        status="ok",
        reason=None,
        view=prepared.view,
        channels=list(prepared.channels),
        channel_files=channel_files,
        mask_file=mask_file(stem),
        shape=list(prepared.shape),
        token_grid=list(prepared.token_grid),
        foreground_tokens=int((prepared.background == 0).sum()),
        affine=[[float(v) for v in row] for row in prepared.affine],
        source_shape=list(prepared.source_shape),
        source_spacing=list(prepared.source_spacing),
        files=files,
    )
    write_text_atomic(folder / f"{stem}.json", json.dumps(meta, indent=1) + "\n")


def build_one(
    data_dir: str, entry: ImageEntry, config: PrepareConfig, force: bool, stem: str | None = None
) -> tuple[str, str]:
    """Build (or confirm) the cache entry of one image; runs in a worker process.

    Returns ``(status, detail)`` with status ``"built"``, ``"unusable"``, ``"up_to_date"``.
    ``stem`` is the file stem (default :func:`image_stem` of the image name). Unexpected
    errors propagate (the caller records them as failures).
    """
    root = Path(data_dir)
    stem = stem or image_stem(entry.image)
    folder = root / PROCESSED_DIR / entry.study
    src = root / entry.path
    signature = source_signature(src)
    digest = source_digest(src)
    meta_path = folder / f"{stem}.json"
    old = _read_meta(meta_path)
    if (
        not force
        and old is not None
        and old.get("config_digest") == config.digest()
        and old.get("source_digest") == digest
        and old.get("status") in ("ok", "unusable")
        and _files_complete(folder, old)
    ):
        if old.get("source_signature") != signature:
            old["source_signature"] = signature
            write_text_atomic(meta_path, json.dumps(old, indent=1) + "\n")
        return "up_to_date", ""
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        meta_path.unlink()  # un-commit before touching the arrays
    base = _meta_for(entry, stem, signature, digest, config)
    try:
        volume = load_image(src)
    except (MedinferError, OSError, EOFError, zlib.error) as exc:
        raise InvalidImageError(f"{entry.path}: cannot read: {exc}") from None
    result = prepare_volume_or_reason(volume, entry.mode, config=config)
    if isinstance(result, str):
        for stale in _own_files(stem, config):
            with contextlib.suppress(FileNotFoundError):
                (folder / stale).unlink()
        meta = dict(base, status="unusable", reason=result, files={})
        write_text_atomic(meta_path, json.dumps(meta, indent=1) + "\n")
        return "unusable", result
    _write_entry(folder, stem, result, base, config)
    return "built", ""


def _clean_temporaries(processed: Path) -> int:
    n = 0
    for p in processed.rglob(".*.part*"):
        if p.is_file():
            p.unlink()
            n += 1
    return n


@contextlib.contextmanager
def _build_lock(processed: Path) -> Iterator[None]:
    processed.mkdir(parents=True, exist_ok=True)
    fd = os.open(processed / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"cache {processed}: another build_cache is running (lock {LOCK_FILE} held)"
                ) from None
            raise
        yield
    finally:
        os.close(fd)  # closing releases the lock; a killed process releases it too


# ============================================================================ manager
class CacheManager:
    """The uint8 cache of a data folder (see the module docstring for layout and rules).

    Parameters
    ----------
    data_dir : data folder with ``raw/`` and ``metadata.json``.
    metadata : the dataset metadata; read from ``<data_dir>/metadata.json`` if None.
    config : preparation parameters (:class:`PrepareConfig` defaults if None).

    Raises
    ------
    ConfigError
        No metadata given and ``metadata.json`` is missing or invalid.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        metadata: DatasetMetadata | None = None,
        config: PrepareConfig | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.processed = self.data_dir / PROCESSED_DIR
        self.metadata = metadata if metadata is not None else DatasetMetadata.load(self.data_dir)
        self.config = config or PrepareConfig()
        self._config_digest = self.config.digest()

    # ------------------------------------------------------------------ build
    def stem(self, entry: ImageEntry) -> str:
        """Cache file stem of ``entry`` (:func:`image_stem`; the full image name when two
        images of its study would share a stem)."""
        stem = image_stem(entry.image)
        clash = [
            e
            for e in self.metadata.images
            if e.study == entry.study and e.image != entry.image and image_stem(e.image) == stem
        ]
        return entry.image if clash else stem

    def _record(self, entry: ImageEntry) -> dict[str, Any] | None:
        return _read_meta(self.processed / entry.study / f"{self.stem(entry)}.json")

    def _is_fresh(self, entry: ImageEntry) -> bool:
        folder = self.processed / entry.study
        meta = self._record(entry)
        if meta is None or meta.get("config_digest") != self._config_digest:
            return False
        if meta.get("status") not in ("ok", "unusable"):
            return False
        try:
            sig = source_signature(self.data_dir / entry.path)
        except FileNotFoundError:
            return False
        return sig == meta.get("source_signature") and _files_complete(folder, meta)

    def build_cache(
        self,
        num_workers: int | None = None,
        force: bool = False,
        *,
        on_error: OnError | str = "raise",
        progress: Callable[[int, int], None] | None = None,
    ) -> BuildReport:
        """Prepare every image of the metadata and write it to the cache.

        Works from any caller, including a plain script without
        ``if __name__ == "__main__":``: the worker processes are fresh interpreters
        running ``python -m medinfer.data._cache_worker`` (they import medinfer only, never
        the caller's module), fed one image at a time over a pipe.

        Parameters
        ----------
        num_workers : worker processes; ``0`` or ``1`` builds in this process; None =
            ``os.cpu_count()``.
        force : rebuild every entry even if it is up to date.
        on_error : ``"raise"`` (default): after building everything else, raise
            :class:`CacheBuildError` naming every image that failed (unreadable file,
            worker crash, unexpected error); ``"skip"``: log them and return, the
            failures listed in :attr:`BuildReport.failed`. Images that can be read but
            not used (too few slices, no foreground, ...) are never failures: they are
            recorded as ``unusable`` with their reason.
        progress : optional ``progress(done, total)`` callback (called in this thread).

        Returns
        -------
        BuildReport

        Raises
        ------
        CacheBuildError
            Some images failed and ``on_error="raise"``.
        ConfigError
            Another build holds the lock, ``num_workers`` is negative, or ``on_error``
            is not ``raise`` / ``skip``.
        """
        policy = parse_enum(OnError, on_error, "on_error")
        if num_workers is not None and num_workers < 0:
            raise ConfigError(f"num_workers: expected >= 0, got {num_workers}")
        workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        report = BuildReport()
        with _build_lock(self.processed):
            removed = _clean_temporaries(self.processed)
            if removed:
                log.info("removed %d temporary files left by an interrupted build", removed)
            todo = [e for e in self.metadata.images if force or not self._is_fresh(e)]
            report.up_to_date = len(self.metadata.images) - len(todo)
            total, done = len(todo), 0

            def record(entry: ImageEntry, status: str, detail: str) -> None:
                nonlocal done
                done += 1
                if status == "built":
                    report.built += 1
                elif status == "unusable":
                    report.unusable += 1
                    log.warning("%s/%s unusable: %s", entry.study, entry.image, detail)
                elif status == "up_to_date":
                    report.up_to_date += 1
                else:
                    log.error("cache build failed for %s: %s", entry.path, detail)
                    report.failed[f"{entry.study}/{entry.image}"] = detail
                if progress is not None:
                    progress(done, total)

            if workers <= 1 or total <= 1:
                for entry in todo:
                    try:
                        status, detail = build_one(
                            str(self.data_dir), entry, self.config, force, self.stem(entry)
                        )
                    except Exception as exc:  # record, go on with the other images
                        status, detail = "failed", f"{type(exc).__name__}: {exc}"
                    record(entry, status, detail)
            else:
                from medinfer.data._cache_pool import run_pool

                tasks = [(e, self.stem(e)) for e in todo]
                for entry, status, detail in run_pool(
                    str(self.data_dir), tasks, self.config, force, min(workers, total)
                ):
                    record(entry, status, detail)
        if report.failed and policy is OnError.RAISE:
            listed = "; ".join(f"{k}: {v}" for k, v in sorted(report.failed.items()))
            raise CacheBuildError(
                f"build_cache {self.data_dir}: {len(report.failed)} of "
                f"{len(self.metadata.images)} images failed ({listed}); fix or remove them, "
                "or pass on_error='skip'",
                report,
            )
        return report

    # ------------------------------------------------------------------ read
    def _find_entry(self, study: str, image: str) -> ImageEntry | None:
        for e in self.metadata.images:
            if e.study == study and (e.image == image or self.stem(e) == image):
                return e
        return None

    def entry_meta(self, study: str, image: str) -> dict[str, Any]:
        """The commit record of a cached image (status ``ok`` or ``unusable``).

        ``image`` is the image name (``T1.nii.gz``) or its cache stem (``T1``). The current
        layout's ``processed/<study>/<stem>.json`` is read first, then the earlier layout's
        ``processed/<study>/<image>/meta.json``; the record's ``"version"`` tells which.

        Raises
        ------
        InvalidImageError
            Not cached (no or invalid commit record), or an unsafe name.
        """
        for part in (study, image):
            if part in ("", ".", "..") or "/" in part or "\\" in part:
                raise InvalidImageError(f"cache: unsafe study/image name {part!r}")
        entry = self._find_entry(study, image)
        stem = self.stem(entry) if entry is not None else image_stem(image)
        meta = _read_meta(self.processed / study / f"{stem}.json")
        if meta is None:
            old_name = entry.image if entry is not None else image
            meta = _read_meta(self.processed / study / old_name / META_FILE, _V1)
        if meta is None:
            raise InvalidImageError(
                f"cache: {study}/{image} is not cached (run build_cache / `medinfer data cache`)"
            )
        return meta

    def _ok_meta(self, study: str, image: str) -> dict[str, Any]:
        meta = self.entry_meta(study, image)
        if meta.get("status") != "ok":
            raise InvalidImageError(f"cache: {study}/{image} is unusable: {meta.get('reason')}")
        return meta

    def load_image(self, study: str, image: str, window: str | None = None) -> np.ndarray:
        """Read a cached image as float32 in [0, 1].

        Parameters
        ----------
        study : study name.
        image : image name (``T1.nii.gz``, ``ct_scan``) or its cache stem (``T1``).
        window : one channel (``"brain"``, ``"blood"``, ``"bone"`` for CT, ``"mri"``);
            None = all channels.

        Returns
        -------
        float32 ``(C, D, H, W)`` (axes as :mod:`medinfer.data.prepare`; ``[1, D, H, W]``
        for one window or an MRI), values ``k * float32(1 / 255)`` (see
        :func:`dequantize`), in [0, 1].

        Raises
        ------
        InvalidImageError
            Not cached, unusable, or a cache file that does not match its record.
        ConfigError
            ``window`` is not a channel of this image.
        """
        meta = self._ok_meta(study, image)
        names = list(meta["channels"])
        if window is not None:
            if window not in names:
                raise ConfigError(f"window: {window!r} is not one of {names} of {study}/{image}")
            names = [window]
        shape = tuple(int(v) for v in meta["shape"])
        out = np.empty((len(names), *shape), dtype=np.float32)
        for i, name in enumerate(names):
            if meta["version"] == _V1:
                arr = _load_npy(self.processed / study / meta["image"] / f"{name}.npy", shape)
            else:
                fname = meta["channel_files"][name]
                arr = _load_pt(self.processed / study / fname, (1, *shape))[0]
            np.multiply(arr, _SCALE, out=out[i], dtype=np.float32)
        return np.clip(out, 0.0, 1.0, out=out)

    def load_mask(self, study: str, image: str) -> np.ndarray:
        """The uint8 token background mask ``(D/4, H/16, W/16)`` (1 = background).

        (Stored flat, ``[N]`` in C order, in the current layout; returned on the grid.)
        """
        meta = self._ok_meta(study, image)
        grid = tuple(int(v) for v in meta["token_grid"])
        if meta["version"] == _V1:
            return _load_npy(self.processed / study / meta["image"] / MASK_FILE, grid)
        n = int(np.prod(grid))
        return _load_pt(self.processed / study / meta["mask_file"], (n,)).reshape(grid)

    # ------------------------------------------------------------------ stats
    def get_cache_stats(self) -> dict[str, Any]:
        """Summary of the cache against the metadata.

        Returns
        -------
        dict with ``images`` (in the metadata), ``cached`` (status ok and files present),
        ``unusable``, ``missing`` (no commit record), ``stale`` (source signature or
        parameters differ), ``bytes`` (cache array files), ``float32_bytes`` (the same
        arrays as float32 ``.npy``), ``size_ratio`` (``bytes / float32_bytes``),
        ``tokens``, ``foreground_tokens``, ``by_mode`` and ``by_view`` counts, and
        ``unusable_reasons`` (``"study/image"`` -> reason).
        """
        stats: dict[str, Any] = {
            "images": len(self.metadata.images),
            "cached": 0,
            "unusable": 0,
            "missing": 0,
            "stale": 0,
            "bytes": 0,
            "float32_bytes": 0,
            "tokens": 0,
            "foreground_tokens": 0,
            "by_mode": {},
            "by_view": {},
            "unusable_reasons": {},
        }
        for entry in self.metadata.images:
            meta = self._record(entry)
            if meta is None:
                stats["missing"] += 1
                continue
            if not self._is_fresh(entry):
                stats["stale"] += 1
                continue
            if meta.get("status") == "unusable":
                stats["unusable"] += 1
                stats["unusable_reasons"][f"{entry.study}/{entry.image}"] = meta.get("reason")
                continue
            stats["cached"] += 1
            files = meta.get("files", {})
            stats["bytes"] += int(sum(files.values()))
            header = 128  # float32 .npy of the same arrays, the reference of size_ratio
            vox = int(np.prod(meta["shape"]))
            ntok = int(np.prod(meta["token_grid"]))
            stats["float32_bytes"] += len(meta["channels"]) * (4 * vox + header) + 4 * ntok + header
            stats["tokens"] += ntok
            stats["foreground_tokens"] += int(meta.get("foreground_tokens", 0))
            stats["by_mode"][entry.mode] = stats["by_mode"].get(entry.mode, 0) + 1
            view = str(meta.get("view"))
            stats["by_view"][view] = stats["by_view"].get(view, 0) + 1
        stats["size_ratio"] = (
            stats["bytes"] / stats["float32_bytes"] if stats["float32_bytes"] else None
        )
        return stats
