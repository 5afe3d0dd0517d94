"""Fixtures for the UDP server tests: the server as a subprocess, a UDP sender, a NATS collector."""

from __future__ import annotations

import contextlib

import pytest
from udphelpers import Collector, Sender, UdpServer


@pytest.fixture
def udp_server(services, tmp_path):
    """Factory: `srv = udp_server()` starts `python -m udpserver.udpserver` (stopped after the test)."""
    servers: list[UdpServer] = []
    spool = tmp_path / "spool"

    def factory(*extra_args: str, start: bool = True, wait_ready: bool = True) -> UdpServer:
        srv = UdpServer(spool, tmp_path / "udpserver.log", list(extra_args))
        servers.append(srv)
        return srv.start(wait_ready=wait_ready) if start else srv

    yield factory
    for srv in servers:
        with contextlib.suppress(Exception):
            srv.stop()


@pytest.fixture
def sender():
    s = Sender()
    yield s
    s.sock.close()


@pytest.fixture
def collector(services):
    c = Collector().start_and_wait()
    yield c
    c.close()
