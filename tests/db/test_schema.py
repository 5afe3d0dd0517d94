"""The schema against a real PostgreSQL: idempotent, versioned, constraints hold, delete cascades."""

import contextlib

import psycopg2
import pytest
from psycopg2 import sql

from semg import db, health


def test_schema_applies_twice_and_records_version(db_conn):
    assert db.migrate(db_conn) == []
    assert db.migrate(db_conn) == []
    with db_conn.cursor() as cur:
        cur.execute("SELECT version FROM schema_version ORDER BY version")
        versions = [r[0] for r in cur.fetchall()]
    assert versions[0] == 1
    assert versions == sorted(versions)


def test_a_database_a_newer_version_migrated_is_refused_and_left_alone(settings, db_conn):
    """`git pull`, start, then `git checkout` back to the older code: its start went on silently on the newer schema
    (and the older code stored rows the newer one had normalised once, in a migration that does not run again).
    Now the migration step refuses, changing nothing, and the health check says what to do."""
    name = "semg_newer_schema_test"
    with db_conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    s = settings.model_copy(update={"postgres_db": name})
    newer = max(v for v, _, _ in db.migrations()) + 1
    try:
        with contextlib.closing(db.connect(s)) as conn:
            db.migrate(conn)
            assert health.check_postgres(s)[0]
            with conn, conn.cursor() as cur:
                cur.execute("INSERT INTO schema_version (version, name) VALUES (%s, 'from_a_newer_version')", (newer,))
                cur.execute("DROP INDEX sample_blocks_user_time_idx")  # as if that version had dropped it
            with pytest.raises(RuntimeError, match=f"schema is v{newer}.*git checkout or git pull"):
                db.migrate(conn)
            with conn.cursor() as cur:
                cur.execute("SELECT to_regclass('sample_blocks_user_time_idx') IS NULL, max(version) FROM schema_version")
                assert cur.fetchone() == (True, newer)  # nothing re-created, nothing recorded
            conn.rollback()
        ok, detail = health.check_postgres(s)
        assert not ok and "newer than this platform version" in detail and f"v{newer}" in detail
        # every service connects through db.connect: each is refused as if the database were down (the UDP server
        # keeps samples in its spool, the API answers 503), not only the migration step
        with pytest.raises(psycopg2.OperationalError, match=f"schema is v{newer}, newer than"):
            db.connect(s)
        with contextlib.closing(db.connect(s, dbname="postgres")):  # the server itself is reachable
            pass
    finally:
        with db_conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _user(cur, email="a@example.org"):
    cur.execute("INSERT INTO users (name, email) VALUES ('Ann', %s) RETURNING id", (email,))
    return cur.fetchone()[0]


