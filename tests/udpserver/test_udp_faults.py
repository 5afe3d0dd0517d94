"""Fault injection against the running server: NATS down, PostgreSQL down, kill -9 (real services)."""

from __future__ import annotations

import contextlib
import os
import re
import time

import numpy as np
import pytest
from udphelpers import Streamer, add_device, add_user, stored_seqs

from semg import db
from udpserver import protocol


def _device(conn, channels: int = 4) -> tuple[int, bytes]:
    """A binary device registered at the highest rate: these tests use it as a load source, sending up to 20 x
    the 500 Hz its packets say (to fill the spool, the memory bound, a backlog) and up to 140,000 samples at once,
    which the sample budget of a device registered at 500 Hz would refuse as too_fast (PROTOCOL.md)."""
    key = b"f" * 32
    with conn.cursor() as cur:
        return add_device(cur, add_user(cur), "binary", channels=channels, rate=protocol.MAX_RATE_HZ, key=key), key


def restart(services, name: str, attempts: int = 5) -> None:
    """Start a stopped service again; retried, because on a busy shared machine a start can fail
    transiently (e.g. a slow shutdown was cut short and its children still hold shared memory for a
    moment). The log tail goes into the error if it never comes back."""
    for attempt in range(attempts):
        try:
            services.start(name)
            return
        except (RuntimeError, ConnectionError):
            if attempt == attempts - 1:
                log = services.logs / f"test-{name}.log"
                tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
                raise RuntimeError(f"{name} did not restart:\n" + "\n".join(tail)) from None
            time.sleep(2.0)


@contextlib.contextmanager
def service_down(services, srv, name: str, timeout: float = 15):
    """`name` ("postgres" or "nats") stopped for the block, which starts once the server has noticed;
    started again after it, however it ends."""
    flag, label = {"postgres": ("db_connected", "PostgreSQL"), "nats": ("nats_connected", "NATS")}[name]
    services.stop(name)
    try:
        srv.wait_for(lambda m: not m[flag], timeout, f"server to notice {label} is down")
        yield
    finally:
        restart(services, name)


def protocol_packet(dev: int, key: bytes, seq0: int) -> bytes:
    return protocol.build_binary(dev, 1, seq0, 1000 + 2 * seq0, 500, np.full((10, 4), seq0 % 100), key)


def _fresh_seqs(device_id: int) -> list[tuple[int, int]]:
    with contextlib.closing(db.connect()) as conn:
        return stored_seqs(conn, device_id)


def _streaming_for_16s(clean_db, udp_server):
    """A device sending 16,000 samples over 16 s to a new server, 3 s into the stream: (device, server, stream)."""
    dev, key = _device(clean_db)
    srv = udp_server()
    stream = Streamer(dev, key, 4, packets_per_s=100, n_packets=1600)
    stream.start()
    time.sleep(3)
    return dev, srv, stream


def test_nats_down_10s_loses_nothing_stored(clean_db, services, udp_server, collector):
    dev, srv, stream = _streaming_for_16s(clean_db, udp_server)
    with service_down(services, srv, "nats", 10):
        time.sleep(10)
        during = srv.metrics()
    stream.join(30)
    m = srv.wait_settled(60)
    assert during["samples"]["stored"] > during["samples"]["published"], "storage must go on while NATS is down"
    assert m["samples"]["accepted"] == m["samples"]["stored"] == m["samples"]["published"] == 16_000
    assert m["samples"]["publish_dropped"] == 0
    expected = [(1, s) for s in range(16_000)]
    assert _fresh_seqs(dev) == expected
    got = collector.wait_samples(dev, 16_000, timeout=30)
    assert sorted(set(got)) == expected, f"{len(set(got))} of 16000 published samples arrived"
    assert srv.stop() == 0


def test_postgres_down_10s_loses_nothing(clean_db, services, udp_server, collector):
    dev, srv, stream = _streaming_for_16s(clean_db, udp_server)
    with service_down(services, srv, "postgres"):
        time.sleep(10)
        during = srv.metrics()
    assert during["buffered"]["unstored_samples"] > 0 and during["samples"]["dropped"] == 0
    stream.join(30)
    m = srv.wait_settled(60)
    assert m["samples"]["accepted"] == m["samples"]["stored"] == m["samples"]["published"] == 16_000
    assert m["samples"]["dropped"] == 0
    expected = [(1, s) for s in range(16_000)]
    assert _fresh_seqs(dev) == expected
    assert sorted(set(collector.wait_samples(dev, 16_000))) == expected
    assert srv.stop() == 0


