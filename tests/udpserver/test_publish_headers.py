"""The Publisher against NATS servers with and without message-header support (no services of the suite)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time

import nats
import pytest

from semg.config import get_settings
from semg.embedded import free_port, nats_server_bin
from semg.messages import published_time
from udpserver.ingest import Record
from udpserver.publish import Publisher
from udpserver.spool import Chunk, ChunkBuilder


@pytest.fixture(params=[False, True], ids=["headers", "no-header-support"])
def nats_url(request, tmp_path):
    """A bare nats-server; `no_header_support` as an older (< 2.2) or so configured external server has it."""
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f"listen: 127.0.0.1:{port}\nno_header_support: {'true' if request.param else 'false'}\n")
    proc = subprocess.Popen([str(nats_server_bin()), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            break
        time.sleep(0.05)
    yield f"nats://127.0.0.1:{port}", not request.param
    proc.terminate()
    proc.wait(timeout=10)


def test_samples_reach_a_nats_server_with_or_without_header_support(nats_url):
    """A server without header support closes the connection on a message with headers: every batch was
    published again and again and none ever arrived. Headers go only to a server that takes them."""
    url, headers_supported = nats_url
    b = ChunkBuilder()
    b.add(Record(1, 2, 7, 0, 25, 8, 500.0, 0.0, 1.7e9, time.time(), bytes(25 * 8 * 2), 0))
    payload = b"".join(b.parts)
    chunk = Chunk(0, 0, len(payload), b.nrec, b.nsamples, b.per_device, payload)
    published: list[tuple] = []

    async def main() -> tuple[list, int]:
        got: list = []
        sub_nc = await nats.connect(url)

        async def on_msg(msg) -> None:
            got.append(msg)

        await sub_nc.subscribe("emg.samples.*", cb=on_msg)
        await sub_nc.flush()
        pub = Publisher(get_settings(), read_chunk=lambda c: b"", on_published=lambda *a, **k: published.append(a),
                        should_shed=lambda: False)
        pub.SETTLE_S = 0.0
        pub.nc = await nats.connect(url, error_cb=pub._error, disconnected_cb=pub._disconnected,
                                    reconnected_cb=pub._reconnected, reconnect_time_wait=0.2,
                                    max_reconnect_attempts=-1)
        task = asyncio.create_task(pub.run())
        pub.submit([chunk])
        deadline = time.monotonic() + 8
        while (not got or not published) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        disconnects = pub.disconnects
        await pub.nc.close()
        await sub_nc.close()
        return got, disconnects

    got, disconnects = asyncio.run(main())
    assert len(got) == 1, f"{len(got)} messages arrived, {disconnects} disconnects"
    assert published and published[0][1] is False  # published, not dropped
    assert disconnects == 0
    stamp = published_time(got[0].headers)
    assert (stamp is not None) == headers_supported
