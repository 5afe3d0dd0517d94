"""A freshly started worker whose very first messages are a backlog the UDP server held (a host restart after a
power loss: the server publishes what it had stored but not published) must not decide it as live gestures.

The worker had no live message yet, so its estimate of the server's clock came from the backlog itself; the
publish-time header the UDP server sets tells it how long the server held the samples, on the server's clock."""

from __future__ import annotations

import asyncio
import re
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
    """Until the worker subscribed to the user's samples (it logs the users it handles after subscribing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = re.findall(r"handling users \[([\d, ]*)\]", Path(proc.log).read_text())
        if lines and uid in map(int, re.findall(r"\d+", lines[-1])):
            time.sleep(0.5)  # the SUB reaches the NATS server
            return
        time.sleep(0.1)
    pytest.fail(f"the worker did not subscribe to user {uid}: {Path(proc.log).read_text()[-2000:]}")


@pytest.mark.parametrize("skew", [0.0, -30.0, 30.0])
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

