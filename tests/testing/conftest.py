"""The simulator tests reuse the UDP server test helpers (server subprocess, NATS collector)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "udpserver"))
from udphelpers import UdpServer  # noqa: E402


@pytest.fixture
def udp_server(services, tmp_path):
    servers: list[UdpServer] = []

    def factory(*extra_args: str) -> UdpServer:
        srv = UdpServer(tmp_path / "spool", tmp_path / "udpserver.log", list(extra_args))
        servers.append(srv)
        return srv.start()

    yield factory
    for srv in servers:
        with contextlib.suppress(Exception):
            srv.stop()
