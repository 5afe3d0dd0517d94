"""Domain data access shared by the REST API and the web UI (one implementation of every mutation).

Every function takes a psycopg2 connection first, runs in one transaction that it commits (or rolls back
on error), returns plain dicts, and raises a RepoError subclass with a message fit to show a person.
SQL is always parameterised.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import secrets as _secrets
import time
import unicodedata
import zipfile
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
from psycopg2.extras import Json

MAX_CHANNELS = 16
# The UDP server reloads every device every 2 s: a user registering devices in a loop (anyone with a user API key
# can) would slow everyone's packets with a list of millions. No person wears more than a few sensors.
MAX_DEVICES_PER_USER = 64
# What the devices of one user may send together (channels x registered rate, values/s): as much as one device at
# the highest rate and channel count. The UDP server holds each device to its registered rate (its sample budget),
# so this bounds what one user can make the server store and publish for everyone.
MAX_VALUES_PER_S_PER_USER = MAX_CHANNELS * 10_000
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
JOB_STATUSES = ("scheduled", "in-progress", "completed", "failed", "canceled")
REST = "REST"
# What live recognition answers when unsure (ml_model.postprocessing.UNKNOWN): a gesture of that name would be
# told apart from "unsure" by no client.
UNSURE = "UNKNOWN"

# Quick-add library of common gestures (names as used in the sEMG literature).
GESTURE_LIBRARY: list[dict[str, str]] = [
    {"name": "fist", "description": "Close the hand firmly (hand close / power grip)"},
    {"name": "open hand", "description": "Spread and extend all fingers"},
    {"name": "wrist flexion", "description": "Bend the wrist so the palm moves toward the forearm"},
    {"name": "wrist extension", "description": "Bend the wrist so the back of the hand moves up"},
    {"name": "radial deviation", "description": "Tilt the hand toward the thumb side"},
    {"name": "ulnar deviation", "description": "Tilt the hand toward the little-finger side"},
    {"name": "pinch", "description": "Touch thumb and index fingertips"},
    {"name": "point", "description": "Extend the index finger, other fingers closed"},
    {"name": "thumbs up", "description": "Closed fist with the thumb extended upward"},
    {"name": "pronation", "description": "Rotate the forearm so the palm faces down"},
    {"name": "supination", "description": "Rotate the forearm so the palm faces up"},
]


class RepoError(ValueError):
    """Base class: the message is meant for the person who asked."""


class NotFound(RepoError):
    pass


class Conflict(RepoError):
    pass


class Invalid(RepoError):
    pass


class RunTakenOver(Conflict):
    """The capture run writing to a session is no longer the session's run: another window took it over (see
    take_over_run). It must write nothing more: the new run cut it where it was last seen."""

    @classmethod
    def of(cls, session_id: int) -> RunTakenOver:
        return cls(f"session {session_id} is recorded by another window now: this one writes nothing more")


def _own_run(cur, session_id: int, owner: str | None) -> None:
    """With `owner` (a capture run's name, see run_heartbeat): raise RunTakenOver unless it is still the session's
    run. The row stays KEY SHARE locked until the transaction ends, so a take-over (SELECT ... FOR UPDATE)
    waits for the write under way, and a write after it sees the new owner."""
    if owner is None:
        return
    cur.execute("SELECT run_owner FROM capture_sessions WHERE id = %s FOR KEY SHARE", (session_id,))
    row = _one(cur, "session", session_id)
    if row["run_owner"] != owner:
        raise RunTakenOver.of(session_id)


# An interval write's condition with an owner: its session's run is still that owner (the session row KEY SHARE
# locked until the write commits, as in _own_run). In the UPDATE itself, so that the write waits on its rows.
_OWNED = """(%(owner)s::text IS NULL OR session_id IN (SELECT id FROM capture_sessions
                                                     WHERE run_owner = %(owner)s FOR KEY SHARE))"""


def _interval_write_refused(cur, interval_id: int) -> None:
    """An owned interval write matched no row: NotFound when the interval is gone, else RunTakenOver."""
    cur.execute("SELECT session_id FROM session_intervals WHERE id = %s", (interval_id,))
    raise RunTakenOver.of(_one(cur, "interval", interval_id)["session_id"])


@contextlib.contextmanager
def _tx(conn: psycopg2.extensions.connection) -> Iterator[psycopg2.extras.RealDictCursor]:
    """One transaction with a dict cursor; integrity errors become RepoErrors."""
    try:
        with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            yield cur
    except psycopg2.errors.UniqueViolation as e:
        raise Conflict(_constraint_message(e, "already exists")) from None
    except psycopg2.errors.ForeignKeyViolation as e:
        raise NotFound(_constraint_message(e, "refers to something that does not exist")) from None
    except (psycopg2.errors.CheckViolation, psycopg2.errors.NotNullViolation,
            psycopg2.errors.InvalidTextRepresentation, psycopg2.errors.NumericValueOutOfRange) as e:
        raise Invalid(_constraint_message(e, "is not valid")) from None
    except psycopg2.errors.UntranslatableCharacter:  # \u0000 in a JSON value
        raise Invalid(f"text {NUL_MESSAGE}") from None
    except ValueError as e:  # psycopg2 refuses NUL in a string parameter before sending it
        if isinstance(e, RepoError) or "cannot contain NUL" not in str(e):
            raise
        raise Invalid(f"text {NUL_MESSAGE}") from None


NUL_MESSAGE = "must not contain a NUL character (\\x00): PostgreSQL text cannot store it"


def check_no_nul(field: str, value: str | None) -> str | None:
    """Refuse a NUL in a text field by its name (the database would fail with a message naming nothing)."""
    if value is not None and "\x00" in value:
        raise Invalid(f"{field} {NUL_MESSAGE}")
    return value


_CONSTRAINT_TEXT = {
    "users_email_lower_key": "a user with this email already exists",
    "gestures_user_id_name_key": "this user already has a gesture with that name",
    "devices_one_legacy_per_user": "this user already has a legacy (text protocol) device",
}


def _constraint_message(e: psycopg2.Error, default: str) -> str:
    name = getattr(e.diag, "constraint_name", None) or ""
    if name in _CONSTRAINT_TEXT:
        return _CONSTRAINT_TEXT[name]
    table = getattr(e.diag, "table_name", None) or "value"
    detail = (getattr(e.diag, "message_primary", None) or str(e)).strip()
    return f"{table}: {default} ({detail})"


def _one(cur, what: str, ident: Any) -> dict:
    row = cur.fetchone()
    if row is None:
        raise NotFound(f"{what} {ident} not found")
    return dict(row)


# ---- users ---------------------------------------------------------------------------------------
_USER_COLS = "id, name, email, notes, created_at, updated_at"


def _clean_user(name: str | None, email: str | None, notes: str | None = None) -> tuple[str | None, str | None]:
    check_no_nul("user name", name)
    check_no_nul("email", email)
    check_no_nul("notes", notes)
    if name is not None:
        name = name.strip()
        if not 1 <= len(name) <= 200:
            raise Invalid("name must be 1 to 200 characters")
    if email is not None:
        email = email.strip()
        if len(email) > 320 or not EMAIL_RE.match(email):
            raise Invalid(f"{email!r} is not a valid email address")
    return name, email


def create_user(conn, name: str, email: str, notes: str = "") -> dict:
    name, email = _clean_user(name, email, notes)
    with _tx(conn) as cur:
        cur.execute(f"INSERT INTO users (name, email, notes) VALUES (%s, %s, %s) RETURNING {_USER_COLS}",
                    (name, email, notes or ""))
        return dict(cur.fetchone())


def get_user(conn, user_id: int) -> dict:
    with _tx(conn) as cur:
        cur.execute(f"SELECT {_USER_COLS} FROM users WHERE id = %s", (user_id,))
        return _one(cur, "user", user_id)


def update_user(conn, user_id: int, name: str | None = None, email: str | None = None,
                notes: str | None = None) -> dict:
    name, email = _clean_user(name, email, notes)
    with _tx(conn) as cur:
        cur.execute(
            f"""UPDATE users SET name = coalesce(%s, name), email = coalesce(%s, email),
                   notes = coalesce(%s, notes), updated_at = now()
                WHERE id = %s RETURNING {_USER_COLS}""",
            (name, email, notes, user_id),
        )
        return _one(cur, "user", user_id)


def user_video_folder(user_id: int) -> str:
    """The folder (relative to the video dir) the UI records a user's webcam videos into."""
    return f"user{int(user_id)}"


# ---- decisions: bounded deletes ----------------------------------------------------------------------
PREDICTION_BATCH = 10_000
# Advisory lock (two-int form; the inference worker slots use namespace 0x5E3C1F) held by the one pruning pass
# that runs at a time, whichever worker started it.
PRUNE_LOCK = (0x5E3C20, 1)

# ctid: the rows just picked are deleted without a second (primary key) lookup each; ORDER BY decided_at makes
# the planner walk the (user_id, decided_at) index instead of a LIMITed sequential scan, which has to pass
# every already-emptied page again on each batch. Each batch starts at the oldest decision of the one before
# (decided_at >= its oldest), as _DELETE_SAMPLES does: starting at the user's first entry walked every earlier
# batch's entries again, so a pass grew with the square of what it deleted (10 days of one user at 40/s: 3,400
# batches), with a table lookup per entry while a snapshot held elsewhere (a backup's pg_dump, an export) kept
# them from being marked dead: +0.2 ms per 1,000 already deleted, on every batch.
_DELETE_BATCH = """WITH gone AS (
    DELETE FROM predictions WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM predictions WHERE user_id = %(u)s AND decided_at >= %(since)s {older}
        ORDER BY decided_at LIMIT %(n)s))
    RETURNING decided_at)
SELECT count(*), min(decided_at) FROM gone"""


@contextlib.contextmanager
def _own_transactions(conn) -> Iterator[None]:
    """Each `with conn:` block below is one transaction, also on a caller's autocommit connection."""
    was = conn.autocommit
    if was:
        conn.autocommit = False
    try:
        yield
    finally:
        if was and not conn.closed:
            with contextlib.suppress(psycopg2.Error):
                conn.rollback()
                conn.autocommit = True


def _delete_predictions(conn, user_id: int, before: datetime | None, batch: int,
                        stop: Callable[[], bool] | None = None, pause_s: float = 0.0) -> int:
    """Delete the user's decisions (those decided before `before`, or all), `batch` per short transaction, so no
    statement runs long and nothing waits long on its locks. Returns how many."""
    sql = _DELETE_BATCH.format(older="AND decided_at < %(before)s" if before is not None else "")
    return _delete_in_batches(conn, sql, {"u": user_id, "before": before}, batch, stop, pause_s)


def _delete_in_batches(conn, sql: str, params: dict, batch: int, stop: Callable[[], bool] | None = None,
                       pause_s: float = 0.0) -> int:
    """Run `sql` (_DELETE_BATCH, _DELETE_SAMPLES: deletes up to %(n)s rows from %(since)s on, returns their count
    and oldest time) batch after batch, each its own short transaction starting at the oldest row of the batch
    before, until one deletes fewer than `batch` (or `stop()`). Returns how many."""
    if batch < 1:
        raise Invalid("batch must be at least 1")
    total, since = 0, "-infinity"
    with _own_transactions(conn):
        while not (stop and stop()):
            with conn, conn.cursor() as cur:
                # a synchronous commit: the next batch, walking these entries once more, can mark them dead only
                # once the commit is flushed, and marked they cost the next pass (and the final cascade of a
                # device's or user's row) a step each instead of a table lookup each (asynchronous ones left a
                # device's 1 M entries unmarked: its user's cascade took 0.7 s instead of 0.05 s)
                cur.execute(sql, {**params, "since": since, "n": batch})
                n, oldest = cur.fetchone()
            total += n
            if n < batch:
                break
            since = oldest
            if pause_s:
                time.sleep(pause_s)
    return total


# ---- recordings: bounded deletes ---------------------------------------------------------------------
SAMPLE_BATCH = 10_000

# A device's sample blocks, oldest first along sample_blocks_device_time_idx (ORDER BY: not a LIMITed sequential
# scan of everyone's recordings). Each batch starts at the first block of the one before (device_time0 >= its
# oldest): walking the entries just deleted once marks them dead in the index, so the final cascade steps over
# them without a table lookup each (3 M blocks: 1.4 s otherwise); starting at the device's first entry instead
# would walk every earlier batch's entries again, each time with a table lookup while a snapshot held elsewhere
# (a long report, a backup) keeps them from being marked.
_DELETE_SAMPLES = """WITH gone AS (
    DELETE FROM sample_blocks WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM sample_blocks WHERE device_id = %(d)s AND device_time0 >= %(since)s
        ORDER BY device_time0 LIMIT %(n)s))
    RETURNING device_time0)
SELECT count(*), min(device_time0) FROM gone"""


def _delete_samples(conn, device_id: int, batch: int) -> int:
    """Delete the device's recordings, `batch` sample blocks per short transaction: a device records 72,000 an
    hour, and tens of hours in the one cascade from its devices (or users) row outran the UI's statement timeout
    and held its locks throughout. Returns how many. Blocks still arriving (a live device) are for the caller's
    final cascade, which then has only those few left."""
    return _delete_in_batches(conn, _DELETE_SAMPLES, {"d": device_id}, batch)


# Set in the transaction deleting a users/devices row once its recordings are gone. The cascade's query
# (sample_blocks WHERE device_id = $1) is planned on statistics that still count the rows just deleted in
# batches (until the next ANALYZE): on a database with a few users it chose a sequential scan of everyone's
# recordings (0.4 s for the user, 0.3 s for a device, on 3.5 M blocks: growing with the whole table) where the
# device index has only the entries just deleted, marked dead, to step over (0.05 s, 0.04 s).
_CASCADE_BY_INDEX = "SET LOCAL enable_seqscan TO off"


def prune_predictions(conn, days: int, batch: int = PREDICTION_BATCH, stop: Callable[[], bool] | None = None,
                      pause_s: float = 0.0) -> dict:
    """Delete the decisions older than `days` days (0 = keep forever), user by user in bounded batches.

    Recordings (samples) are never touched. One pass at a time: while another connection prunes, this returns
    at once with busy=True. Returns {"removed", "older_than" (the cutoff), "busy"}."""
    if days < 0:
        raise Invalid("retention days must be 0 (keep forever) or more")
    out = {"removed": 0, "older_than": None, "busy": False}
    if days == 0:
        return out
    with _own_transactions(conn):
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s, %s), now() - make_interval(days => %s)", (*PRUNE_LOCK, days))
            locked, out["older_than"] = cur.fetchone()
        if not locked:
            out["busy"] = True
            return out
        try:
            with conn, conn.cursor() as cur:
                # every decision belongs to a user (NOT NULL, cascaded): per user, the batches walk the
                # (user_id, decided_at) index, so no index of its own is needed on the insert path
                cur.execute("SELECT id FROM users ORDER BY id")
                users = [r[0] for r in cur.fetchall()]
            for user_id in users:
                if stop and stop():
                    break
                out["removed"] += _delete_predictions(conn, user_id, out["older_than"], batch, stop, pause_s)
        finally:
            if not conn.closed:  # a lost connection took its lock with it
                with contextlib.suppress(psycopg2.Error), conn, conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s, %s)", PRUNE_LOCK)
    return out


