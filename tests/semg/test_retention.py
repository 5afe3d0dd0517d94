"""Decision retention and user deletion in bounded batches, against the session's real PostgreSQL.

Batch sizes are checked with a statement-level trigger that logs how many predictions each DELETE statement
removed (its transition table); an interruption is a trigger that terminates its own backend, i.e. the
connection is lost in the middle of the work, as when the database goes away."""

from __future__ import annotations

import contextlib
import threading

import psycopg2
import pytest

from semg import db, repo

DAYS = 30


def _user(conn, name: str) -> int:
    return repo.create_user(conn, name, f"{name.lower()}@example.org")["id"]


def _model(conn, user_id: int) -> int:
    with conn.cursor() as cur:
        cur.execute("""INSERT INTO model_artifacts (user_id, weights, sha256, size_bytes, classes, channels,
                       sample_rate_hz, window_ms, step_ms, scaler, metadata)
                       VALUES (%s, '\\x00', 'x', 1, '[]', '{0}', 200, 200, 50, '{}', '{}') RETURNING id""", (user_id,))
        return cur.fetchone()[0]


def _decisions(conn, user_id: int, ages: list[str], model_id: int | None = None) -> list[int]:
    """One decision per age (a PostgreSQL interval before now); returns their ids."""
    with conn.cursor() as cur:
        ids = []
        for age in ages:
            cur.execute("""INSERT INTO predictions (user_id, model_id, gesture, confidence, decided_at)
                           VALUES (%s, %s, 'fist', 0.9, now() - %s::interval) RETURNING id""", (user_id, model_id, age))
            ids.append(cur.fetchone()[0])
        return ids


def _ids(conn, user_id: int | None = None) -> set[int]:
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM predictions WHERE %(u)s::bigint IS NULL OR user_id = %(u)s", {"u": user_id})
        return {r[0] for r in cur.fetchall()}


def _old_recording(conn, user_id: int) -> None:
    """Samples recorded a year ago: never pruned."""
    dev = repo.register_device(conn, user_id, 2, 200)
    with conn.cursor() as cur:
        cur.execute("""INSERT INTO sample_blocks (user_id, device_id, seq0, n, channels, sample_rate_hz, device_millis0,
                       device_time0, server_ts, values)
                       VALUES (%s, %s, 0, 2, 2, 200, 0, now() - interval '365 days', now() - interval '365 days',
                       '{1,2,3,4}')""", (user_id, dev["id"]))


def _count(conn, table: str) -> int:
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")  # noqa: S608 (a fixed table name)
        return cur.fetchone()[0]


@pytest.fixture
def statement_sizes(clean_db):
    """sizes(table): how many rows of predictions / model_artifacts each DELETE statement removed, in order."""
    with clean_db.cursor() as cur:
        cur.execute("""CREATE TABLE test_delete_sizes (id serial, tab text, n bigint);
            CREATE FUNCTION test_log_delete() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO test_delete_sizes (tab, n) SELECT TG_TABLE_NAME, count(*) FROM gone; RETURN NULL; END $$;
            CREATE TRIGGER test_log_delete AFTER DELETE ON predictions REFERENCING OLD TABLE AS gone
            FOR EACH STATEMENT EXECUTE FUNCTION test_log_delete();
            CREATE TRIGGER test_log_delete AFTER DELETE ON model_artifacts REFERENCING OLD TABLE AS gone
            FOR EACH STATEMENT EXECUTE FUNCTION test_log_delete()""")

    def sizes(table: str = "predictions") -> list[int]:
        with clean_db.cursor() as cur:
            cur.execute("SELECT n FROM test_delete_sizes WHERE tab = %s ORDER BY id", (table,))
            return [r[0] for r in cur.fetchall()]

    yield sizes
    with clean_db.cursor() as cur:
        cur.execute("""DROP TRIGGER test_log_delete ON predictions; DROP TRIGGER test_log_delete ON model_artifacts;
                       DROP FUNCTION test_log_delete(); DROP TABLE test_delete_sizes""")


