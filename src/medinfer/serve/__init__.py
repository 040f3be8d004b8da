"""HTTP service: FastAPI app, settings, durable job store, WebSocket progress, client.

``medinfer.serve.app`` (module attribute) is the app built from ``MEDINFER_*``
environment settings on first access, so ``uvicorn medinfer.serve:app`` works; building
it is cheap (the model loads in the background at start-up). Use
:func:`medinfer.serve.application.create_app` for an app with explicit settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from medinfer.serve.settings import ServeSettings

__all__ = ["app", "create_app", "load_settings"]

_APP: FastAPI | None = None


def create_app(settings: ServeSettings | None = None, **kwargs: Any) -> FastAPI:
    """Build the app (see :func:`medinfer.serve.application.create_app`)."""
    from medinfer.serve.application import create_app as _create

    return _create(settings, **kwargs)


def load_settings(**overrides: Any) -> ServeSettings:
    """Settings from ``MEDINFER_*`` plus overrides (see :mod:`medinfer.serve.settings`)."""
    from medinfer.serve.settings import load_settings as _load

    return _load(**overrides)


def __getattr__(name: str) -> Any:
    global _APP
    if name == "app":
        if _APP is None:
            _APP = create_app()
        return _APP
    raise AttributeError(f"module 'medinfer.serve' has no attribute {name!r}")