def test_kill9_keeps_every_accepted_sample(clean_db, services, udp_server):
    """PostgreSQL is down, so accepted samples exist only in the spool when the server is killed."""
    dev, key = _device(clean_db)
    srv = udp_server()
    stream = Streamer(dev, key, 4, packets_per_s=200, n_packets=1000)
    stream.start()
    time.sleep(1)
    with service_down(services, srv, "postgres"):
        srv.wait_for(lambda m: m["buffered"]["unstored_samples"] >= 2000 and not m["db_connected"], 20,
                     "a backlog of unstored samples")
        before = srv.metrics()
        srv.kill9()  # while the stream is still going
        killed_at_sent = stream.sent
    accepted = before["samples"]["accepted"]
    assert before["samples"]["stored"] < accepted
    stream.halt()
    srv = udp_server()
    m = srv.wait_settled(60)
    assert m["samples"]["replayed"] >= accepted - before["samples"]["stored"]
    seqs = _fresh_seqs(dev)
    assert len(seqs) == len(set(seqs))
    # everything accepted before the kill is there, as one contiguous run from the start
    assert seqs[:accepted] == [(1, s) for s in range(accepted)]
    assert len(seqs) <= killed_at_sent * 10
    assert srv.stop() == 0


def test_kill9_mid_stream_with_database_up(clean_db, udp_server, sender):
    dev, key = _device(clean_db)
    srv = udp_server()
    stream = Streamer(dev, key, 4, packets_per_s=1000, n_packets=5000)
    stream.start()
    srv.wait_for(lambda m: m["samples"]["accepted"] >= 10_000, 20, "traffic")
    before = srv.metrics()
    srv.kill9()
    stream.halt()
    srv = udp_server()
    srv.wait_settled(60)
    seqs = _fresh_seqs(dev)
    accepted = before["samples"]["accepted"]
    assert len(seqs) >= accepted and seqs[:accepted] == [(1, s) for s in range(accepted)]
    # the restarted server knows where the stream stood: a replay of the first packet is refused
    sender.send(stream.packets[:1])
    srv.wait_for(lambda m: m["rejected"].get("replay") == 1, 10, "replay rejected after restart")
    assert srv.stop() == 0


def test_starts_before_postgres_and_nats(clean_db, services, udp_server, sender):
    from udphelpers import Collector

    dev, key = _device(clean_db)
    packets = [protocol_packet(dev, key, 10 * i) for i in range(100)]
    services.stop("nats")
    services.stop("postgres")
    try:
        srv = udp_server(wait_ready=False)
        assert srv.health()["status"] == "starting"
        sender.send(packets[:5])
        srv.wait_for(lambda m: m["rejected"].get("not_ready") == 5, 10, "not_ready rejections")
        restart(services, "postgres")
        srv.wait_for(lambda m: m["ready"] and m["db_connected"], 30, "ready once PostgreSQL is up")
        sender.send(packets[5:50])
        m = srv.wait_for(lambda m: m["samples"]["stored"] == 450, 20, "stored while NATS is still down")
        assert m["samples"]["published"] == 0 and not m["nats_connected"]
        assert srv.health()["status"] == "degraded"
    finally:
        for name in ("postgres", "nats"):
            if name not in services.procs:
                restart(services, name)
    collector = Collector().start_and_wait()
    try:
        srv.wait_for(lambda m: m["samples"]["published"] == 450, 40, "backlog published once NATS is up")
        sender.send(packets[50:])
        m = srv.wait_settled()
        assert m["samples"]["stored"] == m["samples"]["published"] == 950
        assert collector.wait_samples(dev, 500)[-1] == (1, 999)
    finally:
        collector.close()
    assert _fresh_seqs(dev) == [(1, s) for s in range(50, 1000)]
    assert srv.stop() == 0


