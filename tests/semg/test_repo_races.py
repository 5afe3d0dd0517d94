"""semg.repo when two people act at once: interleavings forced with row locks held by a third connection."""

import threading
import time

import pytest

from semg import db, repo


def _lock_waiting(conn, pid: int) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = cur.fetchone()
    return bool(row and row[0])


def _until(cond, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class _Call(threading.Thread):
    """Run fn(conn, *args) on a connection of its own; .result or .error afterwards."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__(daemon=True)
        self.conn = db.connect()
        self.pid = self.conn.get_backend_pid()
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.fn(self.conn, *self.args, **self.kwargs)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.conn.close()


@pytest.fixture
def bank(clean_db):
    user = repo.create_user(clean_db, "Ann", "ann-races@example.org")
    fist = repo.add_gesture(clean_db, user["id"], "fist")
    repo.add_gesture(clean_db, user["id"], "open")
    device = repo.register_device(clean_db, user["id"], 4, 500)
    return user, fist, device


def _rename_while_held(clean_db, lock_sql: str, lock_id: int, write: _Call, gesture_id: int) -> _Call:
    """`write` starts and is held (mid-transaction, after it read the gesture bank) by a row lock a third
    connection takes with `lock_sql`; the gesture is renamed 'fist' -> 'grip' meanwhile; then the lock goes."""
    holder = db.connect()
    try:
        with holder.cursor() as cur:
            cur.execute(lock_sql, (lock_id,))
        write.start()
        _until(lambda: _lock_waiting(clean_db, write.pid), "the write to wait on the held row")
        rename = _Call(repo.update_gesture, gesture_id, name="grip")
        rename.start()
        # the rename either finishes or waits for the write: both are deterministic end states
        _until(lambda: not rename.is_alive() or _lock_waiting(clean_db, rename.pid), "the rename to settle")
    finally:
        holder.rollback()
        holder.close()
    write.join(20)
    rename.join(20)
    assert not write.is_alive() and not rename.is_alive()
    assert rename.error is None, rename.error
    return write


def _labels_of(clean_db, gesture_id: int) -> set[str]:
    with clean_db.cursor() as cur:
        cur.execute("SELECT DISTINCT label FROM session_intervals WHERE gesture_id = %s", (gesture_id,))
        return {r[0] for r in cur.fetchall()}


def test_a_session_planned_while_its_gesture_is_renamed_labels_it_by_one_name(clean_db, bank):
    """Tab 1 plans a session with 'fist' while tab 2 renames 'fist' to 'grip'. The session's intervals took the
    name read from the bank before the rename committed: 'fist' intervals of the gesture now named 'grip', so
    training learnt 'fist' and 'grip' as two classes of one gesture (and served 'fist' no gesture has)."""
    user, fist, device = bank
    plan = _Call(repo.create_session, user["id"], device["id"], ["fist", "open"], 2, 1.0, 1.0)
    # the new session's row waits on its user row (its foreign key), after the bank was read
    write = _rename_while_held(clean_db, "SELECT 1 FROM users WHERE id = %s FOR UPDATE", user["id"], plan, fist["id"])
    if write.error is not None:  # refused with a clear message is fine too; silently mislabelled is not
        assert isinstance(write.error, repo.Invalid) and "fist" in str(write.error), write.error
    else:
        assert _labels_of(clean_db, fist["id"]) == {"grip"}
        got = repo.get_session(clean_db, write.result["id"])
        assert "fist" not in got["plan"]["gestures"]


def test_an_interval_added_while_its_gesture_is_renamed_takes_the_new_name(clean_db, bank):
    """A redo appends a 'fist' interval while 'fist' is renamed 'grip': it must not keep the old name."""
    user, fist, device = bank
    session = repo.create_session(clean_db, user["id"], device["id"], ["open"], 1, 1.0, 1.0)
    add = _Call(repo.add_interval, session["id"], "gesture", "fist", 0, 5000, 6000)
    # the interval's row waits on its session row (its foreign key), after the gesture was looked up
    write = _rename_while_held(clean_db, "SELECT 1 FROM capture_sessions WHERE id = %s FOR UPDATE", session["id"],
                               add, fist["id"])
    if write.error is not None:
        assert isinstance(write.error, repo.Invalid) and "fist" in str(write.error), write.error
    else:
        assert _labels_of(clean_db, fist["id"]) == {"grip"}
