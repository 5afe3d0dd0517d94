"""A tiny HTTP endpoint (GET /metrics with the service API key, GET /health) and rate-limited logging for bad
packets."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import ssl
import time
from collections.abc import Callable

import orjson

from semg.tls import HANDSHAKE_TIMEOUT_S

log = logging.getLogger("udpserver.metrics")


class RateLimitedLog:
    """At most one line per key every `interval` s; the next line says how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0):
        self.logger = logger
        self.interval = interval
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args) -> None:
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._next[key] = now + self.interval
        n = self._suppressed.pop(key, 0)
        if n:
            self.logger.warning(msg + " (%d similar suppressed)", *args, n)
        else:
            self.logger.warning(msg, *args)


_STATUS = {200: "OK", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request", 503: "Service Unavailable"}


class MetricsServer:
    """Serves `metrics(query)` and `health()` (each returns (status, dict)) as JSON.

    /metrics names every device and when it streams, so it answers only a client that sends `api_key()` (read
    at every request: a rotated key applies at once) in X-API-Key; /health (no user data) answers anyone.

    At most MAX_CONNECTIONS are open at a time: each costs a file descriptor, and the process needs its
    descriptors for the spool and its connections. A new connection beyond that closes the oldest one still
    waiting for its request (idle or slow clients), or is itself closed if every one is being answered. A
    request must arrive within HEADER_TIMEOUT_S."""

    MAX_CONNECTIONS = 64
    HEADER_TIMEOUT_S = 5.0

    def __init__(self, host: str, port: int, metrics: Callable[[str], dict], health: Callable[[], tuple[int, dict]],
                 api_key: Callable[[], str], tls: ssl.SSLContext | None = None):
        self.host, self.port, self.tls = host, port, tls
        self.metrics = metrics
        self.health = health
        self.api_key = api_key
        self._server: asyncio.base_events.Server | None = None
        # open connections in arrival order -> True while still waiting for the request
        self._open: dict[asyncio.StreamWriter, bool] = {}
        self.evicted = 0

    async def start(self) -> None:
        # Over TLS a connection reaches _handle only after its handshake: that has its own time limit.
        https = {"ssl": self.tls, "ssl_handshake_timeout": HANDSHAKE_TIMEOUT_S} if self.tls is not None else {}
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True, **https)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _authorized(self, head: bytes) -> bool:
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"x-api-key":
                return hmac.compare_digest(value.strip(), self.api_key().encode())
        return False

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        if len(self._open) >= self.MAX_CONNECTIONS:
            oldest = next((w for w, waiting in self._open.items() if waiting), None)
            if oldest is None:
                return False
            del self._open[oldest]
            oldest.transport.abort()  # its handler's read fails and it returns
            self.evicted += 1
            if self.evicted % 1000 == 1:
                log.warning("more than %d metrics connections at once: closing idle ones (%d so far)",
                            self.MAX_CONNECTIONS, self.evicted)
        self._open[writer] = True
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            writer.transport.abort()
            return
        try:
            await self._respond(reader, writer)
        except asyncio.CancelledError:
            # the server is stopping (its loop cancels what is left): end quietly. A handler that ended cancelled
            # made Python 3.11's asyncio.streams log a traceback (its done-callback calls task.exception()).
            writer.transport.abort()
        finally:
            self._open.pop(writer, None)

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        status, body = 400, {"error": "bad request"}
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.HEADER_TIMEOUT_S)
            if writer in self._open:
                self._open[writer] = False  # being answered: not evicted
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) == 3:
                method, target = parts[0], parts[1].decode("latin-1")
                path, _, query = target.partition("?")
                if method != b"GET":
                    status, body = 405, {"error": "only GET"}
                elif path == "/metrics":
                    if self._authorized(head):
                        status, body = 200, self.metrics(query)
                    else:
                        status, body = 401, {"error": "send the service API key (secrets/service_api_key, or "
                                                      "SEMG_SERVICE_KEY) in the X-API-Key header"}
                elif path == "/health":
                    status, body = self.health()
                else:
                    status, body = 404, {"error": "try /metrics or /health"}
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:  # noqa: BLE001 - a metrics bug must not take the server down
            log.exception("metrics handler failed")
            status, body = 500, {"error": "internal error"}
        if writer.transport.is_closing():  # closed for a newer connection, or by the client
            return
        data = orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)
        head = (f"HTTP/1.1 {status} {_STATUS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
        with contextlib.suppress(ConnectionError):
            writer.write(head + data)
            await writer.drain()
        writer.close()
