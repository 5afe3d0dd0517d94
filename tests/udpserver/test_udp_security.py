"""Hostile and broken traffic against the running server: rejected, counted by reason, never stored."""

from __future__ import annotations

import os
import random
import time

import numpy as np
from udphelpers import add_device, add_user, stored_seqs

from udpserver import protocol


def _pkt(dev, key, seq0, boot=1, channels=4, n=10):
    vals = np.full((n, channels), seq0 % 1000)
    return protocol.build_binary(dev, boot, seq0, 1000 + seq0 * 2, 500, vals, key)


def test_spoofed_forged_replayed_packets_are_rejected_and_counted(clean_db, udp_server, sender):
    key = b"s" * 32
    with clean_db.cursor() as cur:
        u_bin, u_leg = add_user(cur), add_user(cur)
        dev = add_device(cur, u_bin, "binary", channels=4, key=key)
        leg = add_device(cur, u_leg, "legacy", channels=2)
    srv = udp_server()
    good = [_pkt(dev, key, 10 * i) for i in range(20)]
    sender.send(good[:10])
    srv.wait_for(lambda m: m["samples"]["stored"] == 100, what="first packets stored")
    bad = {
        "bad_tag": [_pkt(dev, b"x" * 32, 500), good[10][:-1] + bytes([good[10][-1] ^ 1])],
        "unknown_device": [_pkt(dev + 1000, key, 0)],
        "protocol_mismatch": [_pkt(leg, key, 0, channels=2)],
        "channel_mismatch": [_pkt(dev, key, 600, channels=3), protocol.build_legacy(u_leg, 5, [1, 2, 3])],
        "replay": [good[3], good[9]],
        "old_boot": [_pkt(dev, key, 700, boot=0)],
        "unknown_user": [protocol.build_legacy(u_bin, 5, [1, 2, 3, 4]), b"987654,5,1,2"],
        "truncated": [good[12][:30]],
        "oversize": [good[12] + b"\0", b"1" * 300],
        "non_numeric": [b"%d,5,1,abc" % u_leg],
        "out_of_range": [b"%d,5,1,40000" % u_leg],
        "bad_version": [good[12][:2] + b"\x07" + good[12][3:]],
        "malformed": [b"GET / HTTP/1.1\r\n\r\n"],
    }
    sender.send([p for ps in bad.values() for p in ps])
    sender.send(good[10:])
    expected = {reason: len(ps) for reason, ps in bad.items()}
    m = srv.wait_for(lambda m: m["samples"]["stored"] == 200 and m["packets"]["rejected"] == sum(expected.values()),
                     what="all rejections counted")
    assert m["rejected"] == expected
    assert m["devices"][str(dev)]["rejected"]["bad_tag"] == 2
    assert stored_seqs(clean_db, dev) == [(1, s) for s in range(200)]
    assert stored_seqs(clean_db, leg) == []


def test_random_garbage_and_mutations_store_nothing_invalid(clean_db, udp_server, sender):
    key = b"m" * 32
    with clean_db.cursor() as cur:
        dev = add_device(cur, add_user(cur), "binary", channels=4, key=key)
        u_leg = add_user(cur)
        leg = add_device(cur, u_leg, "legacy", channels=3)
    srv = udp_server()
    rnd = random.Random(1234)
    valid = [_pkt(dev, key, 10 * i) for i in range(300)]
    junk = []
    for _ in range(3000):
        kind = rnd.random()
        if kind < 0.3:
            junk.append(rnd.randbytes(rnd.randint(0, 1500)))
        else:
            p = bytearray(rnd.choice(valid))
            for _ in range(rnd.randint(1, 3)):
                i = rnd.randrange(len(p))
                p[i] ^= rnd.randint(1, 255)
            if rnd.random() < 0.3:
                del p[rnd.randrange(len(p)):]
            junk.append(bytes(p))
    valid_set = set(valid)
    junk = [p for p in junk if p not in valid_set]
    legacy_junk = [f"{u_leg},{rnd.randint(0, 99_999)},{rnd.randint(-40000, 40000)},{rnd.choice(['1', 'x', ''])},7"
                   .encode() for _ in range(500)]
    traffic = valid + junk + legacy_junk
    rnd.shuffle(traffic)
    # valid packets must reach the server in sequence order (later seq first would make earlier ones replays)
    order = iter(valid)
    traffic = [next(order) if p in valid_set else p for p in traffic]
    sender.send(traffic)
    m = srv.wait_for(lambda m: m["packets"]["received"] == len(traffic), what="all packets received")
    srv.wait_settled()
    assert stored_seqs(clean_db, dev) == [(1, s) for s in range(3000)]
    with clean_db.cursor() as cur:
        cur.execute("SELECT n, channels, values FROM sample_blocks WHERE device_id = %s", (leg,))
        legacy_rows = cur.fetchall()
        cur.execute("SELECT count(*) FROM sample_blocks WHERE device_id NOT IN (%s, %s)", (dev, leg))
        assert cur.fetchone()[0] == 0
    for n, channels, values in legacy_rows:  # whatever legacy text got through is well-formed
        assert n == 1 and channels == 3 and len(values) == 3 and all(-32768 <= v <= 32767 for v in values)
    m = srv.metrics()
    assert m["packets"]["accepted"] == 300 + len(legacy_rows)
    assert m["packets"]["accepted"] + m["packets"]["rejected"] == len(traffic)


