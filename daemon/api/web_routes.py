"""The web console (``web/``) served by dispatchd, and the one API route it needs beyond API.md.

- ``GET /``: ``web/index.html``; ``GET /static/<path>``: files under ``web/static/`` only. Both are
  ``@public`` (the page holds no data: everything it shows comes from the API, with the token
  the person signs in with) and hidden from ``/openapi.json`` (they are not API).
- ``GET /api/v1/whoami`` (viewer): who the token is and what its role may do, so the page can
  say it instead of discovering it through refusals (each of which the audit log records).

A static path is resolved (symlinks followed) and must stay under ``web/static/``, name no
hidden part and end in a known suffix; anything else is a 404 JSON error like every unknown
thing. Each answer carries a strict Content-Security-Policy (only this origin's scripts and
styles, nothing inline, no frames, no plugins), ``Referrer-Policy: no-referrer``, ``nosniff``
(added to every response by ``daemon.api.app``), and ``Cache-Control: no-cache`` with an ETag:
files have no content hash in their names (no build step), so a browser revalidates each time
and gets a 304 while nothing changed, and never runs a stale module after an upgrade.

Where ``web/`` is: next to the ``daemon`` package in a checkout or an editable install, or under
``<prefix>/share/devops-dispatch/web`` where a wheel installs it (``pyproject.toml``'s
``data-files``).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import trio
from pydantic import BaseModel, Field
from quart import Response, g, request
from quart_schema import document_response, hide
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioResponse

from daemon import errors
from daemon.api.auth import ROUTES, Role
from daemon.api.routes import json_response, public

API = "/api/v1"

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])  # fmt: skip

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}


class WhoAmI(BaseModel):
    actor: str = Field(description="token:<name>, bootstrap or anonymous")
    role: str = Field(description="viewer, operator or admin")
    may: list[str] = Field(description="the routes (by name) this role may call")


def find_web_root() -> Path:
    """``web/`` beside the daemon package (checkout, editable install), else where a wheel put
    it; the first that holds an ``index.html``."""
    candidates = [
        Path(__file__).resolve().parents[2] / "web",
        Path(sys.prefix) / "share" / "devops-dispatch" / "web",
    ]
    for candidate in candidates:
        if (candidate / "index.html").is_file():
            return candidate
    return candidates[0]


def resolve_static(root: Path, path: str) -> Path | None:
    """The file ``path`` names under ``root`` (already resolved), or None: nothing outside it,
    no hidden part, only the suffixes of ``CONTENT_TYPES``."""
    if not path or "\\" in path or "\x00" in path:
        return None
    parts = PurePosixPath(path).parts
    if PurePosixPath(path).is_absolute() or any(
        p in ("..", ".") or p.startswith(".") for p in parts
    ):
        return None
    candidate = (root / path).resolve()
    if not candidate.is_relative_to(root) or candidate.suffix not in CONTENT_TYPES:
        return None
    return candidate if candidate.is_file() else None


@dataclass(frozen=True)
class _File:
    mtime_ns: int
    size: int
    data: bytes
    etag: str


class _Files:
    """Small files, read off the event loop and kept until they change on disk."""

    def __init__(self) -> None:
        self._cache: dict[Path, _File] = {}

    async def get(self, path: Path) -> _File:
        stat = await trio.Path(path).stat()
        cached = self._cache.get(path)
        if cached is not None and (cached.mtime_ns, cached.size) == (
            stat.st_mtime_ns,
            stat.st_size,
        ):
            return cached
        data = await trio.Path(path).read_bytes()
        entry = _File(stat.st_mtime_ns, stat.st_size, data,
                      '"' + hashlib.sha256(data).hexdigest()[:32] + '"')  # fmt: skip
        self._cache[path] = entry
        return entry


def _security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
    return response


async def _send(files: _Files, path: Path) -> Response:
    entry = await files.get(path)
    headers = {"ETag": entry.etag, "Cache-Control": "no-cache"}
    if entry.etag in request.headers.get("If-None-Match", ""):
        return _security_headers(TrioResponse(b"", status=304, headers=headers))
    response = TrioResponse(entry.data, headers=headers, content_type=CONTENT_TYPES[path.suffix])
    return _security_headers(response)


def whoami_view(actor: str, role: Role) -> dict:
    """Who the caller is and the routes (by name) its role may call."""
    return {
        "actor": actor,
        "role": role.label,
        "may": sorted(name for name, access in ROUTES.items() if role >= access.role),
    }


def register_web_routes(app: QuartTrio, root: Path | None = None) -> None:
    """Add the console's routes to the API app (``create_app(extra_routes=...)``)."""
    web_root = (root or find_web_root()).resolve()
    static_root = web_root / "static"
    files = _Files()

    @app.get("/")
    @public
    @hide
    async def web_index() -> Response:
        """The web console."""
        index = web_root / "index.html"
        if not index.is_file():
            raise errors.NotFound(f"the web console is not installed (no {index})")
        return await _send(files, index)

    @app.get("/static/<path:path>")
    @public
    @hide
    async def web_static(path: str) -> Response:
        """The console's scripts, styles and images."""
        found = resolve_static(static_root, path)
        if found is None:
            raise errors.NotFound("there is no such file")
        return await _send(files, found)

    @app.get(f"{API}/whoami")
    @document_response(WhoAmI)
    async def whoami() -> Response:
        """Who this token is, its role, and the routes that role may call."""
        return json_response(whoami_view(g.caller.actor, g.caller.role))
