"""The worker's own bookkeeping, on real objects: batches for /predict, vote histories across model switches
and resets, and storing decisions when a user or model was deleted meanwhile (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from ml_model.nat_inference import CLOCK_STEP_BACK_S, HostClock, ModelSpec, Options, UserStream, Worker
from ml_model.rest.schemas import MAX_PREDICT_ITEMS, PredictRequest
from semg.messages import SamplesMessage

SPEC = ModelSpec(artifact_id=1, classes=("REST", "a", "b"), n_device_channels=2, sample_rate_hz=100.0, window=4,
                 step=2)


def _msg(uid: int, seq0: int, n: int, device: int = 1) -> SamplesMessage:
    return SamplesMessage(userid=uid, device_id=device, boot=0, sample_rate_hz=100, channels=2, seq0=seq0,
                          device_millis=[10.0 * (seq0 + i) for i in range(n)], recv_time=[time.time()] * n,
                          values=[[seq0 + i, -(seq0 + i)] for i in range(n)])


def _worker(**opts) -> Worker:
    return Worker(settings=None, opts=Options(api_url="http://127.0.0.1:9", **opts))


def test_a_batch_never_exceeds_what_predict_accepts():
    """Many users each completing one window: the batch stops at the API's item limit, in arrival order."""
    w = _worker(max_batch_windows=4096)
    streams = {u: UserStream(u, SPEC, votes=3) for u in range(1, MAX_PREDICT_ITEMS + 301)}
    for u, s in streams.items():
        s.append(_msg(u, 0, 3))
    for u, s in streams.items():
        w.pending.append(s.append(_msg(u, 3, 1)))  # one window each
    batch = w._take_batch()
    assert len(batch) == MAX_PREDICT_ITEMS and [r.user_id for r in batch] == list(range(1, MAX_PREDICT_ITEMS + 1))
    PredictRequest.model_validate({"items": [w._encode(r) for r in batch]})  # the API takes it
    assert len(w._take_batch()) == 300 and not w.pending


def test_a_users_consecutive_windows_travel_as_one_item():
    w = _worker()
    s1, s2 = UserStream(1, SPEC, votes=3), UserStream(2, SPEC, votes=3)
    for seq0 in range(0, 40, 2):
        for s in (s1, s2):
            r = s.append(_msg(s.user_id, seq0, 2))
            if r is not None:
                w.pending.append(r)
    whole = UserStream(1, SPEC, votes=3).append(_msg(1, 0, 40))
    batch = w._take_batch()
    assert [r.user_id for r in batch] == [1, 2]
    np.testing.assert_array_equal(batch[0].end_seq, whole.end_seq)
    np.testing.assert_array_equal(batch[0].windows, whole.windows)
    np.testing.assert_array_equal(batch[0].end_millis, whole.end_millis)
    # after a reset (new epoch) the windows are another run: not merged into the same item
    w.pending.append(s1.append(_msg(1, 100, 4)))
    w.pending.append(s1.append(_msg(1, 104, 2)))
    w.pending.append(s1.append(_msg(1, 50, 4)))  # older than the run: ignored, nothing cut
    w.pending = type(w.pending)(r for r in w.pending if r is not None)
    assert [len(r.windows) for r in w._take_batch()] == [2]


def test_votes_never_mix_models_or_runs():
    s = UserStream(1, SPEC, votes=3)
    old = s.append(_msg(1, 0, 8))  # windows cut for model 1
    s.votes_for(old.epoch, 1).extend([[1, 0, 0], [1, 0, 0]])
    s.new_votes()  # the worker switched to model 2 (say 4 classes) while `old` was still at /predict
    late = s.votes_for(old.epoch, 1)  # results of the old windows come back: voting among themselves
    late.append([0, 1, 0])
    assert late is not s.history and len(s.history) == 0
    new = s.append(_msg(1, 8, 2))
    h = s.votes_for(new.epoch, 2)
    h.append([0, 0, 0, 1])
    assert h is s.history and list(s.history) == [[0, 0, 0, 1]]
    # the API answers with yet another model for the current windows: its votes start afresh
    assert list(s.votes_for(new.epoch, 3)) == [] and s.history_model == 3
    s.append(_msg(1, 50, 4))  # a gap: a new run, a new epoch
    assert s.votes_for(new.epoch, 3) is not s.history


