"""Owner look-ups the routes need for authorisation that semg.repo does not offer (read-only)."""

from __future__ import annotations

from semg import repo


def _owner(conn, sql: str, ident: int, what: str) -> int:
    with conn, conn.cursor() as cur:
        cur.execute(sql, (ident,))
        row = cur.fetchone()
    if row is None:
        raise repo.NotFound(f"{what} {ident} not found")
    return int(row[0])


def gesture_owner(conn, gesture_id: int) -> int:
    return _owner(conn, "SELECT user_id FROM gestures WHERE id = %s", gesture_id, "gesture")


def interval_owner(conn, interval_id: int) -> int:
    return _owner(conn, """SELECT s.user_id FROM session_intervals i JOIN capture_sessions s ON s.id = i.session_id
                           WHERE i.id = %s""", interval_id, "interval")


def session_owner(conn, session_id: int) -> int:
    return _owner(conn, "SELECT user_id FROM capture_sessions WHERE id = %s", session_id, "session")


def device_owner(conn, device_id: int) -> int:
    return _owner(conn, "SELECT user_id FROM devices WHERE id = %s", device_id, "device")


def job_owner(conn, job_id: int) -> int:
    return _owner(conn, "SELECT user_id FROM training_jobs WHERE id = %s", job_id, "job")