def test_sigterm_commits_and_publishes_what_is_buffered(clean_db, udp_server, sender):
    dev, key = _device(clean_db)
    srv = udp_server()
    sender.send([protocol_packet(dev, key, 10 * i) for i in range(3000)], pace_every=500, pause=0.001)
    assert srv.stop() == 0
    last = [line for line in srv.log_tail(5).splitlines() if "stopped:" in line][-1]
    accepted, stored, published = (int(x) for x in re.findall(r"(?:accepted|stored|published) (\d+)", last))
    assert accepted == stored == published and "0 unstored and 0 unpublished" in last
    assert len(_fresh_seqs(dev)) == accepted > 0


def test_spool_overflow_while_postgres_is_down_is_counted_as_dropped(clean_db, services, udp_server, sender):
    dev, key = _device(clean_db)
    srv = udp_server("--spool-max-mb", "1")
    packets = [protocol_packet(dev, key, 10 * i) for i in range(12_000)]  # ~1.7 MB of spool records
    with service_down(services, srv, "postgres"):
        sender.send(packets, pace_every=100, pause=0.002)
        # a burst counts as accepted or dropped once it is journaled, just after its packets count as received
        # (CI once read the metrics in between: 24 packets received, not yet counted)
        m = srv.wait_for(lambda m: m["packets"]["received"] == len(packets)
                         and m["samples"]["accepted"] + m["samples"]["dropped"] == 10 * len(packets),
                         30, "all packets received and each sample counted as accepted or dropped")
        assert m["samples"]["dropped"] > 0 and m["buffered"]["spool_bytes"] <= 1 << 20
    m = srv.wait_settled(60)
    assert m["samples"]["stored"] == m["samples"]["accepted"] == len(_fresh_seqs(dev))
    assert srv.stop() == 0


def test_writer_backs_off_while_postgres_is_down_despite_traffic(settings, monkeypatch):
    """Every received burst wakes the writer; while PostgreSQL is away that must not mean a connection
    attempt per burst (the backoff runs its course; only stop() cuts it short)."""
    from semg.embedded import free_port
    from udpserver import storage
    from udpserver.spool import Chunk

    down = settings.model_copy(update={"postgres_host": "127.0.0.1", "postgres_port": free_port()})
    attempts = []
    real_connect = storage.db.connect

    def counting_connect(*a, **kw):
        attempts.append(time.monotonic())
        return real_connect(*a, **kw)

    monkeypatch.setattr(storage.db, "connect", counting_connect)
    writer = storage.DbWriter(down, lambda c: b"", lambda *a: None, lambda *a: None)
    writer.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:  # ~200 bursts/s
        writer.submit(Chunk(1, 0, 16, 1, 1, {1: [1, 1]}, b""))
        time.sleep(0.005)
    writer.stop(0.5)
    writer.join(10)
    assert not writer.is_alive()
    # backoff 0.2, 0.4, 0.8, 1.6 s ... is about 5 attempts in 3 s; a burst-driven storm is hundreds
    assert 1 <= len(attempts) <= 20, f"{len(attempts)} connection attempts in 3 s"


def test_shedding_skips_only_the_oldest_batches(clean_db, services, udp_server):
    """NATS down, spool past 80 %: only as many of the oldest stored batches are left unpublished as it
    takes to get back under the mark, not the whole backlog; the rest is published once NATS is back."""
    from udphelpers import Collector, Sender

    dev, key = _device(clean_db)
    srv = udp_server("--spool-max-mb", "1")
    n_packets = 6500  # ~0.95-1.0 MB of spool records (144 B each plus chunk headers): past 80 % of 1 MiB
    with service_down(services, srv, "nats"):
        s = Sender()
        s.send([protocol_packet(dev, key, 10 * i) for i in range(n_packets)], pace_every=20, pause=0.02)
        s.sock.close()
        srv.wait_for(lambda m: m["samples"]["stored"] == m["samples"]["accepted"] == 10 * n_packets,
                     30, "everything stored while NATS is down")
    collector = Collector().start_and_wait()
    try:
        m = srv.wait_settled(60)
        shed = m["samples"]["publish_dropped"]  # batches committed last may still be shed until NATS is back
        assert 0 < shed <= 0.3 * m["samples"]["stored"], f"{shed} of {m['samples']['stored']} samples shed"
        assert m["samples"]["published"] + shed == m["samples"]["stored"] == 10 * n_packets
        # the oldest are the ones not published: what arrives is the newest part of the stream, contiguous
        expected = [(1, s) for s in range(shed, 10 * n_packets)]
        assert sorted(set(collector.wait_samples(dev, len(expected)))) == expected
    finally:
        collector.close()
    assert srv.stop() == 0