def test_a_deleted_user_or_model_loses_only_its_own_decisions(settings, clean_db):
    from ml_model.rest.demo_models import insert_artifact, random_artifact
    from semg import repo
    alive = repo.create_user(clean_db, "Alive", "alive@example.org")["id"]
    gone = repo.create_user(clean_db, "Gone", "gone@example.org")["id"]
    weights, meta = random_artifact(2, 100.0)
    model = insert_artifact(clean_db, alive, weights, meta)
    w = Worker(settings=settings, opts=Options(api_url="http://127.0.0.1:9"))
    now = time.time()

    def row(u, m, i):
        return (u, m, "REST", 0.9, None, float(i), now, now, 1.0, None)  # no channel faults

    w.to_store = ([row(alive, model, i) for i in range(50)] + [row(gone, None, 0)]
                  + [row(alive, 999_999, i) for i in range(50, 60)])  # a model deleted meanwhile
    with clean_db.cursor() as cur:
        cur.execute("DELETE FROM users WHERE id = %s", (gone,))
    clean_db.commit()
    asyncio.run(w.store_now())
    w._store_conn.close()
    with clean_db.cursor() as cur:
        cur.execute("SELECT model_id, count(*) FROM predictions GROUP BY 1 ORDER BY 1 NULLS LAST")
        # the deleted model's rows without their model id; the deleted user's row alone is dropped
        assert cur.fetchall() == [(model, 50), (None, 10)]
    assert w.stats.stored == 60 and not w.to_store


def test_votes_never_span_windows_that_got_no_decision(services):
    """Windows dropped in between (too old, /predict failed) leave a hole: the first window after it must not be
    outvoted by windows from before it (the user may have changed gesture meanwhile)."""
    from semg import natsio

    async def scenario() -> list[tuple]:
        w = _worker(votes=3)
        w.nc = await natsio.connect("admin")
        s = w.streams[1] = UserStream(1, SPEC, votes=3)

        async def decide(ready, probs):
            res = {"model_id": SPEC.artifact_id, "classes": list(SPEC.classes), "error": None,
                   "predictions": [{"probabilities": probs}] * len(ready.windows)}
            await w._handle_results([ready], {"results": [res]})

        await decide(s.append(_msg(1, 0, 8)), [0.9, 0.05, 0.05])  # windows ending at 3, 5, 7: REST
        assert s.append(_msg(1, 8, 8)) is not None  # windows ending at 9..15: dropped, never decided
        await decide(s.append(_msg(1, 16, 2)), [0.05, 0.9, 0.05])  # ending at 17: "a"
        await decide(s.append(_msg(1, 18, 2)), [0.05, 0.9, 0.05])  # ending at 19, right after 17: votes with it
        await w.nc.close()
        return w.to_store

    rows = asyncio.run(scenario())
    assert [r[2] for r in rows] == ["REST", "REST", "REST", "a", "a"]


def _timed(uid: int, seq0: int, n: int, recv: float, boot: int = 0, device: int = 1) -> SamplesMessage:
    """n samples at 100 Hz from seq0, taken at device time 10 ms * seq, all received at `recv`."""
    return SamplesMessage(userid=uid, device_id=device, boot=boot, sample_rate_hz=100, channels=2, seq0=seq0,
                          device_millis=[10.0 * (seq0 + i) for i in range(n)], recv_time=[recv] * n,
                          values=[[seq0 + i, -(seq0 + i)] for i in range(n)])


