"""The browser page of `duplex serve`: static files from `duplex/apps/web/`, served over plain
HTTP on the websocket's own port, so `http://HOST:PORT/` is all a person needs to type.

The page is a handful of hand-written files (no build step, nothing fetched from elsewhere: the
box may be offline). They are read once, at first use, into memory; a request can only name one
of them (a fixed table, no paths from the URL touch the filesystem). The page holds no secrets,
so it is served without the token; the websocket it opens still needs one, which the page takes
from its own `?token=`. A Content-Security-Policy keeps the page to its own origin.
"""

from __future__ import annotations

import functools
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection
    from websockets.http11 import Request, Response

# URL path -> (file in duplex/apps/web, content type). Anything else is not the page's.
FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/worklets.js": ("worklets.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

# Scripts and styles only from this origin; the websocket to this host (ws: or wss:).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; worker-src 'self' blob:; frame-ancestors 'none'"
)


@functools.cache
def _read(name: str) -> bytes:
    return resources.files("duplex.apps").joinpath("web", name).read_bytes()


def is_upgrade(request: Request) -> bool:
    """True for a websocket opening handshake (the page's own requests are plain GETs)."""
    return "websocket" in request.headers.get("Upgrade", "").lower()


def respond(connection: ServerConnection, path: str) -> Response | None:
    """The page's answer to a plain GET of `path`, or None when `path` is not one of its files
    (the caller goes on: a websocket handshake, or 404)."""
    entry = FILES.get(path)
    if entry is None:
        if path == "/favicon.ico":
            return connection.respond(HTTPStatus.NOT_FOUND, "no favicon.ico; see /favicon.svg\n")
        return None
    name, ctype = entry
    try:
        body = _read(name)
    except OSError:
        return connection.respond(HTTPStatus.INTERNAL_SERVER_ERROR, f"{name} is missing\n")
    response = connection.respond(HTTPStatus.OK, "")
    response.body = body
    h = response.headers
    del h["Content-Type"]
    del h["Content-Length"]
    h["Content-Type"] = ctype
    h["Content-Length"] = str(len(body))
    # Small files, changed only by an upgrade: revalidate rather than serve a stale page.
    h["Cache-Control"] = "no-cache"
    h["Content-Security-Policy"] = CSP
    h["X-Content-Type-Options"] = "nosniff"
    return response
