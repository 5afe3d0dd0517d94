"""Web UI sign-ins remembered across page loads and tabs (table ui_sessions, db/migrations/0008).

Streamlit keeps state per websocket, so without this every reload or new tab asked for the password again. After a
sign-in the browser keeps a random token (in its localStorage, streamlit_apps/session_store: not a cookie, which every
port of the host name would get); a new page load presents it and is signed in while the token is known, unexpired
and was issued under the UI password in force now. Only the token's SHA-256 is stored, with an
HMAC of the password keyed by the token: a changed UI password ends every session, and neither column lets a copy
of the table sign in or test a guess of the password. Sessions expire `days` after their last use.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

# token_urlsafe(32): 43 characters of [A-Za-z0-9_-]; anything else a browser sends is not ours
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _password_tag(token: str, password: str) -> str:
    return hmac.new(token.encode(), password.encode(), hashlib.sha256).hexdigest()


def create(conn, password: str, days: float) -> str:
    """A new session for someone who just gave the UI password; returns its token (for the browser to keep). Expired
    sessions are deleted on the way."""
    if days <= 0:
        raise ValueError("sessions are off (SEMG_UI_SESSION_DAYS=0)")
    token = secrets.token_urlsafe(32)
    with conn, conn.cursor() as cur:
        cur.execute("DELETE FROM ui_sessions WHERE expires_at <= now()")
        cur.execute("""INSERT INTO ui_sessions (token_hash, password_tag, expires_at)
                       VALUES (%s, %s, now() + make_interval(secs => %s))""",
                    (_token_hash(token), _password_tag(token, password), days * 86400.0))
    return token


def resume(conn, token: str | None, password: str, days: float) -> bool:
    """True when `token` (what a browser sent; None or anything) names a live session issued under `password`; its
    expiry then moves to `days` from now (written at most once a minute: every page run of a signed-in browser
    asks). A session issued under another password, or unused for `days`, is deleted."""
    if days <= 0 or not isinstance(token, str) or not _TOKEN.fullmatch(token):
        return False
    with conn, conn.cursor() as cur:
        # idle: unused for `days` now, whatever the lifetime was when its expiry was last written (a lowered
        # SEMG_UI_SESSION_DAYS applies to the sessions made before)
        cur.execute("""SELECT id, password_tag, last_used_at <= now() - make_interval(secs => %s) FROM ui_sessions
                       WHERE token_hash = %s AND expires_at > now()""", (days * 86400.0, _token_hash(token)))
        row = cur.fetchone()
        if row is None:
            return False
        session_id, tag, idle = row
        if idle or not hmac.compare_digest(tag, _password_tag(token, password)):
            cur.execute("DELETE FROM ui_sessions WHERE id = %s", (session_id,))
            return False
        cur.execute("""UPDATE ui_sessions SET last_used_at = now(), expires_at = now() + make_interval(secs => %s)
                       WHERE id = %s AND last_used_at < now() - interval '1 minute'""", (days * 86400.0, session_id))
    return True


def end(conn, token: str | None) -> None:
    """Sign out: the token no longer signs anyone in (also in other tabs' next page loads)."""
    if isinstance(token, str) and _TOKEN.fullmatch(token):
        with conn, conn.cursor() as cur:
            cur.execute("DELETE FROM ui_sessions WHERE token_hash = %s", (_token_hash(token),))
