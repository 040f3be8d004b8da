"""Reading small JSON documents from untrusted files (model folders, configs, metadata)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medinfer.errors import MedinferError


def read_json_object(
    path: Path, *, max_bytes: int, error: type[MedinferError], missing: str | None = None
) -> dict[str, Any]:
    """Parse ``path`` as a JSON object, checking its size before reading it.

    Parameters
    ----------
    path : the file.
    max_bytes : largest accepted file size in bytes (checked before reading).
    error : the exception type to raise (e.g. ``ModelError``, ``ConfigError``).
    missing : message for a missing file; default ``"<path>: no such file"``.

    Raises
    ------
    error
        The file is missing, larger than ``max_bytes``, not UTF-8 JSON, or not an object.
    """
    if not path.is_file():
        raise error(missing or f"{path}: no such file")
    if path.stat().st_size > max_bytes:
        raise error(f"{path}: larger than {max_bytes} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object at the top level")
    return data
