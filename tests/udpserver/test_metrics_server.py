"""The UDP server's /metrics and /health listener (udpserver.metrics.MetricsServer) on a real socket."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from semg.embedded import free_port
from udpserver.metrics import MetricsServer


async def _stop_with_a_request_pending() -> list[dict]:
    """A client connects and sends nothing; the loop then cancels what is left, as asyncio.run does when the server
    stops. Returns what reached the loop's exception handler."""
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    srv = MetricsServer("127.0.0.1", free_port(), metrics=lambda _q: {}, health=lambda: (200, {}),
                        api_key=lambda: "k")
    await srv.start()
    _reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    for _ in range(200):  # its handler is waiting for the request's head
        if srv._open:
            break
        await asyncio.sleep(0.01)
    assert srv._open, "the connection never reached the handler"
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for _ in range(5):  # the stream's done-callbacks run on the next iterations
        await asyncio.sleep(0.01)
    writer.close()
    await srv.close()
    return errors


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_connection_cut_by_the_shutdown_logs_no_traceback(loop):
    """Python 3.11's asyncio.streams calls task.exception() on a handler that ended cancelled, which raises and is
    logged with a traceback ("Exception in callback"): CI saw it in the server's log during a shutdown."""
    run = uvloop.run if loop == "uvloop" else asyncio.run
    assert run(_stop_with_a_request_pending()) == []
