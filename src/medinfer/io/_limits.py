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