def test_memory_stays_bounded_while_postgres_is_down(settings, tmp_path):
    """--memory-max-mb bounds the heap of a backlog, not just the payload bytes kept: with PostgreSQL away
    (the writer takes nothing off its queue) every receive burst's chunk used to stay a ~460 B object.
    Nothing may be lost or doubled by merging what is read back from the spool."""
    import asyncio
    import tracemalloc

    from udpserver.ingest import DeviceInfo
    from udpserver.spool import ChunkBuilder, iter_records
    from udpserver.udpserver import Server, parse_args

    n = 30_000  # one legacy packet per burst: ~2.9 MB of spool, ~14 MB of chunk objects before the fix
    packets = [protocol.build_legacy(1, i, [i % 100] * 8) for i in range(n)]

    async def main():
        args = parse_args(["--spool-dir", str(tmp_path / "spool"), "--memory-max-mb", "1"], settings)
        srv = Server(settings, args)  # its writer thread is not started: as good as PostgreSQL being down
        try:
            srv.ingestor.set_devices({1: DeviceInfo(1, 1, "legacy", 8, 1000.0, None)}, {})
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for i, p in enumerate(packets):
                    b = srv._builder = ChunkBuilder()
                    b.add(srv.ingestor.handle(p, 1000.0 + i / 1000))
                    srv._journal()
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            m = srv.metrics("devices=0")
            assert m["samples"]["accepted"] == n and m["samples"]["dropped"] == 0
            assert grown < 3 * srv.memory_max, f"heap grew by {grown} B for a 1 MiB bound"
            assert m["buffered"]["memory_bytes"] <= srv.memory_max + (64 << 10)
            queued = list(srv.writer.queue)
            assert sum(c.nsamples for c in queued) == n
            seqs = [h[3] for c in queued for h, _, _ in iter_records(c.data if c.data is not None
                                                                     else srv.spool.read(c))]
            assert seqs == list(range(n))
        finally:
            srv.spool.close()
            srv.control.shutdown(wait=False)

    asyncio.run(main())


def test_postgres_down_with_a_small_memory_bound_loses_nothing(clean_db, services, udp_server, collector):
    """The backlog beyond --memory-max-mb is read back from the spool in merged ranges: stored and
    published exactly once, in order."""
    dev, key = _device(clean_db)
    srv = udp_server("--memory-max-mb", "1")
    stream = Streamer(dev, key, 4, packets_per_s=500, n_packets=4000)  # 8 s, ~0.6 MB of spool, 4000 bursts
    stream.start()
    time.sleep(1)
    with service_down(services, srv, "postgres"):
        stream.join(30)
        during = srv.wait_for(lambda m: m["samples"]["accepted"] == 40_000, 15, "all accepted")
    assert during["buffered"]["unstored_samples"] > 20_000 and during["samples"]["dropped"] == 0
    assert during["buffered"]["memory_bytes"] <= during["buffered"]["memory_max_bytes"] + (64 << 10)
    assert during["db"]["queued_chunks"] < 2500  # ~1 MiB / (160 B + 512 B overhead) kept, then a few ranges
    m = srv.wait_settled(60)
    assert m["samples"]["accepted"] == m["samples"]["stored"] == m["samples"]["published"] == 40_000
    expected = [(1, s) for s in range(40_000)]
    assert _fresh_seqs(dev) == expected
    assert sorted(set(collector.wait_samples(dev, 40_000))) == expected
    assert m["buffered"]["memory_bytes"] == 0
    assert srv.stop() == 0



def _wait_blocked_by(conn, blocker, timeout: float = 20) -> None:
    """Until the server's writer connection waits for a lock held by the connection `blocker`."""
    pid = blocker.get_backend_pid()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'semg-udpserver' "
                        "AND %s = ANY(pg_blocking_pids(pid))", (pid,))
            if cur.fetchone()[0]:
                return
        time.sleep(0.05)
    raise AssertionError(f"the writer never waited for backend {pid}")


