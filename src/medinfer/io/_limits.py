"""Size limits checked before any image array is allocated.

Every reader computes the size of the array it is about to create from header facts
(NIfTI ``dim`` and datatype, DICOM Rows x Columns x frames) and calls
:func:`check_array_size` first, so that a header claiming 10^12 voxels fails with
:class:`~medinfer.errors.ResourceLimitError` instead of exhausting memory.

The limit is :data:`DEFAULT_MAX_BYTES` (4 GiB: e.g. a 1024 x 1024 x 1000 float32 volume
or a 512 x 512 x 4000 int16 CT), overridable per call (``max_bytes=``) or for the whole
process with the environment variable ``MEDINFER_MAX_IMAGE_BYTES`` (an integer number of
bytes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from medinfer.errors import ConfigError, ResourceLimitError

#: default upper bound (bytes) on one image array returned by a reader: 4 GiB
DEFAULT_MAX_BYTES: int = 4 * 1024**3

#: environment variable that overrides :data:`DEFAULT_MAX_BYTES`
MAX_BYTES_ENV: str = "MEDINFER_MAX_IMAGE_BYTES"


def resolve_max_bytes(max_bytes: int | None) -> int:
    """The byte limit to use: ``max_bytes`` if given, else the environment, else the default.

    Raises
    ------
    ConfigError
        ``max_bytes`` or ``MEDINFER_MAX_IMAGE_BYTES`` is not a positive integer.
    """
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ConfigError(f"max_bytes: {max_bytes!r} is not a positive integer number of bytes")
        return max_bytes
    env = os.environ.get(MAX_BYTES_ENV)
    if env is None or env.strip() == "":
        return DEFAULT_MAX_BYTES
    try:
        value = int(env.strip())
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(
            f"{MAX_BYTES_ENV}: {env!r} is not a positive integer number of bytes"
        )
    return value


def check_array_size(
    shape: Sequence[int], itemsize: int, what: str, max_bytes: int | None = None
) -> int:
    """Raise if an array of ``shape`` and ``itemsize`` would exceed the byte limit.

    Uses Python integers (no overflow for absurd headers). Returns the byte count.

    Raises
    ------
    ResourceLimitError
        The array would need more than the limit (see :func:`resolve_max_bytes`).
    """
    limit = resolve_max_bytes(max_bytes)
    n_vox = 1
    for s in shape:
        n_vox *= int(s)
    n_bytes = n_vox * int(itemsize)
    if n_bytes > limit:
        dims = " x ".join(str(int(s)) for s in shape)
        raise ResourceLimitError(
            f"{what}: the image would need {n_bytes:,} bytes ({dims} = {n_vox:,} voxels of "
            f"{itemsize} bytes); the limit is {limit:,} bytes (set max_bytes= or "
            f"{MAX_BYTES_ENV} to raise it)"
        )
    return n_bytes


#: default cap (bytes) on what one compressed stream (a deflated DICOM data set) may
#: inflate to: 2 GiB, the same default as the server's ``max_unpacked_bytes``
DEFAULT_MAX_UNPACKED_BYTES: int = 2 * 1024**3

#: environment variable that overrides :data:`DEFAULT_MAX_UNPACKED_BYTES` (the server
#: setting ``MEDINFER_MAX_UNPACKED_BYTES`` of the same name)
MAX_UNPACKED_ENV: str = "MEDINFER_MAX_UNPACKED_BYTES"

#: most frames (slices) one DICOM series may hold; every frame costs a Python object with
#: its geometry before pixel data are read, so a header announcing 10^6 frames is refused
#: up front. Override with ``MEDINFER_MAX_FRAMES``.
DEFAULT_MAX_FRAMES: int = 65_536

MAX_FRAMES_ENV: str = "MEDINFER_MAX_FRAMES"


def _positive_env(name: str, default: int) -> int:
    env = os.environ.get(name)
    if env is None or env.strip() == "":
        return default
    try:
        value = int(env.strip())
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{name}: {env!r} is not a positive integer")
    return value


def resolve_max_unpacked_bytes() -> int:
    """Cap on inflated bytes: ``MEDINFER_MAX_UNPACKED_BYTES`` or 2 GiB.

    Raises
    ------
    ConfigError
        The variable is set but not a positive integer.
    """
    return _positive_env(MAX_UNPACKED_ENV, DEFAULT_MAX_UNPACKED_BYTES)


def resolve_max_frames() -> int:
    """Most frames of one DICOM series: ``MEDINFER_MAX_FRAMES`` or 65,536.

    Raises
    ------
    ConfigError
        The variable is set but not a positive integer.
    """
    return _positive_env(MAX_FRAMES_ENV, DEFAULT_MAX_FRAMES)


def check_frame_count(n_frames: int, what: str) -> None:
    """Raise :class:`ResourceLimitError` if a series announces more frames than allowed."""
    limit = resolve_max_frames()
    if n_frames > limit:
        raise ResourceLimitError(
            f"{what}: {n_frames:,} frames announced (NumberOfFrames / files); the limit is "
            f"{limit:,} frames (set {MAX_FRAMES_ENV} to raise it)"
        )
