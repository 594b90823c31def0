"""An ASGI wrapper around the standalone app that every request passes first (HTTP and websocket).

Why: any web page the user visits can send requests to http://127.0.0.1:<port> (a "simple" POST
needs no CORS preflight), and a DNS-rebinding page can even read the answers. gradio 3.41 adds
`Access-Control-Allow-Origin: *` to every response and serves `/file=<any path under the cwd>`.
So, before gradio sees a request:

- Host must be a name of this server: a loopback name when bound to 127.0.0.1 (DNS rebinding sends
  the attacker's host name), anything when --listen (then a login guards the page);
- Origin, when the browser sends one, must be the same origin as Host ("null" is refused), and
  `Sec-Fetch-Site: cross-site` is refused: no other site may drive the app;
- files are served only from the folders gradio writes its own copies to (uploads, gallery
  images): `/file=`, `/file/`, `/gradio_api/file=` elsewhere are refused, as is `/proxy=`;
- every `Access-Control-Allow-*` header is removed from responses (no cross-origin reads).

Written against the ASGI spec only (no gradio, no starlette), so it works on every gradio.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import unquote, urlsplit

from ..storage.containment import inside_any

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
_FILE_ROUTE = re.compile(r"^(?:/gradio_api)?/file(?:=|/)(?P<path>.*)$", re.DOTALL)
_PROXY_ROUTE = re.compile(r"^(?:/gradio_api)?/proxy=")


def gradio_temp_dir() -> Path:
    """Where gradio keeps its own copies of files it serves (3.41 and later agree on this)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


def _split_host(value: str) -> tuple[str, Optional[int]]:
    """("host", port or None) of a Host header or netloc; IPv6 stays bracketed."""
    value = value.strip().lower()
    match = re.fullmatch(r"(\[[^\]]*\]|[^:]*)(?::(\d+))?", value)
    if not match:
        return value, None
    return match.group(1), int(match.group(2)) if match.group(2) else None


class RequestGuard:
    """`RequestGuard(app, port=..., loopback_only=True)`: the ASGI app to serve instead of `app`."""

    def __init__(self, app, *, port: int, loopback_only: bool = True, file_roots: Iterable = ()):
        self.app = app
        self.port = port
        self.loopback_only = loopback_only
        self.file_roots = [Path(p) for p in file_roots] or [gradio_temp_dir()]

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)      # lifespan
        reason = self.refusal(scope)
        if reason:
            return await self._refuse(scope, send, reason)
        return await self.app(scope, receive, self._without_cors(send))

    # ---- the rules ----------------------------------------------------------------------------
    def refusal(self, scope) -> Optional[str]:
        """Why this request is refused, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not self.host_allowed(host):
            return "unknown Host (this server answers only to its own address)"
        origin = headers.get("origin")
        if origin is not None and not self.same_origin(origin, host, scope):
            return "cross-origin request"
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return "cross-site request"
        if scope["type"] == "http":
            return self.path_refusal(scope.get("path", ""))
        return None

    def host_allowed(self, host: str) -> bool:
        if not host:
            return False
        name, port = _split_host(host)
        if port is not None and port != self.port:
            return False
        return (not self.loopback_only) or name in LOOPBACK_HOSTS

    @staticmethod
    def same_origin(origin: str, host: str, scope) -> bool:
        if origin.strip().lower() == "null":
            return False
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
            return False
        origin_host, origin_port = _split_host(parts.netloc)
        host_name, host_port = _split_host(host)
        default = 443 if parts.scheme in ("https", "wss") else 80
        return origin_host == host_name and (origin_port or default) == (host_port or default)

    def path_refusal(self, path: str) -> Optional[str]:
        if _PROXY_ROUTE.match(path):
            return "proxy route disabled"
        match = _FILE_ROUTE.match(path)
        if not match:
            return None
        target = unquote(match.group("path"))
        if "://" in target or not os.path.isabs(target) or inside_any(target, self.file_roots) is None:
            return "file outside the app's own folders"
        return None

    # ---- responses ----------------------------------------------------------------------------
    @staticmethod
    async def _refuse(scope, send, reason: str):
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = f"Forbidden: {reason}.".encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _without_cors(send):
        async def filtered(message):
            if message.get("type") == "http.response.start":
                message = dict(message)
                message["headers"] = [(k, v) for k, v in message.get("headers", [])
                                      if not k.lower().startswith(b"access-control-allow-")]
            return await send(message)
        return filtered


__all__ = ["LOOPBACK_HOSTS", "RequestGuard", "gradio_temp_dir"]