def test_deleting_a_user_deletes_all_their_data(clean_db):
    with clean_db.cursor() as cur:
        uid = _user(cur)
        cur.execute("INSERT INTO gestures (user_id, name, channels_used) VALUES (%s, 'fist', '{0,1}')", (uid,))
        cur.execute("""INSERT INTO devices (user_id, channel_count, sample_rate_hz, secret_key)
                       VALUES (%s, 2, 500, %s) RETURNING id""", (uid, b"k" * 32))
        dev = cur.fetchone()[0]
        cur.execute("""INSERT INTO sample_blocks (user_id, device_id, seq0, n, channels, sample_rate_hz,
                       device_millis0, device_time0, server_ts, values)
                       VALUES (%s, %s, 0, 2, 2, 500, 1000, now(), now(), '{1,2,3,4}')""", (uid, dev))
        cur.execute("INSERT INTO capture_sessions (user_id, device_id) VALUES (%s, %s) RETURNING id", (uid, dev))
        sid = cur.fetchone()[0]
        cur.execute("""INSERT INTO session_intervals (session_id, ordinal, kind, label, planned_start_ms,
                       planned_end_ms) VALUES (%s, 0, 'rest', 'REST', 0, 2000)""", (sid,))
        cur.execute("INSERT INTO training_jobs (user_id) VALUES (%s) RETURNING id", (uid,))
        job = cur.fetchone()[0]
        cur.execute("INSERT INTO training_job_sessions VALUES (%s, %s)", (job, sid))
        cur.execute("INSERT INTO job_logs (job_id, message) VALUES (%s, 'hi')", (job,))
        cur.execute("""INSERT INTO model_artifacts (user_id, job_id, weights, sha256, size_bytes, classes, channels,
                       sample_rate_hz, window_ms, step_ms, scaler, metadata)
                       VALUES (%s, %s, '\\x00', 'x', 1, '["REST"]', '{0}', 500, 250, 25, '{}', '{}')
                       RETURNING id""", (uid, job))
        mid = cur.fetchone()[0]
        cur.execute("INSERT INTO predictions (user_id, model_id, gesture, confidence) VALUES (%s,%s,'fist',0.9)",
                    (uid, mid))
        cur.execute("INSERT INTO videos (user_id, session_id, path, started_at) VALUES (%s,%s,'v/1.webm',now())",
                    (uid, sid))
        cur.execute("INSERT INTO api_keys (user_id, key_prefix, key_hash) VALUES (%s, 'ab', 'h')", (uid,))
        cur.execute("SELECT seq, values FROM sensor_samples WHERE user_id = %s ORDER BY seq", (uid,))
        assert cur.fetchall() == [(0, [1, 2]), (1, [3, 4])]
        cur.execute("DELETE FROM users WHERE id = %s", (uid,))
        for table in ["gestures", "devices", "sample_blocks", "capture_sessions", "session_intervals",
                      "training_jobs", "training_job_sessions", "job_logs", "model_artifacts", "predictions",
                      "videos", "api_keys"]:
            cur.execute(f"SELECT count(*) FROM {table}")
            assert cur.fetchone()[0] == 0, table


def test_every_foreign_key_is_indexed(db_conn):
    """Deleting a row runs its ON DELETE action on the rows referencing it; without an index on the referencing
    columns that is a full scan per deleted row (deleting a user with 115 models scanned 3 M predictions 115
    times, past the web UI's 20 s statement timeout)."""
    with db_conn.cursor() as cur:
        cur.execute("""SELECT c.conrelid::regclass::text || '.' || c.conname
                       FROM pg_constraint c
                       WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace
                         AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.conrelid
                                         AND (i.indkey::int2[])[0:cardinality(c.conkey) - 1] = c.conkey)
                       ORDER BY 1""")
        assert [r[0] for r in cur.fetchall()] == []


@pytest.mark.parametrize("stmt", [
    "INSERT INTO devices (user_id, channel_count, sample_rate_hz, secret_key) VALUES ({u}, 17, 500, '\\x00')",
    "INSERT INTO devices (user_id, channel_count, sample_rate_hz) VALUES ({u}, 4, 500)",  # binary needs a key
    "INSERT INTO devices (user_id, protocol, channel_count, sample_rate_hz) VALUES ({u}, 'legacy', 4, 0)",
    "INSERT INTO gestures (user_id, name) VALUES ({u}, 'REST')",
    "INSERT INTO gestures (user_id, name, channels_used) VALUES ({u}, 'x', '{{16}}')",
    "INSERT INTO users (name, email) VALUES ('B', 'A@EXAMPLE.ORG')",  # emails are unique case-insensitively
    "INSERT INTO users (name, email) VALUES ('B', 'not-an-email')",
    "INSERT INTO training_jobs (user_id, status) VALUES ({u}, 'running')",
])
def test_constraints_reject_bad_rows(clean_db, stmt):
    with clean_db.cursor() as cur:
        uid = _user(cur)
        with pytest.raises(psycopg2.IntegrityError):
            cur.execute(stmt.format(u=uid))
