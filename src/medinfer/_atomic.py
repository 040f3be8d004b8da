"""Atomic file output: write to a temporary file in the target folder, then rename.

A crash or an exception while writing never leaves a half-written file under the
final name (POSIX ``rename`` within one file system is atomic).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once at import, not per write, so
    # that concurrent writer threads never see a temporarily changed umask
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

# temporaries this process is writing now (atomic_path / atomic_paths): a writer that is
# itself atomic and is handed one of them writes into it directly -- its owner renames
# it -- instead of nesting a second temporary (a second rename, and a stray file when
# the process is killed in between)
_LIVE: set[Path] = set()


def _suffixes(path: Path) -> str:
    # keep ".nii.gz" etc. so that libraries choosing a writer by suffix still work
    return "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix


def _new_temporary(final: Path) -> Path:
    """Create ``.<name>.<random>.part<suffixes>`` next to ``final`` (registered live)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name is bounded (a 243-character final name must not make the
    # temporary one exceed NAME_MAX = 255 bytes); the final suffixes are kept
    fd, name = tempfile.mkstemp(
        prefix=f".{final.name[:80]}.", suffix=".part" + _suffixes(final)[-24:],
        dir=final.parent,
    )
    os.close(fd)
    # mkstemp creates mode 0600; give the result the permissions a plain open() would
    os.chmod(name, 0o666 & ~_UMASK)
    tmp = Path(name)
    _LIVE.add(tmp)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary name keeps the final suffixes (``.nii.gz``) and starts with a dot,
    so directory listings and globbing for results do not pick it up. On error it is
    removed and the exception propagates. A ``path`` that is itself a temporary of an
    enclosing :func:`atomic_path` / :func:`atomic_paths` in this process is yielded as
    it is (the enclosing write renames it).
    """
    final = Path(path)
    if final in _LIVE:  # already a temporary of an enclosing atomic write
        yield final
        return
    tmp = _new_temporary(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        _LIVE.discard(tmp)


def _check_replaceable(final: Path) -> None:
    if final.is_dir() or (final.exists() and not final.is_file()):
        raise IsADirectoryError(
            errno.EISDIR, "an output name is taken by a folder or a special file", str(final)
        )


@contextlib.contextmanager
def atomic_paths(
    paths: Mapping[str, str | os.PathLike[str]],
) -> Iterator[dict[str, Path]]:
    """All-or-nothing output of several files: yield temporary paths (same keys).

    On success every temporary file is renamed onto its final path; if any final path is
    taken by a folder (checked before and after the work) or a rename fails, the files
    renamed so far are removed again and every temporary file is deleted, so a case's
    files land together or none does.

    Raises
    ------
    IsADirectoryError
        A final path is an existing folder or special file.
    """
    finals = {k: Path(p) for k, p in paths.items()}
    for final in finals.values():
        _check_replaceable(final)
    tmps: dict[str, Path] = {}
    try:
        for key, final in finals.items():
            tmps[key] = _new_temporary(final)
        yield tmps
        for final in finals.values():
            _check_replaceable(final)
        done: list[Path] = []
        try:
            for key, final in finals.items():
                os.replace(tmps[key], final)
                done.append(final)
        except BaseException:
            for final in done:
                with contextlib.suppress(OSError):
                    final.unlink()
            raise
    except BaseException:
        for tmp in tmps.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    finally:
        _LIVE.difference_update(tmps.values())


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the final path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; return the final path."""
    return write_bytes_atomic(path, text.encode("utf-8"))
