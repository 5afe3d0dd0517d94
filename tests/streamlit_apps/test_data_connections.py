"""The UI's database connections (data.connection): kept for reuse, and replaced after a database restart."""

from __future__ import annotations

import contextlib


def _ui_backends(conn) -> list[int]:
    with conn.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'semg-ui' AND pid <> pg_backend_pid()")
        return [r[0] for r in cur.fetchall()]


def test_the_ui_reuses_its_database_connections(clean_db):
    """psycopg2's pool closes every connection handed back beyond minconn: with minconn 0 each of the dozens of
    queries of a page run opened a new connection (TCP, SCRAM, a new server process) and closed it."""
    import data
    pids = {data._one("SELECT pg_backend_pid() AS pid")["pid"] for _ in range(20)}
    assert len(pids) == 1, f"20 queries in a row used {len(pids)} connections"
    with data.connection() as a, data.connection() as b, data.connection() as c:  # three pages at once
        assert len({x.get_backend_pid() for x in (a, b, c)}) == 3
    assert len(_ui_backends(clean_db)) <= data.POOL_IDLE


def test_connections_killed_by_a_database_restart_are_replaced_at_once(clean_db):
    import data
    with contextlib.ExitStack() as stack:  # several idle connections kept
        for _ in range(4):
            stack.enter_context(data.connection())
    with clean_db.cursor() as cur:  # what a restart does to them
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'semg-ui'")
        assert cur.fetchone()[0] >= 4
    assert data._one("SELECT 1 AS ok")["ok"] == 1  # the first query after the restart already works
    assert data._one("SELECT 1 AS ok")["ok"] == 1


def test_the_nats_line_says_at_once_that_nats_is_down(settings):
    """The sidebar's service line (data.health, in parallel, cached 5 s) waited for its NATS probe's whole 3 s
    timeout whenever NATS was down -- every page render after the cache expired -- and said only 'TimeoutError':
    the probe now fails on the refused connection and says so."""
    import socket

    import data
    ok = data._check_nats(settings)
    assert ok["ok"], ok
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    down = data._check_nats(settings.model_copy(update={"nats_port": free, "nats_server": None}))
    assert not down["ok"] and f"127.0.0.1:{free}" in down["detail"] and "NoServersError" in down["detail"], down


def test_the_ui_refuses_a_database_a_newer_version_migrated(clean_db):
    """An older version started on a database a newer one migrated (a `git checkout` back, an older Docker image
    on the same volume): only its migration step refused, and the web UI went on writing captures and labels the
    newer code reads wrongly. Its connections are refused now, and the page says why."""
    import data
    import pytest

    from semg import db
    newer = max(v for v, _, _ in db.migrations()) + 1
    with clean_db.cursor() as cur:
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'semg-ui'")
        cur.execute("INSERT INTO schema_version (version, name) VALUES (%s, 'from_a_newer_version')", (newer,))
    clean_db.commit()
    try:
        with pytest.raises(data.Unavailable, match=f"cannot be used by this version: .*schema is v{newer}"):
            data._one("SELECT 1 AS ok")
    finally:
        with clean_db.cursor() as cur:
            cur.execute("DELETE FROM schema_version WHERE version = %s", (newer,))
        clean_db.commit()
    assert data._one("SELECT 1 AS ok")["ok"] == 1  # the right version again


def test_a_change_cancelled_by_a_deadlock_says_so_and_keeps_the_connection(clean_db):
    """A deadlock with a change made at the same moment (another tab, the API) cancels one side; on a page it read
    'The database at ... is not reachable (deadlock detected). Start the platform with ./start_all.sh' and the
    connection was thrown away, though the database was up and the same click works again."""
    import threading
    import time

    import data
    import pytest

    from semg import db, repo
    user = repo.create_user(clean_db, "Dee", "dee@example.org")
    a, b = (repo.add_gesture(clean_db, user["id"], name) for name in ("fist", "pinch"))
    other = db.connect()
    try:
        with other.cursor() as cur:
            cur.execute("UPDATE gestures SET description = 'other' WHERE id = %s", (a["id"],))
            with pytest.raises(data.Cancelled) as raised, data.connection() as conn:
                pid = conn.get_backend_pid()
                with conn.cursor() as mine:
                    mine.execute("UPDATE gestures SET description = 'ui' WHERE id = %s", (b["id"],))

                    def close_the_cycle():  # once the page waits for `a`, the other side wants `b`
                        deadline = time.monotonic() + 20
                        with other.cursor() as c:
                            while time.monotonic() < deadline:
                                c.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
                                if c.fetchone()[0] == "Lock":
                                    break
                                time.sleep(0.01)
                            c.execute("UPDATE gestures SET description = 'other' WHERE id = %s", (b["id"],))

                    closer = threading.Thread(target=close_the_cycle)
                    closer.start()
                    try:
                        mine.execute("UPDATE gestures SET description = 'ui' WHERE id = %s", (a["id"],))
                    finally:
                        closer.join(30)
        other.rollback()
    finally:
        other.close()
    said = str(raised.value)
    assert "deadlock detected" in said and "nothing was changed: try again" in said and "not reachable" not in said
    assert data._one("SELECT pg_backend_pid() AS pid")["pid"] == pid  # the connection was kept
    # what waits for a database that is down (the capture page's interval times) waits for this too
    assert isinstance(raised.value, data.Unavailable)


def test_a_request_the_database_took_too_long_for_says_so_and_keeps_the_connection(clean_db):
    """The web UI's statement timeout (20 s) cancels a request that takes longer (a query over months of one user's
    data); psycopg2 raises that as an OperationalError, so the page said 'The database at ... is not reachable
    (canceling statement due to statement timeout). Start the platform with ./start_all.sh' and threw the
    connection away, though the database was up."""
    import data
    import pytest
    with pytest.raises(data.Unavailable) as raised, data.connection() as conn:
        pid = conn.get_backend_pid()
        with conn.cursor() as cur:
            cur.execute("SET LOCAL statement_timeout = 50")  # for this transaction only: the pool's stays 20 s
            cur.execute("SELECT pg_sleep(5)")
    said = str(raised.value)
    assert "took too long to answer" in said and "statement timeout" in said and "nothing was changed" in said
    assert "not reachable" not in said and "start_all" not in said
    assert data._one("SELECT pg_backend_pid() AS pid")["pid"] == pid  # the connection was kept
    assert data._one("SHOW statement_timeout")["statement_timeout"] == "20s"
