"""Safe unpacking of untrusted payloads (raw files, TAR and zip archives) for a federated node.

A federated analysis node receives bytes from sites it does not control. Every payload is
written under a work folder that nothing escapes from:

* raw (non-archive) payloads are written as one file under their normalised name;
* TAR archives (plain, gzip, bzip2, xz; read as a *stream*, ``tarfile`` mode ``r|*``) and
  zip archives are unpacked member by member in chunks of 1 MiB, never a whole member in
  memory.

Refused, each reported as a :class:`RefusedInput` (source, member, reason) and never
silently dropped:

* per member: absolute paths, ``..`` components, NUL / control characters, empty names;
  symbolic and hard links, character / block devices, FIFOs; a name already taken by an
  earlier member (names compared case-folded after Unicode NFC normalisation, so two
  members never overwrite each other) or whose path runs through an earlier file; a member
  larger than ``max_file_bytes``; a member that is itself an archive (TAR / zip, also
  compressed TARs);
* per archive (everything unpacked from it is removed again): more than ``max_members``
  members, more than ``max_total_bytes`` unpacked, or an expansion ratio above
  ``max_ratio`` once more than ``ratio_floor_bytes`` were unpacked (decompression bombs);
  an unreadable archive.

Names are normalised: backslashes become ``/``, ``.`` components and repeated slashes go,
Unicode NFC. Directory members create nothing (folders come from file paths).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import shutil
import stat
import tarfile
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

__all__ = ["UnpackLimits", "RefusedInput", "Unpacked", "SafeUnpacker", "archive_kind"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class UnpackLimits:
    """Caps for unpacking one request (bytes unless stated)."""

    max_members: int = 4096
    max_file_bytes: int = 2 << 30
    max_total_bytes: int = 8 << 30
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 64 << 20


@dataclass(frozen=True)
class RefusedInput:
    """One refused payload or archive member: ``source`` (payload name), ``member`` (the
    member name as stored in the archive, or ``None`` for the payload itself), ``reason``."""

    source: str
    member: str | None
    reason: str

    def as_dict(self) -> dict[str, str | None]:
        return {"source": self.source, "member": self.member, "reason": self.reason}


@dataclass
class Unpacked:
    """What :class:`SafeUnpacker` wrote: ``files`` (path -> payload name it came from) and
    ``refused`` (every refused payload or member)."""

    files: dict[Path, str] = field(default_factory=dict)
    refused: list[RefusedInput] = field(default_factory=list)


class _ArchiveRefused(Exception):
    """An archive-level limit was hit: the whole archive is refused."""


def archive_kind(head: bytes) -> str | None:
    """``"zip"``, ``"tar"``, ``"gz"``, ``"bz2"``, ``"xz"`` from the first bytes (>= 512 for a
    plain TAR), else ``None``. Compressed kinds are only TARs if their content is one."""
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[:2] == b"\x1f\x8b":
        return "gz"
    if head[:3] == b"BZh":
        return "bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    return None


def _decompressed_head(data: bytes, kind: str, n: int = 512) -> bytes:
    """The first ``n`` decompressed bytes of a gz/bz2/xz payload (b"" if unreadable)."""
    try:
        if kind == "gz":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[: 1 << 16], n)
        if kind == "bz2":
            return bz2.BZ2Decompressor().decompress(data[: 1 << 16], n)
        if kind == "xz":
            return lzma.LZMADecompressor().decompress(data[: 1 << 16], n)
    except (OSError, EOFError, zlib.error, lzma.LZMAError):
        return b""
    return b""


def payload_kind(data: bytes) -> str | None:
    """``"tar"`` (plain or compressed), ``"zip"`` or ``None`` (a raw file, e.g. NIfTI)."""
    kind = archive_kind(data[:512])
    if kind in ("gz", "bz2", "xz"):
        head = _decompressed_head(data, kind)
        return "tar" if archive_kind(head) == "tar" else None
    return kind


def normalise_name(raw: str) -> tuple[str | None, str]:
    """``(normalised relative POSIX name, "")`` or ``(None, reason)`` for an unsafe name."""
    if not raw:
        return None, "empty name"
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        return None, "name contains a NUL or control character"
    name = unicodedata.normalize("NFC", raw.replace("\\", "/"))
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None, "absolute path"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None, "path contains a '..' component"
    if not parts:
        return None, "empty name"
    if any(len(p.encode()) > 200 for p in parts):
        return None, "a path component is longer than 200 bytes"
    return "/".join(parts), ""


class SafeUnpacker:
    """Unpack payloads under ``root`` (see the module docstring); one instance per request.

    Parameters
    ----------
    root : the work folder (created); nothing is written outside it.
    limits : :class:`UnpackLimits` (member count and sizes apply per archive, the total
        across the request).
    """

    def __init__(self, root: str | Path, limits: UnpackLimits | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.limits = limits or UnpackLimits()
        self.result = Unpacked()
        self._total = 0
        self._count = 0
        self._dirs: dict[int, set[str]] = {}

    # ------------------------------------------------------------------ public API
    def add(self, name: str, data: bytes) -> None:
        """Write one payload (raw file or archive) named ``name`` into its own sub-folder."""
        self._count += 1
        folder = self.root / f"src{self._count:04d}"
        kind = payload_kind(data)
        if kind is None:
            norm, reason = normalise_name(name)
            if norm is None:
                self._refuse(name, None, reason)
                return
            if len(data) > self.limits.max_file_bytes:
                self._refuse(name, None, f"{len(data)} bytes; the per-file limit is "
                             f"{self.limits.max_file_bytes}")
                return
            if self._total + len(data) > self.limits.max_total_bytes:
                self._refuse(name, None, "the request's total size limit "
                             f"({self.limits.max_total_bytes} bytes) is reached")
                return
            # raw files of one request share a folder (a DICOM series sent file by file);
            # a name already there gets a numbered suffix, nothing is overwritten
            raw_dir = self.root / "raw"
            raw_dir.mkdir(exist_ok=True)
            leaf = PurePosixPath(norm).name
            path, n = raw_dir / leaf, 1
            while path.exists():
                n += 1
                path = raw_dir / f"{n}_{leaf}"
            with open(path, "xb") as fh:
                fh.write(data)
            self._total += len(data)
            self.result.files[path] = name
            return
        start = len(self.result.files)
        refused_before = len(self.result.refused)
        try:
            if kind == "zip":
                self._unpack_zip(name, data, folder)
            else:
                self._unpack_tar(name, data, folder)
        except _ArchiveRefused as exc:
            self._drop_from(name, start, folder, refused_before)
            self._refuse(name, None, f"archive refused: {exc}")
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error,
                lzma.LZMAError, NotImplementedError) as exc:
            self._drop_from(name, start, folder, refused_before)
            self._refuse(name, None, f"unreadable {kind} archive ({type(exc).__name__}: {exc})")

    # ------------------------------------------------------------------ internals
    def _refuse(self, source: str, member: str | None, reason: str) -> None:
        self.result.refused.append(RefusedInput(source, member, reason))

    def _drop_from(self, source: str, start: int, folder: Path, refused_before: int) -> None:
        for path in list(self.result.files)[start:]:
            self._total -= path.stat().st_size if path.exists() else 0
            del self.result.files[path]
        del self.result.refused[refused_before:]
        shutil.rmtree(folder, ignore_errors=True)

    def _target(self, source: str, raw: str, folder: Path, taken: dict[str, str],
                files: set[str]) -> Path | None:
        norm, reason = normalise_name(raw)
        if norm is None:
            self._refuse(source, raw, reason)
            return None
        key = norm.casefold()
        if key in taken:
            self._refuse(source, raw, f"duplicate name: {norm!r} was already written from "
                         f"member {taken[key]!r}; not overwritten")
            return None
        parts = key.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in files:
                self._refuse(source, raw, f"path runs through the earlier file "
                             f"{'/'.join(norm.split('/')[:i])!r}")
                return None
        if key in self._dirs.setdefault(id(files), set()):
            self._refuse(source, raw, f"name {norm!r} is a folder of earlier members")
            return None
        target = folder / norm
        # defence in depth: the resolved parent must stay under the work folder
        resolved_parent = target.parent.resolve()
        if not resolved_parent.is_relative_to(self.root):
            self._refuse(source, raw, "path resolves outside the work folder")
            return None
        taken[key] = raw
        files.add(key)
        self._dirs[id(files)].update("/".join(parts[:i]) for i in range(1, len(parts)))
        return target

    def _copy(self, source: str, raw: str, src: IO[bytes], target: Path,
              compressed_so_far: Iterator[int]) -> bool:
        """Stream one member; False (and nothing left behind) if it was refused."""
        target.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        head = b""
        with open(target, "xb") as out:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                if not head:
                    head = chunk[:512]
                    if payload_kind(chunk[: 1 << 16]) is not None and not raw.lower().endswith(
                            (".nii.gz", ".nii")):
                        out.close()
                        target.unlink()
                        self._refuse(source, raw, "an archive inside an archive is not "
                                     "unpacked")
                        return False
                size += len(chunk)
                self._total += len(chunk)
                if size > self.limits.max_file_bytes:
                    out.close()
                    self._total -= size
                    target.unlink()
                    self._refuse(source, raw, f"unpacks to more than the per-file limit of "
                                 f"{self.limits.max_file_bytes} bytes")
                    return False
                self._check_archive_limits(next(compressed_so_far))
                out.write(chunk)
        return True

    def _check_archive_limits(self, compressed: int) -> None:
        lim = self.limits
        if self._total > lim.max_total_bytes:
            raise _ArchiveRefused(f"unpacks to more than {lim.max_total_bytes} bytes in all")
        if self._total > lim.ratio_floor_bytes and self._total > lim.max_ratio * max(
                compressed, 1):
            raise _ArchiveRefused(
                f"expands more than {lim.max_ratio:g} times ({self._total} bytes unpacked "
                f"from {compressed} compressed bytes): a decompression bomb?")

    def _tar_stream(self, buf: io.BytesIO, kind: str | None) -> IO[bytes]:
        # the decompressors of the standard library read concatenated streams (RFC 1952
        # multi-member gzip, bzip2 / xz multi-stream), tarfile's own stream reader does not
        stream: Any = (gzip.GzipFile(fileobj=buf) if kind == "gz" else
                       bz2.BZ2File(buf) if kind == "bz2" else
                       lzma.LZMAFile(buf) if kind == "xz" else buf)
        return cast(IO[bytes], stream)

    def _scan_tar(self, data: bytes, kind: str | None) -> None:
        """First pass over the headers only: member count and declared sizes, refused
        before anything is written (a header stating 1 GB for 1 MB of input stops here)."""
        lim = self.limits
        count = 0
        declared = 0
        with self._tar_stream(io.BytesIO(data), kind) as stream, \
                tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                count += 1
                if count > lim.max_members:
                    raise _ArchiveRefused(f"more than {lim.max_members} members")
                if member.isreg() and member.size <= lim.max_file_bytes:
                    declared += member.size
                if self._total + declared > lim.max_total_bytes:
                    raise _ArchiveRefused(f"its members declare more than "
                                          f"{lim.max_total_bytes} bytes in all")
                if declared > lim.ratio_floor_bytes and declared > lim.max_ratio * len(data):
                    raise _ArchiveRefused(
                        f"expands more than {lim.max_ratio:g} times ({declared} bytes "
                        f"declared in {len(data)} archive bytes): a decompression bomb?")

    def _unpack_tar(self, name: str, data: bytes, folder: Path) -> None:
        kind = archive_kind(data[:512])
        self._scan_tar(data, kind)
        buf = io.BytesIO(data)
        taken: dict[str, str] = {}
        files: set[str] = set()
        count = 0

        def consumed() -> Iterator[int]:
            while True:
                yield max(buf.tell(), 1)

        counter = consumed()
        with self._tar_stream(buf, kind) as stream, tarfile.open(fileobj=stream,
                                                                 mode="r|") as tar:
            for member in tar:
                count += 1
                if count > self.limits.max_members:
                    raise _ArchiveRefused(f"more than {self.limits.max_members} members")
                raw = member.name
                if member.isdir():
                    ok, reason = normalise_name(raw)
                    if ok is None:
                        self._refuse(name, raw, reason)
                    continue
                if member.issym() or member.islnk():
                    self._refuse(name, raw, f"{'symbolic' if member.issym() else 'hard'} "
                                 f"link (to {member.linkname!r}) refused")
                    continue
                if not member.isreg():
                    kind = ("device file" if member.ischr() or member.isblk() else
                            "FIFO" if member.isfifo() else "special file")
                    self._refuse(name, raw, f"{kind} refused")
                    continue
                if member.size > self.limits.max_file_bytes:
                    self._refuse(name, raw, f"declares {member.size} bytes; the per-file "
                                 f"limit is {self.limits.max_file_bytes}")
                    continue
                target = self._target(name, raw, folder, taken, files)
                if target is None:
                    continue
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - regular members always have data
                    continue
                if self._copy(name, raw, src, target, counter):
                    self.result.files[target] = name

    def _unpack_zip(self, name: str, data: bytes, folder: Path) -> None:
        taken: dict[str, str] = {}
        files: set[str] = set()
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > self.limits.max_members:
                raise _ArchiveRefused(f"{len(infos)} members; the limit is "
                                      f"{self.limits.max_members}")
            compressed = 0
            for info in infos:
                raw = info.filename
                mode = info.external_attr >> 16
                if info.is_dir():
                    continue
                if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                    kind = "symbolic link" if stat.S_ISLNK(mode) else "special file"
                    self._refuse(name, raw, f"{kind} refused")
                    continue
                if info.flag_bits & 0x1:
                    self._refuse(name, raw, "encrypted member refused")
                    continue
                if info.file_size > self.limits.max_file_bytes:
                    self._refuse(name, raw, f"declares {info.file_size} bytes; the per-file "
                                 f"limit is {self.limits.max_file_bytes}")
                    continue
                target = self._target(name, raw, folder, taken, files)
                if target is None:
                    continue
                compressed += info.compress_size

                def fixed(c: int = compressed) -> Iterator[int]:
                    while True:
                        yield c

                with zf.open(info) as src:
                    if self._copy(name, raw, src, target, fixed()):
                        self.result.files[target] = name


@contextlib.contextmanager
def private_work_dir(base: str | Path | None = None) -> Iterator[Path]:
    """A fresh private folder (mode 0700) removed on exit, whatever happens."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="medinfer-fed-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
