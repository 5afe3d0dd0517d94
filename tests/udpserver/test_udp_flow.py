"""The server end to end against the real PostgreSQL and NATS: stored once, published once, counted."""

from __future__ import annotations

import time

import numpy as np
import pytest
from udphelpers import add_device, add_user, stored_seqs

from udpserver import protocol


def _binary_packets(dev: int, key: bytes, channels: int, n_packets: int, per_packet: int = 10, boot: int = 1,
                    seq_start: int = 0, rate: int = 500, millis_start: int = 1000, skip: set[int] = frozenset()):
    rng = np.random.default_rng(dev)
    out = []
    for i in range(n_packets):
        seq0 = seq_start + i * per_packet
        if i in skip:
            continue
        vals = rng.integers(-2000, 2000, size=(per_packet, channels))
        out.append(protocol.build_binary(dev, boot, seq0, millis_start + seq0 * 1000 // rate, rate, vals, key))
    return out


def test_binary_and_legacy_stored_once_published_once(clean_db, udp_server, sender, collector):
    with clean_db.cursor() as cur:
        u1, u2 = add_user(cur), add_user(cur)
        key = b"k" * 32
        d_bin = add_device(cur, u1, "binary", channels=4, key=key)
        d_leg = add_device(cur, u2, "legacy", channels=3)
    srv = udp_server()
    packets = _binary_packets(d_bin, key, 4, 200, skip={50, 51})  # a gap of 20 samples
    legacy = [protocol.build_legacy(u2, 5000 + 2 * i, [i % 4096, -i % 100, 7]) for i in range(1000)]
    mixed = [p for pair in zip(packets, legacy, strict=False) for p in pair] + legacy[len(packets):]
    sender.send(mixed)
    m = srv.wait_for(lambda m: m["samples"]["accepted"] == 198 * 10 + 1000, what="all accepted")
    m = srv.wait_settled()
    assert m["samples"]["stored"] == m["samples"]["published"] == 2980
    assert m["samples"]["lost"] == 20
    assert m["devices"][str(d_bin)]["lost_samples"] == 20
    assert m["devices"][str(d_leg)]["stored_samples"] == 1000
    assert m["packets"]["rejected"] == 0

    expected_bin = sorted((1, s) for s in range(2000) if not 500 <= s < 520)
    assert stored_seqs(clean_db, d_bin) == expected_bin
    assert stored_seqs(clean_db, d_leg) == [(0, s) for s in range(1000)]
    assert collector.wait_samples(d_bin, len(expected_bin)) == expected_bin
    assert collector.wait_samples(d_leg, 1000) == [(0, s) for s in range(1000)]
    assert not collector.errors

    # device time and stored values round-trip
    with clean_db.cursor() as cur:
        cur.execute("""SELECT device_millis, values, extract(epoch FROM device_time), extract(epoch FROM server_ts)
                       FROM sensor_samples WHERE device_id = %s AND seq = 3""", (d_leg,))
        millis, values, dev_time, server_ts = cur.fetchone()
    assert millis == 5006 and values == [3, 97, 7]
    assert abs(float(dev_time) - float(server_ts)) < 1.0
    assert srv.stop() == 0

    # every message says when it was published, on its receive times' clock (consumers tell a backlog by it)
    assert len(collector.published) == len(collector.messages)
    for msg, published in zip(collector.messages, collector.published, strict=True):
        assert published is not None and max(msg.recv_time) <= published <= time.time()


def test_restart_keeps_sequence_numbers(clean_db, udp_server, sender):
    with clean_db.cursor() as cur:
        u = add_user(cur)
        key = b"r" * 32
        d = add_device(cur, u, "binary", channels=2, key=key)
    srv = udp_server()
    first = _binary_packets(d, key, 2, 20)
    sender.send(first)
    srv.wait_for(lambda m: m["samples"]["stored"] == 200, what="stored")
    assert srv.stop() == 0
    srv = udp_server()
    sender.send(first[-5:] + _binary_packets(d, key, 2, 5, seq_start=200))  # replays, then new ones
    m = srv.wait_for(lambda m: m["samples"]["stored"] == 50 and m["rejected"].get("replay") == 5,
                     what="replays rejected after restart")
    assert m["devices"][str(d)]["last_seq"] == 249
    assert stored_seqs(clean_db, d) == [(1, s) for s in range(250)]


def test_restart_keeps_device_millis_whole(clean_db, udp_server, sender):
    """At 333 Hz the stored time of a block's last sample has a fraction; a restart resumes the device clock
    from it, and the next block's device_millis0 must still be the millis() the device sent."""
    with clean_db.cursor() as cur:
        u = add_user(cur)
        key = b"m" * 32
        d = add_device(cur, u, "binary", channels=1, rate=333, key=key)
    vals = np.zeros((50, 1), np.int16)
    srv = udp_server()
    sender.send([protocol.build_binary(d, 7, 0, 1000, 333, vals, key)])
    srv.wait_for(lambda m: m["samples"]["stored"] == 50, what="stored")
    assert srv.stop() == 0
    srv = udp_server()
    sender.send([protocol.build_binary(d, 7, 50, 1150, 333, vals, key)])
    srv.wait_for(lambda m: m["samples"]["stored"] == 50, what="stored after the restart")
    with clean_db.cursor() as cur:
        cur.execute("SELECT seq0, device_millis0 FROM sample_blocks WHERE device_id = %s ORDER BY seq0", (d,))
        assert cur.fetchall() == [(0, 1000.0), (50, 1150.0)]
    assert srv.stop() == 0


def test_a_packet_longer_than_a_message_is_split(clean_db, udp_server, sender, collector):
    """A legal binary packet holds up to 4076 one-channel samples; a NATS message at most 2000 (PROTOCOL.md):
    the record is published as several messages, numbered and timed as the samples of the whole packet."""
    from udpserver.publish import MAX_SAMPLES_PER_MESSAGE
    with clean_db.cursor() as cur:
        u = add_user(cur)
        key = b"s" * 32
        d = add_device(cur, u, "binary", channels=1, rate=1000, key=key)
    n = (protocol.MAX_PACKET_SIZE - 40) // 2
    vals = np.arange(n, dtype=np.int16).reshape(n, 1)
    srv = udp_server()
    sender.send([protocol.build_binary(d, 1, 0, 1000, 1000, vals, key)])
    srv.wait_settled()
    assert collector.wait_samples(d, n) == [(1, s) for s in range(n)]
    msgs = sorted((m for m in collector.messages if m.device_id == d), key=lambda m: m.seq0)
    assert len(msgs) == 3 and all(len(m.values) <= MAX_SAMPLES_PER_MESSAGE for m in msgs)
    assert [v for m in msgs for v in m.values] == vals.tolist()
    assert [t for m in msgs for t in m.device_millis] == [1000.0 + s for s in range(n)]
    assert srv.stop() == 0


def _reflashed_device(clean_db, udp_server, sender, key: bytes, rejected: int):
    """A device whose 100 samples of boot 5 are stored, then re-flashed: `rejected` packets of its boot 1 were
    refused as old_boot. Returns (device id, running server)."""
    with clean_db.cursor() as cur:
        dev = add_device(cur, add_user(cur), "binary", channels=4, key=key)
    srv = udp_server()
    sender.send(_binary_packets(dev, key, 4, 10, boot=5))
    srv.wait_for(lambda m: m["samples"]["stored"] == 100, what="the first boot stored")
    sender.send(_binary_packets(dev, key, 4, rejected, boot=1))
    srv.wait_for(lambda m: m["rejected"].get("old_boot") == rejected, what="the re-flashed device rejected")
    return dev, srv


def test_a_reflashed_device_is_accepted_again_after_its_boot_counter_is_reset(clean_db, udp_server, sender):
    """Re-flashing the sketch restarts its boot counter (in NVS): the server rejected every packet as old_boot
    and the only remedy was to register a new device. Resetting the device's boot counter makes the running
    server accept its next boot, stored after (never on top of) what it had sent before. The reset gives the
    device a new key: with the old one, a packet captured before the reset would pass as a newer boot."""
    from semg import repo

    key = b"r" * 32
    dev, srv = _reflashed_device(clean_db, udp_server, sender, key, rejected=10)
    m = srv.metrics()
    assert m["devices"][str(dev)]["rejected_boot"] == 1 and m["devices"][str(dev)]["boot"] == 5

    new_key = bytes.fromhex(repo.reset_device_boot(clean_db, dev)["secret_key_hex"])
    assert new_key != key
    reflashed = _binary_packets(dev, new_key, 4, 20, boot=1)
    deadline = time.monotonic() + 20  # the running server reloads its device list every 2 s
    while srv.metrics()["samples"]["stored"] < 110 and time.monotonic() < deadline:
        sender.send(reflashed[:1])
        time.sleep(0.3)
    sender.send(reflashed[1:10])
    m = srv.wait_for(lambda m: m["samples"]["stored"] == 200, what="the re-flashed boot stored")
    # a packet captured before the reset, replayed: under the old key it would be taken as a newer boot
    refused = m["rejected"].get("bad_tag", 0)  # (new-key packets sent before the server reloaded its keys)
    sender.send([_binary_packets(dev, key, 4, 20, boot=5)[15]])
    m = srv.wait_for(lambda m: m["rejected"].get("bad_tag", 0) == refused + 1, what="the captured packet refused")
    assert m["samples"]["stored"] == 200
    assert m["devices"][str(dev)]["boot"] == 1 and m["devices"][str(dev)]["last_seq"] == 99
    stored = stored_seqs(clean_db, dev)
    assert stored[:100] == [(5, s) for s in range(100)]
    new_boot = stored[100][0]
    assert new_boot > 5 and stored[100:] == [(new_boot, s) for s in range(100)]

    # a restarted server resumes the re-flashed device's stream where it stood, replays are still refused
    srv.stop()
    srv = udp_server()
    sender.send(reflashed)
    srv.wait_for(lambda m: m["samples"]["stored"] == 100 and m["rejected"].get("replay") == 10,
                 what="the rest stored, the repeats refused")
    assert stored_seqs(clean_db, dev)[100:] == [(new_boot, s) for s in range(200)]
    assert repo.reset_device_boot(clean_db, dev)["secret_key_hex"] != new_key.hex()
    with pytest.raises(repo.Invalid):
        with clean_db.cursor() as cur:
            legacy = add_device(cur, add_user(cur), "legacy", channels=2)
        repo.reset_device_boot(clean_db, legacy)


def test_after_a_boot_counter_reset_the_status_shows_no_made_up_boot(clean_db, udp_server, sender):
    """Between the reset and the re-flashed device's first packet, /metrics gave the device's boot as the last
    stored boot minus the new offset: -1, which the device status page showed as 'the server has already
    received boot -1'. That boot was received before the reset, under no offset: it is not given (None)."""
    from semg import repo

    key = b"q" * 32
    dev, srv = _reflashed_device(clean_db, udp_server, sender, key, rejected=1)
    repo.reset_device_boot(clean_db, dev)
    late = _binary_packets(dev, key, 4, 20, boot=5)
    deadline = time.monotonic() + 20  # until the server has reloaded the device (the old key is refused)
    i = 10
    while not srv.metrics()["rejected"].get("bad_tag") and time.monotonic() < deadline and i < 20:
        sender.send([late[i]])
        i += 1
        time.sleep(0.5)
    m = srv.wait_for(lambda m: m["rejected"].get("bad_tag"), what="the new key and offset loaded")
    status = m["devices"][str(dev)]
    assert status["boot"] is None, status
    assert status["rejected_boot"] == 1
    assert srv.stop() == 0


def test_lost_legacy_packets_leave_a_gap_in_the_sequence(clean_db, udp_server, sender, collector):
    """A legacy device samples every 1/rate s and stamps each sample with millis(): when the clock moves on by
    more periods than packets arrived (beyond the 1 ms resolution and some latency), the missing samples are
    counted as lost and their sequence numbers skipped, as for a binary device, so consumers (the inference
    worker resets its windows on a sequence gap) never take the samples on both sides for contiguous ones.
    They used to be numbered as if nothing was missing."""
    with clean_db.cursor() as cur:
        user = add_user(cur)
        dev = add_device(cur, user, "legacy", channels=2, rate=500)  # one sample every 2 ms
    srv = udp_server()
    # samples 40..49 are lost (a WiFi hiccup); the clock jitters by a millisecond elsewhere
    millis = [5000 + 2 * i + (1 if i % 7 == 3 else 0) for i in range(100)]
    sender.send([protocol.build_legacy(user, millis[i], [i, 7]) for i in range(100) if not 40 <= i < 50])
    m = srv.wait_for(lambda m: m["samples"]["accepted"] == 90, what="all accepted")
    m = srv.wait_settled()
    expected = [(0, s) for s in range(100) if not 40 <= s < 50]
    assert stored_seqs(clean_db, dev) == expected
    assert m["samples"]["lost"] == 10 and m["devices"][str(dev)]["lost_samples"] == 10
    assert collector.wait_samples(dev, 90) == expected
    with clean_db.cursor() as cur:
        cur.execute("SELECT seq, values FROM sensor_samples WHERE device_id = %s AND seq IN (39, 50)", (dev,))
        assert cur.fetchall() == [(39, [39, 7]), (50, [50, 7])]
    assert srv.stop() == 0