IN_FLIGHT = 50  # packets per device in the batch whose devices are deleted


def _three_devices_and_a_held_batch(conn, udp_server, sender, *server_args: str, c_packets: int = IN_FLIGHT):
    """Devices A, B, C (with their users); the server's writer stuck on committing one packet of B (its
    foreign key check waits for our row lock on B) while packets of A, B, C (`c_packets` of C) are accepted:
    they queue up as its next batch, A's rows first, written once `release()` is called."""
    key = b"f" * 32
    with conn.cursor() as cur:
        users = [add_user(cur) for _ in range(3)]
        a, b, c = (add_device(cur, u, "binary", channels=4, key=key) for u in users)
    srv = udp_server(*server_args)
    hold = db.connect()
    with hold.cursor() as cur:
        cur.execute("SELECT 1 FROM devices WHERE id = %s FOR UPDATE", (b,))
    try:
        sender.send([protocol_packet(b, key, 0)])
        _wait_blocked_by(conn, hold)
        sender.send([protocol_packet(d, key, 10 * i + (10 if d == b else 0)) for i in range(IN_FLIGHT)
                     for d in (a, b, c) if d != c or i < c_packets])
        srv.wait_for(lambda m: m["samples"]["accepted"] == 10 + 10 * (2 * IN_FLIGHT + c_packets), 20,
                     "all packets accepted")
    except BaseException:
        hold.close()
        raise
    return srv, users, (a, b, c), hold.close


def _assert_only_b_stored_and_published(srv, collector, a, b, c) -> None:
    m = srv.wait_for(lambda m: m["buffered"]["unstored_samples"] == 0 and m["buffered"]["unpublished_samples"] == 0,
                     30, "the batch stored and published")
    expected_b = [(1, s) for s in range(10 * (IN_FLIGHT + 1))]
    assert _fresh_seqs(b) == expected_b, "B's samples in the same batch must be stored"
    assert _fresh_seqs(a) == [] and _fresh_seqs(c) == []
    assert m["samples"]["stored"] == m["samples"]["published"] == len(expected_b)
    assert m["samples"]["dropped"] == 20 * IN_FLIGHT
    assert sorted(set(collector.wait_samples(b, len(expected_b)))) == expected_b
    assert collector.seqs(a) == [] and collector.seqs(c) == []
    assert m["buffered"]["memory_bytes"] == 0
    assert "deleted device(s)" in srv.log_tail(50)
    assert srv.stop() == 0


@pytest.mark.parametrize("memory_mb", ["256", "0"], ids=["in-memory", "read-back-from-spool"])
def test_samples_of_devices_deleted_in_flight_are_dropped_not_stored(clean_db, udp_server, sender, collector,
                                                                     memory_mb):
    """Device A deleted, and device C's user, after their packets were accepted but before their batch is
    written: B's samples in it are stored and published; A's and C's are not published and counted as
    dropped (they used to be counted as stored, and published, though the rows were skipped)."""
    srv, (_, _, user_c), (a, b, c), release = _three_devices_and_a_held_batch(
        clean_db, udp_server, sender, "--memory-max-mb", memory_mb)
    with clean_db.cursor() as cur:
        cur.execute("DELETE FROM devices WHERE id = %s", (a,))
        cur.execute("DELETE FROM users WHERE id = %s", (user_c,))
    release()
    _assert_only_b_stored_and_published(srv, collector, a, b, c)


def test_a_device_deleted_while_its_batch_is_written_costs_no_other_devices_samples(clean_db, udp_server, sender,
                                                                                     collector):
    """A's rows (A deleted) send the batch down the path that skips deleted devices, and C's user is being
    deleted meanwhile: the foreign key used to refuse the whole batch there, B's samples with it."""
    srv, (_, _, user_c), (a, b, c), release = _three_devices_and_a_held_batch(clean_db, udp_server, sender)
    deleting_c = db.connect()
    try:
        with clean_db.cursor() as cur:
            cur.execute("DELETE FROM devices WHERE id = %s", (a,))
        with deleting_c.cursor() as cur:  # not committed yet when the batch is written
            cur.execute("DELETE FROM users WHERE id = %s", (user_c,))
        release()
        _wait_blocked_by(clean_db, deleting_c)
        deleting_c.commit()
    finally:
        deleting_c.close()
    _assert_only_b_stored_and_published(srv, collector, a, b, c)


