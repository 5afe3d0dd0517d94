"""Deleting a user or a device removes its recordings (sample_blocks) in bounded batches, against the session's
real PostgreSQL.

As in test_retention: a statement-level trigger logs how many sample blocks each DELETE statement removed (its
transition table), and an interruption is a trigger that terminates its own backend. The defaults (10,000
blocks per batch, what the UI and the API use) are checked on a few tens of thousands of one-value blocks."""

from __future__ import annotations

import contextlib
import threading
import time

import psycopg2
import pytest

from semg import db, repo

BATCH = 10_000  # repo.SAMPLE_BATCH, written out: the test must also run (and fail) against code without it


def _user(conn, name: str) -> int:
    return repo.create_user(conn, name, f"{name.lower()}@example.org")["id"]


def _device(conn, user_id: int) -> int:
    return repo.register_device(conn, user_id, 1, 20)["id"]


def _blocks(conn, device_id: int, count: int, tie: int = 1, first: int = 0) -> None:
    """`count` one-sample blocks, seq0 first..; every `tie` consecutive blocks share a device_time0."""
    with conn.cursor() as cur:
        cur.execute("""INSERT INTO sample_blocks (user_id, device_id, seq0, n, channels, sample_rate_hz,
                                                  device_millis0, device_time0, server_ts, values)
                       SELECT d.user_id, d.id, i, 1, 1, 20, i * 50.0,
                              timestamptz '2026-01-01' + (i / %(tie)s) * interval '50 ms', now(), '{1}'
                       FROM devices d, generate_series(%(first)s, %(first)s + %(n)s - 1) i WHERE d.id = %(d)s""",
                    {"d": device_id, "n": count, "tie": tie, "first": first})


def _packet(conn, user_id: int, device_id: int, seq0: int) -> None:
    """One block stored as the UDP server stores it: the device named by value (refused by the foreign key once
    the device is gone; _blocks, selecting from devices, would then insert nothing and say nothing)."""
    with conn.cursor() as cur:
        cur.execute("""INSERT INTO sample_blocks (user_id, device_id, seq0, n, channels, sample_rate_hz,
                                                  device_millis0, device_time0, server_ts, values)
                       VALUES (%s, %s, %s, 1, 1, 20, %s * 50.0,
                               timestamptz '2026-01-01' + %s * interval '50 ms', now(), '{1}')""",
                    (user_id, device_id, seq0, seq0, seq0))


def _count(conn, device_id: int | None = None) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM sample_blocks WHERE %(d)s::bigint IS NULL OR device_id = %(d)s",
                    {"d": device_id})
        return cur.fetchone()[0]


def _seqs(conn, device_id: int) -> set[int]:
    with conn.cursor() as cur:
        cur.execute("SELECT seq0 FROM sample_blocks WHERE device_id = %s", (device_id,))
        return {r[0] for r in cur.fetchall()}


@pytest.fixture
def statement_sizes(clean_db):
    """sizes(): how many sample blocks each DELETE statement removed, in order (0 for the final cascade's)."""
    with clean_db.cursor() as cur:
        cur.execute("""CREATE TABLE test_block_deletes (id serial, n bigint);
            CREATE FUNCTION test_log_block_delete() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO test_block_deletes (n) SELECT count(*) FROM gone; RETURN NULL; END $$;
            CREATE TRIGGER test_log_block_delete AFTER DELETE ON sample_blocks REFERENCING OLD TABLE AS gone
            FOR EACH STATEMENT EXECUTE FUNCTION test_log_block_delete()""")

    def sizes() -> list[int]:
        with clean_db.cursor() as cur:
            cur.execute("SELECT n FROM test_block_deletes ORDER BY id")
            return [r[0] for r in cur.fetchall()]

    yield sizes
    with clean_db.cursor() as cur:
        cur.execute("""DROP TRIGGER test_log_block_delete ON sample_blocks; DROP FUNCTION test_log_block_delete();
                       DROP TABLE test_block_deletes""")


@contextlib.contextmanager
def connection_lost_at(conn, device_id: int, seq0: int):
    """Deleting this block kills the deleting connection (the database 'goes away' mid-work)."""
    with conn.cursor() as cur:
        cur.execute(f"""CREATE FUNCTION test_die() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5); RETURN OLD; END $$;
            CREATE TRIGGER test_die BEFORE DELETE ON sample_blocks FOR EACH ROW
            WHEN (OLD.device_id = {int(device_id)} AND OLD.seq0 = {int(seq0)}) EXECUTE FUNCTION test_die()""")
    try:
        yield
    finally:
        with conn.cursor() as cur:
            cur.execute("DROP TRIGGER test_die ON sample_blocks; DROP FUNCTION test_die()")


def test_delete_user_removes_recordings_in_bounded_batches(clean_db, statement_sizes):
    a, b = _user(clean_db, "A"), _user(clean_db, "B")
    a1, a2, b1 = _device(clean_db, a), _device(clean_db, a), _device(clean_db, b)
    _blocks(clean_db, a1, 12_000)
    _blocks(clean_db, b1, 3_000)  # another user's, recorded at the same times
    _blocks(clean_db, a2, 9_000, tie=3)
    out = repo.delete_user(clean_db, a)
    assert out["id"] == a
    sizes = [n for n in statement_sizes() if n]  # the user row's cascade finds nothing left
    assert max(sizes) == BATCH and sum(sizes) == 21_000
    assert _count(clean_db) == _count(clean_db, b1) == 3_000
    assert repo.list_devices(clean_db) == [repo.get_device(clean_db, b1)]
    with pytest.raises(repo.NotFound):
        repo.get_user(clean_db, a)