@pytest.mark.parametrize("skew", [0.0, -3600.0, 3600.0])
def test_samples_a_sensor_kept_through_a_wifi_outage_are_not_decided_as_live(skew):
    """The sketch keeps ~2 s of samples while its WiFi is down and sends them when it is back: they arrive with
    fresh receive times, so only the device clock shows how old they are. Windows of samples taken longer ago
    than --max-age get no decision; the fresh end of the backlog does. The UDP server's clock may be `skew` s
    ahead of the worker's (another host): the ages are the same."""
    w = _worker(max_age_s=1.0, max_batch_windows=100_000)
    s = UserStream(1, SPEC, votes=3)
    m0 = time.monotonic() - 6.6  # device time 0 on the worker's clock; "now" is 6.6 s into the stream
    t0 = time.time() - 6.6 + skew  # the same on the UDP server's clock
    lat = np.random.default_rng(0).uniform(0.02, 0.04, 60)  # each packet of 5 samples arrives 20-40 ms after
    for i, seq0 in enumerate(range(0, 300, 5)):  # 3 s live, long decided (not pending here)
        s.append(_timed(1, seq0, 5, t0 + (seq0 + 4) / 100 + lat[i]), arrival=m0 + (seq0 + 4) / 100 + lat[i] + 0.002)
    # WiFi down from 3 s to 6.5 s: the sensor kept 3.5 s of samples and sends them all, received at 6.53 s
    r = s.append(_timed(1, 300, 350, t0 + 6.53), arrival=m0 + 6.532)
    # the estimate is the true time taken plus the fastest delivery (20 + 2 ms), never the receive time
    taken = r.end_taken + r.host.offset(m0 + 6.532)  # on the worker's clock
    assert np.all(np.abs(taken - (m0 + r.end_seq / 100) - 0.022) < 0.005)
    w.pending.append(r)
    n_windows = len(r.end_seq)
    before = time.monotonic()
    decided = np.concatenate([b.end_seq for b in w._take_batch()])
    after = time.monotonic()
    # windows of samples taken more than 1 s before the check (by the estimate: taken + 22 ms) are stale, the
    # rest are all decided: at 6.6 s into the stream that is from sample 558 on, later on a busy machine
    first = [(t - m0 - 1.0 - 0.022) * 100 for t in (before, after)]
    assert first[0] - 2 <= decided.min() <= first[1] + 2, (first, decided.min())
    assert decided.min() < 600 and decided.tolist() == list(range(decided.min(), 650, 2)), decided
    assert w.stats.dropped == n_windows - len(decided)


def test_the_clock_estimate_follows_a_device_clock_that_runs_slow():
    """A device crystal running 200 ppm slow: over an hour its samples seem 0.72 s later each hour by their
    receive times; the estimate must follow, not call live samples old."""
    s = UserStream(1, SPEC, votes=3)
    t = np.arange(0, 3600, 0.5)  # one packet every 0.5 s of device time for an hour
    recv = 1_000.0 + t * (1 + 200e-6) + 0.03
    for tt, rr in zip(t, recv, strict=True):
        taken = s.taken_times(1, 0, np.array([tt * 1000.0]), np.array([rr]))
    assert rr - taken[0] < 0.05  # the live sample is seen as taken ~now (within the delivery delay)
    # a new boot starts a new estimate
    assert s.taken_times(1, 1, np.array([0.0]), np.array([5000.0]))[0] == 5000.0


def test_a_backlog_a_worker_sees_first_is_aged_by_the_server_clock_another_device_anchors():
    """A worker (re)started while the UDP server publishes what it kept through an outage: the first samples it
    sees of user 1's device are 10 s old. User 2's live device tells the worker how the server's clock (here an
    hour ahead) maps to its own, so user 1's backlog is stale, and only its last --max-age is decided."""
    w = _worker(max_age_s=2.0, max_batch_windows=100_000)
    m_now, skew = time.monotonic(), 3600.0
    t_now = time.time() + skew  # the server's clock
    live = UserStream(2, SPEC, votes=3, host=w.host_clock)
    for i in range(10):  # user 2: live, each packet here 3 ms after the server received it
        live.append(_timed(2, 5 * i, 5, t_now - 0.5 + 0.05 * i, device=2), arrival=m_now - 0.5 + 0.05 * i + 0.003)
    s = UserStream(1, SPEC, votes=3, host=w.host_clock)
    for i, seq0 in enumerate(range(0, 1000, 10)):  # user 1: 10 s kept by the server, published in 0.2 s
        r = s.append(_timed(1, seq0, 10, t_now - 10 + (seq0 + 9) / 100),
                      arrival=m_now - 0.2 + 0.002 * i)
        if r is not None:
            w.pending.append(r)
    decided = np.concatenate([b.end_seq for b in w._take_batch()])
    assert 795 <= decided.min() <= 805 and decided.max() == 999, decided


