"""Admission to `duplex serve`: who may open a websocket, how often, and how many at a time.

Everything here runs before a session exists, on the event loop: the handshake budget (at most
`max_handshakes` unfinished handshakes server-wide and twice `max_per_peer` per client address;
one more is dropped at once), connections per address and their rate (HTTP 429), the token
(HTTP 401) and the query parameters (HTTP 400). Plain GETs (no websocket upgrade) get the
browser page (`duplex.apps.web_page`) or 404. Failed handshakes are logged in one line each, at
most one a second, so a flood of bad connections cannot flood the log.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import logging
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from duplex.apps import web_page

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection
    from websockets.http11 import Request, Response

    from duplex.apps.server_config import ServeConfig


# What the server sends the model's audio as (?audio=...): int16 PCM or Opus packets.
AUDIO_WIRES = ("pcm", "opus")


class TokenBucket:
    """Allows `rate` messages a second with bursts of `burst`; a flood empties it."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.t = time.monotonic()

    def take(self, now: float, cost: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def peer_of(connection: Any) -> str:
    """The client address of a websocket connection ("?" when unknown)."""
    addr = getattr(connection, "remote_address", None)
    return str(addr[0]) if addr else "?"


class OneLineLog(logging.Filter):
    """What the websocket layer logs about failed handshakes: one line each, no traceback, and
    at most one a second (a flood of bad connections must not flood the log)."""

    def __init__(self) -> None:
        super().__init__()
        self.last = -1e9
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        now = time.monotonic()
        if now - self.last < 1.0:
            self.suppressed += 1
            return False
        self.last = now
        detail = f": {type(err).__name__}: {str(err)[:120]}" if err is not None else ""
        more = f" ({self.suppressed} more suppressed)" if self.suppressed else ""
        record.msg, record.args = f"duplex serve: {record.getMessage()}{detail}{more}", None
        self.suppressed = 0
        return True


WS_LOG = logging.getLogger("duplex.websockets")
WS_LOG.addFilter(OneLineLog())


class Gate:
    """The server's admission state: unfinished handshakes, connections per address, their
    rates, and the counts of what was refused."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.peers: dict[str, set] = collections.defaultdict(set)
        self.buckets: dict[str, TokenBucket] = {}
        self.handshaking: set = set()
        self.refused_handshakes = 0
        self.refused_peers = 0

    def connection_class(self) -> type:
        """A websocket connection that counts unfinished handshakes (see the module doc) and
        forgets its peer when it ends."""
        from websockets.asyncio.server import ServerConnection

        gate = self

        class Connection(ServerConnection):
            def connection_made(self, transport: Any) -> None:
                super().connection_made(transport)
                peer = peer_of(self)
                mine = sum(1 for c in gate.handshaking if peer_of(c) == peer)
                if (
                    len(gate.handshaking) >= gate.cfg.max_handshakes
                    or mine >= 2 * gate.cfg.max_per_peer
                ):
                    gate.refused_handshakes += 1
                    transport.abort()
                    return
                gate.handshaking.add(self)

            def connection_lost(self, exc: Exception | None) -> None:
                gate.handshaking.discard(self)
                peer = gate.peers.get(peer_of(self))
                if peer is not None:
                    peer.discard(self)
                    if not peer:
                        gate.peers.pop(peer_of(self), None)
                super().connection_lost(exc)

        return Connection

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Health checks and authentication, before any websocket upgrade."""
        self.handshaking.discard(connection)
        url = urlsplit(request.path)
        if url.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        upgrade = web_page.is_upgrade(request)
        if not upgrade and url.path != "/auth":
            # A plain GET: the browser page (no token: it holds no secrets; its websocket does
            # need one), or 404 rather than a confusing failed websocket handshake.
            page = web_page.respond(connection, url.path)
            if page is not None:
                return page
            return connection.respond(HTTPStatus.NOT_FOUND, f"no page at {url.path}\n")
        peer = peer_of(connection)
        now = time.monotonic()
        bucket = self.buckets.get(peer)
        if bucket is None:
            if len(self.buckets) > 4096:
                # Forget peers whose bucket has refilled: they are owed nothing.
                for p, b in list(self.buckets.items()):
                    b.take(now, 0.0)
                    if b.tokens >= b.burst:
                        del self.buckets[p]
            bucket = self.buckets[peer] = TokenBucket(self.cfg.connect_rate, self.cfg.connect_burst)
        if len(self.peers.get(peer, ())) >= self.cfg.max_per_peer:
            self.refused_peers += 1
            return connection.respond(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"at most {self.cfg.max_per_peer} connections per client address\n",
            )
        if not bucket.take(now):
            self.refused_peers += 1
            return connection.respond(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"more than {self.cfg.connect_rate:g} connections/s from this address\n",
            )
        query = parse_qs(url.query)
        if query.get("tokens", ["0"])[0] not in ("0", "1"):
            return connection.respond(HTTPStatus.BAD_REQUEST, "tokens must be 0 or 1\n")
        if query.get("audio", ["pcm"])[0] not in AUDIO_WIRES:
            return connection.respond(
                HTTPStatus.BAD_REQUEST, f"audio must be one of {', '.join(AUDIO_WIRES)}\n"
            )
        if self.cfg.token:
            got = None
            auth = request.headers.get("Authorization")
            if auth is not None and auth.startswith("Bearer "):
                got = auth[len("Bearer ") :].strip()
            elif "token" in query:
                got = query["token"][0]
            if got is None or not hmac.compare_digest(
                got.encode("utf-8"), self.cfg.token.encode("utf-8")
            ):
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
        if "seed" in query:
            try:
                seed = int(query["seed"][0])
            except ValueError:
                return connection.respond(HTTPStatus.BAD_REQUEST, "seed must be an integer\n")
            if not 0 <= seed < 1 << 63:
                return connection.respond(HTTPStatus.BAD_REQUEST, "seed is out of range\n")
        if not upgrade:
            # GET /auth: the same limits and token check as an upgrade, answered in plain HTTP,
            # since a browser's websocket API hides why an upgrade was refused.
            return connection.respond(HTTPStatus.OK, "ok\n")
        self.peers[peer].add(connection)
        return None