def _http_status(url: str):
    """The HTTP status of a GET, or "closed" if the connection was refused or closed without an answer."""
    import urllib.error
    import urllib.request

    from semg import secrets
    try:
        req = urllib.request.Request(url, headers={"X-API-Key": secrets.service_api_key()})
        with urllib.request.urlopen(req, timeout=2) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return "closed"


def test_metrics_answer_until_the_server_has_stopped(clean_db, services, udp_server, sender):
    """During a shutdown (here one that waits for NATS to publish the stored backlog) /metrics and /health
    answer normally, or the connection is refused once they are closed: never 500, no traceback."""
    import signal
    from collections import Counter

    dev, key = _device(clean_db)
    srv = udp_server("--shutdown-timeout", "4")
    statuses: Counter = Counter()
    with service_down(services, srv, "nats"):
        sender.send([protocol_packet(dev, key, 10 * i) for i in range(20)])
        srv.wait_for(lambda m: m["samples"]["stored"] == 200, 20, "stored while NATS is down")
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while srv.proc.poll() is None and time.monotonic() < deadline:
            for path in ("/metrics", "/health"):
                statuses[path, _http_status(srv.metrics_url + path)] += 1
            time.sleep(0.01)
        assert srv.proc.wait(30) == 0
    assert statuses["/metrics", 200] > 0 and statuses["/health", 200] > 0
    assert {s for _, s in statuses} <= {200, "closed"}, statuses
    assert "Traceback" not in srv.log_path.read_text()


def test_nats_refusing_publishes_never_stops_storage(clean_db, udp_server, sender, monkeypatch):
    """NATS connected but refusing every publish (here the ingest service connects as an identity without
    publish permission; the server answers each message with a permissions violation): everything is stored,
    the publish backlog stays bounded (past 80 % of the spool the oldest stored batches are not published,
    counted), and metrics and log say why. The refused messages used to be counted as published."""
    from semg import secrets

    user, password = secrets.nats_credentials("ui")  # may subscribe to samples, never publish
    monkeypatch.setenv("NATS_SERVER", f"nats://127.0.0.1:{os.environ['NATS_PORT']}")
    monkeypatch.setenv("NATS_USER", user)
    monkeypatch.setenv("NATS_PASSWORD", password)
    dev, key = _device(clean_db)
    srv = udp_server("--spool-max-mb", "2", "--shutdown-timeout", "2")
    # ~2.0 MB of spool records, beyond the bound. (The spool frees whole segments of ~1 s, so the 20 % it keeps
    # free above the shedding mark must hold a few seconds of this stream: 2 MiB rather than 1.)
    packets = [protocol_packet(dev, key, 10 * i) for i in range(14_000)]
    sender.send(packets, pace_every=20, pause=0.02)
    m = srv.wait_for(lambda m: m["packets"]["received"] == len(packets) and m["buffered"]["unstored_samples"] == 0,
                     30, "all packets received and stored")
    assert m["samples"]["dropped"] == 0
    assert m["samples"]["accepted"] == m["samples"]["stored"] == 10 * len(packets) == len(_fresh_seqs(dev))
    # the server may report refusing the first batch only after that batch counted as published
    assert m["samples"]["published"] < 0.01 * m["samples"]["stored"]
    assert m["samples"]["publish_dropped"] > 0
    assert (m["samples"]["published"] + m["samples"]["publish_dropped"] + m["buffered"]["unpublished_samples"]
            == m["samples"]["stored"])
    assert m["buffered"]["spool_bytes"] <= m["buffered"]["spool_max_bytes"]
    assert m["nats_connected"] and m["nats"]["failing"] and m["nats"]["failures"] > 0
    assert "permissions violation" in m["nats"]["last_error"]
    log = srv.log_tail(200)
    assert "will retry" in log and "stored samples not published" in log
    assert srv.stop() == 0


