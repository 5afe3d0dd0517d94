"""Service NATS connections (a real server): state changes are logged, a clean close is not a warning."""

from __future__ import annotations

import asyncio
import logging

from semg import natsio


def test_closing_or_draining_is_not_logged_as_a_disconnect(settings, caplog):
    async def run() -> None:
        for finish in ("close", "drain"):
            nc = await natsio.connect("admin", settings)
            await nc.flush()
            await getattr(nc, finish)()

    with caplog.at_level(logging.DEBUG, logger="semg.nats.admin"):
        asyncio.run(asyncio.wait_for(run(), 30))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [], warnings
    assert [r.getMessage() for r in caplog.records].count("NATS connection closed") == 2