def test_new_devices_and_rotated_keys_take_effect_while_running(clean_db, udp_server, sender):
    with clean_db.cursor() as cur:
        u = add_user(cur)
    srv = udp_server()
    key1, key2 = b"1" * 32, b"2" * 32
    with clean_db.cursor() as cur:
        dev = add_device(cur, u, "binary", channels=4, key=key1)
    t0 = time.monotonic()
    deadline = t0 + 10
    seq = 0
    while time.monotonic() < deadline:  # the first packets are unknown until the refresh picks it up
        sender.send([_pkt(dev, key1, seq)])
        seq += 10
        if srv.metrics()["samples"]["accepted"] > 0:
            break
        time.sleep(0.2)
    assert srv.metrics()["samples"]["accepted"] > 0, "new device not picked up within 10 s"
    with clean_db.cursor() as cur:
        cur.execute("UPDATE devices SET secret_key = %s, key_rotated_at = now() WHERE id = %s", (key2, dev))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        before = srv.metrics()["rejected"].get("bad_tag", 0)
        sender.send([_pkt(dev, key2, seq)])
        seq += 10
        time.sleep(0.2)
        m = srv.metrics()
        if m["rejected"].get("bad_tag", 0) == before:
            break
    else:
        raise AssertionError("rotated key not picked up within 10 s")
    sender.send([_pkt(dev, key1, seq)])  # the old key is refused from now on
    srv.wait_for(lambda m: m["rejected"].get("bad_tag", 0) == before + 1, 5, "old key rejected")


def test_metrics_answer_only_the_service_key_and_health_tells_no_devices(clean_db, udp_server, sender):
    """/metrics lists every device and when it streams (who records, when): with SEMG_BIND_HOST=0.0.0.0 it is
    on the network, so it answers only the service API key; /health answers anyone, with nothing per device."""
    import urllib.error
    import urllib.request

    from semg import secrets

    key = b"k" * 32
    with clean_db.cursor() as cur:
        dev = add_device(cur, add_user(cur), "binary", channels=4, key=key)
    srv = udp_server()
    sender.send([_pkt(dev, key, 0)])
    srv.wait_for(lambda m: m["samples"]["stored"] == 10, what="stored")

    def get(path: str, api_key: str | None) -> tuple[int, bytes]:
        req = urllib.request.Request(srv.metrics_url + path, headers={"X-API-Key": api_key} if api_key else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    good = secrets.service_api_key()
    for path in ("/metrics", f"/metrics?device={dev}"):
        for api_key in (None, "", good[:-1], good + "x", "wrong"):
            status, body = get(path, api_key)
            assert status == 401 and str(dev).encode() not in body and b"devices" not in body, (path, api_key, body)
        status, body = get(path, good)
        assert status == 200 and f'"{dev}"'.encode() in body
    status, body = get("/health", None)
    assert status == 200 and b'"status"' in body and b"devices" not in body and f'"{dev}"'.encode() not in body


def test_idle_connections_to_the_metrics_port_cannot_exhaust_the_servers_file_descriptors(clean_db, udp_server,
                                                                                         sender):
    """A client opening many idle connections to /metrics used to hold a file descriptor each (until a 5 s
    header timeout): past the process limit a fresh /health went unanswered, and the spool could not open its
    next segment, so accepted packets were dropped. Connections are now bounded (the oldest idle one is
    closed for a new one)."""
    import contextlib
    import resource
    import socket
    import urllib.request

    key = b"d" * 32
    with clean_db.cursor() as cur:
        dev = add_device(cur, add_user(cur), "binary", channels=4, key=key)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the server inherits a small limit
    try:
        srv = udp_server()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    sender.send([_pkt(dev, key, 0)])
    srv.wait_for(lambda m: m["samples"]["stored"] == 10, what="stored")
    host, port = srv.metrics_url.removeprefix("http://").split(":")
    idle: list[socket.socket] = []
    try:
        for _ in range(400):  # more than the server's file descriptor limit; bounded, loopback only
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex((host, int(port)))
            idle.append(s)
        time.sleep(1.5)  # the server has accepted what it can; its spool segment is due to be rolled
        t0 = time.monotonic()
        sender.send([_pkt(dev, key, 10)])
        with urllib.request.urlopen(srv.metrics_url + "/health", timeout=2) as r:
            assert r.status == 200
        assert time.monotonic() - t0 < 4  # still within the idle connections' header timeout
    finally:
        for s in idle:
            with contextlib.suppress(OSError):
                s.close()
    m = srv.wait_for(lambda m: m["packets"]["received"] == 2 and m["buffered"]["unstored_samples"] == 0, 10,
                     "the second packet handled")
    assert m["samples"]["stored"] == 20 and m["samples"]["dropped"] == 0, m["samples"]
    assert srv.stop() == 0


def test_the_udp_port_alone_listens_where_semg_udp_bind_host_says(clean_db, udp_server, sender, monkeypatch):
    """SEMG_UDP_BIND_HOST (here the loopback alias 127.0.0.5, a LAN address in real life) moves the sensor port
    alone: packets sent there are stored, nothing listens on 127.0.0.1's UDP port, and the metrics stay on
    SEMG_BIND_HOST (the fixture reads them at 127.0.0.1)."""
    from semg.embedded import port_in_use
    key = b"u" * 32
    with clean_db.cursor() as cur:
        dev = add_device(cur, add_user(cur), "binary", channels=4, key=key)
    monkeypatch.setenv("SEMG_UDP_BIND_HOST", "127.0.0.5")
    srv = udp_server()
    port = int(os.environ["UDP_PORT"])
    assert port_in_use(port, "127.0.0.5", udp=True) and not port_in_use(port, "127.0.0.1", udp=True)
    sender.addr = ("127.0.0.5", port)
    sender.send([_pkt(dev, key, 10 * i) for i in range(3)])
    srv.wait_for(lambda m: m["samples"]["stored"] == 30, what="packets sent to SEMG_UDP_BIND_HOST stored")