@contextlib.contextmanager
def connection_lost_at(conn, prediction_id: int):
    """Deleting this prediction kills the deleting connection (the database 'goes away' mid-work)."""
    with conn.cursor() as cur:
        cur.execute(f"""CREATE FUNCTION test_die() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5); RETURN OLD; END $$;
            CREATE TRIGGER test_die BEFORE DELETE ON predictions FOR EACH ROW
            WHEN (OLD.id = {int(prediction_id)}) EXECUTE FUNCTION test_die()""")
    try:
        yield
    finally:
        with conn.cursor() as cur:
            cur.execute("DROP TRIGGER test_die ON predictions; DROP FUNCTION test_die()")


def test_prune_deletes_exactly_the_decisions_older_than_the_retention(clean_db):
    a, b = _user(clean_db, "A"), _user(clean_db, "B")
    boundary = [f"{DAYS} days 1 minute", f"{DAYS - 1} days 23 hours 59 minutes"]  # just past / just within
    old_a = _decisions(clean_db, a, ["400 days", f"{DAYS + 1} days", boundary[0]], _model(clean_db, a))
    kept_a = _decisions(clean_db, a, [boundary[1], "1 hour", "1 second"])
    old_b = _decisions(clean_db, b, [f"{DAYS * 2} days", boundary[0]])
    kept_b = _decisions(clean_db, b, [boundary[1], "0 seconds"])
    _old_recording(clean_db, a)
    out = repo.prune_predictions(clean_db, DAYS)
    assert out["removed"] == len(old_a) + len(old_b) and not out["busy"]
    assert _ids(clean_db) == set(kept_a + kept_b)
    assert _count(clean_db, "sample_blocks") == 1 and _count(clean_db, "users") == 2
    assert _count(clean_db, "model_artifacts") == 1
    assert repo.prune_predictions(clean_db, DAYS)["removed"] == 0  # nothing left to do: idempotent


def test_zero_days_keeps_every_decision(clean_db, statement_sizes):
    a = _user(clean_db, "A")
    ids = _decisions(clean_db, a, ["3000 days", "400 days", "1 day"])
    out = repo.prune_predictions(clean_db, 0)
    assert out["removed"] == 0 and _ids(clean_db) == set(ids)
    assert statement_sizes() == []  # not even looked at


def test_prune_works_in_bounded_batches_with_the_same_result(clean_db, statement_sizes):
    a, b = _user(clean_db, "A"), _user(clean_db, "B")
    old = _decisions(clean_db, a, [f"{DAYS + 1 + i} days" for i in range(50)])
    old += _decisions(clean_db, b, [f"{DAYS + 1} days {i} minutes" for i in range(9)])
    kept = _decisions(clean_db, a, [f"{i} hours" for i in range(20)])
    out = repo.prune_predictions(clean_db, DAYS, batch=7)
    assert out["removed"] == 59 and _ids(clean_db) == set(kept)
    sizes = statement_sizes()
    assert max(sizes) == 7 and sum(sizes) == 59 and len(sizes) >= 59 // 7 + 1


def test_two_concurrent_pruners_end_in_the_same_state_without_error(clean_db):
    users = [_user(clean_db, f"U{i}") for i in range(3)]
    kept = []
    with clean_db.cursor() as cur:
        for u in users:
            cur.execute("""INSERT INTO predictions (user_id, gesture, confidence, decided_at)
                           SELECT %s, 'fist', 0.5, now() - %s * interval '1 day' - i * interval '1 s'
                           FROM generate_series(1, 3000) i""", (u, DAYS + 1))
        kept = _decisions(clean_db, users[0], ["1 day", "2 days"])
    results, errors = [], []
    go = threading.Barrier(2)

    def prune() -> None:
        try:
            with contextlib.closing(db.connect()) as conn:
                go.wait(10)
                results.append(repo.prune_predictions(conn, DAYS, batch=100))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=prune) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 2
    assert sum(r["removed"] for r in results) == 9000
    assert _ids(clean_db) == set(kept)


def test_delete_user_removes_predictions_in_bounded_batches(clean_db, statement_sizes):
    a, b = _user(clean_db, "A"), _user(clean_db, "B")
    models = [_model(clean_db, a) for _ in range(3)]
    for i, m in enumerate(models):
        _decisions(clean_db, a, [f"{j} minutes" for j in range(i, 60, 3)], m)
    other = _decisions(clean_db, b, ["1 minute", "400 days"], _model(clean_db, b))
    out = repo.delete_user(clean_db, a, batch=7)
    assert out["id"] == a and out["videos_removed"] == 0
    sizes = [n for n in statement_sizes() if n]  # the user row's cascade finds nothing left
    assert max(sizes) == 7 and sum(sizes) == 60
    # each model in a statement of its own (its ON DELETE SET NULL walks the index entries of its decisions)
    assert [n for n in statement_sizes("model_artifacts") if n] == [1, 1, 1]
    assert _ids(clean_db) == set(other) and _count(clean_db, "model_artifacts") == 1
    with pytest.raises(repo.NotFound):
        repo.get_user(clean_db, a)


