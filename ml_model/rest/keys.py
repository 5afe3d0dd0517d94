"""API keys: generation, hashing and the `api_keys` table (only the SHA-256 of a key is ever stored).

Roles: 'admin' (everything), 'service' (internal services: the inference worker and the UI; same rights as
admin) and 'user' (scoped to its user_id). An admin or user key may be read-only: it may only read (GET/HEAD),
for an app that follows a user's decisions, so that a key copied off its device can change nothing.
"""

from __future__ import annotations

import hashlib
import secrets as _secrets
from typing import Any

import psycopg2.extras

from semg import repo

ROLES = ("admin", "user", "service")
KEY_PREFIX = "semg_"
_SHOWN_PREFIX_LEN = len(KEY_PREFIX) + 6
_KEY_COLS = "id, user_id, name, role, read_only, key_prefix, created_at, last_used_at, revoked_at"


def new_key() -> str:
    return KEY_PREFIX + _secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _cursor(conn):
    return conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor)


def create_key(conn, role: str, user_id: int | None = None, name: str = "", key: str | None = None,
               read_only: bool = False) -> dict[str, Any]:
    """Store a new key's hash; returns its row plus 'key' (the secret, shown once)."""
    if role not in ROLES:
        raise repo.Invalid(f"role must be one of {', '.join(ROLES)}")
    if read_only and role == "service":
        raise repo.Invalid("a 'service' key cannot be read-only (the platform's services write with it)")
    if role == "user" and user_id is None:
        raise repo.Invalid("a 'user' key needs the user_id it is scoped to")
    if role != "user" and user_id is not None:
        raise repo.Invalid(f"an '{role}' key belongs to no user; leave user_id empty")
    name = (name or "").strip()
    if len(name) > 200:
        raise repo.Invalid("key name must be at most 200 characters")
    repo.check_no_nul("key name", name)
    key = key or new_key()
    with conn, _cursor(conn) as cur:
        if user_id is not None:
            cur.execute("SELECT 1 FROM users WHERE id = %s", (user_id,))
            if cur.fetchone() is None:
                raise repo.NotFound(f"user {user_id} not found")
        cur.execute(
            f"""INSERT INTO api_keys (user_id, name, role, read_only, key_prefix, key_hash)
                VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_KEY_COLS}""",  # noqa: S608 - constant column list
            (user_id, name, role, bool(read_only), key[:_SHOWN_PREFIX_LEN], key_hash(key)),
        )
        row = dict(cur.fetchone())
    row["key"] = key
    return row


def ensure_key(conn, key: str, role: str, name: str) -> None:
    """Make sure `key` is a live key of `role` (used at startup for the service key); idempotent."""
    with conn, _cursor(conn) as cur:
        cur.execute(
            """INSERT INTO api_keys (name, role, key_prefix, key_hash) VALUES (%s, %s, %s, %s)
               ON CONFLICT (key_hash) DO UPDATE SET revoked_at = NULL, role = EXCLUDED.role, user_id = NULL,
                                                    read_only = false""",
            (name, role, key[:_SHOWN_PREFIX_LEN], key_hash(key)),
        )


def lookup(conn, key: str) -> dict[str, Any] | None:
    """The live key row for a presented key, or None (unknown or revoked)."""
    with conn, _cursor(conn) as cur:
        cur.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL", (key_hash(key),))  # noqa: S608 - constant column list
        row = cur.fetchone()
        return dict(row) if row else None


def touch(conn, key_ids: list[int]) -> None:
    if not key_ids:
        return
    with conn, conn.cursor() as cur:
        # informative only: do not wait for the WAL flush (it can take long on a busy disk)
        cur.execute("SET LOCAL synchronous_commit TO OFF")
        cur.execute("UPDATE api_keys SET last_used_at = now() WHERE id = ANY(%s)", (key_ids,))


def list_keys(conn, user_id: int | None = None, include_revoked: bool = False) -> list[dict[str, Any]]:
    with conn, _cursor(conn) as cur:
        cur.execute(
            f"""SELECT {_KEY_COLS} FROM api_keys
                WHERE (%(u)s::bigint IS NULL OR user_id = %(u)s) AND (%(r)s OR revoked_at IS NULL) ORDER BY id""",  # noqa: S608
            {"u": user_id, "r": include_revoked},
        )
        return [dict(r) for r in cur.fetchall()]


def revoke_key(conn, key_id: int) -> dict[str, Any]:
    with conn, _cursor(conn) as cur:
        cur.execute(
            f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s RETURNING {_KEY_COLS}",  # noqa: S608 - constant column list
            (key_id,),
        )
        row = cur.fetchone()
        if row is None:
            raise repo.NotFound(f"API key {key_id} not found")
        return dict(row)
