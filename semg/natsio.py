"""NATS connections for services: per-service credentials, unlimited reconnects, logged state changes."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client

from semg import secrets
from semg.config import Settings, get_settings


async def connect(service: str, settings: Settings | None = None, **options) -> Client:
    """Connect as `service` (its own identity on the embedded server); reconnects forever."""
    s = settings or get_settings()
    log = logging.getLogger(f"semg.nats.{service}")
    user, password = secrets.nats_credentials(service, s)

    async def error_cb(e: Exception) -> None:
        log.warning("NATS error: %s", e)

    client: list[Client] = []

    async def disconnected_cb() -> None:
        if client and client[0].is_closed:  # our own close() or drain(): not worth a warning after a clean run
            log.debug("NATS connection closed")
            return
        log.warning("NATS disconnected")

    async def reconnected_cb() -> None:
        log.info("NATS reconnected")

    kw = dict(
        servers=s.nats_url.split(","), name=f"semg-{service}", user=user, password=password,
        max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=3,
        allow_reconnect=True, error_cb=error_cb, disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb, inbox_prefix=secrets.nats_inbox_prefix(service, s),
    )
    kw.update(options)
    nc = await nats.connect(**kw)
    client.append(nc)
    return nc


async def connect_once(service: str, settings: Settings | None = None, timeout: float = 2.0) -> Client:
    """One connection attempt, for a health probe: a refused or unreachable server fails at once with
    NoServersError. (nats-py reads max_reconnect_attempts=0 as "no limit" even without reconnecting: a probe
    of a NATS that was down then waited out its caller's whole timeout and reported only "TimeoutError".)"""

    async def quiet(_e: Exception) -> None:  # the failure is the answer, not a log line
        return None

    return await connect(service, settings, allow_reconnect=False, max_reconnect_attempts=1,
                         reconnect_time_wait=0.05, connect_timeout=timeout, error_cb=quiet,
                         disconnected_cb=None, reconnected_cb=None)


def install_shutdown(loop: asyncio.AbstractEventLoop, stop: Callable[[], Awaitable[None]]) -> asyncio.Event:
    """SIGTERM/SIGINT -> run `stop()` (typically nc.drain()) once; returns an event set when it is done."""
    done = asyncio.Event()

    def _handler() -> None:
        async def _run() -> None:
            try:
                await stop()
            finally:
                done.set()

        if not getattr(_handler, "fired", False):
            _handler.fired = True  # type: ignore[attr-defined]
            loop.create_task(_run())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _handler)
    return done
