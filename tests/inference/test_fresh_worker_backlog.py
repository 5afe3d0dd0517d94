"""A freshly started worker whose very first messages are a backlog the UDP server held (a host restart after a
power loss: the server publishes what it had stored but not published) must not decide it as live gestures.

The worker had no live message yet, so its estimate of the server's clock came from the backlog itself; the
publish-time header the UDP server sets tells it how long the server held the samples, on the server's clock."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from semg import natsio
from semg.messages import published_headers
from tests.inference.helpers import Collector, expected_ends, samples_message
from tests.inference.test_worker import RATE, STEP, WIN, _wait_workers

MAX_AGE_S = 2.0  # the worker's default --max-age


def _wait_handling(proc, uid: int, timeout: float = 30) -> None:
    """Until the worker subscribed to the user's samples (it logs the users it handles once the NATS server has
    its subscriptions)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = re.findall(r"handling users \[([\d, ]*)\]", Path(proc.log).read_text())
        if lines and uid in map(int, re.findall(r"\d+", lines[-1])):
            # The line now comes once the NATS server has the subscription; the pause stays: without it the
            # first two live windows went undecided once in CI (0d40300, skew +30 s), not understood yet.
            time.sleep(0.5)
            return
        time.sleep(0.1)
    pytest.fail(f"the worker did not subscribe to user {uid}: {Path(proc.log).read_text()[-2000:]}")


@pytest.mark.parametrize("skew", [-30.0, 30.0])  # the worker's clock behind / ahead of the server's
def test_a_backlog_a_fresh_worker_sees_first_is_not_decided(skew, workers, model_user, db_conn):
    """10 s of samples received 20 to 10 s before the server publishes them, at once, to a worker that has seen
    nothing yet (on a host whose clock is `skew` s behind or ahead of the server's), then 2 s live: no decision
    for the backlog, every live window decided."""
    (uid, dev, _), = [model_user()]
    proc, = workers(1)
    _wait_workers(db_conn, 1)
    _wait_handling(proc, uid)
    backlog, live = 2000, 400
    live0 = 2 * backlog  # the device sampled on meanwhile: what it sent in those 10 s was lost

    async def scenario() -> Collector:
        nc = await natsio.connect("admin")
        coll = Collector()
        await coll.start(nc)
        await nc.flush()
        rng = np.random.default_rng(5)
        t_recv = time.time() - 20.0
        for a in range(0, backlog, 10):
            body = samples_message(uid, dev, a, rng.integers(-60, 60, (10, 8)), RATE, t0=t_recv + a / RATE, skew=skew)
            await nc.publish(f"emg.samples.{uid}", body, headers=published_headers(time.time() + skew))
        for a in range(live0, live0 + live, 10):
            body = samples_message(uid, dev, a, rng.integers(-60, 60, (10, 8)), RATE, skew=skew)
            await nc.publish(f"emg.samples.{uid}", body, headers=published_headers(time.time() + skew))
            await asyncio.sleep(10 / RATE)
        await asyncio.sleep(1.5)
        await nc.close()
        return coll

    coll = asyncio.run(scenario())
    ds = coll.of(uid)
    stale = [d.seq for d in ds if d.seq < backlog]
    assert not stale, f"{len(stale)} decisions on the backlog (window ends {stale[0]}..{stale[-1]})"
    assert sorted(d.seq for d in ds) == expected_ends(live0, live0 + live - 1, WIN, STEP)


def test_a_backlog_the_udp_server_publishes_after_a_restart_is_not_decided(workers, db_conn, clean_db, settings,
                                                                          tmp_path, monkeypatch):
    """The real path: the UDP server stores a device's samples but cannot publish them (NATS unreachable), the
    host loses power (kill -9), and after the restart a fresh worker is up before the server publishes the
    spooled backlog, 6 s or more after receiving it (3x --max-age). Then the device streams live again."""
    from ml_model.rest.demo_models import insert_artifact, random_artifact
    from semg import repo
    from semg.embedded import free_port
    from tests.inference.conftest import announce_model
    from tests.udpserver.udphelpers import UdpServer
    from udpserver.protocol import build_binary

    user = repo.create_user(clean_db, "Restart", "restart@example.org")
    device = repo.register_device(clean_db, user["id"], 8, RATE)
    uid, dev, key = user["id"], device["id"], bytes.fromhex(device["secret_key_hex"])
    weights, meta = random_artifact(8, RATE, seed=0)
    announce_model(uid, insert_artifact(clean_db, uid, weights, meta))
    rng = np.random.default_rng(6)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = ("127.0.0.1", settings.udp_port)
    per, backlog, live = 10, 600, 400  # 3 s held by the server, then 2 s live
    booted = time.monotonic()  # the device's millis() runs on in real time (packets sent meanwhile are lost)

    def send(seq_from: int, n: int) -> None:
        t0 = time.monotonic()
        for k, a in enumerate(range(seq_from, seq_from + n, per)):
            millis = int((time.monotonic() - booted) * 1000)
            sock.sendto(build_binary(dev, 1, a, millis, int(RATE), rng.integers(-60, 60, (per, 8)), key), addr)
            time.sleep(max(0.0, t0 + (k + 1) * per / RATE - time.monotonic()))

    srv = UdpServer(tmp_path / "spool", tmp_path / "udpserver.log", [])
    try:
        with monkeypatch.context() as m:  # a server that cannot reach NATS: it stores, and publishes nothing
            m.setenv("NATS_SERVER", f"nats://127.0.0.1:{free_port()}")
            srv.start()
        send(0, backlog)
        srv.wait_for(lambda m: m["samples"]["stored"] == backlog, 20, "the backlog stored")
        assert srv.metrics()["samples"]["published"] == 0
        last_received = time.time()
        srv.kill9()  # power loss

        proc, = workers(1)  # the host comes back: a fresh worker ...
        _wait_workers(db_conn, 1)
        _wait_handling(proc, uid)
        time.sleep(max(0.0, last_received + 6.0 - time.time()))

        async def scenario() -> Collector:
            nc = await natsio.connect("admin")
            coll = Collector()
            await coll.start(nc)
            await nc.flush()
            srv.start()  # ... and the UDP server publishes the spooled backlog
            await asyncio.to_thread(srv.wait_for, lambda m: m["samples"]["published"] >= backlog, 30,
                                    "the backlog published")
            live_seq0.append(int((time.monotonic() - booted) * RATE) // per * per)
            await asyncio.to_thread(send, live_seq0[0], live)
            await asyncio.sleep(1.5)
            await nc.close()
            return coll

        live_seq0: list[int] = []
        coll = asyncio.run(scenario())
    finally:
        sock.close()
        with contextlib.suppress(Exception):
            srv.stop()
    ds = coll.of(uid)
    stale = [d.seq for d in ds if d.seq < backlog]
    assert not stale, f"{len(stale)} decisions on the backlog (window ends {stale[0]}..{stale[-1]})"
    live_ends = expected_ends(live_seq0[0], live_seq0[0] + live - 1, WIN, STEP)
    got = sorted(d.seq for d in ds)
    assert got == live_ends, f"{len(got)} decisions for {len(live_ends)} live windows"