def test_a_delete_interrupted_half_way_leaves_the_user_deletable(clean_db, db_conn):
    a, b = _user(clean_db, "A"), _user(clean_db, "B")
    mine = _decisions(clean_db, a, [f"{50 - i} minutes" for i in range(50)], _model(clean_db, a))  # oldest first
    other = _decisions(clean_db, b, [f"{i} minutes" for i in range(20)])
    doomed = db.connect()
    try:
        with connection_lost_at(db_conn, mine[20]), pytest.raises(psycopg2.Error):  # in the third batch of 7
            repo.delete_user(doomed, a, batch=7)
    finally:
        doomed.close()
    assert repo.get_user(clean_db, a)["id"] == a  # still there, its remaining data with it
    assert _ids(clean_db, a) == set(mine[14:])  # two batches were committed, the third rolled back
    assert _ids(clean_db, b) == set(other)
    repo.delete_user(clean_db, a, batch=7)
    assert _ids(clean_db) == set(other) and _count(clean_db, "users") == 1


def test_a_prune_interrupted_half_way_is_finished_by_the_next(clean_db, db_conn):
    a = _user(clean_db, "A")
    old = _decisions(clean_db, a, [f"{DAYS + 50 - i} days" for i in range(50)])  # oldest first
    kept = _decisions(clean_db, a, ["1 day"])
    doomed = db.connect()
    try:
        with connection_lost_at(db_conn, old[20]), pytest.raises(psycopg2.Error):
            repo.prune_predictions(doomed, DAYS, batch=7)
    finally:
        doomed.close()
    assert _ids(clean_db) == set(old[14:] + kept)
    assert repo.prune_predictions(clean_db, DAYS, batch=7)["removed"] == 36
    assert _ids(clean_db) == set(kept)


def _index_entries_read(conn) -> int:
    """How many entries scans of predictions_user_time_idx returned, dead ones included (this backend's counts
    flushed first)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_stat_force_next_flush()")
    conn.commit()
    with conn.cursor() as cur:
        cur.execute("SELECT pg_stat_clear_snapshot()")
        cur.execute("SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = 'predictions_user_time_idx'")
        n = cur.fetchone()[0]
    conn.commit()
    return n


@pytest.mark.parametrize("before", ["prune", "delete_user"])
def test_each_batch_starts_where_the_one_before_did_not_at_the_users_first_decision(clean_db, before):
    """A snapshot held elsewhere (a backup's pg_dump, an export) keeps deleted entries from being marked dead:
    a batch starting at the user's first entry walked every earlier batch's entries again, each with a table
    lookup, so a pass grew with the square of what it deleted (10 days due at 40/s: 3,400 batches a user)."""
    a = _user(clean_db, "A")
    with clean_db.cursor() as cur:
        cur.execute("""INSERT INTO predictions (user_id, gesture, confidence, decided_at)
                       SELECT %s, 'fist', 0.9, now() - make_interval(days => %s, secs => i)
                       FROM generate_series(1, 400) i""", (a, DAYS + 1))
    kept = _decisions(clean_db, a, ["1 hour"])
    held, pruner = db.connect(), db.connect()
    try:
        held.set_session(isolation_level="REPEATABLE READ")
        with held.cursor() as cur:
            cur.execute("SELECT count(*) FROM predictions")  # the snapshot stays until the rollback below
        start = _index_entries_read(pruner)
        if before == "prune":
            assert repo.prune_predictions(pruner, DAYS, batch=10)["removed"] == 400
            assert _ids(clean_db) == set(kept)
        else:
            assert repo._delete_predictions(pruner, a, None, 10) == 401
        walked = _index_entries_read(pruner) - start
    finally:
        held.rollback()
        held.close()
        pruner.close()
    # 40 batches, each walking the 10 entries of the one before once more and its own 10: 800 counted; from the
    # user's first entry every time it was 16,441
    assert walked <= 3 * 401, walked
