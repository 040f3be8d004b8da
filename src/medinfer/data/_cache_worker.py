"""One cache-build worker process (see :mod:`medinfer.data._cache_pool`).

Reads one JSON task per line on stdin, builds it with :func:`medinfer.data.cache.build_one`
and writes one JSON result line ``{"status": ..., "detail": ...}``; errors are results
(``"status": "failed"``). Runs until stdin closes. Not a user command.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    """Serve tasks from stdin until it closes; return the exit code (0)."""
    # the protocol uses a private copy of stdout; stray prints go to stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    from medinfer.data._cache_pool import config_from_dict
    from medinfer.data.cache import build_one
    from medinfer.data.metadata import ImageEntry

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            task = json.loads(line)
            status, detail = build_one(
                task["data_dir"],
                ImageEntry(**task["entry"]),
                config_from_dict(task["config"]),
                bool(task["force"]),
                task["stem"],
            )
        except Exception as exc:  # reported to the parent, which names the image
            status, detail = "failed", f"{type(exc).__name__}: {exc}"
        proto.write(json.dumps({"status": status, "detail": detail}) + "\n")
        proto.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
