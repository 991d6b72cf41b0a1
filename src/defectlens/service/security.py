"""API keys with roles, and request-size limits.

Keys guard every endpoint that changes state; reading stays open so a line display or the
dashboard needs no secret (unless the service is started with ``--protect-read``). A key carries
a role: ``viewer`` reads, ``operator`` also inspects and gives feedback, ``admin`` also changes
thresholds and models. A key is given as ``ROLE:SECRET``; a bare ``SECRET`` is an admin key, as
every key was before roles existed. The size limit counts the bytes as they arrive, so a client that
sends no Content-Length (chunked upload) is cut off at the limit, not after filling memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from typing import Any, NamedTuple

from fastapi import HTTPException, Request

KEY_HEADER = "X-API-Key"
ROLES = ("viewer", "operator", "admin")  # each can do what the ones before it can


class Caller(NamedTuple):
    actor: str  # the key's fingerprint, what the history records
    role: str


def fingerprint(key: str) -> str:
    """What the history records about who acted: enough to tell keys apart, useless to an attacker."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def parse_key(entry: str) -> tuple[str, str]:
    """``operator:s3cret`` -> (operator, s3cret); a key without a known role prefix is an admin's."""
    role, sep, secret = entry.partition(":")
    if sep and role in ROLES and secret:
        return role, secret
    return "admin", entry


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [parse_key(k) for k in (k.strip() for k in keys) if k]

    @property
    def configured(self) -> bool:
        return bool(self._keys)

    def roles(self) -> dict[str, int]:
        return {r: sum(role == r for role, _ in self._keys) for r in ROLES}

    def check(self, request: Request, need: str = "admin") -> Caller:
        """Who is calling, when their key's role covers ``need``; otherwise 401/403 naming what is missing."""
        given = request.headers.get(KEY_HEADER) or _bearer(request.headers.get("Authorization", ""))
        if not self._keys:
            raise HTTPException(403, "this service has no API key configured, so nothing can change its state; "
                                     "start it with --api-key or DEFECTLENS_API_KEYS")
        if not given:
            raise HTTPException(401, f"this endpoint needs the {need} role: send an API key in the {KEY_HEADER} header")
        for role, key in self._keys:
            if hmac.compare_digest(given.encode(), key.encode()):
                if ROLES.index(role) < ROLES.index(need):
                    raise HTTPException(403, f"this endpoint needs the {need} role; the key given is a(n) {role} key")
                return Caller(fingerprint(key), role)
        raise HTTPException(401, "API key not recognised")


def _bearer(value: str) -> str:
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class BodyLimit:
    """Pure ASGI middleware: 413 for any request body over ``max_bytes``."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        seen = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._message(seen))
            return message

        async def watched_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except HTTPException as exc:
            if exc.status_code != 413 or started:
                raise
            await self._refuse(send, seen)

    def _message(self, size: int) -> str:
        return f"request body of {size:,} bytes or more is over the {self.max_bytes:,} byte upload limit"

    async def _refuse(self, send: Any, size: int) -> None:
        body = json.dumps({"error": self._message(size), "status": 413}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