def test_a_batch_too_large_for_the_nats_server_does_not_block_the_others(clean_db, udp_server, sender, monkeypatch,
                                                                        tmp_path):
    """A NATS server whose max_payload is below the messages of a burst (several packets of a device merged):
    publish raises for them while connected. Such a batch used to be retried forever, so nothing after it
    was published and, once the spool was full, new samples were dropped instead of stored. It is now not
    published (counted), and the batches after it are."""
    from udphelpers import own_nats_server

    dev, key = _device(clean_db)
    with own_nats_server(tmp_path / "nats", max_payload=700) as url:  # a one-packet message is ~550 bytes
        monkeypatch.setenv("NATS_SERVER", url)
        srv = udp_server("--shutdown-timeout", "2")
        sender.send([protocol_packet(dev, key, 10 * i) for i in range(500)], pace_every=0)
        srv.wait_for(lambda m: m["samples"]["publish_dropped"] > 0, 20, "a batch of merged packets not published")
        for i in range(500, 520):  # one packet per batch from here on
            sender.send([protocol_packet(dev, key, 10 * i)])
            time.sleep(0.05)
        m = srv.wait_for(lambda m: m["samples"]["accepted"] == 5200 and m["buffered"]["unpublished_samples"] == 0,
                         30, "every batch published or not published")
        assert m["samples"]["stored"] == 5200 == len(_fresh_seqs(dev)) and m["samples"]["dropped"] == 0
        assert m["samples"]["published"] > 0
        assert m["samples"]["published"] + m["samples"]["publish_dropped"] == 5200
        assert "max_payload of 700" in srv.log_tail(200)
        assert srv.stop() == 0


def test_a_message_too_large_for_the_nats_server_costs_no_other_devices_samples(clean_db, udp_server, sender,
                                                                               monkeypatch, tmp_path):
    """One batch holds A's and B's bursts (each merged into a message above max_payload) and one packet of C (a message well
    below it): only A's message is not published (counted); C's goes out. The whole batch used to be dropped,
    C's samples with it."""
    from udphelpers import Collector, own_nats_server

    with own_nats_server(tmp_path / "nats", max_payload=700) as url:  # a one-packet message is ~550 bytes
        monkeypatch.setenv("NATS_SERVER", url)
        from semg.config import Settings
        collector = Collector(Settings()).start_and_wait()  # on this server: not the session's cached settings
        try:
            srv, _users, (a, b, c), release = _three_devices_and_a_held_batch(
                clean_db, udp_server, sender, "--shutdown-timeout", "2", c_packets=1)
            release()
            m = srv.wait_for(lambda m: m["buffered"]["unstored_samples"] == 0
                             and m["buffered"]["unpublished_samples"] == 0, 30, "the batch stored and published")
            assert m["samples"]["stored"] == m["samples"]["accepted"] == 10 * (2 * IN_FLIGHT + 2)
            assert m["devices"][str(c)]["published_samples"] == 10, "C's message fits: it must be published"
            assert m["devices"][str(a)]["published_samples"] == 0
            assert m["devices"][str(b)]["published_samples"] == 10  # its first packet, in a batch of its own
            assert m["samples"]["publish_dropped"] == 20 * IN_FLIGHT  # A's and B's merged bursts only
            assert m["samples"]["published"] + m["samples"]["publish_dropped"] == m["samples"]["stored"]
            assert collector.wait_samples(c, 10) == [(1, s) for s in range(10)]
            assert collector.seqs(a) == []
            assert "max_payload of 700" in srv.log_tail(200)
            assert srv.stop() == 0
        finally:
            collector.close()


def test_recovery_does_not_publish_samples_of_a_device_deleted_while_the_server_was_down(clean_db, services,
                                                                                       udp_server, sender, collector):
    """Stored but not yet published (NATS down) when the server is killed; device A is deleted (its rows with
    it) before the restart. Recovery used to publish A's samples all the same; now only B's go out, A's are
    counted as not published."""
    key = b"f" * 32
    with clean_db.cursor() as cur:
        a, b = (add_device(cur, add_user(cur), "binary", channels=4, key=key) for _ in range(2))
    srv = udp_server()
    with service_down(services, srv, "nats"):
        sender.send([protocol_packet(d, key, 10 * i) for i in range(20) for d in (a, b)])
        srv.wait_for(lambda m: m["samples"]["stored"] == 400, 20, "stored while NATS is down")
        time.sleep(2)  # the committed position reaches cursors.json (saved at most once a second)
        srv.kill9()
    with clean_db.cursor() as cur:
        cur.execute("DELETE FROM devices WHERE id = %s", (a,))
    srv = udp_server()
    m = srv.wait_for(lambda m: m["buffered"]["unpublished_samples"] == 0 and m["samples"]["replayed"] == 400, 30,
                     "the recovered samples published")
    expected_b = [(1, s) for s in range(200)]
    assert sorted(set(collector.wait_samples(b, 200))) == expected_b
    time.sleep(0.5)
    assert collector.seqs(a) == [], "samples of a deleted device must not be published"
    assert m["samples"]["publish_dropped"] == 200
    assert "deleted" in srv.log_tail(50)
    assert srv.stop() == 0


