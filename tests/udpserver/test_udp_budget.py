"""The per-device sample budget (udpserver.ingest, PROTOCOL.md "Sample budget"): a device sending faster than its
registered rate gets about 1.25 x that rate through (its excess rejected as too_fast) and costs the other devices
nothing; legitimate bursts (an outage backlog) pass whole."""

from __future__ import annotations

import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from udphelpers import Streamer, add_device, add_user, stored_seqs

from udpserver import protocol
from udpserver.ingest import BURST_MIN_SAMPLES, BURST_S, RATE_TOLERANCE, DeviceInfo, Ingestor, Record
from udpserver.protocol import Reject

KEY = bytes(range(32))
RATE = 500
CAP = BURST_S * RATE  # 15,000 samples at 500 Hz


def _pkt(dev: int, seq0: int, n: int, channels: int = 4, rate: int = RATE, boot: int = 1) -> bytes:
    return protocol.build_binary(dev, boot, seq0, 1000 + seq0 * 1000 // rate, rate, np.zeros((n, channels), int), KEY)


def _ingestor(rate: float = RATE, **kw) -> Ingestor:
    ing = Ingestor(**kw)
    ing.set_devices({1: DeviceInfo(1, 10, "binary", 4, float(rate), KEY),
                     2: DeviceInfo(2, 20, "binary", 4, float(rate), KEY)}, {})
    return ing


def test_a_flooding_device_gets_its_budget_through_and_the_rest_is_too_fast():
    """20 x its registered rate for 10 s (simulated receive times): the burst allowance plus 1.25 x the rate
    passes; every other packet is too_fast, counted for the device; a device at its rate meanwhile loses nothing."""
    ing = _ingestor()
    per, t0, seconds = 50, 1000.0, 10.0
    accepted = {1: 0, 2: 0}
    n_flood = int(20 * RATE * seconds / per)
    for i in range(n_flood):
        now = t0 + i * per / (20 * RATE)
        r = ing.handle(_pkt(1, i * per, per), now)
        assert isinstance(r, Record) or r == Reject.TOO_FAST
        accepted[1] += r.n if isinstance(r, Record) else 0
        if i % 20 == 0:  # device 2 at its rate, between device 1's packets
            r2 = ing.handle(_pkt(2, (i // 20) * per, per), now)
            assert isinstance(r2, Record), r2
            accepted[2] += r2.n
    budget = CAP + RATE * RATE_TOLERANCE * seconds
    assert budget - 2 * per <= accepted[1] <= budget
    too_fast = ing.states[1].rejected["too_fast"]
    assert too_fast * per == n_flood * per - accepted[1] and ing.rejected["too_fast"] == too_fast
    assert accepted[2] == n_flood // 20 * per and not ing.states[2].rejected
    # what was refused is a gap in the stream, as for lost packets
    assert ing.states[1].lost_samples == ing.states[1].last_seq + 1 - accepted[1]


def test_an_outage_backlog_passes_whole_while_the_budget_holds():
    """The sketch queues QUEUE_SAMPLES = 1024 samples while its Wi-Fi is down and sends them at once when it is
    back, then goes on live; the Myo bridge's packets arrive bunched. All of it passes, after a minute of
    streaming at the registered rate as before it; 30 s more of samples at once do not."""
    queue_samples, per = 1024, 25
    for rate in (RATE, 50):  # a slow device: its whole backlog is 20 s of samples
        ing = _ingestor(rate)
        now, seq = 1000.0, 0
        for _ in range(int(60 * rate / per)):  # a minute live
            assert isinstance(ing.handle(_pkt(1, seq, per, rate=rate), now), Record)
            now, seq = now + per / rate, seq + per
        now += queue_samples / rate  # the outage: the queue fills, then everything goes at once
        for k in range(0, queue_samples, per):
            r = ing.handle(_pkt(1, seq + k, min(per, queue_samples - k), rate=rate), now)
            assert isinstance(r, Record), (rate, k, r)
        seq += queue_samples
        for _ in range(int(5 * rate / per)):  # live again
            assert isinstance(ing.handle(_pkt(1, seq, per, rate=rate), now), Record)
            now, seq = now + per / rate, seq + per
        assert not ing.states[1].rejected and ing.states[1].lost_samples == 0
        # the budget is in force all along: the next 30 s (at least 4096 samples) at once is too much
        burst = int(max(BURST_S * rate, BURST_MIN_SAMPLES)) + per
        results = [ing.handle(_pkt(1, seq + k, per, rate=rate), now) for k in range(0, burst, per)]
        assert results[-1] == Reject.TOO_FAST and ing.states[1].rejected["too_fast"] >= 1


def test_the_largest_legal_packet_passes_for_a_slow_device():
    """4076 one-channel samples fit in one packet: the budget of a 1 Hz device still lets it through once."""
    ing = Ingestor()
    ing.set_devices({1: DeviceInfo(1, 10, "binary", 1, 1.0, KEY)}, {})
    n = protocol.MAX_BINARY_SAMPLES
    assert isinstance(ing.handle(protocol.build_binary(1, 1, 0, 0, 1, np.zeros((n, 1), int), KEY), 5.0), Record)
    assert ing.handle(protocol.build_binary(1, 1, n, n * 1000, 1, np.zeros((n, 1), int), KEY), 6.0) == Reject.TOO_FAST


def test_the_budget_is_spent_only_by_authentic_new_samples_and_can_be_turned_off():
    ing = _ingestor()
    for k in range(4):
        assert isinstance(ing.handle(_pkt(1, k * 1000, 1000), 1000.0), Record)
    # a forged packet, a replay, a wrong channel count and an old boot spend nothing of it
    forged = protocol.build_binary(1, 1, 4000, 0, RATE, np.zeros((1000, 4), int), b"x" * 32)
    assert ing.handle(forged, 1000.0) == Reject.BAD_TAG
    assert ing.handle(_pkt(1, 0, 1000), 1000.0) == Reject.REPLAY
    assert ing.handle(_pkt(1, 4000, 1000, channels=3), 1000.0) == Reject.CHANNEL_MISMATCH
    assert ing.handle(_pkt(1, 4000, 1000, boot=0), 1000.0) == Reject.OLD_BOOT
    seq = 4000
    while seq < CAP:  # exactly the rest of the 30 s passes, one sample more does not
        n = min(1000, int(CAP) - seq)
        assert isinstance(ing.handle(_pkt(1, seq, n), 1000.0), Record), seq
        seq += n
    assert ing.handle(_pkt(1, seq, 1), 1000.0) == Reject.TOO_FAST
    # a step back of the server's clock neither refills nor blocks refilling afterwards
    assert ing.handle(_pkt(1, seq, 1), 900.0) == Reject.TOO_FAST
    assert isinstance(ing.handle(_pkt(1, seq, 625), 901.0), Record)
    off = _ingestor(rate_tolerance=0)
    for k in range(40):
        assert isinstance(off.handle(_pkt(1, k * 1000, 1000), 1000.0), Record)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 2.0), st.integers(1, 1000)), min_size=1, max_size=200),
       st.sampled_from([1.0, 50.0, 200.0, 333.3, 500.0, 2000.0]))