def test_delete_device_removes_its_recordings_in_bounded_batches(clean_db, statement_sizes):
    a = _user(clean_db, "A")
    a1, a2 = _device(clean_db, a), _device(clean_db, a)
    _blocks(clean_db, a1, 23_000)
    _blocks(clean_db, a2, 500)
    repo.delete_device(clean_db, a1)
    sizes = [n for n in statement_sizes() if n]
    assert max(sizes) == BATCH and sum(sizes) == 23_000
    assert _count(clean_db) == _count(clean_db, a2) == 500
    with pytest.raises(repo.NotFound):
        repo.get_device(clean_db, a1)
    with pytest.raises(repo.NotFound):  # as before: a device that is not there is NotFound, nothing deleted
        repo.delete_device(clean_db, a1)
    assert _count(clean_db) == 500


def test_small_batches_through_equal_device_times_and_boots(clean_db, statement_sizes):
    """Batches continue from the oldest time of the batch before: blocks sharing it across a batch boundary, and
    a second boot's blocks at the same times, are all removed, in statements of at most `batch`."""
    a = _user(clean_db, "A")
    a1, a2 = _device(clean_db, a), _device(clean_db, a)
    _blocks(clean_db, a1, 100, tie=5)
    with clean_db.cursor() as cur:  # boot 1 of the same device, at the same device times
        cur.execute("""INSERT INTO sample_blocks (user_id, device_id, boot, seq0, n, channels, sample_rate_hz,
                                                  device_millis0, device_time0, server_ts, values)
                       SELECT user_id, device_id, 1, seq0, n, channels, sample_rate_hz, device_millis0,
                              device_time0, server_ts, values FROM sample_blocks WHERE device_id = %s""", (a1,))
    _blocks(clean_db, a2, 30, tie=5)
    repo.delete_device(clean_db, a1, batch=7)
    sizes = [n for n in statement_sizes() if n]
    assert max(sizes) == 7 and sum(sizes) == 200
    assert _count(clean_db) == _count(clean_db, a2) == 30


@pytest.mark.parametrize("what", ["user", "device"])
def test_a_delete_interrupted_half_way_leaves_everything_deletable(clean_db, db_conn, what):
    a, b = _user(clean_db, "A"), _user(clean_db, "B")
    a1, b1 = _device(clean_db, a), _device(clean_db, b)
    _blocks(clean_db, a1, 25_000)  # seq0 order is time order: deleted oldest first
    _blocks(clean_db, b1, 2_000)
    doomed = db.connect()
    try:
        with connection_lost_at(db_conn, a1, 15_000), pytest.raises(psycopg2.Error):  # in the second batch
            if what == "user":
                repo.delete_user(doomed, a)
            else:
                repo.delete_device(doomed, a1)
    finally:
        doomed.close()
    assert repo.get_user(clean_db, a)["id"] == a and repo.get_device(clean_db, a1)["id"] == a1
    assert _seqs(clean_db, a1) == set(range(BATCH, 25_000))  # the first batch committed, the second rolled back
    assert _count(clean_db, b1) == 2_000
    if what == "user":
        repo.delete_user(clean_db, a)
        assert _count(clean_db) == _count(clean_db, b1) == 2_000
        with pytest.raises(repo.NotFound):
            repo.get_user(clean_db, a)
    else:
        repo.delete_device(clean_db, a1)
        assert _count(clean_db) == _count(clean_db, b1) == 2_000
        assert repo.get_user(clean_db, a)["id"] == a


def test_blocks_arriving_from_a_live_device_while_deleting_it_are_removed_too(clean_db, statement_sizes):
    """The device keeps sending (newer blocks, one autocommit INSERT each, as the udpserver stores them) until
    its row is gone; then its packets are refused by the foreign key. Nothing of it is left, and another
    device's blocks stored meanwhile are all kept."""
    a, b = _user(clean_db, "A"), _user(clean_db, "B")
    a1, b1 = _device(clean_db, a), _device(clean_db, b)
    _blocks(clean_db, a1, 25_000)
    sent: dict[int, int] = {a1: 0, b1: 0}
    owner = {a1: a, b1: b}
    refused: list[Exception] = []
    stop = threading.Event()

    def live() -> None:
        with contextlib.closing(db.connect()) as conn:
            conn.autocommit = True
            deadline = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < deadline:
                for dev in (a1, b1):
                    if dev == a1 and refused:
                        continue
                    try:
                        _packet(conn, owner[dev], dev, 100_000 + sent[dev])
                        sent[dev] += 1
                    except psycopg2.errors.ForeignKeyViolation as e:
                        refused.append(e)
                time.sleep(0.001)

    sender = threading.Thread(target=live)
    sender.start()
    try:
        while sent[a1] < 5:  # it is live before the delete starts
            time.sleep(0.01)
        repo.delete_device(clean_db, a1)
        deadline = time.monotonic() + 10  # its next packet is refused (the sender may be slow to try on a busy machine)
        while not refused and sender.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        sender.join(30)
    assert refused and sent[a1] >= 5
    assert _count(clean_db, a1) == 0
    assert _count(clean_db) == _count(clean_db, b1) == sent[b1]
    sizes = [n for n in statement_sizes() if n]
    assert max(sizes) <= BATCH and sum(sizes) == 25_000 + sent[a1]
