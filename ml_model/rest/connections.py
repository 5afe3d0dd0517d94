"""The HTTP protocol of the API and of the web UI (Streamlit's uvicorn, see streamlit_apps.__main__): uvicorn's own, with a bound on connections that have not sent a request.

Uvicorn never closes a connection that has not sent a whole request head: a client on the network could open
connections and send nothing (or a header line now and then) until the API ran out of file descriptors, and
then nobody could reach it, not even the inference workers. Here a request head must arrive within
HEAD_TIMEOUT_S of the connection (or of the previous response), and beyond max_connections() open connections
a new one closes the oldest still waiting for its request head (or is itself closed if none is waiting).

Nor does it close a connection whose client stopped reading a response (a live decision stream, a download): the
response waits for it forever, holding what it holds (a live stream's slot). A client that has not taken enough
to drain the server's send buffer (64 KB, beyond the sockets' own) for STALL_S is disconnected: it has stopped
reading, or reads under ~1 KB/s. Below 64 KB the buffer never counts as full, and a connection closed with some
of it unsent (keep-alive timeout, `Connection: close`, the head timer) waited for the client for ever: one that
has not taken the rest STALL_S after its response ended is disconnected too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource

# httptools' protocol (pinned in requirements.txt), not uvicorn's 'auto' choice: on_headers_complete below is its
# callback; h11's protocol has none, and its head timer would cut requests running longer than HEAD_TIMEOUT_S.
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("semg.api.connections")

HEAD_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive)
MAX_CONNECTIONS = 1000
STALL_S = 60.0


def max_connections() -> int:
    """MAX_CONNECTIONS, or fewer when the process may not open that many files (it needs some of its own)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft // 2))


class GuardedHttp(HttpToolsProtocol):  # type: ignore[misc,valid-type]
    # connections waiting for a request head, oldest first (a dict keeps insertion order)
    _waiting: dict[GuardedHttp, None] = {}
    evicted = 0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = None
        self._stall_timer = None
        self._drain_timer = None
        self._wait_for_head()
        if len(self.connections) > max_connections():
            oldest = next((c for c in self._waiting if c is not self), None)
            victim = oldest if oldest is not None else self
            victim._stop_waiting()
            victim.transport.abort()
            GuardedHttp.evicted += 1
            if GuardedHttp.evicted % 1000 == 1:
                log.warning("more than %d HTTP connections at once: closing ones that sent no request (%d so far)",
                            max_connections(), GuardedHttp.evicted)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        self._not_stalled()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        super().connection_lost(exc)

    @property
    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "?"

    def pause_writing(self) -> None:
        """The transport's buffer is full: the client has stopped taking data, or takes it slowly."""
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(STALL_S, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._not_stalled()

    def _not_stalled(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _stalled(self) -> None:
        self._stall_timer = None
        log.warning("closed a connection from %s that has stopped reading its response (%g s)", self._peer, STALL_S)
        self.transport.abort()  # close() would wait for the buffer to be sent, which it never is

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # the next request (keep-alive) gets the same time, unless its head has come already (pipelined: it runs
        # now, and may take longer than HEAD_TIMEOUT_S to send its body or to be answered)
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._wait_for_head()
        self._watch_drain()

    def _watch_drain(self) -> None:
        """Part of a finished response is still unsent: the client must take it within STALL_S once the
        connection is closing (a close waits for the buffer to be sent, however long that is)."""
        if self._drain_timer is None and self.transport.get_write_buffer_size():
            self._drain_timer = self.loop.call_later(STALL_S, self._drain_due)

    def _drain_due(self) -> None:
        self._drain_timer = None
        if not self.transport.is_closing():
            self._watch_drain()  # still open (keep-alive, a next response): its close is yet to come
        elif self.transport.get_write_buffer_size():
            log.warning("closed a connection from %s that has not taken the end of its response (%g s)", self._peer,
                        STALL_S)
            self.transport.abort()

    def _wait_for_head(self) -> None:
        self._stop_waiting()
        self._waiting[self] = None
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timeout)

    def _stop_waiting(self) -> None:
        self._waiting.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        self._waiting.pop(self, None)
        if not self.transport.is_closing():
            self.transport.close()


@functools.cache
def _handshake_bound_loop_class() -> type[asyncio.AbstractEventLoop]:
    from uvicorn.loops.auto import auto_loop_factory

    from semg.tls import HANDSHAKE_TIMEOUT_S

    probe = auto_loop_factory(use_subprocess=False)()
    base = type(probe)
    probe.close()

    class HandshakeBoundLoop(base):  # type: ignore[misc,valid-type]
        async def create_server(self, *args, **kwargs):  # type: ignore[override]
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", HANDSHAKE_TIMEOUT_S)
            return await super().create_server(*args, **kwargs)

    return HandshakeBoundLoop


def handshake_bound_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for an HTTPS server (uvicorn's `loop` as an import string, Streamlit's server loop): the
    usual one (uvloop when installed), whose TLS servers drop a connection that has not finished its handshake
    within semg.tls.HANDSHAKE_TIMEOUT_S instead of asyncio's 60 s. GuardedHttp sees a TLS connection only once
    its handshake is done, so without this a client that connects and sends nothing would hold a file descriptor
    for a minute."""
    return _handshake_bound_loop_class()()