def test_no_stream_gets_more_than_its_budget_and_a_stream_within_it_loses_nothing(steps, rate):
    """Whatever the pace: accepted samples <= capacity + tolerance x rate x elapsed. A stream that never sends
    more than the registered rate x elapsed time, however bunched, is never refused (the bucket starts full)."""
    cap = max(BURST_MIN_SAMPLES, BURST_S * rate)
    greedy, modest = _ingestor(rate), _ingestor(rate)
    now = t0 = 1000.0
    accepted = seq = sent_modest = 0
    room = cap  # what a bucket refilled at exactly the registered rate would let the modest stream send
    for dt, n in steps:
        now += dt
        r = greedy.handle(_pkt(1, seq, n), now)
        accepted += r.n if isinstance(r, Record) else 0
        assert accepted <= cap + RATE_TOLERANCE * rate * (now - t0) + 1e-6
        seq += n
        room = min(cap, room + dt * rate)
        m = min(n, int(room))
        if m >= 1:
            assert isinstance(modest.handle(_pkt(1, sent_modest, m), now), Record)
            sent_modest += m
            room -= m
    assert not modest.states[1].rejected


def test_a_flooding_device_is_bounded_and_the_others_lose_nothing(clean_db, udp_server, sender, collector):
    """Against the real server: device A (registered at 500 Hz) sends 40,000 samples as fast as it can (80 s of
    its rate) while B streams at its 500 Hz. A gets its 30 s burst allowance plus 1.25 x 500 Hz through, the rest
    is counted as too_fast; every sample of B is stored and published."""
    with clean_db.cursor() as cur:
        a = add_device(cur, add_user(cur), "binary", channels=4, rate=RATE, key=KEY)
        b = add_device(cur, add_user(cur), "binary", channels=4, rate=RATE, key=KEY)
    srv = udp_server()
    per = 50
    flood = [_pkt(a, i * per, per) for i in range(800)]
    stream = Streamer(b, KEY, 4, packets_per_s=50, n_packets=100, per_packet=10)  # 500 Hz for 2 s
    t0 = time.time()
    stream.start()
    sender.send(flood, pace_every=100, pause=0.01)
    stream.join(10)
    # a burst's packets count as accepted once journaled, just after they count as received
    m = srv.wait_for(lambda m: m["packets"]["received"] == len(flood) + 100
                     and m["packets"]["accepted"] + m["packets"]["rejected"] == len(flood) + 100,
                     20, "all packets received and counted as accepted or rejected")
    elapsed = time.time() - t0
    da, db_ = m["devices"][str(a)], m["devices"][str(b)]
    assert CAP <= da["accepted_samples"] <= CAP + RATE * RATE_TOLERANCE * elapsed, (da, elapsed)
    assert da["rejected"] == {"too_fast": len(flood) - da["accepted_samples"] // per}
    assert m["rejected"] == {"too_fast": da["rejected"]["too_fast"]}
    assert db_["rejected"] == {} and db_["accepted_samples"] == 1000
    m = srv.wait_settled()
    assert m["samples"]["stored"] == m["samples"]["published"] == da["accepted_samples"] + 1000
    assert stored_seqs(clean_db, b) == [(1, s) for s in range(1000)]
    assert collector.wait_samples(b, 1000) == [(1, s) for s in range(1000)]
    assert len(stored_seqs(clean_db, a)) == da["accepted_samples"]
    assert srv.stop() == 0