def delete_user(conn, user_id: int, video_dir: Path | None = None, batch: int = PREDICTION_BATCH,
                sample_batch: int = SAMPLE_BATCH) -> dict:
    """Delete the user and, by cascade, all their data; then remove their video files: the registered ones, and
    whatever else is in their recording folder (a capture whose window closed before it ended never registered
    its video).

    Their decisions go first, `batch` per transaction: a heavy user has millions (144,000 an hour of live use),
    and one cascade over them all outran the UI's 20 s statement timeout. Their recordings likewise, device by
    device (`sample_batch` blocks per transaction). Interrupted (database gone), the user is still there,
    without some of their decisions, models or recordings, and can be deleted again; nobody else's rows are
    touched."""
    get_user(conn, user_id)  # NotFound before anything is deleted
    _delete_predictions(conn, user_id, None, batch)
    # Then their models, one per transaction: a model's ON DELETE SET NULL looks its decisions up in
    # predictions_model_idx, which lists the rows just deleted until VACUUM, each checked in the table; in the
    # user row's cascade that was one statement for all models (12.7 s for 3 M decisions over 100 models).
    with _tx(conn) as cur:
        cur.execute("SELECT id FROM model_artifacts WHERE user_id = %s ORDER BY id", (user_id,))
        models = [r["id"] for r in cur.fetchall()]
    for model_id in models:
        with _tx(conn) as cur:
            cur.execute("DELETE FROM model_artifacts WHERE id = %s AND user_id = %s", (model_id, user_id))
    # A device registered meanwhile, and blocks still arriving, go with the user row's cascade. Their other
    # tables hold what a person does by hand (sessions and their intervals, videos, jobs and their ~10 log
    # lines each, gestures, keys): a few thousand rows at most, left to the cascade.
    with _tx(conn) as cur:
        cur.execute("SELECT id FROM devices WHERE user_id = %s ORDER BY id", (user_id,))
        devices = [r["id"] for r in cur.fetchall()]
    for device_id in devices:
        _delete_samples(conn, device_id, sample_batch)
    with _tx(conn) as cur:
        cur.execute("SELECT path FROM videos WHERE user_id = %s", (user_id,))
        paths = [r["path"] for r in cur.fetchall()]
        cur.execute(_CASCADE_BY_INDEX)
        cur.execute("DELETE FROM users WHERE id = %s RETURNING id, name, email", (user_id,))
        deleted = _one(cur, "user", user_id)
    removed = 0
    if video_dir is not None:
        root = Path(video_dir).resolve()
        folder = root / user_video_folder(user_id)
        if folder.is_dir() and not folder.is_symlink():
            paths += [p.relative_to(root).as_posix() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
        for rel in dict.fromkeys(paths):
            p = (root / rel).resolve()
            if root in p.parents and p.is_file():  # never follow a stored path out of the video dir
                p.unlink()
                removed += 1
                # and the folders that only held their recordings (e.g. user<id>/), up to the video dir
                for parent in p.parents:
                    if parent == root or root not in parent.parents:
                        break
                    try:
                        parent.rmdir()  # only when empty
                    except OSError:
                        break
    deleted["videos_removed"] = removed
    return deleted


def list_users(conn, search: str | None = None, limit: int = 100, offset: int = 0,
               only_user: int | None = None) -> list[dict]:
    """Users by id (matching `search` in name or email), or just `only_user` when given."""
    check_no_nul("search", search)
    # the typed text matches literally: LIKE's own % and _ and its escape character (backslash) are escaped
    literal = (search or "").strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    pattern = f"%{literal}%" if literal else None
    with _tx(conn) as cur:
        cur.execute(
            f"""SELECT {_USER_COLS},
                   (SELECT count(*) FROM devices d WHERE d.user_id = u.id) AS devices,
                   (SELECT count(*) FROM gestures g WHERE g.user_id = u.id) AS gestures
                FROM users u
                WHERE (%(p)s::text IS NULL OR name ILIKE %(p)s ESCAPE '\\' OR email ILIKE %(p)s ESCAPE '\\')
                  AND (%(only)s::bigint IS NULL OR u.id = %(only)s)
                ORDER BY id LIMIT %(limit)s OFFSET %(offset)s""",
            {"p": pattern, "only": only_user, "limit": max(1, min(int(limit), 1000)), "offset": max(0, int(offset))},
        )
        return [dict(r) for r in cur.fetchall()]


# ---- gestures ------------------------------------------------------------------------------------
_GESTURE_COLS = "id, user_id, name, description, channels_used, channel_purposes, created_at"


def _clean_channels(channels_used: Sequence[int] | None, channel_purposes: dict | None
                    ) -> tuple[list[int], dict[str, str]]:
    chans = sorted({int(c) for c in (channels_used or ())})
    if any(not 0 <= c < MAX_CHANNELS for c in chans):
        raise Invalid(f"channels must be between 0 and {MAX_CHANNELS - 1}")
    purposes: dict[str, str] = {}
    for k, v in (channel_purposes or {}).items():
        try:
            c = int(k)
        except (TypeError, ValueError):
            raise Invalid(f"channel purpose key {k!r} is not a channel number") from None
        if not 0 <= c < MAX_CHANNELS:
            raise Invalid(f"channel purpose for channel {c}: channels are 0 to {MAX_CHANNELS - 1}")
        if str(v).strip():
            purposes[str(c)] = check_no_nul("channel purpose", str(v).strip()[:200])
    return chans, purposes


def _clean_gesture_name(name: str) -> str:
    # NFC: the same name typed on macOS (decomposed accents) and elsewhere must be one gesture, not two classes.
    name = unicodedata.normalize("NFC", check_no_nul("gesture name", (name or "").strip()))
    if not 1 <= len(name) <= 80:
        raise Invalid("gesture name must be 1 to 80 characters")
    if name.upper() == REST:
        raise Invalid("REST is built in (the rest intervals); choose another name")
    if name.upper() == UNSURE:
        raise Invalid(f"{UNSURE} is what live recognition answers when it is unsure; choose another name")
    return name


def list_gestures(conn, user_id: int) -> list[dict]:
    with _tx(conn) as cur:
        cur.execute(f"SELECT {_GESTURE_COLS} FROM gestures WHERE user_id = %s ORDER BY id", (user_id,))
        return [dict(r) for r in cur.fetchall()]


def add_gesture(conn, user_id: int, name: str, description: str = "", channels_used: Sequence[int] = (),
                channel_purposes: dict | None = None) -> dict:
    name = _clean_gesture_name(name)
    check_no_nul("gesture description", description)
    chans, purposes = _clean_channels(channels_used, channel_purposes)
    with _tx(conn) as cur:
        cur.execute(
            f"""INSERT INTO gestures (user_id, name, description, channels_used, channel_purposes)
                VALUES (%s, %s, %s, %s::smallint[], %s) RETURNING {_GESTURE_COLS}""",
            (user_id, name, description or "", chans, Json(purposes)),
        )
        gesture = dict(cur.fetchone())
        # Recordings of a deleted gesture of this name are its recordings again (they do not train while their
        # gesture is deleted): re-adding a gesture deleted by mistake gives its data back.
        cur.execute("""UPDATE session_intervals SET gesture_id = %s
                       WHERE kind = 'gesture' AND gesture_id IS NULL AND label = %s
                         AND session_id IN (SELECT id FROM capture_sessions WHERE user_id = %s)""",
                    (gesture["id"], name, user_id))
        return gesture


def update_gesture(conn, gesture_id: int, name: str | None = None, description: str | None = None,
                   channels_used: Sequence[int] | None = None, channel_purposes: dict | None = None) -> dict:
    name = _clean_gesture_name(name) if name is not None else None
    check_no_nul("gesture description", description)
    chans, purposes = _clean_channels(channels_used, channel_purposes)
    with _tx(conn) as cur:
        cur.execute("SELECT name FROM gestures WHERE id = %s FOR UPDATE", (gesture_id,))
        old_name = _one(cur, "gesture", gesture_id)["name"]
        cur.execute(
            f"""UPDATE gestures SET name = coalesce(%s, name), description = coalesce(%s, description),
                   channels_used = CASE WHEN %s THEN %s::smallint[] ELSE channels_used END,
                   channel_purposes = CASE WHEN %s THEN %s ELSE channel_purposes END
                WHERE id = %s RETURNING {_GESTURE_COLS}""",
            (name, description, channels_used is not None, chans, channel_purposes is not None, Json(purposes),
             gesture_id),
        )
        gesture = _one(cur, "gesture", gesture_id)
        if name is not None and name != old_name:
            # Training labels samples by session_intervals.label: the gesture's recordings take the new name, or
            # its old and new sessions would train as two classes (and a new gesture given the old name, as one).
            cur.execute(
                """WITH renamed AS (
                       UPDATE session_intervals SET label = %(new)s WHERE gesture_id = %(g)s RETURNING session_id)
                   UPDATE capture_sessions SET plan = jsonb_set(plan, '{gestures}', (
                           SELECT coalesce(jsonb_agg(CASE WHEN e.x = %(old)s THEN %(new)s ELSE e.x END ORDER BY e.o),
                                           '[]'::jsonb)
                           FROM jsonb_array_elements_text(plan->'gestures') WITH ORDINALITY AS e(x, o)))
                   WHERE id IN (SELECT session_id FROM renamed) AND jsonb_typeof(plan->'gestures') = 'array'""",
                {"new": name, "old": old_name, "g": gesture_id})
        return gesture


def delete_gesture(conn, gesture_id: int) -> None:
    with _tx(conn) as cur:
        cur.execute("DELETE FROM gestures WHERE id = %s RETURNING id", (gesture_id,))
        _one(cur, "gesture", gesture_id)


# ---- devices -------------------------------------------------------------------------------------
_DEVICE_COLS = "id, user_id, name, protocol, channel_count, sample_rate_hz, key_rotated_at, created_at"


def register_device(conn, user_id: int, channel_count: int, sample_rate_hz: float, protocol: str = "binary",
                    name: str = "") -> dict:
    """Register a sensor. A binary device gets a fresh 32-byte key, returned ONCE as secret_key_hex."""
    check_no_nul("device name", name)
    if protocol not in ("binary", "legacy"):
        raise Invalid("protocol must be 'binary' or 'legacy'")
    if not 1 <= int(channel_count) <= MAX_CHANNELS:
        raise Invalid(f"channel count must be 1 to {MAX_CHANNELS}")
    if not 0 < float(sample_rate_hz) <= 10000:
        raise Invalid("sample rate must be above 0 and at most 10000 Hz")
    key = _secrets.token_bytes(32) if protocol == "binary" else None
    with _tx(conn) as cur:
        # the user's row lock serialises registrations, so two at once cannot both pass the count
        # (NO KEY: rows that only reference the user, e.g. the live worker's predictions, are not held up)
        cur.execute("SELECT 1 FROM users WHERE id = %s FOR NO KEY UPDATE", (user_id,))
        _one(cur, "user", user_id)
        cur.execute("""SELECT count(*) AS n, coalesce(sum(channel_count * sample_rate_hz), 0) AS values_per_s
                       FROM devices WHERE user_id = %s""", (user_id,))
        have = cur.fetchone()
        if have["n"] >= MAX_DEVICES_PER_USER:
            raise Conflict(f"a user may have at most {MAX_DEVICES_PER_USER} devices: delete one that is no longer "
                           f"used (its recordings go with it) before registering another")
        adds = int(channel_count) * float(sample_rate_hz)
        if have["values_per_s"] + adds > MAX_VALUES_PER_S_PER_USER:
            raise Conflict(f"a user's devices may send at most {MAX_VALUES_PER_S_PER_USER} values/s together "
                           f"(channels x sample rate); theirs send {have['values_per_s']:g} and this one would add "
                           f"{adds:g}: delete a device no longer used")
        cur.execute(
            f"""INSERT INTO devices (user_id, name, protocol, channel_count, sample_rate_hz, secret_key)
                VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_DEVICE_COLS}""",
            (user_id, (name or "").strip()[:80], protocol, int(channel_count), float(sample_rate_hz),
             psycopg2.Binary(key) if key else None),
        )
        dev = dict(cur.fetchone())
    dev["secret_key_hex"] = key.hex() if key else None
    return dev


def rotate_device_key(conn, device_id: int) -> dict:
    key = _secrets.token_bytes(32)
    with _tx(conn) as cur:
        cur.execute(
            f"""UPDATE devices SET secret_key = %s, key_rotated_at = now()
                WHERE id = %s AND protocol = 'binary' RETURNING {_DEVICE_COLS}""",
            (psycopg2.Binary(key), device_id),
        )
        row = cur.fetchone()
        if row is None:
            cur.execute("SELECT protocol FROM devices WHERE id = %s", (device_id,))
            found = cur.fetchone()
            if found is None:
                raise NotFound(f"device {device_id} not found")
            raise Invalid("legacy devices have no key to rotate; register a binary device instead")
    dev = dict(row)
    dev["secret_key_hex"] = key.hex()
    return dev


def reset_device_boot(conn, device_id: int) -> dict:
    """After a re-flash restarted the device's boot counter (kept in its NVS): its next boot is taken as newer
    than everything received. The UDP server picks this up at its next device-list refresh (every 2 s).

    The device gets a new key at the same time (returned once, to flash with the sketch): with the old one, any
    packet ever sent by the device would now pass as a newer boot, so a packet captured off the network could
    be replayed, and would lock the real device out as 'old_boot' again."""
    key = _secrets.token_bytes(32)
    with _tx(conn) as cur:
        cur.execute(
            f"""UPDATE devices d SET boot_offset = greatest(d.boot_offset, coalesce(
                    (SELECT max(boot) + 1 FROM sample_blocks s WHERE s.device_id = d.id), 0)),
                    secret_key = %s, key_rotated_at = now()
                WHERE id = %s AND protocol = 'binary' RETURNING {_DEVICE_COLS}""",
            (psycopg2.Binary(key), device_id),
        )
        row = cur.fetchone()
        if row is None:
            cur.execute("SELECT protocol FROM devices WHERE id = %s", (device_id,))
            if cur.fetchone() is None:
                raise NotFound(f"device {device_id} not found")
            raise Invalid("legacy devices have no boot counter (the server numbers their boots itself)")
    dev = dict(row)
    dev["secret_key_hex"] = key.hex()
    return dev


def list_devices(conn, user_id: int | None = None) -> list[dict]:
    with _tx(conn) as cur:
        cur.execute(f"""SELECT {_DEVICE_COLS} FROM devices WHERE %(u)s::bigint IS NULL OR user_id = %(u)s
                        ORDER BY id""", {"u": user_id})
        return [dict(r) for r in cur.fetchall()]


def get_device(conn, device_id: int) -> dict:
    with _tx(conn) as cur:
        cur.execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE id = %s", (device_id,))
        return _one(cur, "device", device_id)


def delete_device(conn, device_id: int, batch: int = SAMPLE_BATCH) -> None:
    """Deletes the device and its samples, these `batch` per transaction first (see _delete_samples).
    Interrupted, the device is still there, with fewer samples, and can be deleted again."""
    get_device(conn, device_id)  # NotFound before anything is deleted
    _delete_samples(conn, device_id, batch)
    with _tx(conn) as cur:
        cur.execute(_CASCADE_BY_INDEX)
        cur.execute("DELETE FROM devices WHERE id = %s RETURNING id", (device_id,))
        _one(cur, "device", device_id)


# ---- capture sessions ----------------------------------------------------------------------------
def plan_intervals(gestures: Sequence[str], repetitions: int, hold_s: float, rest_s: float) -> list[dict]:
    """The timing plan: for each repetition, each gesture held for hold_s after a rest of rest_s.

    Starts with a rest (the REST class needs data too) and ends with one. Offsets in ms from the start.
    """
    names = [_clean_gesture_name(g) for g in gestures]
    if not names:
        raise Invalid("choose at least one gesture")
    if len(set(names)) != len(names):
        raise Invalid("each gesture may appear only once per session")
    if not 1 <= int(repetitions) <= 50:
        raise Invalid("repetitions must be 1 to 50")
    if not 0.5 <= float(hold_s) <= 60 or not 0.5 <= float(rest_s) <= 60:
        raise Invalid("hold and rest must each be 0.5 to 60 seconds")
    hold_ms, rest_ms = round(float(hold_s) * 1000), round(float(rest_s) * 1000)
    plan, t = [], 0
    for rep in range(int(repetitions)):
        for name in names:
            plan.append({"ordinal": len(plan), "kind": "rest", "label": REST, "repetition": rep,
                         "planned_start_ms": t, "planned_end_ms": t + rest_ms})
            t += rest_ms
            plan.append({"ordinal": len(plan), "kind": "gesture", "label": name, "repetition": rep,
                         "planned_start_ms": t, "planned_end_ms": t + hold_ms})
            t += hold_ms
    plan.append({"ordinal": len(plan), "kind": "rest", "label": REST, "repetition": int(repetitions) - 1,
                 "planned_start_ms": t, "planned_end_ms": t + rest_ms})
    return plan


_SESSION_COLS = "id, user_id, device_id, name, status, plan, created_at, started_at, ended_at"
_INTERVAL_COLS = ("id, session_id, ordinal, kind, gesture_id, label, repetition, planned_start_ms, planned_end_ms, "
                  "started_at, ended_at, discarded")


def create_session(conn, user_id: int, device_id: int | None, gestures: Sequence[str], repetitions: int,
                   hold_s: float, rest_s: float, name: str = "") -> dict:
    check_no_nul("session name", name)
    intervals = plan_intervals(gestures, repetitions, hold_s, rest_s)
    gestures = [_clean_gesture_name(g) for g in gestures]  # the plan names them as the bank and intervals do
    with _tx(conn) as cur:
        # KEY SHARE until commit: a rename (FOR UPDATE) waits and then relabels these intervals too, instead of
        # committing between this read and the insert and leaving them under the old name (two classes)
        cur.execute("SELECT name, id FROM gestures WHERE user_id = %s FOR KEY SHARE", (user_id,))
        bank = {r["name"]: r["id"] for r in cur.fetchall()}
        missing = [g for g in {i["label"] for i in intervals if i["kind"] == "gesture"} if g not in bank]
        if missing:
            raise Invalid(f"not in this user's gesture bank: {', '.join(sorted(missing))}")
        if device_id is not None:
            cur.execute("SELECT user_id FROM devices WHERE id = %s", (device_id,))
            dev = cur.fetchone()
            if dev is None or dev["user_id"] != user_id:
                raise Invalid(f"device {device_id} does not belong to user {user_id}")
        plan = {"gestures": list(gestures), "repetitions": int(repetitions), "hold_s": float(hold_s),
                "rest_s": float(rest_s), "total_ms": intervals[-1]["planned_end_ms"]}
        cur.execute(f"""INSERT INTO capture_sessions (user_id, device_id, name, plan) VALUES (%s, %s, %s, %s)
                        RETURNING {_SESSION_COLS}""", (user_id, device_id, (name or "").strip(), Json(plan)))
        session = dict(cur.fetchone())
        psycopg2.extras.execute_values(
            cur,
            """INSERT INTO session_intervals (session_id, ordinal, kind, gesture_id, label, repetition,
                   planned_start_ms, planned_end_ms) VALUES %s""",
            [(session["id"], i["ordinal"], i["kind"], bank.get(i["label"]), i["label"], i["repetition"],
              i["planned_start_ms"], i["planned_end_ms"]) for i in intervals],
        )
        cur.execute(f"SELECT {_INTERVAL_COLS} FROM session_intervals WHERE session_id = %s ORDER BY ordinal",
                    (session["id"],))
        session["intervals"] = [dict(r) for r in cur.fetchall()]
    return session


def get_session(conn, session_id: int) -> dict:
    with _tx(conn) as cur:
        cur.execute(f"SELECT {_SESSION_COLS} FROM capture_sessions WHERE id = %s", (session_id,))
        session = _one(cur, "session", session_id)
        cur.execute(f"SELECT {_INTERVAL_COLS} FROM session_intervals WHERE session_id = %s ORDER BY ordinal",
                    (session_id,))
        session["intervals"] = [dict(r) for r in cur.fetchall()]
    return session


def list_sessions(conn, user_id: int) -> list[dict]:
    with _tx(conn) as cur:
        cur.execute(f"""SELECT {_SESSION_COLS},
                           (SELECT count(*) FROM session_intervals i WHERE i.session_id = s.id
                              AND i.started_at IS NOT NULL AND NOT i.discarded) AS recorded_intervals
                        FROM capture_sessions s WHERE user_id = %s ORDER BY id DESC""", (user_id,))
        return [dict(r) for r in cur.fetchall()]


def recording_on_device(conn, device_id: int, at: datetime | None = None, exclude: int | None = None) -> dict | None:
    """The session recording on this device at `at` (default now) within its planned time, if any: a second
    session started then would label the same samples again, with other gestures."""
    with _tx(conn) as cur:
        return _recording_on_device(cur, device_id, at, exclude)


def _recording_on_device(cur, device_id: int, at: datetime | None, exclude: int | None) -> dict | None:
    cur.execute("""SELECT id, started_at + make_interval(secs => coalesce((plan->>'total_ms')::bigint, 0) / 1000.0)
                          AS planned_end
                   FROM capture_sessions
                   WHERE device_id = %(d)s AND status = 'recording' AND id IS DISTINCT FROM %(x)s
                     AND started_at <= coalesce(%(at)s, now())
                     AND started_at + make_interval(secs => coalesce((plan->>'total_ms')::bigint, 0) / 1000.0)
                         > coalesce(%(at)s, now())
                   ORDER BY planned_end DESC LIMIT 1""", {"d": device_id, "x": exclude, "at": at})
    row = cur.fetchone()
    return dict(row) if row else None


START_SKEW_S = 300.0  # how far ahead of the server's clock a session's given start may be (clocks differ a little)


def start_session(conn, session_id: int, at: datetime | None = None, owner: str | None = None) -> dict:
    """Mark the session recording. Refused while another session records on the same device (within its
    planned time): both would label the same samples, and training on both would learn contradictory labels.
    `owner` names the run recording it (see run_heartbeat): its first heartbeat is the start. A start more than
    START_SKEW_S ahead of the database's clock is refused: the session would hold its device until then."""
    with _tx(conn) as cur:
        if at is not None:
            cur.execute("SELECT %s::timestamptz > now() + make_interval(secs => %s), now()", (at, START_SKEW_S))
            ahead, now = cur.fetchone().values()
            if ahead:
                raise Invalid(f"the start {at.isoformat()} is in the future (the server's time is "
                              f"{now.isoformat(timespec='seconds')}): give the time the session started, or none "
                              "for now")
        cur.execute("SELECT device_id FROM capture_sessions WHERE id = %s", (session_id,))
        found = cur.fetchone()
        if found is not None and found["device_id"] is not None:
            cur.execute("SELECT id FROM devices WHERE id = %s FOR UPDATE", (found["device_id"],))  # one start at a time
            if busy := _recording_on_device(cur, found["device_id"], at, session_id):
                raise Conflict(f"device {found['device_id']} is already recording session {busy['id']} (planned "
                               f"to end {busy['planned_end']:%Y-%m-%d %H:%M:%S %Z}): two sessions at once would "
                               "label the same samples twice; stop that one first, or start after it ends")
        cur.execute(f"""UPDATE capture_sessions SET status = 'recording', started_at = coalesce(%s, now()),
                            run_owner = %s, heartbeat_at = CASE WHEN %s::text IS NULL THEN NULL ELSE now() END,
                            run_seen_at = CASE WHEN %s::text IS NULL THEN NULL ELSE coalesce(%s, now()) END
                        WHERE id = %s AND status IN ('planned', 'recording') RETURNING {_SESSION_COLS}""",
                    (at, owner, owner, owner, at, session_id))
        row = cur.fetchone()
        if row is None:
            _session_state_error(cur, session_id, "start")
        return dict(row)


def end_session(conn, session_id: int, status: str = "completed", at: datetime | None = None,
                owner: str | None = None) -> dict:
    """With `owner`, only while that capture run is the session's (else RunTakenOver)."""
    if status not in ("completed", "aborted"):
        raise Invalid("a session ends as 'completed' or 'aborted'")
    with _tx(conn) as cur:
        _own_run(cur, session_id, owner)
        # an end before the start broke a CHECK constraint, whose text was all the caller saw
        cur.execute("""SELECT started_at, coalesce(%s, now()) AS ended_at FROM capture_sessions
                       WHERE id = %s AND started_at > coalesce(%s, now())""", (at, session_id, at))
        if early := cur.fetchone():
            raise Invalid(f"session {session_id} cannot end at {early['ended_at']:%Y-%m-%d %H:%M:%S.%f %Z}: it started "
                          f"later, at {early['started_at']:%Y-%m-%d %H:%M:%S.%f %Z}; give an end (at) after its start")
        cur.execute(f"""UPDATE capture_sessions SET status = %s, ended_at = coalesce(%s, now()),
                           started_at = coalesce(started_at, coalesce(%s, now()))
                        WHERE id = %s AND status IN ('planned', 'recording') RETURNING {_SESSION_COLS}""",
                    (status, at, at, session_id))
        row = cur.fetchone()
        if row is None:
            _session_state_error(cur, session_id, "end")
        return dict(row)


def extend_session_plan(conn, session_id: int, total_ms: int, owner: str | None = None) -> dict:
    """The session now runs until total_ms after its start (a redo inserts time): plan.total_ms, which says
    when a started session's plan runs out, never moves earlier. With `owner`, only while that capture run is
    the session's (else RunTakenOver), as for every write of a run."""
    if int(total_ms) <= 0:
        raise Invalid("a session's planned length must be positive")
    with _tx(conn) as cur:
        _own_run(cur, session_id, owner)
        cur.execute(f"""UPDATE capture_sessions SET plan = jsonb_set(plan, '{{total_ms}}', to_jsonb(
                            greatest(coalesce((plan->>'total_ms')::bigint, 0), %s::bigint)))
                        WHERE id = %s RETURNING {_SESSION_COLS}""", (int(total_ms), session_id))
        return _one(cur, "session", session_id)


def run_heartbeat(conn, session_id: int, owner: str, seen_at: datetime, video: dict | None = None,
                  cursor: dict | None = None) -> str:
    """The run `owner` still shows the session's cue (last at `seen_at`, its own clock): one UPDATE, which also
    stores where the run is in its plan (`cursor`, when it changed) and its webcam file. Returns 'ok'; 'lost'
    when another window took the run over (its owner changed: this one must stop writing), whether that window
    is still recording it or has stopped or finished it since; 'ended' when the session, still this run's, is
    no longer recording (closed elsewhere: the run still stores its times and finishes). NotFound when it is
    gone."""
    with _tx(conn) as cur:
        cur.execute("""UPDATE capture_sessions SET heartbeat_at = now(), run_seen_at = %s,
                           run_video = coalesce(%s, run_video), run_cursor = coalesce(%s, run_cursor)
                       WHERE id = %s AND run_owner = %s AND status = 'recording' RETURNING id""",
                    (seen_at, Json(video) if video is not None else None, Json(cursor) if cursor is not None else None,
                     session_id, owner))
        if cur.fetchone() is not None:
            return "ok"
        cur.execute("SELECT status, run_owner FROM capture_sessions WHERE id = %s", (session_id,))
        row = _one(cur, "session", session_id)
        return "lost" if row["run_owner"] != owner else "ended"


# How long the run has not been heard of, by the database's clock. Counted from the server's start at the
# earliest: while the database was down (restarted) no run could beat, and that must not make live runs look dead.
_HEARD_AGO = "now() - greatest(heartbeat_at, pg_postmaster_start_time())"  # NULL (never beat) stays NULL below
_RUN_COLS = ("run_owner, heartbeat_at, run_seen_at, run_cursor, run_video, "
             f"CASE WHEN heartbeat_at IS NOT NULL THEN extract(epoch FROM {_HEARD_AGO})::float8 END AS heartbeat_age_s")


def recording_runs(conn, user_id: int) -> dict[int, dict]:
    """The user's recording sessions' run columns by session id, with heartbeat_age_s by the database's own
    clock (None for a session recorded before heartbeats)."""
    with _tx(conn) as cur:
        cur.execute(f"""SELECT id, {_RUN_COLS} FROM capture_sessions
                        WHERE user_id = %s AND status = 'recording'""", (user_id,))
        return {r["id"]: dict(r) for r in cur.fetchall()}


def take_over_run(conn, session_id: int, old_owner: str, old_heartbeat: datetime, new_owner: str,
                  stale_s: float) -> dict | None:
    """Make `new_owner` the run recording the session, if its heartbeat is still the one seen (old_owner's, at
    old_heartbeat) and at least stale_s old by the database's clock. Atomic: of concurrent take-overs exactly
    one gets the session (with its run columns as they were, and its intervals); the others get None."""
    with _tx(conn) as cur:
        # the row lock orders concurrent take-overs: the second sees the first's owner and takes nothing
        cur.execute(f"SELECT {_RUN_COLS} FROM capture_sessions WHERE id = %s FOR UPDATE", (session_id,))
        row = cur.fetchone()
        cur.execute(f"""UPDATE capture_sessions SET run_owner = %(new)s, heartbeat_at = now()
                       WHERE id = %(id)s AND status = 'recording' AND run_owner = %(old)s AND heartbeat_at = %(hb)s
                         AND {_HEARD_AGO} >= make_interval(secs => %(stale)s) RETURNING id""",
                    {"id": session_id, "new": new_owner, "old": old_owner, "hb": old_heartbeat,
                     "stale": float(stale_s)})
        if row is None or cur.fetchone() is None:
            return None
        taken = dict(row)
        cur.execute(f"SELECT {_SESSION_COLS} FROM capture_sessions WHERE id = %s", (session_id,))
        session = dict(cur.fetchone())
        cur.execute(f"SELECT {_INTERVAL_COLS} FROM session_intervals WHERE session_id = %s ORDER BY ordinal",
                    (session_id,))
        session["intervals"] = [dict(r) for r in cur.fetchall()]
    return {**session, **{k: v for k, v in taken.items() if k != "id"}}


def _session_state_error(cur, session_id: int, action: str) -> None:
    cur.execute("SELECT status FROM capture_sessions WHERE id = %s", (session_id,))
    found = cur.fetchone()
    if found is None:
        raise NotFound(f"session {session_id} not found")
    raise Conflict(f"cannot {action} session {session_id}: it is {found['status']}")


def mark_interval(conn, interval_id: int, started_at: datetime, ended_at: datetime | None = None,
                  keep_discarded: bool = False, owner: str | None = None) -> dict:
    """Record when a cue actually started (and ended): training labels samples by these times. Marking
    clears the discarded flag unless keep_discarded (a late replay of a mark must not undo a redo). With
    `owner`, only while that capture run is the session's (else RunTakenOver)."""
    if ended_at is not None and ended_at <= started_at:
        raise Invalid("an interval must end after it starts")
    with _tx(conn) as cur:
        cur.execute(f"""UPDATE session_intervals SET started_at = %(s)s, ended_at = %(e)s,
                               discarded = discarded AND %(keep)s
                        WHERE id = %(id)s AND {_OWNED} RETURNING {_INTERVAL_COLS}""",
                    {"s": started_at, "e": ended_at, "keep": bool(keep_discarded), "id": interval_id, "owner": owner})
        if (row := cur.fetchone()) is None:
            _interval_write_refused(cur, interval_id)
        return dict(row)


# A device's sample blocks that may hold samples between two server times %(t0)s and %(t1)s: those starting in
# it, and those starting up to 5 s before it (a block usually lasts well under a second) or at the last start
# before t0 (a slow device's packet may be long: 100 samples at 10 Hz, up to 4076 at any rate), found by one
# index probe. One rule for training and the data review. Parameters: d (device id), t0, t1.
BLOCKS_OVERLAPPING = """device_id = %(d)s AND device_time0 <= %(t1)s AND device_time0 >= least(
    %(t0)s::timestamptz - interval '5 seconds',
    (SELECT max(device_time0) FROM sample_blocks WHERE device_id = %(d)s AND device_time0 < %(t0)s))"""


def interval_label_end(started_at: datetime, ended_at: datetime | None, planned_ms: float,
                       next_started_at: datetime | None) -> datetime:
    """Where an interval's label ends: its marked end, or, for one marked without an end, its planned length but
    never past the next cue's start (a client's cue timer may run a little early). Training and every export of
    labels use this one rule, so a CSV's labels are the ones the model learnt from."""
    if ended_at is not None:
        return ended_at
    end = started_at + timedelta(milliseconds=planned_ms)
    return end if next_started_at is None else min(end, next_started_at)


def with_label_ends(intervals: Sequence[dict]) -> list[dict]:
    """Copies of a session's interval rows (with planned_start_ms/planned_end_ms) where each labelled one (marked,
    not discarded) marked without an end has `ended_at` where training ends its label (interval_label_end)."""
    out = [dict(iv) for iv in intervals]
    live = sorted((iv for iv in out if iv.get("started_at") is not None and not iv.get("discarded")),
                  key=lambda iv: (iv["started_at"], iv.get("ordinal", 0)))
    for i, iv in enumerate(live):
        if iv.get("ended_at") is None:
            nxt = live[i + 1]["started_at"] if i + 1 < len(live) else None
            iv["ended_at"] = interval_label_end(iv["started_at"], None,
                                                iv["planned_end_ms"] - iv["planned_start_ms"], nxt)
    return out


def discard_interval(conn, interval_id: int, owner: str | None = None) -> dict:
    """Keep a redone repetition's times for the record but leave it out of training. With `owner`, only while
    that capture run is the session's (else RunTakenOver)."""
    with _tx(conn) as cur:
        cur.execute(f"""UPDATE session_intervals SET discarded = true WHERE id = %(id)s AND {_OWNED}
                        RETURNING {_INTERVAL_COLS}""", {"id": interval_id, "owner": owner})
        if (row := cur.fetchone()) is None:
            _interval_write_refused(cur, interval_id)
        return dict(row)


def add_interval(conn, session_id: int, kind: str, label: str, repetition: int, planned_start_ms: int,
                 planned_end_ms: int, owner: str | None = None) -> dict:
    """Append an interval (used when a repetition is redone): it gets the next ordinal. With `owner`, only
    while that capture run is the session's (else RunTakenOver)."""
    if kind not in ("rest", "gesture"):
        raise Invalid("kind must be 'rest' or 'gesture'")
    with _tx(conn) as cur:
        _own_run(cur, session_id, owner)
        cur.execute("SELECT user_id FROM capture_sessions WHERE id = %s", (session_id,))
        sess = _one(cur, "session", session_id)
        gesture_id = None
        if kind == "gesture":
            label = _clean_gesture_name(label)
            # KEY SHARE: a concurrent rename waits for this interval and relabels it (see create_session)
            cur.execute("SELECT id FROM gestures WHERE user_id = %s AND name = %s FOR KEY SHARE",
                        (sess["user_id"], label))
            g = cur.fetchone()
            if g is None:
                raise Invalid(f"{label!r} is not in this user's gesture bank")
            gesture_id = g["id"]
        elif label.strip().upper() not in ("", REST):  # a gesture's samples would train as REST
            raise Invalid(f"a rest interval's label is {REST}, not {label!r}: for that gesture give kind 'gesture'")
        else:
            label = REST
        cur.execute(f"""INSERT INTO session_intervals (session_id, ordinal, kind, gesture_id, label, repetition,
                            planned_start_ms, planned_end_ms)
                        SELECT %s, coalesce(max(ordinal) + 1, 0), %s, %s, %s, %s, %s, %s
                        FROM session_intervals WHERE session_id = %s RETURNING {_INTERVAL_COLS}""",
                    (session_id, kind, gesture_id, label, repetition, planned_start_ms, planned_end_ms, session_id))
        return dict(cur.fetchone())


# ---- training jobs -------------------------------------------------------------------------------
_JOB_COLS = ("j.id, j.user_id, j.status, j.params, j.progress, j.epoch_metrics, j.error, j.cancel_requested, "
             "j.attempts, j.worker, j.heartbeat_at, j.created_at, j.started_at, j.finished_at")
_JOB_SELECT = f"""SELECT {_JOB_COLS},
        coalesce((SELECT array_agg(s.session_id ORDER BY s.session_id) FROM training_job_sessions s
                  WHERE s.job_id = j.id), '{{}}') AS session_ids,
        (SELECT m.id FROM model_artifacts m WHERE m.job_id = j.id ORDER BY m.id DESC LIMIT 1) AS artifact_id
    FROM training_jobs j"""


# What a training job reads from its params (ml_model/jobs.py); anything else would be silently ignored.
JOB_PARAMS = ("epochs", "window_ms", "step_ms", "seed", "base_artifact_id")


def _check_job_params(params: dict) -> dict:
    """Refuse parameters the trainer would ignore or fail on later, with a message saying which and why."""
    unknown = sorted(set(params) - set(JOB_PARAMS))
    if unknown:
        raise Invalid(f"unknown training parameters {unknown}; known: {list(JOB_PARAMS)}")

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def number(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    epochs, seed, base = params.get("epochs"), params.get("seed"), params.get("base_artifact_id")
    if epochs is not None and not (whole(epochs) and 1 <= epochs <= 1000):
        raise Invalid("epochs must be a whole number from 1 to 1000")
    if seed is not None and not (whole(seed) and 0 <= seed < 2**31):
        raise Invalid("seed must be a whole number from 0 to 2147483647")
    if base is not None and not (whole(base) and 1 <= base < 2**63):
        raise Invalid("base_artifact_id must be the id of a base model")
    window, step = params.get("window_ms"), params.get("step_ms")
    if window is not None and not (number(window) and 10 <= window <= 10_000):
        raise Invalid("window_ms must be a number of milliseconds from 10 to 10000")
    if step is not None and not (number(step) and 1 <= step <= 10_000):
        raise Invalid("step_ms must be a number of milliseconds from 1 to 10000")
    return params


def _check_training_sessions(cur, user_id: int, ids: list[int]) -> None:
    """The sessions exist, are the user's, completed, and of one sensor setup (a job over mixed sample rates or
    channel counts would only fail in the training worker)."""
    cur.execute("""SELECT s.id, s.user_id, s.status, s.device_id, d.channel_count, d.sample_rate_hz
                   FROM capture_sessions s LEFT JOIN devices d ON d.id = s.device_id
                   WHERE s.id = ANY(%s) ORDER BY s.id""", (ids,))
    found = {r["id"]: r for r in cur.fetchall()}
    for sid in ids:
        if sid not in found:
            raise NotFound(f"session {sid} not found")
        if found[sid]["user_id"] != user_id:
            raise Invalid(f"session {sid} belongs to another user")
        if found[sid]["status"] != "completed":
            raise Invalid(f"session {sid} is {found[sid]['status']}; only completed sessions can be trained on")
        if found[sid]["device_id"] is None:  # the worker failed such a job only when it took it
            raise Invalid(f"session {sid} has no device (none was given when it was created, or it was deleted "
                          "with its samples), so it holds no samples to train on")
    with_device = [r for r in found.values() if r["channel_count"] is not None]
    mismatches = []
    if len({float(r["sample_rate_hz"]) for r in with_device}) > 1:
        mismatches.append("different sample rates (" + ", ".join(
            f"session {r['id']}: {float(r['sample_rate_hz']):g} Hz" for r in with_device) + ")")
    if len({r["channel_count"] for r in with_device}) > 1:
        mismatches.append("different channel counts (" + ", ".join(
            f"session {r['id']}: {r['channel_count']} channels" for r in with_device) + ")")
    if mismatches:
        raise Invalid(f"the chosen sessions were recorded with {' and '.join(mismatches)}; a training job needs "
                      "sessions of one sensor setup")
    if with_device:
        # Training reads the channels of every gesture of the bank (ml_model.jobs): one naming a channel the device
        # lacks failed every job, but only once a worker took it.
        n = with_device[0]["channel_count"]
        cur.execute("""SELECT g.name, c FROM gestures g, unnest(g.channels_used) AS c
                       WHERE g.user_id = %s AND c >= %s ORDER BY c DESC, g.name LIMIT 1""", (user_id, n))
        if (row := cur.fetchone()) is not None:
            raise Invalid(f"gesture {row['name']!r} of the bank uses channel {row['c']}, but these sessions were "
                          f"recorded with {n} channels (0 to {n - 1}), and training reads the channels of every "
                          f"gesture of the bank: change that gesture's channels first")


def _single_repetition(cur, ids: list[int]) -> tuple[int, list[str]] | None:
    """When what the sessions recorded is one repetition and no session could be held out (each holds a gesture no
    other one does), so a job from scratch has nothing to measure its model on (ml_model.jobs holds the sessions out
    as repetitions when one can be): how many sessions recorded something, and the gestures only one of them holds.
    None otherwise, or when nothing is recorded (the job says that). Read as the job reads intervals: recorded, not
    redone, gestures not deleted."""
    cur.execute("""SELECT session_id, CASE WHEN kind = 'rest' THEN %s ELSE label END AS name, repetition
                   FROM session_intervals
                   WHERE session_id = ANY(%s) AND started_at IS NOT NULL AND NOT discarded
                         AND NOT (kind = 'gesture' AND gesture_id IS NULL)""", (REST, ids))
    rows = cur.fetchall()
    if not rows or len({r["repetition"] for r in rows}) > 1:
        return None
    holders: dict[str, set] = {}  # name -> the sessions holding it
    for r in rows:
        holders.setdefault(r["name"], set()).add(r["session_id"])
    sessions = {r["session_id"] for r in rows}
    if len(sessions) > 1 and any(all(h - {s} for h in holders.values() if s in h) for s in sessions):
        return None
    return len(sessions), sorted(n for n, h in holders.items() if len(h) == 1 and n != REST)


def nothing_to_hold_out(n_sessions: int, alone: Sequence[str]) -> str:
    """Why a job from scratch cannot train on one repetition of each gesture, and what to record (training's own
    'need at least 2 repetitions (groups)' named neither, and two sessions of different gestures puzzled)."""
    if n_sessions == 1:
        what = "this session holds one repetition of each gesture"
    else:
        what = ("each chosen session holds one repetition, and each holds a gesture no other one does"
                + (f" ({', '.join(alone)})" if alone else "") + ", so none can be held out without losing a gesture")
    return (f"{what}: training from scratch holds a repetition out to measure the model, and none is left. Record "
            "each gesture once more (another short session) and train on it too, or fine-tune a pretrained base "
            "(the Kickoff Training page offers those of this sample rate; through the API params.base_artifact_id, "
            "GET /bases)")


def single_repetition(conn, user_id: int, session_ids: Sequence[int]) -> bool:
    """Whether these sessions of the user hold one repetition of each gesture and none can be held out: a job from
    scratch is refused (schedule_job), fine-tuning a base has nothing to be measured on."""
    ids = sorted({int(s) for s in session_ids})
    if not ids:
        return False
    with _tx(conn) as cur:
        cur.execute("SELECT id FROM capture_sessions WHERE id = ANY(%s) AND user_id = %s", (ids, user_id))
        return _single_repetition(cur, [r["id"] for r in cur.fetchall()]) is not None


def training_sessions_problem(conn, user_id: int, session_ids: Sequence[int]) -> str | None:
    """Why schedule_job would refuse these sessions (None when it would not): lets a form say so before a click."""
    ids = sorted({int(s) for s in session_ids})
    if not ids:
        return None
    try:
        with _tx(conn) as cur:
            _check_training_sessions(cur, user_id, ids)
    except RepoError as e:
        return str(e)
    return None


def schedule_job(conn, user_id: int, session_ids: Sequence[int], params: dict | None = None) -> dict:
    """Queue a training job on completed sessions of the user; a training worker picks it up."""
    ids = sorted({int(s) for s in session_ids})
    if not ids:
        raise Invalid("choose at least one capture session to train on")
    params = _check_job_params(dict(params or {}))
    with _tx(conn) as cur:
        # FOR SHARE: a choice of the model served (choose_served_model) waits for this job to be stored, or this
        # for the choice; created_at is read after it, so the two times follow the order they were stored in
        cur.execute("SELECT 1 FROM users WHERE id = %s FOR SHARE", (user_id,))
        _one(cur, "user", user_id)
        _check_training_sessions(cur, user_id, ids)
        if (base := params.get("base_artifact_id")) is None:
            # the worker would fail it, but only once it is its turn (maybe behind hours of others' jobs)
            if (single := _single_repetition(cur, ids)) is not None:
                raise Invalid(nothing_to_hold_out(*single))
        else:
            # The worker checks it again (it may be deleted meanwhile), but only once the job is its turn. One
            # answer for missing and another user's, so a user key cannot learn which ids exist.
            cur.execute("SELECT 1 FROM model_artifacts WHERE id = %s AND (user_id IS NULL OR user_id = %s)",
                        (base, user_id))
            if cur.fetchone() is None:
                raise NotFound(f"base model {base} not found: give the id of a shared base model or of one of "
                               f"user {user_id}'s own models")
        cur.execute("INSERT INTO training_jobs (user_id, params, created_at) VALUES (%s, %s, clock_timestamp()) "
                    "RETURNING id", (user_id, Json(params)))
        job_id = cur.fetchone()["id"]
        psycopg2.extras.execute_values(cur, "INSERT INTO training_job_sessions (job_id, session_id) VALUES %s",
                                       [(job_id, sid) for sid in ids])
        cur.execute("INSERT INTO job_logs (job_id, message) VALUES (%s, %s)",
                    (job_id, f"scheduled on sessions {ids}"))
        cur.execute(f"{_JOB_SELECT} WHERE j.id = %s", (job_id,))
        return dict(cur.fetchone())


def cancel_job(conn, job_id: int) -> dict:
    """A scheduled job is canceled at once; a running one is asked to stop (its worker ends it as canceled)."""
    with _tx(conn) as cur:
        cur.execute("""UPDATE training_jobs SET status = 'canceled', finished_at = now(), cancel_requested = true
                       WHERE id = %s AND status = 'scheduled' RETURNING id""", (job_id,))
        if cur.fetchone() is None:
            cur.execute("""UPDATE training_jobs SET cancel_requested = true
                           WHERE id = %s AND status = 'in-progress' RETURNING id""", (job_id,))
            if cur.fetchone() is None:
                cur.execute("SELECT status FROM training_jobs WHERE id = %s", (job_id,))
                found = cur.fetchone()
                if found is None:
                    raise NotFound(f"job {job_id} not found")
                raise Conflict(f"job {job_id} is already {found['status']}")
            msg = "cancel requested; the worker stops at the next epoch"
        else:
            msg = "canceled before it started"
        cur.execute("INSERT INTO job_logs (job_id, message) VALUES (%s, %s)", (job_id, msg))
        cur.execute(f"{_JOB_SELECT} WHERE j.id = %s", (job_id,))
        return dict(cur.fetchone())


def get_job(conn, job_id: int) -> dict:
    with _tx(conn) as cur:
        cur.execute(f"{_JOB_SELECT} WHERE j.id = %s", (job_id,))
        return _one(cur, "job", job_id)


def list_jobs(conn, user_id: int | None = None, limit: int = 50) -> list[dict]:
    with _tx(conn) as cur:
        cur.execute(f"{_JOB_SELECT} WHERE %(u)s::bigint IS NULL OR j.user_id = %(u)s ORDER BY j.id DESC LIMIT %(l)s",
                    {"u": user_id, "l": max(1, min(int(limit), 1000))})
        return [dict(r) for r in cur.fetchall()]


def job_logs(conn, job_id: int, after_id: int = 0) -> list[dict]:
    with _tx(conn) as cur:
        cur.execute("SELECT id, ts, level, message FROM job_logs WHERE job_id = %s AND id > %s ORDER BY id",
                    (job_id, after_id))
        return [dict(r) for r in cur.fetchall()]


# ---- models and predictions ----------------------------------------------------------------------
_MODEL_COLS = ("id, user_id, job_id, weights_format, sha256, size_bytes, classes, channels, sample_rate_hz, "
               "window_ms, step_ms, scaler, metrics, metadata, created_at")

# THE definition of the model served to each user (the API's serving cache, the web UI and every other caller
# read it here):
# - the model the user chose (users.served_artifact_id, choose_served_model) while no training job queued after
#   that choice has stored a model since;
# - otherwise the model of the training job QUEUED last that stored one, not of the one that finished last: a long
#   job started before a quick one does not replace the quick one's model when it ends. A model without a job (its
#   job deleted, a demo model) counts as asked for when it was stored; ties go by when stored, then by id.
# Shared bases (user_id NULL) are nobody's. %(users)s: an array of user ids, or NULL for every user.
# Columns: user_id, artifact_id, chosen_at (when the user chose it; NULL when it is served as the newest).
SERVED_MODELS_SQL = """
    WITH newest AS (
        SELECT DISTINCT ON (a.user_id) a.user_id, a.id, coalesce(j.created_at, a.created_at) AS asked_at
        FROM model_artifacts a LEFT JOIN training_jobs j ON j.id = a.job_id
        WHERE a.user_id IS NOT NULL AND (%(users)s::bigint[] IS NULL OR a.user_id = ANY(%(users)s::bigint[]))
        ORDER BY a.user_id, coalesce(j.created_at, a.created_at) DESC, a.created_at DESC, a.id DESC)
    SELECT n.user_id, coalesce(c.id, n.id) AS artifact_id, CASE WHEN c.id IS NOT NULL THEN u.served_chosen_at END
           AS chosen_at
    FROM newest n JOIN users u ON u.id = n.user_id
    LEFT JOIN model_artifacts c ON c.id = u.served_artifact_id AND c.user_id = u.id
                                AND n.asked_at <= u.served_chosen_at"""


def _served(cur, user_ids: Sequence[int] | None) -> dict[int, dict]:
    cur.execute(SERVED_MODELS_SQL, {"users": None if user_ids is None else [int(u) for u in user_ids]})
    return {int(r["user_id"]): {"artifact_id": int(r["artifact_id"]), "chosen_at": r["chosen_at"]}
            for r in cur.fetchall()}


def served_models(conn, user_ids: Sequence[int] | None = None) -> dict[int, dict]:
    """{user: {"artifact_id", "chosen_at"}} of the model served to each of these users (all when None) that has
    one (SERVED_MODELS_SQL); chosen_at is when the user chose it, None when it is served as the newest."""
    with _tx(conn) as cur:
        return _served(cur, user_ids)


def latest_model(conn, user_id: int) -> dict | None:
    """The model served to the user (SERVED_MODELS_SQL), without its weights, with ``chosen_at`` (when the user
    chose it; None when it is served as the newest); None if the user has no model."""
    cols = ", ".join(f"a.{c.strip()}" for c in _MODEL_COLS.split(","))
    with _tx(conn) as cur:
        cur.execute(f"""SELECT {cols}, s.chosen_at FROM ({SERVED_MODELS_SQL}) s
                        JOIN model_artifacts a ON a.id = s.artifact_id""", {"users": [int(user_id)]})
        row = cur.fetchone()
        return dict(row) if row else None


def list_models(conn, user_id: int) -> list[dict]:
    """Every model of the user, newest first, with ``served`` (the one served to them, SERVED_MODELS_SQL) and
    ``chosen_at`` (set on the served one when the user chose it), without meta["data"] (what its job trained on:
    every interval, so parsing it for each of many models made a listing take seconds; latest_model and the
    export keep it)."""
    cols = _MODEL_COLS.replace("metadata", "metadata - 'data' AS metadata")
    with _tx(conn) as cur:
        served = _served(cur, [user_id]).get(int(user_id), {})
        cur.execute(f"SELECT {cols} FROM model_artifacts WHERE user_id = %s ORDER BY created_at DESC, id DESC",
                    (user_id,))
        rows = [dict(r) for r in cur.fetchall()]
    for r in rows:
        r["served"] = r["id"] == served.get("artifact_id")
        r["chosen_at"] = served["chosen_at"] if r["served"] else None
    return rows


def choose_served_model(conn, user_id: int, artifact_id: int) -> dict:
    """Serve the user this model of theirs from now on ("roll back" to an earlier one, no retraining), until a
    training job queued after now stores a model. Returns latest_model's answer (the model now served).
    NotFound, one answer for a missing model and another user's (a user key cannot learn which ids exist)."""
    with _tx(conn) as cur:
        # The user's row first: a job being scheduled (schedule_job holds it FOR SHARE) is stored before the time
        # is read. clock_timestamp(), not now() (the transaction's start), so the choice and the jobs' created_at
        # follow the order they were stored in.
        cur.execute("SELECT id FROM users WHERE id = %s FOR NO KEY UPDATE", (user_id,))
        _one(cur, "user", user_id)
        # a model deleted after the EXISTS fails the foreign key check (NotFound too)
        cur.execute("""UPDATE users SET served_artifact_id = %(a)s, served_chosen_at = clock_timestamp()
                       WHERE id = %(u)s AND EXISTS (SELECT 1 FROM model_artifacts WHERE id = %(a)s AND user_id = %(u)s)
                       RETURNING id""", {"a": artifact_id, "u": user_id})
        if cur.fetchone() is None:
            raise NotFound(f"user {user_id} has no model {artifact_id} (their models are listed on the Training "
                           f"Jobs page and by GET /users/{user_id}/models)")
    return latest_model(conn, user_id)


def serve_newest_model(conn, user_id: int) -> dict | None:
    """Forget the user's choice: serve the model of their newest training again (SERVED_MODELS_SQL). Returns
    latest_model's answer (None when the user has no model)."""
    with _tx(conn) as cur:
        cur.execute("UPDATE users SET served_artifact_id = NULL, served_chosen_at = NULL WHERE id = %s RETURNING id",
                    (user_id,))
        _one(cur, "user", user_id)
    return latest_model(conn, user_id)


def renamed_classes(conn, artifact_id: int, classes: Sequence[str]) -> dict[str, str]:
    """{model class: its gesture's name now} for the gestures renamed since the model was trained: their recordings
    take the new name (update_gesture), the model keeps the old one. Found by the intervals the model learnt from
    (its metadata's data.sessions[].intervals, [id, label, ...] each; a model without them maps nothing), read in
    the database, so that a caller need not load them. classes: the model's classes as the caller names them."""
    with _tx(conn) as cur:
        cur.execute(
            """SELECT DISTINCT iv->>1 AS trained, si.label AS now
               FROM model_artifacts a
               CROSS JOIN LATERAL jsonb_array_elements(CASE WHEN jsonb_typeof(a.metadata #> '{data,sessions}') = 'array'
                                                           THEN a.metadata #> '{data,sessions}' ELSE '[]' END) s
               CROSS JOIN LATERAL jsonb_array_elements(CASE WHEN jsonb_typeof(s->'intervals') = 'array'
                                                           THEN s->'intervals' ELSE '[]' END) iv
               JOIN session_intervals si ON si.id = (iv->>0)::bigint AND si.gesture_id IS NOT NULL
               WHERE a.id = %s AND iv->>1 <> %s""", (artifact_id, REST))
        names_now: dict[str, set[str]] = {}
        for row in cur.fetchall():
            names_now.setdefault(row["trained"], set()).add(row["now"])
    classes = [str(c) for c in classes]
    renamed = {name: next(iter(now)) for name, now in names_now.items()
               if name in classes and len(now) == 1 and next(iter(now)) != name}
    # names swapped are followed both ways; a name two classes would now share (a gesture deleted, another renamed
    # to its name) is left as it was
    mapped = [renamed.get(c, c) for c in classes]
    return {c: new for c, new in renamed.items() if mapped.count(new) == 1}


def gesture_names_keys(conn, user_ids: Sequence[int]) -> dict[int, str]:
    """{user: a digest of their gesture bank's ids and names}: it changes when a gesture is renamed, added or
    deleted (a user without gestures is absent)."""
    with _tx(conn) as cur:
        cur.execute("""SELECT user_id, md5(string_agg(id::text || '=' || name, E'\\n' ORDER BY id)) AS key
                       FROM gestures WHERE user_id = ANY(%s) GROUP BY user_id""", (list(user_ids),))
        return {int(r["user_id"]): r["key"] for r in cur.fetchall()}


def recent_predictions(conn, user_id: int, limit: int = 100, since: datetime | None = None) -> list[dict]:
    with _tx(conn) as cur:
        cur.execute(
            """SELECT id, user_id, model_id, gesture, confidence, device_id, device_millis, sample_received,
                      decided_at, latency_ms, channel_faults
               FROM predictions WHERE user_id = %s AND (%s::timestamptz IS NULL OR decided_at > %s)
               ORDER BY decided_at DESC LIMIT %s""",
            (user_id, since, since, max(1, min(int(limit), 10000))),
        )
        return [dict(r) for r in cur.fetchall()]


# ---- videos --------------------------------------------------------------------------------------
_VIDEO_COLS = ("id, user_id, session_id, path, mime_type, started_at, ended_at, frame_count, fps, width, height, "
               "bytes, created_at")


def add_video(conn, user_id: int, session_id: int | None, rel_path: str, started_at: datetime,
              ended_at: datetime | None = None, frame_count: int = 0, fps: float | None = None,
              width: int | None = None, height: int | None = None, size: int = 0,
              mime_type: str = "video/webm") -> dict:
    """Register a webcam recording stored under the video dir (rel_path is relative to it)."""
    p = Path(rel_path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise Invalid("a video path must be relative to the video directory")
    with _tx(conn) as cur:
        if session_id is not None:
            cur.execute("SELECT user_id FROM capture_sessions WHERE id = %s", (session_id,))
            sess = _one(cur, "session", session_id)
            if sess["user_id"] != user_id:
                raise Invalid(f"session {session_id} belongs to another user")
        cur.execute(
            f"""INSERT INTO videos (user_id, session_id, path, mime_type, started_at, ended_at, frame_count, fps,
                                    width, height, bytes)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_VIDEO_COLS}""",
            (user_id, session_id, str(p), mime_type, started_at, ended_at, frame_count, fps, width, height, size),
        )
        return dict(cur.fetchone())


def list_videos(conn, user_id: int, session_id: int | None = None) -> list[dict]:
    with _tx(conn) as cur:
        cur.execute(f"""SELECT {_VIDEO_COLS} FROM videos WHERE user_id = %(u)s
                        AND (%(s)s::bigint IS NULL OR session_id = %(s)s) ORDER BY started_at""",
                    {"u": user_id, "s": session_id})
        return [dict(r) for r in cur.fetchall()]


# ---- export (a user's copy of all their data) -------------------------------------------------------
EXPORT_FORMAT = "semg-user-export"
EXPORT_VERSION = 1
# zlib level 1: half the export time of level 6 for a zip ~14 % larger (bench/export.py)
EXPORT_ZIP_LEVEL = 1
_EXPORT_FETCH = 2000  # rows per round trip of the server-side cursors (bounded memory for any user)


def _jsonable(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, (bytes, memoryview)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)  # Decimal, timedelta, ...


_PREDICTION_EXPORT_COLS = ("id", "model_id", "gesture", "confidence", "device_id", "device_millis", "sample_received",
                           "decided_at", "latency_ms", "channel_faults")


def _prediction_jsonable(row: tuple) -> dict:
    """A predictions row (the columns above) as _jsonable makes it, without its per-value type tests: the two
    timestamps are the only values JSON cannot hold as they come (channel_faults is jsonb, already plain)."""
    d = dict(zip(_PREDICTION_EXPORT_COLS, row, strict=True))
    for k in ("sample_received", "decided_at"):
        if d[k] is not None:
            d[k] = d[k].isoformat()
    return d


def _dump(rows: Any) -> bytes:
    return json.dumps(_jsonable(rows), indent=1, ensure_ascii=False).encode()


def export_user_data(conn, user_id: int, video_dir: Path | None = None, out=None) -> bytes | dict:
    """Everything stored about one user, as a zip (one consistent snapshot of the database):

        manifest.json            format, user id, time, counts, what is not included and why
        user.json, gestures.json, devices.json, sessions.json (with intervals), jobs.json (with logs),
        predictions.json, api_keys.json, videos.json        the rows, as JSON
        samples/device_<id>.csv  every stored sample: device_id, boot, seq, device_millis, device_time_unix,
                                 server_ts_unix, ch0..chN
        models/model_<id>.safetensors + models/model_<id>.json   weights and metadata of each trained model
        videos/<path>            the webcam recordings

    Device keys and API key hashes are credentials, not personal data: they are left out. With `out` (a
    writable binary file) the zip is written there and the manifest returned; otherwise the zip's bytes are
    returned. Raises NotFound for an unknown user.
    """
    target = out if out is not None else io.BytesIO()
    prev_autocommit = conn.autocommit
    if prev_autocommit:
        conn.autocommit = False  # one REPEATABLE READ snapshot; named cursors need a transaction
    try:
        with conn.cursor() as c:
            if conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        manifest = _write_export(conn, user_id, video_dir, target)
    finally:
        conn.rollback()  # read only: nothing to keep
        if prev_autocommit:
            conn.autocommit = True
    return manifest if out is not None else target.getvalue()


def _export_rows(cur, sql: str, params: Any) -> list[dict]:
    cur.execute(sql, params)
    return [dict(r) for r in cur.fetchall()]


def _write_export(conn, user_id: int, video_dir: Path | None, target) -> dict:
    dict_cur = psycopg2.extras.RealDictCursor
    counts: dict[str, int] = {}
    with conn.cursor(cursor_factory=dict_cur) as cur:
        cur.execute(f"SELECT {_USER_COLS} FROM users WHERE id = %s", (user_id,))
        user = _one(cur, "user", user_id)
        tables = {
            "gestures": _export_rows(cur, f"SELECT {_GESTURE_COLS} FROM gestures WHERE user_id = %s ORDER BY id",
                                     (user_id,)),
            "devices": _export_rows(cur, f"""SELECT {_DEVICE_COLS}, secret_key IS NOT NULL AS has_secret_key,
                                                    boot_offset
                                             FROM devices WHERE user_id = %s ORDER BY id""", (user_id,)),
            "sessions": _export_rows(cur, f"SELECT {_SESSION_COLS} FROM capture_sessions WHERE user_id = %s "
                                          "ORDER BY id", (user_id,)),
            "jobs": _export_rows(cur, f"{_JOB_SELECT} WHERE j.user_id = %s ORDER BY j.id", (user_id,)),
            "api_keys": _export_rows(cur, """SELECT id, name, role, read_only, key_prefix, created_at, last_used_at,
                                                    revoked_at
                                             FROM api_keys WHERE user_id = %s ORDER BY id""", (user_id,)),
            "videos": _export_rows(cur, f"SELECT {_VIDEO_COLS} FROM videos WHERE user_id = %s ORDER BY id",
                                   (user_id,)),
        }
        intervals = _export_rows(cur, f"""SELECT {_INTERVAL_COLS} FROM session_intervals WHERE session_id IN
                                          (SELECT id FROM capture_sessions WHERE user_id = %s)
                                          ORDER BY session_id, ordinal""", (user_id,))
        for s in tables["sessions"]:
            s["intervals"] = [i for i in intervals if i["session_id"] == s["id"]]
        logs = _export_rows(cur, """SELECT job_id, id, ts, level, message FROM job_logs WHERE job_id IN
                                    (SELECT id FROM training_jobs WHERE user_id = %s) ORDER BY job_id, id""",
                            (user_id,))
        for j in tables["jobs"]:
            j["logs"] = [{k: v for k, v in lg.items() if k != "job_id"} for lg in logs if lg["job_id"] == j["id"]]
        models = _export_rows(cur, f"SELECT {_MODEL_COLS} FROM model_artifacts WHERE user_id = %s ORDER BY id",
                              (user_id,))

    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=EXPORT_ZIP_LEVEL) as zf:
        zf.writestr("user.json", _dump(user))
        for name, rows in tables.items():
            zf.writestr(f"{name}.json", _dump(rows))
            counts[name] = len(rows)

        # predictions: possibly many (~144,000 an hour of live use); streamed as one JSON array, a batch at a time
        n_pred = 0
        with zf.open("predictions.json", "w", force_zip64=True) as f, \
                conn.cursor(name="semg_export_predictions") as cur:
            cur.execute(f"SELECT {', '.join(_PREDICTION_EXPORT_COLS)} FROM predictions WHERE user_id = %s ORDER BY id",
                        (user_id,))
            f.write(b"[")
            while rows := cur.fetchmany(_EXPORT_FETCH):
                lines = ",\n".join(json.dumps(_prediction_jsonable(row)) for row in rows)
                f.write((b",\n" if n_pred else b"\n") + lines.encode())
                n_pred += len(rows)
            f.write(b"\n]\n")
        counts["predictions"] = n_pred

        # samples: one CSV per device, streamed block by block
        n_samples = 0
        for dev in tables["devices"]:
            n_samples += _export_samples(conn, zf, dev)
        counts["samples"] = n_samples

        # models: weights (safetensors, as stored) and everything else as JSON
        for m in models:
            with conn.cursor() as cur:
                cur.execute("SELECT weights FROM model_artifacts WHERE id = %s", (m["id"],))
                weights = bytes(cur.fetchone()[0])
            zf.writestr(f"models/model_{m['id']}.safetensors", weights)
            zf.writestr(f"models/model_{m['id']}.json", _dump(m))
        counts["models"] = len(models)

        # video files
        missing, copied = [], 0
        root = Path(video_dir).resolve() if video_dir is not None else None
        for v in tables["videos"]:
            p = (root / v["path"]).resolve() if root is not None else None
            if p is None or root not in p.parents or not p.is_file():
                missing.append(v["path"])
                continue
            try:
                # ZipFile.write stats and opens the file before it writes anything to the archive, so a video
                # deleted meanwhile (its user or session deleted in another tab) leaves the zip as it was
                zf.write(p, f"videos/{v['path']}")
            except FileNotFoundError:
                missing.append(v["path"])
                continue
            copied += 1
        counts["video_files"] = copied

        manifest = {
            "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "user_id": user_id,
            "exported_at": datetime.now().astimezone().isoformat(), "counts": counts,
            "missing_video_files": missing,
            "not_included": {"device secret keys": "credentials: rotate a key to get a new one",
                             "API key hashes": "credentials: create a new key instead"},
            "samples_csv_columns": "device_id, boot, seq, device_millis, device_time_unix, server_ts_unix, "
                                   "ch0..chN (device_time_unix: the sample's time on the server clock; boot: the "
                                   "platform's number of the device's boot, its own boot counter plus the "
                                   "device's boot_offset in devices.json at the time, which 'Reset boot counter' "
                                   "raises so that numbers never repeat)",
        }
        zf.writestr("manifest.json", _dump(manifest))
    return manifest


def sample_csv_rows(device_id: int, boot: int, seq0: int, n: int, channels: int, rate: float, millis0: float,
                    t0: float, server_ts: float, values: Sequence[int]) -> str:
    """One stored block of `n` samples (`values`: n*channels ints, sample-major) as CSV lines ending in CRLF:
    device_id, boot, seq, device_millis (3 decimals), device_time_unix (6), server_ts_unix (6), ch0..chN.

    The same text csv.writer makes of those fields, about 3.5x faster: one %-format over the whole block rather than
    a Python row each (the export of millions of samples spent most of its time here)."""
    k = np.arange(n)
    millis = (millis0 + k * 1000.0 / rate).tolist()
    times = (t0 + k / rate).tolist()
    fmt = (f"{device_id},{boot},%d,%.3f,%.6f,{server_ts:.6f}" + ",%d" * channels + "\r\n") * n
    args: list = []
    for i in range(n):
        args += (seq0 + i, millis[i], times[i])
        args += values[i * channels:(i + 1) * channels]
    return fmt % tuple(args)


def _export_samples(conn, zf: zipfile.ZipFile, dev: dict) -> int:
    channels = int(dev["channel_count"])
    n_total = 0
    with zf.open(f"samples/device_{dev['id']}.csv", "w", force_zip64=True) as raw, \
            conn.cursor(name=f"semg_export_samples_{dev['id']}") as cur:
        raw.write(",".join(["device_id", "boot", "seq", "device_millis", "device_time_unix", "server_ts_unix",
                            *[f"ch{c}" for c in range(channels)]]).encode() + b"\r\n")
        cur.execute("""SELECT boot, seq0, n, channels, sample_rate_hz, device_millis0,
                              extract(epoch FROM device_time0)::float8, extract(epoch FROM server_ts)::float8, values
                       FROM sample_blocks WHERE device_id = %s ORDER BY boot, seq0""", (dev["id"],))
        while rows := cur.fetchmany(_EXPORT_FETCH):
            raw.write("".join(sample_csv_rows(dev["id"], *row) for row in rows).encode("ascii"))
            n_total += sum(row[2] for row in rows)
    return n_total
