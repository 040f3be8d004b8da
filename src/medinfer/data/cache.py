"""uint8 cache of prepared images, built in parallel processes, crash-safe and resumable.

Layout (``<data_dir>/processed/``)::

    processed/<study>/<image>/
        brain.npy blood.npy bone.npy   CT: one uint8 (D, H, W) file per window
        mri.npy                        MRI: one uint8 (D, H, W) file
        mask.npy                       uint8 (D/4, H/16, W/16) token background mask (1 = bg)
        meta.json                      commit record (written last), see below
    processed/.build.lock              held (flock) while a build runs

Values are stored as ``round(255 * v)`` for ``v`` in [0, 1] and read back as
``k * float32(1/255)`` (float32; quantisation error <= 1/510). Arrays are plain ``.npy`` files
(no compression) so a cached load is one read plus a table look-up.

Crash safety
------------
Every file is written to a hidden temporary name in the same folder and renamed
(:func:`medinfer._atomic.atomic_path`). ``meta.json`` is the commit record: it is removed
before an image is rebuilt and written after all its arrays, so an entry without
``meta.json`` is incomplete and is rebuilt; readers refuse it. A killed build leaves at
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
import multiprocessing
import os
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medinfer._atomic import atomic_path, write_text_atomic
from medinfer.data.metadata import DatasetMetadata, ImageEntry, source_digest, source_signature
from medinfer.data.prepare import (
    PrepareConfig,
    PreparedVolume,
    load_image,
    prepare_volume_or_reason,
)
from medinfer.errors import ConfigError, InvalidImageError, MedinferError

log = logging.getLogger(__name__)

PROCESSED_DIR = "processed"
META_FILE = "meta.json"
MASK_FILE = "mask.npy"
LOCK_FILE = ".build.lock"
_FORMAT = "medinfer.data.cache"
_VERSION = 1
#: uint8 -> float32 scale (k -> k * float32(1 / 255), 255 -> exactly 1.0)
_SCALE = np.float32(1.0 / 255.0)
_MAX_META_BYTES = 16 * 1024 * 1024


def quantize(values: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint8 ``round(255 v)`` (values outside are clipped)."""
    return np.clip(np.rint(np.asarray(values, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def dequantize(values: np.ndarray) -> np.ndarray:
    """uint8 -> float32 ``k * float32(1 / 255)`` (within 1 ulp of k / 255; 0 -> 0, 255 -> 1)."""
    return np.multiply(np.asarray(values, dtype=np.uint8), _SCALE, dtype=np.float32)


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


# ============================================================================ helpers
def _entry_dir(processed: Path, entry: ImageEntry) -> Path:
    return processed / entry.study / entry.image


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > _MAX_META_BYTES:
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("version") != _VERSION:
        return None
    return doc


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


def _save_npy(path: Path, arr: np.ndarray) -> int:
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
    return path.stat().st_size


def _meta_for(
    entry: ImageEntry, signature: str, digest: str, config: PrepareConfig
) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "study": entry.study,
        "image": entry.image,
        "source": entry.path,
        "mode": entry.mode,
        "source_signature": signature,
        "source_digest": digest,
        "config_digest": config.digest(),
    }


def _write_entry(
    folder: Path, entry: ImageEntry, prepared: PreparedVolume, base: dict[str, Any]
) -> None:
    files: dict[str, int] = {}
    for name, arr in prepared.channels.items():
        files[f"{name}.npy"] = _save_npy(folder / f"{name}.npy", quantize(arr))
    files[MASK_FILE] = _save_npy(folder / MASK_FILE, prepared.background.astype(np.uint8))
    for stale in folder.glob("*.npy"):
        if stale.name not in files:
            stale.unlink()
    meta = dict(base)
    meta.update(
        status="ok",
        reason=None,
        view=prepared.view,
        channels=list(prepared.channels),
        shape=list(prepared.shape),
        token_grid=list(prepared.token_grid),
        foreground_tokens=int((prepared.background == 0).sum()),
        affine=[[float(v) for v in row] for row in prepared.affine],
        source_shape=list(prepared.source_shape),
        source_spacing=list(prepared.source_spacing),
        files=files,
    )
    write_text_atomic(folder / META_FILE, json.dumps(meta, indent=1) + "\n")


def build_one(
    data_dir: str, entry: ImageEntry, config: PrepareConfig, force: bool
) -> tuple[str, str]:
    """Build (or confirm) the cache entry of one image; runs in a worker process.

    Returns ``(status, detail)`` with status ``"built"``, ``"unusable"``, ``"up_to_date"``.
    Unexpected errors propagate (the caller records them as failures).
    """
    root = Path(data_dir)
    folder = _entry_dir(root / PROCESSED_DIR, entry)
    src = root / entry.path
    signature = source_signature(src)
    digest = source_digest(src)
    meta_path = folder / META_FILE
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
    base = _meta_for(entry, signature, digest, config)
    try:
        volume = load_image(src)
        result = prepare_volume_or_reason(volume, entry.mode, config=config)
    except (MedinferError, OSError, EOFError, zlib.error) as exc:
        result = f"cannot read: {exc}"
    if isinstance(result, str):
        for stale in folder.glob("*.npy"):
            stale.unlink()
        meta = dict(base, status="unusable", reason=result, files={})
        write_text_atomic(meta_path, json.dumps(meta, indent=1) + "\n")
        return "unusable", result
    _write_entry(folder, entry, result, base)
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
    def _is_fresh(self, entry: ImageEntry) -> bool:
        folder = _entry_dir(self.processed, entry)
        meta = _read_meta(folder / META_FILE)
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
        progress: Callable[[int, int], None] | None = None,
    ) -> BuildReport:
        """Prepare every image of the metadata and write it to the cache.

        Parameters
        ----------
        num_workers : worker processes (``spawn`` start method); ``0`` or ``1`` builds in
            this process; None = ``os.cpu_count()``.
        force : rebuild every entry even if it is up to date.
        progress : optional ``progress(done, total)`` callback.

        Returns
        -------
        BuildReport

        Raises
        ------
        ConfigError
            Another build holds the lock, or ``num_workers`` is negative.
        """
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
                else:
                    report.up_to_date += 1
                if progress is not None:
                    progress(done, total)

            if workers <= 1 or total <= 1:
                for entry in todo:
                    try:
                        record(entry, *build_one(str(self.data_dir), entry, self.config, force))
                    except Exception as exc:  # record, go on with the other images
                        log.exception("cache build failed for %s/%s", entry.study, entry.image)
                        report.failed[f"{entry.study}/{entry.image}"] = repr(exc)
            else:
                ctx = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=min(workers, total), mp_context=ctx) as pool:
                    futures: dict[Future[tuple[str, str]], ImageEntry] = {
                        pool.submit(build_one, str(self.data_dir), e, self.config, force): e
                        for e in todo
                    }
                    for fut in as_completed(futures):
                        entry = futures[fut]
                        try:
                            record(entry, *fut.result())
                        except Exception as exc:  # record, go on with the other images
                            log.error(
                                "cache build failed for %s/%s: %r", entry.study, entry.image, exc
                            )
                            report.failed[f"{entry.study}/{entry.image}"] = repr(exc)
        return report

    # ------------------------------------------------------------------ read
    def entry_meta(self, study: str, image: str) -> dict[str, Any]:
        """The ``meta.json`` of a cached image (status ``ok`` or ``unusable``).

        Raises
        ------
        InvalidImageError
            Not cached (no or invalid commit record).
        """
        for part in (study, image):
            if part in ("", ".", "..") or "/" in part or "\\" in part:
                raise InvalidImageError(f"cache: unsafe study/image name {part!r}")
        meta = _read_meta(self.processed / study / image / META_FILE)
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
        study, image : names as in the metadata.
        window : one channel (``"brain"``, ``"blood"``, ``"bone"`` for CT, ``"mri"``);
            None = all channels.

        Returns
        -------
        float32 ``(C, D, H, W)`` (axes as :mod:`medinfer.data.prepare`), values
        ``k * float32(1 / 255)`` (see :func:`dequantize`).

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
        shape = tuple(meta["shape"])
        folder = self.processed / study / image
        out = np.empty((len(names), *shape), dtype=np.float32)
        for i, name in enumerate(names):
            arr = self._load_npy(folder / f"{name}.npy", shape)
            np.multiply(arr, _SCALE, out=out[i], dtype=np.float32)
        return out

    def load_mask(self, study: str, image: str) -> np.ndarray:
        """The uint8 token background mask ``(D/4, H/16, W/16)`` (1 = background)."""
        meta = self._ok_meta(study, image)
        return self._load_npy(self.processed / study / image / MASK_FILE, tuple(meta["token_grid"]))

    @staticmethod
    def _load_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise InvalidImageError(f"cache file {path}: unreadable ({exc})") from None
        if arr.dtype != np.uint8 or arr.shape != shape:
            raise InvalidImageError(
                f"cache file {path}: {arr.dtype} {arr.shape}, expected uint8 {shape}"
            )
        return arr

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
            folder = _entry_dir(self.processed, entry)
            meta = _read_meta(folder / META_FILE)
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
            header = 128
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
