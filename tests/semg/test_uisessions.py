"""Remembered web UI sign-ins (semg.uisessions) against a real PostgreSQL."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semg import uisessions

PASSWORD = "correct horse battery staple"


def _rows(conn) -> list[dict]:
    with conn.cursor() as cur:
        cur.execute("SELECT id, token_hash, password_tag, created_at, last_used_at, expires_at FROM ui_sessions")
        cols = [d.name for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]


def test_a_sign_in_is_resumed_with_its_token_and_its_expiry_moves_on(clean_db):
    token = uisessions.create(clean_db, PASSWORD, 7)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    with clean_db, clean_db.cursor() as cur:  # as if last used two days ago
        cur.execute("""UPDATE ui_sessions SET expires_at = now() + interval '5 days',
                                              last_used_at = now() - interval '2 days'""")
    assert uisessions.resume(clean_db, token, PASSWORD, 7)
    [row] = _rows(clean_db)
    left = (row["expires_at"] - row["last_used_at"]).total_seconds()
    assert left == pytest.approx(7 * 86400, abs=1)
    assert row["last_used_at"] > row["created_at"]
    # and again: a session serves many page runs, written at most once a minute
    assert uisessions.resume(clean_db, token, PASSWORD, 7)
    assert _rows(clean_db) == [row]


def test_the_table_holds_neither_the_token_nor_the_password(clean_db):
    token = uisessions.create(clean_db, PASSWORD, 7)
    [row] = _rows(clean_db)
    stored = " ".join(str(v) for v in row.values())
    assert token not in stored and PASSWORD not in stored
    # a copy of the table signs nobody in: its hash is not a token
    assert not uisessions.resume(clean_db, row["token_hash"][:43], PASSWORD, 7)


def test_a_changed_ui_password_ends_every_session(clean_db):
    first, second = uisessions.create(clean_db, PASSWORD, 7), uisessions.create(clean_db, PASSWORD, 7)
    assert not uisessions.resume(clean_db, first, "a brand new password", 7)
    assert len(_rows(clean_db)) == 1  # that one is gone
    assert not uisessions.resume(clean_db, first, PASSWORD, 7)  # also if the old password comes back
    assert uisessions.resume(clean_db, second, PASSWORD, 7)


def test_an_expired_or_ended_session_signs_nobody_in_and_expired_ones_are_deleted(clean_db):
    expired, ended, other = (uisessions.create(clean_db, PASSWORD, 7) for _ in range(3))
    with clean_db, clean_db.cursor() as cur:
        cur.execute("UPDATE ui_sessions SET expires_at = now() - interval '1 second' WHERE id = "
                    "(SELECT min(id) FROM ui_sessions)")
    assert not uisessions.resume(clean_db, expired, PASSWORD, 7)
    uisessions.end(clean_db, ended)
    assert not uisessions.resume(clean_db, ended, PASSWORD, 7)
    assert uisessions.resume(clean_db, other, PASSWORD, 7)  # signing out one browser leaves the others
    assert len(_rows(clean_db)) == 2  # the expired one is still there until the next sign-in
    uisessions.create(clean_db, PASSWORD, 7)
    assert len(_rows(clean_db)) == 2


def test_sessions_switched_off_remember_nothing(clean_db):
    token = uisessions.create(clean_db, PASSWORD, 7)
    assert not uisessions.resume(clean_db, token, PASSWORD, 0)
    with pytest.raises(ValueError, match="SEMG_UI_SESSION_DAYS"):
        uisessions.create(clean_db, PASSWORD, 0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.none(), st.text(max_size=300), st.binary(max_size=50).map(repr)))
def test_any_value_a_browser_sends_is_refused_without_an_error(clean_db, value):
    assert uisessions.resume(clean_db, value, PASSWORD, 7) is False
    uisessions.end(clean_db, value)

def test_a_shorter_session_lifetime_applies_to_the_sessions_made_before(clean_db):
    """SEMG_UI_SESSION_DAYS lowered (say 30 -> 1, after a lab laptop went missing) still let a browser idle for
    29 days in: a session's expiry was fixed when it was last used, under the lifetime in force then. A session
    now also ends `days` after its last use under the lifetime in force now."""
    idle, recent = uisessions.create(clean_db, PASSWORD, 30), uisessions.create(clean_db, PASSWORD, 30)
    with clean_db, clean_db.cursor() as cur:  # made under 30 days, last used 5 days ago and 1 hour ago
        cur.execute("""UPDATE ui_sessions SET last_used_at = now() - interval '5 days'
                       WHERE id = (SELECT min(id) FROM ui_sessions)""")
        cur.execute("""UPDATE ui_sessions SET last_used_at = now() - interval '1 hour'
                       WHERE id = (SELECT max(id) FROM ui_sessions)""")
    assert not uisessions.resume(clean_db, idle, PASSWORD, 1)
    assert not uisessions.resume(clean_db, idle, PASSWORD, 30)  # and it stays ended
    assert uisessions.resume(clean_db, recent, PASSWORD, 1)
    [row] = [r for r in _rows(clean_db) if r["last_used_at"] > r["created_at"]]
    assert (row["expires_at"] - row["last_used_at"]).total_seconds() == pytest.approx(86400, abs=1)