@pytest.mark.parametrize("skew", [0.0, -3600.0, 3600.0])
def test_a_backlog_a_fresh_worker_sees_first_is_aged_by_its_publish_time(skew):
    """Nothing anchors the worker's estimate of the server's clock when the first samples it ever sees are a
    backlog (the host restarted after a power loss; the UDP server publishes what it had stored): by receive
    times alone the newest of them look live, and the last --max-age of the backlog was decided. The server's
    publish time (Semg-Published), on the same clock as the receive times, shows they are 10 s old or more.
    Without it (a server that predates the header) the worker does what it did."""
    for published, want in ((True, 0), (False, 2.0 * 100 / SPEC.step)):
        w = _worker(max_age_s=2.0, max_batch_windows=100_000)
        m_now, t_now = time.monotonic(), time.time() + skew  # the worker's clock, the server's
        s = UserStream(1, SPEC, votes=3, host=w.host_clock)
        for i, seq0 in enumerate(range(0, 1000, 10)):  # 10 s received 20 to 10 s ago, published in 0.2 s
            r = s.append(_timed(1, seq0, 10, t_now - 20 + (seq0 + 9) / 100), arrival=m_now - 0.2 + 0.002 * i,
                         published=t_now - 0.2 + 0.002 * i - 0.003 if published else None)
            if r is not None:
                w.pending.append(r)
        n = sum(len(b.end_seq) for b in w._take_batch())
        assert abs(n - want) <= 2, (published, n)


def test_the_server_clock_stepping_back_is_followed_within_a_minute_and_a_backlog_is_not_taken_for_it():
    """The UDP server host's clock steps back by 5 s (NTP starting late): deliveries then all look 5 s slow. Left
    to CLOCK_RISE, every window would be stale for 5000 s; after CLOCK_STEP_BACK_S of it the clock re-anchors. A
    backlog of the same length interleaved with a live device's deliveries changes nothing."""
    host, t0 = HostClock(), 1000.0
    for i in range(100):  # 10 s of live traffic, 3 ms from the server to here
        host.see(t0 + 0.1 * i, 5000.0 + 0.1 * i - 0.003)
    anchored = host.offset(t0 + 10)
    for i in range(100, 100 + int(CLOCK_STEP_BACK_S * 10) + 10):  # the server's clock is now 5 s behind
        host.see(t0 + 0.1 * i, 5000.0 + 0.1 * i - 0.003 - 5.0)
        if i == 100 + int(CLOCK_STEP_BACK_S * 10) - 20:
            assert abs(host.offset(t0 + 0.1 * i) - anchored) < 0.1  # not yet: it could still be a backlog
    assert abs(host.offset(t0 + 0.1 * i) - (anchored + 5.0)) < 0.1

    host, t0 = HostClock(), 1000.0
    for i in range(100 + int(CLOCK_STEP_BACK_S * 10) * 2):  # a server backlog 10 s old, live deliveries between
        host.see(t0 + 0.1 * i, 5000.0 + 0.1 * i - 0.003 - (10.0 if i >= 100 and i % 5 else 0.0))
        assert abs(host.offset(t0 + 0.1 * i) - anchored) < 0.2


def test_the_worker_lets_go_of_an_idle_api_connection_before_the_api_closes_it():
    """The worker kept idle connections to the API for 60 s, the API closes them after 5 s: a /predict sent on one
    just as the API closed it failed and its windows were dropped (1 in 62 requests sent 4.97-5.03 s after the last
    one, measured with aiohttp against uvicorn). aiohttp checks a pooled connection's idle time when it takes it,
    so a pool limit below the API's keep-alive leaves no such moment."""
    from ml_model.nat_inference import POOL_IDLE_S, ApiClient
    from ml_model.rest.connections import KEEP_ALIVE_S

    async def pool_limit() -> float:
        client = ApiClient("http://127.0.0.1:9", "key", timeout_s=1, max_connections=1)
        try:
            return client._session.connector._keepalive_timeout
        finally:
            await client.close()

    assert asyncio.run(pool_limit()) == POOL_IDLE_S <= KEEP_ALIVE_S - 1  # a second's margin for a busy machine
