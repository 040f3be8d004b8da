"""API keys: who is calling, checked before a request body is read; jobs belong to a key.

With ``MEDINFER_API_KEYS`` (and/or ``MEDINFER_ADMIN_API_KEYS``) set, every endpoint but
``/health/*`` and the API docs needs ``Authorization: Bearer <key>``.
:class:`AuthFirstMiddleware` answers 401 from the request headers alone, so an
unauthenticated upload is never read, spooled or parsed. WebSocket clients are
checked by the endpoint before it reads any message.

Ownership: a job records the :func:`owner_id` of the key that submitted it (a SHA-256
prefix; the key itself is never stored). Status, results, files, cancellation and the
WebSocket stream of a job answer 404 to any other key, so that job ids cannot be probed;
an admin key (``MEDINFER_ADMIN_API_KEYS``) reads and cancels every job. Without keys
the service is open and every job has the owner ``""``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from medinfer.serve.errors import error_response

#: paths served without a key (liveness/readiness probes, API docs)
OPEN_PREFIXES: tuple[str, ...] = ("/health/", "/docs", "/redoc", "/openapi.json")


@dataclass(frozen=True)
class Principal:
    """The caller: ``owner`` (job ownership id, ``""`` without keys) and ``admin``."""

    owner: str
    admin: bool

    def may_read(self, job_owner: str) -> bool:
        """True if this caller may see a job owned by ``job_owner``."""
        return self.admin or hmac.compare_digest(self.owner, job_owner)


def owner_id(key: str) -> str:
    """Ownership id of an API key: the first 24 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]


def _match(key: str, keys: Iterable[str]) -> bool:
    found = False
    for k in keys:  # no early exit: the same work for every key
        found |= hmac.compare_digest(key.encode(), k.encode())
    return found


def principal_for(key: str | None, api_keys: Sequence[str],
                  admin_keys: Sequence[str]) -> Principal | None:
    """The caller for ``key``, or ``None`` when keys are configured and ``key`` is wrong."""
    if not api_keys and not admin_keys:
        return Principal(owner="", admin=True)
    if not key:
        return None
    if _match(key, admin_keys):
        return Principal(owner=owner_id(key), admin=True)
    if _match(key, api_keys):
        return Principal(owner=owner_id(key), admin=False)
    return None


def bearer_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header in raw ASGI headers."""
    for name, value in headers:
        if name.lower() == b"authorization":
            text = value.decode("latin-1").strip()
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
    return None


class AuthFirstMiddleware:
    """Answer 401 for protected HTTP paths before the app reads the request body."""

    def __init__(self, app: Any, api_keys: Sequence[str], admin_keys: Sequence[str]) -> None:
        self.app = app
        self.api_keys = list(api_keys)
        self.admin_keys = list(admin_keys)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or (not self.api_keys and not self.admin_keys)
                or scope.get("method") == "OPTIONS"
                or str(scope.get("path", "")).startswith(OPEN_PREFIXES)):
            await self.app(scope, receive, send)
            return
        key = bearer_key(scope.get("headers", []))
        if principal_for(key, self.api_keys, self.admin_keys) is None:
            resp = error_response(401, "Unauthorized",
                                  "missing or wrong API key; send 'Authorization: Bearer <key>'",
                                  {"WWW-Authenticate": "Bearer"})
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)