@contextlib.contextmanager
def _small_filesystem(path, size: str = "512k"):
    """A tmpfs of `size` mounted at `path` for the block (needs root: skipped otherwise)."""
    import subprocess
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_spool_disk_is_reported_and_nothing_accepted_is_lost(clean_db, tmp_path, sender):
    """The spool's disk fills up (PostgreSQL and NATS up): packets were dropped, but /health said "ok",
    `python -m semg.health` said the server was fine, and the log got one error line per receive burst (into
    logs on the same full disk). Now health is degraded with the reason, the error is logged once, and once
    space is back packets are accepted again; everything accepted is stored."""
    from udphelpers import UdpServer

    from semg import health
    from semg.config import get_settings
    from streamlit_apps import data

    dev, key = _device(clean_db)
    with _small_filesystem(tmp_path / "disk") as disk:
        srv = UdpServer(disk / "spool", tmp_path / "udpserver.log", []).start()
        try:
            sender.send([protocol_packet(dev, key, 10 * i) for i in range(100)])
            srv.wait_settled()
            for filler in ("filler", "filler2"):  # again once the spool has deleted its published segments
                fd = os.open(disk / filler, os.O_WRONLY | os.O_CREAT)
                with contextlib.suppress(OSError):
                    while os.write(fd, b"\0" * 4096):
                        pass
                os.close(fd)
                time.sleep(1.5)
            sender.send([protocol_packet(dev, key, 10 * i) for i in range(100, 400)], pace_every=20, pause=0.01)
            # (a burst counts as accepted or dropped once journaled, just after its packets count as received)
            m = srv.wait_for(lambda m: m["packets"]["received"] == 400
                             and m["samples"]["accepted"] + m["samples"]["dropped"] == 4000,
                             20, "all packets received and each sample counted as accepted or dropped")
            assert m["samples"]["dropped"] > 0
            h = srv.health()
            assert h["status"] == "degraded" and "No space left on device" in h["spool_error"], h
            assert m["spool_error"] == h["spool_error"]
            ok, detail = health.check_udpserver(get_settings())
            assert not ok and "spool cannot be written" in detail
            ui = data._check_udp(get_settings())  # the UI's Overview
            assert not ui["ok"] and "spool cannot be written" in ui["detail"]
            (disk / "filler").unlink()
            (disk / "filler2").unlink()
            # with no packet arriving, health still notices that space came back (it said degraded until one came)
            deadline = time.monotonic() + 10
            while srv.health()["status"] != "ok":
                assert time.monotonic() < deadline, srv.health()
                time.sleep(0.2)
            assert health.check_udpserver(get_settings())[0]
            sender.send([protocol_packet(dev, key, 10 * i) for i in range(400, 500)])
            m = srv.wait_for(lambda m: m["packets"]["received"] == 500, 20, "all packets received")
            m = srv.wait_settled()
            assert srv.health()["status"] == "ok" and m["spool_error"] is None
            assert health.check_udpserver(get_settings())[0]
            seqs = _fresh_seqs(dev)
            assert len(seqs) == len(set(seqs)) == m["samples"]["accepted"] == m["samples"]["stored"]
            assert seqs[:1000] == [(1, s) for s in range(1000)] and seqs[-1000:] == [(1, s) for s in range(4000, 5000)]
            log = srv.log_path.read_text()
            assert log.count("packets are dropped until it can be written") == 1, log[-3000:]
            assert "writable again" in log
            assert srv.stop() == 0
        finally:
            with contextlib.suppress(Exception):
                srv.stop()
