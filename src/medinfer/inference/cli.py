"""CLI sub-commands of the inference layer (``medinfer predict``)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add ``predict`` to the root app (implemented in the inference work)."""
    return None
