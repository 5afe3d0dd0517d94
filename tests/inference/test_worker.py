"""The live inference worker against a real API server, PostgreSQL and NATS."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import numpy as np
import pytest

from semg import natsio
from tests.inference.helpers import Collector, expected_ends, samples_message

RATE = 200.0
WIN, STEP = 50, 5  # 250 ms / 25 ms at 200 Hz (the demo artifacts' defaults)
WARMUP_SEQ0 = 1_000_000


def _slots(db_conn) -> int:
    from ml_model.nat_inference import SLOT_LOCK_NS
    with db_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s",
                    (SLOT_LOCK_NS,))
        return cur.fetchone()[0]


def _wait_workers(db_conn, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _slots(db_conn) < n:
        assert time.monotonic() < deadline, f"{n} inference workers did not register"
        time.sleep(0.2)


async def _live(users: list[tuple[int, int]], **warm_up) -> tuple[Any, Collector]:
    """A NATS connection and a started Collector once every user gets decisions (_warm_up)."""
    nc = await natsio.connect("admin")
    coll = Collector()
    await coll.start(nc)
    await _warm_up(nc, coll, users, **warm_up)
    return nc, coll


async def _warm_up(nc, coll: Collector, users: list[tuple[int, int]], timeout: float = 30, skew: float = 0.0) -> None:
    """Stream (real time) until every user gets decisions: all workers subscribed and models fetched."""
    rng = np.random.default_rng(1)
    seq = WARMUP_SEQ0
    deadline = time.monotonic() + timeout
    stable_since = None
    while time.monotonic() < deadline:
        for uid, dev in users:
            await nc.publish(f"emg.samples.{uid}", samples_message(uid, dev, seq, rng.integers(-60, 60, (5, 8)), RATE,
                                                                   skew=skew))
        seq += 5
        await asyncio.sleep(0.025)
        if all(coll.of(uid) for uid, _ in users):
            stable_since = stable_since or time.monotonic()
            if time.monotonic() - stable_since > 2.5:  # > 2 membership polls with everything live
                return
    pytest.fail("not every user got live decisions during the warm-up")


async def _stream(nc, users: list[tuple[int, int]], n_samples: int, chunk: int = 10, speed: float = 3.0,
                  boot: int = 1, seq0: int = 0, skew: float = 0.0) -> None:
    """Publish n_samples per user in chunks, interleaved across users, `speed` x real time."""
    rng = np.random.default_rng(2)
    for a in range(seq0, seq0 + n_samples, chunk):
        for uid, dev in users:
            k = min(chunk, seq0 + n_samples - a)
            await nc.publish(f"emg.samples.{uid}",
                             samples_message(uid, dev, a, rng.integers(-60, 60, (k, 8)), RATE, boot=boot, skew=skew))
        await asyncio.sleep(chunk / RATE / speed)


def _counted(coll: Collector, uid: int) -> list[int]:
    return sorted(d.seq for d in coll.of(uid) if d.seq < WARMUP_SEQ0)


@pytest.mark.parametrize("n_workers", [1, 2])
def test_every_window_decided_exactly_once(n_workers, workers, model_user, db_conn):
    users = [model_user(seed=i)[:2] for i in range(6)]
    procs = workers(n_workers)
    _wait_workers(db_conn, n_workers)
    n_samples = 1000

    async def scenario() -> Collector:
        nc, coll = await _live(users)
        await _stream(nc, users, n_samples)
        want = len(expected_ends(0, n_samples - 1, WIN, STEP))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(len(_counted(coll, u)) < want for u, _ in users):
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # duplicates, if any, would arrive now
        await nc.close()
        return coll

    coll = asyncio.run(scenario())
    want = expected_ends(0, n_samples - 1, WIN, STEP)
    for uid, dev in users:
        got = _counted(coll, uid)
        assert got == want, f"user {uid}: {len(got)} decisions, {len(set(got))} distinct, want {len(want)}"
        for d in coll.of(uid):
            assert d.device_id == dev and 0 <= d.confidence <= 1 and d.decided_time >= d.sample_recv_time
    if n_workers == 2:
        handled = []
        for p in procs:
            lines = re.findall(r"handling users \[([\d, ]*)\]", p.log.read_text())
            handled.append(set(map(int, re.findall(r"\d+", lines[-1]))) if lines else set())
        assert handled[0] and handled[1], f"users not shared between the workers: {handled}"
        assert not handled[0] & handled[1] and handled[0] | handled[1] == {u for u, _ in users}


def test_gaps_reset_the_buffer_and_resent_samples_are_decided_once(workers, model_user, db_conn):
    (uid, dev, _), = [model_user()]
    workers(1)
    _wait_workers(db_conn, 1)
    rng = np.random.default_rng(3)

    async def scenario() -> Collector:
        nc, coll = await _live([(uid, dev)])

        async def send(seq0: int, n: int) -> None:
            await nc.publish(f"emg.samples.{uid}", samples_message(uid, dev, seq0, rng.integers(-60, 60, (n, 8)),
                                                                   RATE, boot=1))
            await asyncio.sleep(0.01)

        for a in range(0, 100, 10):      # run 1: seq 0..99
            await send(a, 10)
        for a in range(130, 230, 10):    # gap of 30 samples -> run 2: 130..229
            await send(a, 10)
        await send(200, 10)              # already seen (the UDP server re-sends after a timeout): ignored
        await send(220, 20)              # 220..229 seen, 230..239 new: run 2 goes on
        for a in range(240, 300, 10):    # run 2: 130..299
            await send(a, 10)
        await asyncio.sleep(2)
        await nc.close()
        return coll

    coll = asyncio.run(scenario())
    want = sorted(expected_ends(0, 99, WIN, STEP) + expected_ends(130, 299, WIN, STEP))  # each window once
    assert _counted(coll, uid) == want


def test_decisions_are_stored_and_unknown_users_skipped(workers, model_user, db_conn):
    (uid, dev, meta), = [model_user()]
    workers(1)
    _wait_workers(db_conn, 1)

    async def scenario() -> Collector:
        nc, coll = await _live([(uid, dev)])
        await nc.publish("emg.samples.424242", samples_message(424242, 9, 0, np.zeros((100, 8)), RATE))
        await nc.publish(f"emg.samples.{uid}", b"{not json")
        await nc.publish(f"emg.samples.{uid}", b'{"v": 1, "userid": 1}')
        await _stream(nc, [(uid, dev)], 200)
        await asyncio.sleep(2)
        await nc.close()
        return coll

    coll = asyncio.run(scenario())
    assert len(_counted(coll, uid)) == len(expected_ends(0, 199, WIN, STEP))
    time.sleep(1.5)  # store interval
    with db_conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT model_id), min(model_id) FROM predictions WHERE user_id = %s",
                    (uid,))
        count, models, model_id = cur.fetchone()
    assert count == len(coll.of(uid)) and models == 1 and model_id == meta["artifact_id"]
    with db_conn.cursor() as cur:
        cur.execute("""SELECT gesture, device_millis, round(confidence::numeric, 4), device_id,
                              extract(epoch FROM sample_received), latency_ms FROM predictions WHERE user_id = %s""",
                    (uid,))
        rows = cur.fetchall()
    stored = {(g, dm, float(c), d) for g, dm, c, d, _, _ in rows}
    published = {(p.gesture, p.device_millis, round(p.confidence, 4), p.device_id) for p in coll.of(uid)}
    assert stored == published
    assert all(lat is not None and lat >= 0 and abs(float(sr) - 1e9) < 1e10 for *_, sr, lat in rows)


def test_sigterm_drains_queued_windows(workers, model_user, db_conn):
    (uid, dev, _), = [model_user()]
    (proc,) = workers(1)
    _wait_workers(db_conn, 1)

    async def scenario() -> Collector:
        nc, coll = await _live([(uid, dev)])
        await _stream(nc, [(uid, dev)], 400, speed=50)
        await nc.flush()
        proc.send_signal(15)
        await asyncio.sleep(3)
        await nc.close()
        return coll

    coll = asyncio.run(scenario())
    assert proc.wait(20) == 0
    assert _counted(coll, uid) == expected_ends(0, 399, WIN, STEP)


def test_new_model_goes_live_without_losing_windows(workers, model_user, db_conn, clean_db):
    from ml_model.rest.demo_models import insert_artifact, random_artifact
    from tests.inference.conftest import announce_model
    (uid, dev, _), = [model_user()]
    workers(1)
    _wait_workers(db_conn, 1)
    n_samples = 1200  # 6 s of data streamed in real time; the model changes after ~2 s

    async def scenario() -> tuple[Collector, float, int]:
        nc, coll = await _live([(uid, dev)])
        weights, new_meta = random_artifact(8, RATE, seed=42, classes=("REST", "x", "y"))
        new_id = insert_artifact(clean_db, uid, weights, new_meta)
        stream = asyncio.create_task(_stream(nc, [(uid, dev)], n_samples, speed=1.0))
        await asyncio.sleep(2.0)
        announced = time.time()
        await asyncio.to_thread(announce_model, uid, new_id)
        await stream
        await asyncio.sleep(1.5)
        await nc.close()
        return coll, announced, new_id

    coll, announced, new_id = asyncio.run(scenario())
    counted = [d for d in coll.of(uid) if d.seq < WARMUP_SEQ0]
    assert sorted(d.seq for d in counted) == expected_ends(0, n_samples - 1, WIN, STEP)  # none lost
    first_new = min(d.decided_time for d in counted if d.model_id == new_id)
    assert first_new - announced < 2.0
    assert all(d.model_id == new_id for d in counted if d.decided_time > first_new)
    assert {d.gesture for d in counted if d.model_id == new_id} <= {"REST", "x", "y", "UNKNOWN"}


def test_worker_survives_a_nats_restart(workers, model_user, db_conn, services):
    (uid, dev, _), = [model_user()]
    (proc,) = workers(1)
    _wait_workers(db_conn, 1)

    async def before() -> None:
        nc, coll = await _live([(uid, dev)])
        await nc.close()

    asyncio.run(before())
    services.stop("nats")
    time.sleep(2)
    services.start("nats")

    async def after() -> Collector:
        nc = await natsio.connect("admin")
        coll = Collector()
        await coll.start(nc)
        deadline = time.monotonic() + 30
        seq = 0
        while time.monotonic() < deadline and len(coll.of(uid)) < 20:  # the worker resubscribes by itself
            await _stream(nc, [(uid, dev)], 100, speed=2.0, boot=5, seq0=seq)
            seq += 100
        await nc.close()
        return coll

    coll = asyncio.run(after())
    assert proc.poll() is None and len(coll.of(uid)) >= 20


def test_worker_recovers_when_the_api_restarts(workers, model_user, db_conn, api_server):
    (uid, dev, _), = [model_user()]
    (proc,) = workers(1)
    _wait_workers(db_conn, 1)

    async def scenario() -> tuple[int, int]:
        nc, coll = await _live([(uid, dev)])
        await asyncio.to_thread(api_server.stop)
        await _stream(nc, [(uid, dev)], 200, speed=2.0, boot=7)  # decisions impossible: windows dropped
        during = len(coll.of(uid))
        await asyncio.to_thread(api_server.start)
        deadline = time.monotonic() + 30
        seq = 1000
        while time.monotonic() < deadline and len(coll.of(uid)) < during + 20:
            await _stream(nc, [(uid, dev)], 100, speed=2.0, boot=7, seq0=seq)
            seq += 100
        after = len(coll.of(uid)) - during
        await nc.close()
        return during, after

    _, after = asyncio.run(scenario())
    assert proc.poll() is None and after >= 20


@pytest.mark.parametrize("skew", [0.0, -30.0, 30.0])
def test_a_backlog_after_an_outage_is_not_decided_as_live(skew, workers, model_user, db_conn):
    """After a NATS or PostgreSQL outage the UDP server publishes the samples it kept, with their receive times:
    windows of samples received longer ago than --max-age (2 s) are stale for live use and get no decision,
    and the live windows that follow are all decided. Whatever the UDP server host's clock says: the worker
    may run on another host whose clock is 30 s ahead of it (every window looked stale: nothing was decided)
    or behind it (no window ever looked stale: the backlog was decided as live)."""
    users = [model_user(seed=i)[:2] for i in range(4)]
    workers(1)
    _wait_workers(db_conn, 1)
    backlog, live = 2000, 400  # 10 s kept during the outage, then 2 s live

    async def scenario() -> Collector:
        nc, coll = await _live(users, skew=skew)
        rng = np.random.default_rng(4)
        t_down = time.time() - backlog / RATE
        for a in range(0, backlog, 10):
            for uid, dev in users:
                await nc.publish(f"emg.samples.{uid}", samples_message(uid, dev, a, rng.integers(-60, 60, (10, 8)),
                                                                       RATE, boot=3, t0=t_down + a / RATE, skew=skew))
        await _stream(nc, users, live, speed=1.0, boot=3, seq0=backlog, skew=skew)
        await asyncio.sleep(1.5)
        await nc.close()
        return coll

    coll = asyncio.run(scenario())
    for uid, _ in users:
        ds = [d for d in coll.of(uid) if d.seq < WARMUP_SEQ0]
        ages = [d.decided_time - (d.sample_recv_time - skew) for d in ds]
        assert max(ages) < 2.5, f"user {uid}: {sum(a > 2.5 for a in ages)} decisions on samples up to {max(ages):.1f} s old"
        live_ends = [e for e in expected_ends(0, backlog + live - 1, WIN, STEP) if e >= backlog]
        assert sorted(d.seq for d in ds if d.seq >= backlog) == live_ends


def test_a_worker_started_while_the_api_waits_for_the_database_serves_its_models(workers, model_user, api_server,
                                                                                 services):
    """The platform starting (or the API restarting) while PostgreSQL is not up yet: the API has not loaded the
    models, so it must not tell the worker there are none -- the worker would recognise nobody until its next
    catalogue poll (30 s)."""
    (uid, dev, _), = [model_user()]
    api_server.stop()
    services.stop("postgres")
    try:
        api_server.start()  # serves /health without the database
        workers(1)
        time.sleep(3)  # the worker is up and asking the API for the models
    finally:
        services.start("postgres")
    back = time.monotonic()

    async def scenario() -> float | None:
        nc = await natsio.connect("admin")
        coll = Collector()
        await coll.start(nc)
        rng = np.random.default_rng(5)
        seq = 0
        while not coll.of(uid) and time.monotonic() - back < 40:
            await nc.publish(f"emg.samples.{uid}", samples_message(uid, dev, seq, rng.integers(-60, 60, (10, 8)), RATE))
            seq += 10
            await asyncio.sleep(10 / RATE)
        await nc.close()
        return time.monotonic() - back if coll.of(uid) else None

    first = asyncio.run(scenario())
    assert first is not None and first < 15, f"first decision {first} s after PostgreSQL came back"


def test_a_failed_electrode_is_flagged_live_logged_once_and_cleared(workers, model_user, db_conn):
    """Channel 3 comes off for 2 s, later three channels at once: decisions say which (published and stored),
    three of eight failed make them UNKNOWN, the log has one line per spell, and nothing after the return."""
    (uid, dev, _), = [model_user()]
    (proc,) = workers(1)
    _wait_workers(db_conn, 1)
    rng = np.random.default_rng(5)
    x = rng.integers(-60, 60, (2400, 8))  # the demo model's channels: level 0, spread 30
    x[400:800, 3] = 0                     # 2 s off
    x[1400:1800, [0, 1, 2]] = 127         # 2 s at the rail: three of eight

    async def scenario() -> Collector:
        nc, coll = await _live([(uid, dev)])
        for a in range(0, len(x), 10):
            await nc.publish(f"emg.samples.{uid}", samples_message(uid, dev, a, x[a:a + 10], RATE, boot=1))
            await asyncio.sleep(10 / RATE / 3)
        want = len(expected_ends(0, len(x) - 1, WIN, STEP))
        deadline = time.monotonic() + 20
        while len(_counted(coll, uid)) < want and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await nc.close()
        return coll

    coll = asyncio.run(scenario())
    live = sorted((d for d in coll.of(uid) if d.seq < WARMUP_SEQ0), key=lambda d: d.seq)
    assert [d.seq for d in live] == expected_ends(0, len(x) - 1, WIN, STEP)
    flagged = {d.seq: d for d in live if d.channel_faults}
    first = [d for d in live if d.channel_faults and d.channel_faults[0].channel == 3]
    assert first and {(f.channel, f.fault) for d in first for f in d.channel_faults} == {(3, "flat")}
    assert 400 <= first[0].seq < 800 and max(d.seq for d in first) < 800 + 2 * RATE
    assert max(f.seconds for d in first for f in d.channel_faults) >= 1.5
    three = [d for d in live if d.channel_faults and len(d.channel_faults) == 3]
    assert three and all(d.gesture == "UNKNOWN" for d in three)
    assert {f.channel for d in three for f in d.channel_faults} == {0, 1, 2}
    assert all(1400 <= s < 1800 + 2 * RATE for s in flagged if s >= 1400)
    assert not any(d.channel_faults for d in live if d.seq < 400 or 1000 + 2 * RATE <= d.seq < 1400
                   or d.seq >= 1800 + 2 * RATE)
    text = proc.log.read_text()
    assert text.count("channel 3 looks disconnected (flat") == 1 and text.count("channel 3 is back") == 1
    assert "decisions are UNKNOWN until they are back" in text
    time.sleep(1.5)  # store interval
    with db_conn.cursor() as cur:
        cur.execute("""SELECT device_millis, channel_faults FROM predictions WHERE user_id = %s
                       AND channel_faults IS NOT NULL""", (uid,))
        stored = {round(dm / 5.0): faults for dm, faults in cur.fetchall()}  # device millis -> seq at 200 Hz
    assert stored.keys() == flagged.keys()
    assert all(stored[s] == [f.model_dump() for f in flagged[s].channel_faults] for s in stored)


def test_decisions_say_which_boot_their_seq_counts_in(workers, model_user, db_conn):
    """A decision's `seq` (and `device_millis`) count from 0 again when the sensor reboots (power, a crash), but the
    decision did not say which boot it came from: a controller that orders or de-duplicates decisions by seq
    took every decision after a reboot for an old one. Decisions now carry the device's boot, and
    (device_id, boot, seq) only goes forward."""
    (uid, dev, _), = [model_user()]
    workers(1)
    _wait_workers(db_conn, 1)

    async def scenario() -> Collector:
        nc, coll = await _live([(uid, dev)])  # boot 0, seq from 1,000,000
        await _stream(nc, [(uid, dev)], 200, boot=1)  # rebooted: seq from 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(_counted(coll, uid)) < len(expected_ends(0, 199, WIN, STEP)):
            await asyncio.sleep(0.1)
        await nc.close()
        return coll

    decisions = asyncio.run(scenario()).of(uid)
    assert {d.boot for d in decisions if d.seq >= WARMUP_SEQ0} == {0}
    assert {d.boot for d in decisions if d.seq < WARMUP_SEQ0} == {1}
    order = [(d.device_id, d.boot, d.seq) for d in decisions]  # as published
    assert order == sorted(set(order)), "decisions went back (or repeated) in (device_id, boot, seq)"


def test_decisions_give_when_their_samples_were_taken(workers, model_user, db_conn):
    """A sensor that kept its samples through a short Wi-Fi drop sends them at once when it is back, with fresh
    receive times: the decisions on them (up to --max-age old) looked as fresh as live ones, and a controller had
    no way to see their age. Decisions now carry sample_taken_time (the device clock on the server's, as the
    worker estimates it): a second behind their receive time here, and with the receive time when live."""
    (uid, dev, _), = [model_user()]
    workers(1)
    _wait_workers(db_conn, 1)
    half, held = int(RATE) // 2, int(RATE)  # half a second live, then one second kept by the sensor

    async def scenario() -> Collector:
        nc, coll = await _live([(uid, dev)])
        await _stream(nc, [(uid, dev)], half, speed=1.0, boot=2)  # live: the device clock's offset is learnt
        await asyncio.sleep(held / RATE)  # the Wi-Fi drop: nothing arrives, the sensor keeps its samples
        rng = np.random.default_rng(5)
        await nc.publish(f"emg.samples.{uid}", samples_message(uid, dev, half, rng.integers(-60, 60, (held, 8)),
                                                               RATE, boot=2))  # all at once, received now
        await _stream(nc, [(uid, dev)], half, speed=1.0, boot=2, seq0=half + held)
        await asyncio.sleep(1.0)
        await nc.close()
        return coll

    ds = [d for d in asyncio.run(scenario()).of(uid) if d.boot == 2]
    lag = {d.seq: d.sample_recv_time - d.sample_taken_time for d in ds}
    kept = [s for s in lag if half <= s < half + held // 2]  # taken 1 to 0.5 s before they came
    live = [s for s in lag if s < half or s >= half + held + STEP]
    assert kept and live, sorted(lag)
    assert min(lag[s] for s in kept) > 0.45, {s: round(lag[s], 3) for s in kept}  # 0.5 s at least, by design
    assert float(np.median([lag[s] for s in live])) < 0.2, {s: round(lag[s], 3) for s in live}


def test_a_gesture_renamed_through_the_api_is_decided_by_its_new_name_at_once(workers, db_conn, clean_db, settings):
    """Live decisions used the names the model was trained under until the next training: an app acting on
    'power grip' never saw it after 'fist' was renamed so. Renamed through the API while streaming: the next
    decisions (same model, same votes) carry the new names."""
    import httpx

    from ml_model.jobs import INTERVAL_COLUMNS
    from ml_model.rest import keys as keystore
    from ml_model.rest.demo_models import insert_artifact, random_artifact
    from semg import repo
    from tests.inference.conftest import announce_model
    user = repo.create_user(clean_db, "Renamer", "renamer@example.org")
    uid = user["id"]
    ids = {g: repo.add_gesture(clean_db, uid, g)["id"] for g in ("fist", "open hand")}
    dev = repo.register_device(clean_db, uid, 8, RATE)["id"]
    session = repo.create_session(clean_db, uid, dev, ["fist", "open hand"], 1, 2.0, 1.0)
    # a model of the two gestures only (no REST class), so that every decision names one of them
    weights, meta = random_artifact(8, RATE, classes=("fist", "open hand"))
    meta["data"] = {"sessions": [{"id": session["id"], "interval_columns": INTERVAL_COLUMNS,
                                  "intervals": [[iv["id"], iv["label"], iv["repetition"], 0, 1]
                                                for iv in session["intervals"]]}]}
    artifact_id = insert_artifact(clean_db, uid, weights, meta)
    announce_model(uid, artifact_id)
    key = {"X-API-Key": keystore.create_key(clean_db, "user", uid, "renamer")["key"]}
    workers(1)
    _wait_workers(db_conn, 1)

    async def scenario() -> tuple[Collector, float]:
        nc, coll = await _live([(uid, dev)])
        stream = asyncio.create_task(_stream(nc, [(uid, dev)], 600, speed=1.0))  # 3 s
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(base_url=settings.api_url, timeout=10) as client:
            for gid, to in ((ids["fist"], "power grip"), (ids["open hand"], "open palm")):
                r = await client.patch(f"/gestures/{gid}", json={"name": to}, headers=key)
                assert r.status_code == 200, r.text
        renamed_at = time.time()
        await stream
        await asyncio.sleep(1.0)
        await nc.close()
        return coll, renamed_at

    coll, renamed_at = asyncio.run(scenario())
    decided = [d for d in coll.of(uid) if d.seq < WARMUP_SEQ0]
    before = {d.raw_gesture for d in decided if d.decided_time < renamed_at - 0.2}
    after = [d for d in decided if d.decided_time > renamed_at + 0.5]
    assert before and before <= {"fist", "open hand"}, before
    assert after and {d.raw_gesture for d in after} <= {"power grip", "open palm"}, {d.raw_gesture for d in after}
    assert {d.gesture for d in after} <= {"power grip", "open palm", "UNKNOWN"}
    assert {d.model_id for d in decided} == {artifact_id}
    assert sorted(d.seq for d in decided) == expected_ends(0, 599, WIN, STEP)  # none lost across the rename
