"""The web UI's one data-access module.

Every mutation goes through `semg.repo` (the same code the REST API uses); this module adds the read-side
queries the pages need (data quality, downsampled signals, spectra, service health) and a cached connection
pool. SQL is always parameterised. Pages import only this module for data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import pandas as pd
import psycopg2
import psycopg2.errors
import psycopg2.extras
import psycopg2.pool
import streamlit as st

from semg import db, diskspace, journal, repo, tls, uisessions
from semg import secrets as semg_secrets
from semg.config import Settings, SettingsError, get_settings
from semg.messages import MODELS_POLL_S  # noqa: F401 - the pages say how soon the API follows a rename
from udpserver import troubleshooting

log = logging.getLogger("semg.ui")

RepoError = repo.RepoError
NotFound = repo.NotFound
RunTakenOver = repo.RunTakenOver
GESTURE_LIBRARY = repo.GESTURE_LIBRARY
REST = repo.REST
with_label_ends = repo.with_label_ends

# Raw samples are plotted as they are up to this many per channel; longer ranges become a min/max envelope.
MAX_PLOT_POINTS = 2000
# Values (samples x channels) read for one min/max envelope of a long range.
ENVELOPE_VALUES = 120_000
# Per-channel RMS of long ranges is estimated from evenly spread blocks holding about this many samples.
RMS_SAMPLE_BUDGET = 10_000
# CSV export refuses ranges above this many samples (the browser download would be hundreds of MB).
MAX_EXPORT_SAMPLES = 2_000_000
# The web UI builds a user's export zip in its own memory (a download button needs the bytes): above this estimated
# size it sends the user to the API's export instead, which spools to disk and streams.
MAX_UI_EXPORT_BYTES = 512 * 2**20
# Zipped bytes per exported sample value (CSV at zip level 1; bench/export.py: 56 MB for 14.4 M values and 144,000
# decisions), per sample (its own columns: device, boot, seq, device millis, device time, server time: 12-17 bytes
# zipped, what a device with one or two channels exports mostly) and per decision (JSON): an over-estimate rather
# than an under-estimate.
EXPORT_BYTES_PER_VALUE = 4
EXPORT_BYTES_PER_SAMPLE = 14
EXPORT_BYTES_PER_DECISION = 60
EXPORT_OVERHEAD_BYTES = 2**20  # users, gestures, sessions, intervals, jobs as JSON; the manifest
# How many of a user's sample blocks and decisions the User Management page counts at most (export estimate, delete
# confirmation): a user streaming for months has hundreds of millions of each, and counting them all took longer than
# the UI's statement timeout. 1 M blocks of an 8-channel armband are ~14 h and ~460 MB of export; 2 M decisions ~14 h
# of live use. Beyond them the page says "more than".
COUNT_MAX_BLOCKS = 1_000_000
COUNT_MAX_DECISIONS = 2_000_000
# Database connections the UI keeps open for reuse (each page run makes dozens of queries).
POOL_IDLE = 8
STREAMING_WINDOW_S = 5.0
SETTLED_AFTER_S = 60.0
# A device whose last packet passed the UDP server's checks this recently is "receiving".
RECEIVING_WITHIN_S = 5.0
# Rejections this recent explain why a device that is not receiving is not (older ones are history).
RECENT_REJECT_S = 60.0


class Unavailable(RuntimeError):
    """A service the UI needs (settings, database) is not reachable; the message says what to do."""


# ---- settings and connections --------------------------------------------------------------------
def settings() -> Settings:
    try:
        return get_settings()
    except SettingsError as e:
        raise Unavailable(f"The platform settings are invalid: {e}. Fix the environment and restart the UI.") from None


class Cancelled(Unavailable):
    """A change the database cancelled because another one made at the same moment conflicted with it (a deadlock):
    nothing was changed and the same step normally succeeds at once. An Unavailable, so that what keeps work for a
    database that is down (the capture page's queued interval times) keeps it here too."""


class _FreshPasswordPool(psycopg2.pool.ThreadedConnectionPool):
    """Keeps up to `idle` connections for reuse, opened only when needed (psycopg2's pool closes every connection
    handed back beyond minconn, and a minconn above 0 connects in the constructor). Every new connection reads
    the current password, so `python -m semg.secrets rotate postgres` needs no UI restart (connections already
    open stay valid)."""

    def __init__(self, idle: int, maxconn: int, **kwargs):
        super().__init__(0, maxconn, **kwargs)
        self.minconn = idle  # only read when a connection is handed back: up to this many stay open

    def _connect(self, key=None):
        self._kwargs["password"] = db.connect_kwargs(settings())["password"]
        # as psycopg2's, with db.connect's check: the UI never writes to a database a newer version migrated
        conn = psycopg2.connect(*self._args, **self._kwargs)
        db.refuse_newer_schema(conn)
        if key is not None:
            self._used[key] = conn
            self._rused[id(conn)] = key
        else:
            self._pool.append(conn)
        return conn

    def discard_idle(self) -> None:
        """Close the kept connections: one was found dead (database restart), so the others are too."""
        with self._lock:
            idle, self._pool = self._pool, []
        for conn in idle:
            with contextlib.suppress(psycopg2.Error):
                conn.close()


@st.cache_resource(show_spinner=False)
def _pool(host: str, port: int, dbname: str) -> _FreshPasswordPool:
    # Keyed by the target so a changed environment (tests) gets its own pool; connections open lazily.
    kw = db.connect_kwargs(settings())
    kw.update(connect_timeout=3, application_name="semg-ui",
              options="-c statement_timeout=20000 -c idle_in_transaction_session_timeout=60000")
    return _FreshPasswordPool(POOL_IDLE, 16, **kw)


def _db_down_message(err: Exception) -> str:
    if isinstance(err, db.SchemaTooNewError):
        return f"The database cannot be used by this version: {err}"
    s = settings()
    where = f"{s.postgres_address}:{s.postgres_port}"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"The database at {where} is not reachable ({reason}). Start the platform with ./start_all.sh "
            "(or check POSTGRES_HOST/POSTGRES_PORT), then reload this page.")


@contextlib.contextmanager
def connection() -> Iterator[psycopg2.extensions.connection]:
    """A pooled connection, checked alive before use; always handed back without an open transaction."""
    s = settings()
    pool = _pool(s.postgres_address, s.postgres_port, s.postgres_db)
    conn = None
    try:
        for _attempt in range(2):  # a pooled connection may have died with a database restart
            try:
                conn = pool.getconn()
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                conn.rollback()
                break
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
                if conn is not None:
                    pool.putconn(conn, close=True)
                    pool.discard_idle()
                    conn = None
                last = e
        else:
            raise Unavailable(_db_down_message(last))
    except psycopg2.pool.PoolError as e:
        raise Unavailable(f"Too many simultaneous database requests ({e}); reload the page in a moment.") from None
    broken = False
    try:
        yield conn
    except psycopg2.errors.TransactionRollbackError as e:  # the database is up and this connection fine
        raise Cancelled(f"Another change made at the same moment conflicted with this one and the database "
                        f"cancelled it ({db.first_line(e)}); nothing was changed: try again.") from None
    except psycopg2.errors.QueryCanceled as e:  # an OperationalError, but the database is up and answered
        raise Unavailable(f"The database took too long to answer and cancelled the request ({db.first_line(e)}); "
                          "nothing was changed. Try again in a moment; if it keeps happening, the database is "
                          "overloaded or this page asks for too much at once.") from None
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
        broken = True
        raise Unavailable(_db_down_message(e)) from None
    finally:
        if broken or conn.closed:
            pool.putconn(conn, close=True)
        else:
            with contextlib.suppress(psycopg2.Error):
                conn.rollback()
            pool.putconn(conn)


def _rows(sql: str, params: dict | Sequence | None = None) -> list[dict]:
    with connection() as conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(sql, params)
        return [dict(r) for r in cur.fetchall()]


def _one(sql: str, params: dict | Sequence | None = None) -> dict | None:
    rows = _rows(sql, params)
    return rows[0] if rows else None


def _repo(fn, *args, **kwargs):
    with connection() as conn:
        return fn(conn, *args, **kwargs)


# ---- remembered sign-ins (semg.uisessions) --------------------------------------------------------
def create_ui_session(password: str, days: float) -> str:
    return _repo(uisessions.create, password, days)


def resume_ui_session(token: str, password: str, days: float) -> bool:
    return _repo(uisessions.resume, token, password, days)


def end_ui_session(token: str) -> None:
    _repo(uisessions.end, token)


# ---- a user's API keys (ml_model.rest.keys) -------------------------------------------------------
def list_user_keys(user_id: int) -> list[dict]:
    """The user's API keys, revoked ones included (newest last)."""
    from ml_model.rest import keys
    return _repo(keys.list_keys, user_id, include_revoked=True)


def create_user_key(user_id: int, name: str, read_only: bool = False) -> dict:
    """A new API key scoped to the user (read_only: it may only read); its row with "key" (the secret: shown once,
    only its hash is stored)."""
    from ml_model.rest import keys
    return _repo(keys.create_key, "user", user_id, name, read_only=read_only)


def revoke_user_key(user_id: int, key_id: int) -> dict:
    """Revoke one of the user's keys (refused for a key of another user or role). The API refuses it at once for
    new callers and within 10 s where it had just checked it (its key cache)."""
    from ml_model.rest import keys
    with connection() as conn:
        if not any(k["id"] == key_id for k in keys.list_keys(conn, user_id, include_revoked=True)):
            raise repo.NotFound(f"user {user_id} has no API key {key_id}")
        return keys.revoke_key(conn, key_id)


# ---- users, gestures, devices (repo) -------------------------------------------------------------
def list_users(search: str | None = None, limit: int = 200) -> list[dict]:
    return _repo(repo.list_users, search=search, limit=limit)


def get_user(user_id: int) -> dict:
    return _repo(repo.get_user, user_id)


def create_user(name: str, email: str, notes: str = "") -> dict:
    return _repo(repo.create_user, name, email, notes)


def update_user(user_id: int, name: str, email: str, notes: str) -> dict:
    return _repo(repo.update_user, user_id, name=name, email=email, notes=notes)


def delete_user(user_id: int) -> dict:
    return _repo(repo.delete_user, user_id, settings().video_dir)


def export_user(user_id: int) -> bytes:
    """All the user's data as a zip (semg.repo.export_user_data): rows as JSON, samples as CSV, models, videos."""
    return _repo(repo.export_user_data, user_id, settings().video_dir)


# A user's sample blocks and decisions, each counted up to a cap (COUNT_MAX_*): `blocks`/`p` equal to the cap mean
# "at least" (the sums are then over the first blocks found).
_CAPPED_COUNTS = """SELECT s.v, s.n, s.blocks, p.p
    FROM (SELECT coalesce(sum(n::bigint * channels), 0) AS v, coalesce(sum(n::bigint), 0) AS n, count(*) AS blocks
          FROM (SELECT n, channels FROM sample_blocks WHERE user_id = %(u)s LIMIT %(max_blocks)s) AS b) AS s,
         (SELECT count(*) AS p FROM (SELECT 1 FROM predictions WHERE user_id = %(u)s LIMIT %(max_p)s) AS d) AS p"""


def _capped_counts(user_id: int) -> dict:
    r = _one(_CAPPED_COUNTS, {"u": user_id, "max_blocks": COUNT_MAX_BLOCKS, "max_p": COUNT_MAX_DECISIONS}) or {}
    r = {k: int(r.get(k) or 0) for k in ("v", "n", "blocks", "p")}
    r["samples_more"], r["predictions_more"] = r["blocks"] >= COUNT_MAX_BLOCKS, r["p"] >= COUNT_MAX_DECISIONS
    return r


class ExportSize(NamedTuple):
    bytes: int
    at_least: bool  # the user has more sample blocks or decisions than COUNT_MAX_*: only those were counted


@st.cache_data(ttl=60, show_spinner=False, max_entries=64)
def export_size_estimate(user_id: int) -> ExportSize:
    """About how many bytes the user's export zip takes: samples, decisions, videos and models as stored, plus the
    rows' JSON (EXPORT_OVERHEAD_BYTES). With more sample blocks or decisions than COUNT_MAX_* (counting them all
    took minutes for a user streaming for months) it is `at_least` and above MAX_UI_EXPORT_BYTES."""
    c = _capped_counts(user_id)
    b = _one("""SELECT (SELECT coalesce(sum(bytes), 0) FROM videos WHERE user_id = %(u)s)
                       + (SELECT coalesce(sum(size_bytes), 0) FROM model_artifacts WHERE user_id = %(u)s) AS b""",
             {"u": user_id}) or {}
    size = (c["v"] * EXPORT_BYTES_PER_VALUE + c["n"] * EXPORT_BYTES_PER_SAMPLE + c["p"] * EXPORT_BYTES_PER_DECISION
            + int(b.get("b") or 0) + EXPORT_OVERHEAD_BYTES)
    if c["samples_more"] or c["predictions_more"]:
        return ExportSize(max(size, MAX_UI_EXPORT_BYTES + 1), True)
    return ExportSize(size, False)


def user_data_counts(user_id: int) -> dict:
    """What deleting a user would remove, to show before asking for confirmation. Samples and predictions are counted
    up to COUNT_MAX_* (`samples_more`/`predictions_more`: at least that many)."""
    counts = _one(
        """SELECT (SELECT count(*) FROM gestures WHERE user_id = %(u)s) AS gestures,
                  (SELECT count(*) FROM devices WHERE user_id = %(u)s) AS devices,
                  (SELECT count(*) FROM capture_sessions WHERE user_id = %(u)s) AS sessions,
                  (SELECT count(*) FROM videos WHERE user_id = %(u)s) AS videos,
                  (SELECT count(*) FROM training_jobs WHERE user_id = %(u)s) AS jobs,
                  (SELECT count(*) FROM model_artifacts WHERE user_id = %(u)s) AS models""",
        {"u": user_id},
    ) or {}
    c = _capped_counts(user_id)
    return {**counts, "samples": c["n"], "samples_more": c["samples_more"],
            "predictions": c["p"], "predictions_more": c["predictions_more"]}


def list_gestures(user_id: int) -> list[dict]:
    return _repo(repo.list_gestures, user_id)


def add_gesture(user_id: int, name: str, description: str = "", channels_used: Sequence[int] = (),
                channel_purposes: dict | None = None) -> dict:
    return _repo(repo.add_gesture, user_id, name, description, channels_used, channel_purposes)


def update_gesture(gesture_id: int, name: str, description: str, channels_used: Sequence[int],
                   channel_purposes: dict) -> dict:
    return _repo(repo.update_gesture, gesture_id, name=name, description=description, channels_used=channels_used,
                 channel_purposes=channel_purposes)


def delete_gesture(gesture_id: int) -> None:
    _repo(repo.delete_gesture, gesture_id)


def list_devices(user_id: int | None = None) -> list[dict]:
    return _repo(repo.list_devices, user_id)


def register_device(user_id: int, channel_count: int, sample_rate_hz: float, name: str = "") -> dict:
    return _repo(repo.register_device, user_id, channel_count, sample_rate_hz, "binary", name)


def rotate_device_key(device_id: int) -> dict:
    return _repo(repo.rotate_device_key, device_id)


def reset_device_boot(device_id: int) -> dict:
    return _repo(repo.reset_device_boot, device_id)


def delete_device(device_id: int) -> None:
    _repo(repo.delete_device, device_id)


def unreachable_from_boards() -> bool:
    """True when the UDP port listens on loopback only (the default): no board on Wi-Fi reaches it."""
    return troubleshooting.listens_on_loopback_only(settings().udp_bind_host)


def arduino_secrets_snippet(device: dict) -> str:
    """The lines to paste into arduino/arduino_secrets.h for a freshly registered or rotated device.

    The sketch (arduino/arduinocode.ino) reads the SECRET_* names; SEMG_DEVICE_ID / SEMG_DEVICE_KEY_HEX carry
    the values under the platform's names, and SEMG_SAMPLE_RATE_HZ overrides the sketch's default rate."""
    s = settings()
    host = troubleshooting.sensor_address(s.udp_bind_host) or "YOUR.SERVER.IP"
    rate = float(device["sample_rate_hz"])
    return "\n".join([
        f"// arduino_secrets.h for device #{device['id']} (user #{device['user_id']})",
        '#define SECRET_SSID "your-wifi-name"',
        '#define SECRET_PASS "your-wifi-password"',
        f'#define SECRET_SERVER_IP "{host}"  // this platform\'s address',
        f"#define SECRET_SERVER_PORT {s.udp_port}",
        f"#define SEMG_DEVICE_ID {device['id']}",
        f'#define SEMG_DEVICE_KEY_HEX "{device["secret_key_hex"]}"',
        "#define SECRET_DEVICE_ID SEMG_DEVICE_ID",
        "#define SECRET_DEVICE_KEY_HEX SEMG_DEVICE_KEY_HEX",
        f"#define SECRET_USER_ID {device['user_id']}",
        f"#define SEMG_SAMPLE_RATE_HZ {int(rate) if rate.is_integer() else rate}  // as registered",
        f"// registered with {device['channel_count']} channel(s): list that many ADC1 pins in ANALOG_PINS",
    ])


# ---- capture sessions (repo) ---------------------------------------------------------------------
def plan_intervals(gestures: Sequence[str], repetitions: int, hold_s: float, rest_s: float) -> list[dict]:
    return repo.plan_intervals(gestures, repetitions, hold_s, rest_s)


def training_cue_timing_s() -> tuple[float, float]:
    """(reaction time skipped after each cue, window length) in seconds, with the training defaults: a hold (or
    rest) shorter than their sum yields no training window."""
    from ml_model import preprocessing as pp

    return pp.DEFAULT_REACTION_MS / 1000.0, pp.DEFAULT_WINDOW_MS / 1000.0


def create_session(user_id: int, device_id: int | None, gestures: Sequence[str], repetitions: int, hold_s: float,
                   rest_s: float, name: str = "") -> dict:
    return _repo(repo.create_session, user_id, device_id, gestures, repetitions, hold_s, rest_s, name)


def start_session(session_id: int, at: datetime | None = None, owner: str | None = None) -> dict:
    return _repo(repo.start_session, session_id, at, owner)


def run_heartbeat(session_id: int, owner: str, seen_at: datetime, video: dict | None = None,
                  cursor: dict | None = None) -> str:
    return _repo(repo.run_heartbeat, session_id, owner, seen_at, video, cursor)


def recording_runs(user_id: int) -> dict[int, dict]:
    return _repo(repo.recording_runs, user_id)


def take_over_run(session_id: int, old_owner: str, old_heartbeat: datetime, new_owner: str,
                  stale_s: float) -> dict | None:
    return _repo(repo.take_over_run, session_id, old_owner, old_heartbeat, new_owner, stale_s)


def recording_on_device(device_id: int, exclude: int | None = None) -> dict | None:
    """The session recording on this device now (within its planned time), e.g. in another window, or None;
    `exclude` is a session not to count (the one asking)."""
    return _repo(repo.recording_on_device, device_id, exclude=exclude)


def end_session(session_id: int, status: str = "completed", at: datetime | None = None,
                owner: str | None = None) -> dict:
    return _repo(repo.end_session, session_id, status, at, owner)


def end_session_once(session_id: int, status: str, at: datetime | None = None,
                     owner: str | None = None) -> tuple[dict, bool]:
    """(session, ended here): a session already ended elsewhere (another tab's 'Close it') is returned as it is,
    so the recording tab can still close its video and stop. RunTakenOver when `owner` (the run ending it) is
    no longer the session's run."""
    try:
        return end_session(session_id, status, at, owner), True
    except repo.RunTakenOver:
        raise
    except repo.Conflict:
        return get_session(session_id), False


def extend_session_plan(session_id: int, total_ms: int, owner: str | None = None) -> dict:
    return _repo(repo.extend_session_plan, session_id, total_ms, owner)


def planned_end(session: dict) -> datetime | None:
    """When a started session's plan runs out (a redo moves it later: CueRun stores the new length)."""
    total_ms = (session.get("plan") or {}).get("total_ms")
    if session.get("started_at") is None or total_ms is None:
        return None
    return session["started_at"] + timedelta(milliseconds=total_ms)


def mark_interval(interval_id: int, started_at: datetime, ended_at: datetime | None, owner: str | None = None) -> dict:
    return _repo(repo.mark_interval, interval_id, started_at, ended_at, owner=owner)


def discard_interval(interval_id: int, owner: str | None = None) -> dict:
    return _repo(repo.discard_interval, interval_id, owner)


def add_interval(session_id: int, kind: str, label: str, repetition: int, planned_start_ms: int,
                 planned_end_ms: int, owner: str | None = None) -> dict:
    return _repo(repo.add_interval, session_id, kind, label, repetition, planned_start_ms, planned_end_ms, owner)


def get_session(session_id: int) -> dict:
    return _repo(repo.get_session, session_id)


def list_sessions(user_id: int) -> list[dict]:
    return _repo(repo.list_sessions, user_id)


def record_video(session: dict, video: dict) -> None:
    """Register a finished session's webcam recording: `video` is what VideoRecorder.stop() returned, with
    `path` relative to settings.video_dir. The registration is journalled first (once; its file is noted in
    video["journal"]), so when the write fails it is stored by a later call, page load or training job, and the
    recording is never left on disk with nothing pointing to it."""
    if video.get("journal") is None:
        try:
            video["journal"] = journal.journal_video(session, video)
        except OSError as e:  # the write below may still work: the journal only covers its failure
            log.error("session %s: the video registration could not be journalled (%s: %s)", session["id"],
                      type(e).__name__, e)
    with connection() as conn:
        journal.register_video(conn, session["user_id"], session["id"], video["path"], video["started_at"],
                               video["ended_at"], video["frame_count"], video["fps"], video["width"],
                               video["height"], video["bytes"])
    if video.get("journal") is not None:
        with contextlib.suppress(OSError):
            video["journal"].unlink()


def _probe_video(path: Path) -> tuple[int, float, int | None, int | None]:
    """(frames that decode, seconds from the first to the last, width, height) of a WebM file that may have been
    cut off mid-write (its process was killed): decoding stops at the damage, what came before counts."""
    import av

    frames, first, last, size = 0, None, None, (None, None)
    try:
        with av.open(str(path)) as c:
            for frame in c.decode(video=0):
                t = float(frame.pts * frame.time_base) if frame.pts is not None else None
                if t is not None:
                    first = t if first is None else min(first, t)
                    last = t if last is None else max(last, t)
                frames, size = frames + 1, (frame.width, frame.height)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        log.warning("video %s is damaged after %d frame(s): %s", path, frames, e)
    return frames, (last - first) if frames else 0.0, *size


def keep_left_video(session: dict) -> str:
    """The webcam file of a run whose UI process died (session["run_video"]: path, first frame time) cannot be
    continued -- its writer is gone, the file may be cut off -- so it is registered as it is when it has
    anything in it (what decodes of it is counted), and a new file records the rest after a resume. An empty
    file (the process died before writing out a frame) is removed. Returns what became of it, for the user."""
    info = session.get("run_video") or {}
    rel = info.get("path")
    if not rel:
        return "It had no webcam video."
    root = settings().video_dir.resolve()
    path = (root / rel).resolve()
    if root not in path.parents or not path.is_file():
        return "Its webcam video had not been written yet."
    size = path.stat().st_size
    if size == 0:
        path.unlink()
        return "Its webcam video had not been written yet."
    frames, span, width, height = _probe_video(path)
    started = datetime.fromisoformat(info["started_at"]) if info.get("started_at") else session["started_at"]
    record_video(session, {"path": rel, "started_at": started, "ended_at": started + timedelta(seconds=span),
                           "frame_count": frames, "fps": (frames - 1) / span if span > 0 else None,
                           "width": width, "height": height, "bytes": size})
    return (f"Its webcam video until then is kept as it was written ({frames} frames readable, {size:,} bytes); "
            "a new video records the rest.")


def session_video(session_id: int) -> dict | None:
    """The session's newest video row with `file` (absolute Path) when the file exists, else None."""
    row = _one("""SELECT id, path, mime_type, started_at, ended_at, frame_count, fps, width, height, bytes
                  FROM videos WHERE session_id = %s ORDER BY id DESC LIMIT 1""", (session_id,))
    if row is None:
        return None
    root = settings().video_dir.resolve()
    p = (root / row["path"]).resolve()
    row["file"] = p if root in p.parents and p.is_file() else None
    return row


def intervals_between(user_id: int, t0: datetime, t1: datetime) -> list[dict]:
    """Labelled intervals of any of the user's sessions overlapping [t0, t1] (for time-range review); one marked
    without an end ends where training ends its label (repo.with_label_ends, within its session)."""
    rows = _rows("""SELECT i.id, i.session_id, i.ordinal, i.kind, i.label, i.repetition, i.planned_start_ms,
                           i.planned_end_ms, i.started_at, i.ended_at, i.discarded
                    FROM session_intervals i JOIN capture_sessions s ON s.id = i.session_id
                    WHERE s.user_id = %s AND i.started_at IS NOT NULL AND i.session_id IN (
                          SELECT session_id FROM session_intervals j JOIN capture_sessions t ON t.id = j.session_id
                          WHERE t.user_id = %s AND j.started_at < %s AND (j.ended_at IS NULL OR j.ended_at > %s))
                    ORDER BY i.started_at""", (user_id, user_id, t1, t0))
    by_session: dict[int, list[dict]] = {}
    for r in rows:
        by_session.setdefault(r["session_id"], []).append(r)
    ends = [iv for ivs in by_session.values() for iv in repo.with_label_ends(ivs)]
    return sorted((iv for iv in ends if iv["started_at"] < t1 and iv["ended_at"] is not None and iv["ended_at"] > t0),
                  key=lambda iv: iv["started_at"])


def user_videos_between(user_id: int, t0: datetime, t1: datetime) -> list[dict]:
    rows = _rows("""SELECT id, session_id, path, mime_type, started_at, ended_at FROM videos
                    WHERE user_id = %s AND started_at < %s AND coalesce(ended_at, started_at) > %s
                    ORDER BY started_at""", (user_id, t1, t0))
    root = settings().video_dir.resolve()
    for r in rows:
        p = (root / r["path"]).resolve()
        r["file"] = p if root in p.parents and p.is_file() else None
    return rows


# ---- training (repo + read side) -----------------------------------------------------------------
def schedule_job(user_id: int, session_ids: Sequence[int], params: dict) -> dict:
    return _repo(repo.schedule_job, user_id, session_ids, params)


def training_sessions_problem(user_id: int, session_ids: Sequence[int]) -> str | None:
    """Why scheduling a job on these sessions would be refused (e.g. mixed sample rates), or None."""
    return _repo(repo.training_sessions_problem, user_id, session_ids)


def single_repetition(user_id: int, session_ids: Sequence[int]) -> bool:
    """Whether these sessions hold one repetition of each gesture and none can be held out (repo.single_repetition)."""
    return _repo(repo.single_repetition, user_id, session_ids)


def cancel_job(job_id: int) -> dict:
    return _repo(repo.cancel_job, job_id)


def get_job(job_id: int) -> dict:
    return _repo(repo.get_job, job_id)


def list_jobs(user_id: int | None = None, limit: int = 50) -> list[dict]:
    return _repo(repo.list_jobs, user_id, limit)


def job_logs(job_id: int, after_id: int = 0) -> list[dict]:
    return _repo(repo.job_logs, job_id, after_id)


def latest_model(user_id: int) -> dict | None:
    """The served model (no weights; repo.SERVED_MODELS_SQL: the one the user chose, ``chosen_at`` set, or that of
    their newest training), with ``renamed`` {class as trained: its gesture's name now} and ``answers``, its classes
    by the names live recognition answers (the API follows renames: repo.renamed_classes)."""
    m = _repo(repo.latest_model, user_id)
    if m is not None:
        m["renamed"] = _repo(repo.renamed_classes, m["id"], m["classes"])
        m["answers"] = [m["renamed"].get(c, c) for c in m["classes"]]
    return m


def list_models(user_id: int) -> list[dict]:
    return _repo(repo.list_models, user_id)


def served_model_ids(user_ids: Sequence[int]) -> dict[int, int]:
    """{user: id of the model served to them} for those of these users that have one."""
    return {u: m["artifact_id"] for u, m in _repo(repo.served_models, list(user_ids)).items()}


def _announce_served(user_id: int, served: dict | None) -> None:
    """models.updated, so that the API and the inference workers switch now (not at their next poll, 30 s)."""
    if served is not None:
        from ml_model import jobs  # its sender, with the web UI's NATS identity; NATS down: logged, the poll follows

        jobs._publish_model_updated(settings(), user_id, served["job_id"], served["id"], service="ui")


def serve_model(user_id: int, artifact_id: int) -> dict:
    """Serve the user this model of theirs from now on, until a training they start after now stores a model
    (repo.choose_served_model), once it is known to load as the API serves it (RepoError if not: nothing changes);
    returns the model now served (latest_model's row, without renames)."""
    from ml_model.rest import serving

    served = _repo(serving.choose_if_servable, user_id, artifact_id)
    _announce_served(user_id, served)
    return served


def serve_newest_model(user_id: int) -> dict | None:
    """Forget the user's choice: serve the model of their newest training again (repo.serve_newest_model)."""
    served = _repo(repo.serve_newest_model, user_id)
    _announce_served(user_id, served)
    return served


def job_artifact(job_id: int) -> dict | None:
    """The model a job produced (metadata only, never the weights)."""
    return _one("""SELECT id, user_id, job_id, size_bytes, classes, channels, sample_rate_hz, window_ms, step_ms,
                          metrics, created_at
                   FROM model_artifacts WHERE job_id = %s ORDER BY id DESC LIMIT 1""", (job_id,))


EXPORT_FORMATS = {"onnx": "ONNX", "onnx-int8": "ONNX int8", "torchscript": "TorchScript"}


def export_model(artifact_id: int, fmt: str) -> tuple[bytes, str]:
    """A stored model exported for running off the platform (``ml_model.export``): ``(file bytes, file name)``.

    ``fmt`` is one of ``EXPORT_FORMATS``. The export runs the whole serving path (channels, filter, scaler,
    CNN, softmax) and takes seconds (int8 quantisation), so it is cached per artifact and format.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {list(EXPORT_FORMATS)}")
    row = _one("SELECT classes FROM model_artifacts WHERE id = %s", (artifact_id,))
    # the outputs are named as the gestures are now (a rename since gives another file, not the cached one)
    renamed = _repo(repo.renamed_classes, int(artifact_id), row["classes"]) if row else {}
    return _export_model_cached(int(artifact_id), fmt, tuple(sorted(renamed.items())))


def export_file_name(job_id: int | None, artifact_id: int, fmt: str) -> str:
    """The download name of ``export_model(artifact_id, fmt)`` (known without exporting)."""
    from ml_model.export_names import export_filename

    return export_filename({"job_id": job_id, "sha256": f"model{int(artifact_id)}"}, fmt)


@st.cache_data(ttl=600, show_spinner=False, max_entries=12)
def _export_model_cached(artifact_id: int, fmt: str, renamed: tuple[tuple[str, str], ...] = ()) -> tuple[bytes, str]:
    from ml_model import export

    row = _one("SELECT id, job_id, weights, metadata FROM model_artifacts WHERE id = %s", (artifact_id,))
    if row is None:
        raise Unavailable(f"Model #{artifact_id} no longer exists (deleted?); reload the page.")
    meta = export.with_names_now(export.stored_meta(row["id"], row["job_id"], row["metadata"]), dict(renamed))
    weights = bytes(row["weights"])
    return export.export_bytes(weights, meta, fmt), export.export_filename(meta, fmt)


def score_job_model(job_id: int, session_ids: Sequence[int]) -> dict:
    """A job's model tested on chosen sessions of its user (``ml_model.jobs.score_job_model``): the Jobs page's
    figures on their windows. Takes seconds for long sessions (it runs the model on every window)."""
    from ml_model import jobs

    with connection() as conn:
        try:
            # bounded as training is: the windows of hours of sessions would otherwise fill this process's memory
            return jobs.score_job_model(conn, int(job_id), [int(i) for i in session_ids],
                                        settings().semg_train_max_window_mb * 2**20)
        except jobs.JobFailed as e:
            raise RepoError(f"Not tested: {e}") from None


def pretrained_bases() -> list[dict]:
    """Shared base models (user_id NULL) a user's model can be fine-tuned from."""
    return _rows("""SELECT id, created_at, classes, channels, sample_rate_hz, size_bytes, metrics,
                           coalesce(metadata->>'name', metadata->>'source', '') AS name
                    FROM model_artifacts WHERE user_id IS NULL ORDER BY created_at DESC, id DESC""")


def session_sample_rates(session_ids: Sequence[int]) -> list[float]:
    """The distinct sample rates (Hz, ascending) of the devices the given sessions were recorded with."""
    if not session_ids:
        return []
    rows = _rows("""SELECT DISTINCT d.sample_rate_hz FROM capture_sessions s JOIN devices d ON d.id = s.device_id
                    WHERE s.id = ANY(%s) ORDER BY 1""", ([int(i) for i in session_ids],))
    return [float(r["sample_rate_hz"]) for r in rows]


def base_fits_rate(base: dict, sample_rate_hz: float) -> bool:
    """A base is offered only for data at its own sample rate: its temporal filters are tuned to that time scale."""
    return base.get("sample_rate_hz") is not None and abs(float(base["sample_rate_hz"]) - sample_rate_hz) < 1e-6


def trainer_status() -> dict:
    """Whether a training worker looks alive: queue length, the freshest heartbeat of a running job, and the
    workers connected to the database (an idle worker writes nothing, but keeps its connection open)."""
    return _one("""SELECT count(*) FILTER (WHERE status = 'scheduled') AS queued,
                          count(*) FILTER (WHERE status = 'in-progress') AS running,
                          min(created_at) FILTER (WHERE status = 'scheduled') AS oldest_queued,
                          max(heartbeat_at) FILTER (WHERE status = 'in-progress') AS last_heartbeat,
                          (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                                  AND application_name = %s) AS workers,
                          now() AS now
                   FROM training_jobs""", (db.TRAINER_APPLICATION_NAME,)) or {}


def normalize_metrics(metrics: dict | None, classes: Sequence[str] | None = None) -> dict:
    """Accuracy, per-class accuracy {class: acc} and confusion (classes, matrix) from an artifact's metrics,
    accepting the list and {classes, matrix} forms of the confusion matrix."""
    m = dict(metrics or {})
    cm = m.get("confusion_matrix") or m.get("confusion")
    cm_classes = list(classes or m.get("classes") or [])
    matrix = None
    if isinstance(cm, dict):
        matrix = cm.get("matrix")
        cm_classes = list(cm.get("classes") or cm_classes)
    elif isinstance(cm, list):
        matrix = cm
    per_class = m.get("per_class_accuracy") or m.get("per_class") or {}
    if isinstance(per_class, list):
        per_class = dict(zip(cm_classes, per_class, strict=False))
    acc = m.get("accuracy", m.get("val_accuracy"))
    return {"accuracy": acc, "per_class": per_class, "classes": cm_classes, "matrix": matrix}


# how transfer.finetune_model named the repetition it held out before it recorded val_groups
_OLD_HELD_OUT_GROUP = re.compile(r"held-out group (\d+)")


def held_out_note(metrics: dict | None) -> str | None:
    """What a job's accuracy, per-class figures and confusion matrix were measured on, to cite them: the data held
    out, how many windows, and that the model served was retrained afterwards (on the held-out part too), so the
    figures estimate it rather than measure it. None when the metrics say nothing about it (older models)."""
    m = dict(metrics or {})
    if m.get("accuracy", m.get("val_accuracy")) is None:
        return None
    if m.get("val_sessions"):  # each session held one repetition: a whole session was held out
        ids = [f"#{s}" for s in m["val_sessions"]]
        what = (f"session{'s' if len(ids) > 1 else ''} {', '.join(ids)} (each chosen session holds one "
                "repetition), never trained on by the model measured")
    elif m.get("val_groups") or _OLD_HELD_OUT_GROUP.fullmatch(str(m.get("validation") or "")):
        # groups are the intervals' repetition numbers, counted from 0; the UI counts from 1. Fine-tuned models
        # from before val_groups only say it in words: "held-out group 1".
        groups = m.get("val_groups") or [int(_OLD_HELD_OUT_GROUP.fullmatch(m["validation"])[1])]
        reps = [int(g) + 1 if isinstance(g, (int, float)) else g for g in groups]
        what = f"repetition{'s' if len(reps) > 1 else ''} {', '.join(map(str, reps))}"
        if holding := m.get("val_repetition_sessions"):  # only some sessions have it (they differ in length)
            what += (f" of session{'s' if len(holding) > 1 else ''} {', '.join(f'#{i}' for i in holding)} only "
                     f"(the other chosen sessions have no repetition {', '.join(map(str, reps))})")
        else:
            what += " of every session"
        what += ", never trained on by the model measured"
    elif m.get("val_time_fraction") is not None:
        what = f"the last {float(m['val_time_fraction']):.0%} of each recording (one repetition of each gesture)"
    elif isinstance(m.get("validation"), str):  # fine-tuned models from before the fields above
        what = m["validation"]
    else:
        return None
    counts = [f"{m['n_val_windows']:,} held-out windows" if m.get("n_val_windows") is not None else None,
              f"{m['n_train_windows']:,} training windows" if m.get("n_train_windows") is not None else None]
    counts = [c for c in counts if c]
    note = f"Held out: {what}" + (f" ({', '.join(counts)}; windows overlap)" if counts else "") + "."
    # a class with no held-out window (the session held out lacks it) is in no figure: the accuracy is over the rest
    unmeasured = sorted(c for c, v in (m.get("per_class_accuracy") or {}).items() if v is None)
    if unmeasured:
        note += (f" {', '.join(unmeasured)} {'was' if len(unmeasured) == 1 else 'were'} not in the held-out part: "
                 "the accuracy is over the other classes only.")
    if m.get("retrained_on_all"):
        epochs = m.get("final_epochs")
        note += (" The model served was then retrained on all the data, held-out part included"
                 + (f" ({epochs} epochs)" if epochs else "")
                 + ": these figures estimate it; they were not measured on it.")
    return note


def measured_on_its_own_recordings(metrics: dict | None) -> bool:
    """Whether a model's figures come from the ends of the recordings it learnt from (one repetition of each
    gesture, so none left to hold out): they overstate how well it recognises the next attempts."""
    m = dict(metrics or {})
    return m.get("val_time_fraction") is not None or "time split" in str(m.get("validation") or "")


# ---- overview ------------------------------------------------------------------------------------
def overview_counts() -> dict:
    return _one("""SELECT (SELECT count(*) FROM users) AS users,
                          (SELECT count(*) FROM devices) AS devices,
                          (SELECT count(*) FROM capture_sessions WHERE status = 'completed') AS sessions,
                          (SELECT count(*) FROM training_jobs WHERE status IN ('scheduled', 'in-progress'))
                              AS active_jobs,
                          (SELECT count(*) FROM model_artifacts WHERE user_id IS NOT NULL) AS models""") or {}


def device_activity(user_id: int | None = None, window_s: float = STREAMING_WINDOW_S) -> list[dict]:
    """Every device with its newest sample time and the sample rate measured over the last `window_s`."""
    rows = _rows(
        """SELECT d.id, d.user_id, u.name AS user_name, d.name, d.protocol, d.channel_count, d.sample_rate_hz,
                  last.t AS last_sample_at, coalesce(recent.samples, 0) AS recent_samples, now() AS now
           FROM devices d JOIN users u ON u.id = d.user_id
           LEFT JOIN LATERAL (SELECT b.device_time0 AS t FROM sample_blocks b WHERE b.device_id = d.id
                              ORDER BY b.device_time0 DESC LIMIT 1) last ON true
           LEFT JOIN LATERAL (SELECT sum(b.n) AS samples FROM sample_blocks b WHERE b.device_id = d.id
                              AND b.device_time0 > now() - make_interval(secs => %(w)s)) recent ON true
           WHERE %(u)s::bigint IS NULL OR d.user_id = %(u)s
           ORDER BY d.id""",
        {"u": user_id, "w": window_s},
    )
    for r in rows:
        r["measured_rate_hz"] = float(r["recent_samples"]) / window_s
        r["streaming"] = r["recent_samples"] > 0
        r["idle_s"] = (r["now"] - r["last_sample_at"]).total_seconds() if r["last_sample_at"] else None
    return rows


# ---- data quality ----------------------------------------------------------------------------------
def _range_blocks(device_id: int, t0: datetime, t1: datetime) -> dict:
    """Blocks, samples and sequence-gap loss of a device's data starting in [t0, t1]."""
    rows = _rows(
        """SELECT boot, count(*) AS blocks, sum(n) AS samples, min(seq0) AS first_seq, max(seq0 + n) AS end_seq,
                  max(channels) AS channels, max(sample_rate_hz) AS rate
           FROM sample_blocks WHERE device_id = %s AND device_time0 >= %s AND device_time0 <= %s
           GROUP BY boot""",
        (device_id, t0, t1),
    )
    samples = sum(int(r["samples"]) for r in rows)
    expected = sum(int(r["end_seq"]) - int(r["first_seq"]) for r in rows)
    return {"blocks": sum(int(r["blocks"]) for r in rows), "samples": samples, "expected": expected,
            "lost": max(0, expected - samples), "loss_pct": 100.0 * max(0, expected - samples) / expected
            if expected else None, "channels": max((int(r["channels"]) for r in rows), default=0),
            "rate": max((float(r["rate"]) for r in rows), default=None)}


def channel_rms(device_id: int, t0: datetime, t1: datetime, blocks: int | None = None) -> list[float]:
    """RMS of each channel about its mean (DC removed), from evenly spread blocks for long ranges."""
    if _settled(t1):
        return _channel_rms_cached(device_id, t0, t1, blocks)
    return _channel_rms(device_id, t0, t1, blocks)


@st.cache_data(ttl=300, show_spinner=False, max_entries=256)
def _channel_rms_cached(device_id: int, t0: datetime, t1: datetime, blocks: int | None) -> list[float]:
    return _channel_rms(device_id, t0, t1, blocks)


def _channel_rms(device_id: int, t0: datetime, t1: datetime, blocks: int | None = None) -> list[float]:
    if blocks is None:
        blocks = _range_blocks(device_id, t0, t1)["blocks"]
    if not blocks:
        return []
    probes = max(1, RMS_SAMPLE_BUDGET // 50)  # ~50 samples per packet; a wrong guess only changes the budget
    if blocks <= probes:
        rows = _rows(
            """SELECT (u.k - 1) %% b.channels AS ch, stddev_pop(u.v)::float8 AS rms
               FROM sample_blocks b, unnest(b.values) WITH ORDINALITY AS u(v, k)
               WHERE b.device_id = %s AND b.device_time0 >= %s AND b.device_time0 <= %s
               GROUP BY 1 ORDER BY 1""", (device_id, t0, t1))
    else:
        # evenly spread blocks, one index probe each (a long range is never scanned)
        rows = _rows(
            """SELECT (u.k - 1) %% blk.channels AS ch, stddev_pop(u.v)::float8 AS rms
               FROM generate_series(0, %(p)s - 1) AS j
               CROSS JOIN LATERAL (
                   SELECT b.values, b.channels FROM sample_blocks b
                   WHERE b.device_id = %(d)s
                     AND b.device_time0 >= %(t0)s::timestamptz + make_interval(secs => j * %(w)s)
                     AND b.device_time0 <= %(t1)s
                   ORDER BY b.device_time0 LIMIT 1) AS blk
               CROSS JOIN LATERAL unnest(blk.values) WITH ORDINALITY AS u(v, k)
               GROUP BY 1 ORDER BY 1""",
            {"p": probes, "d": device_id, "t0": t0, "t1": t1, "w": (t1 - t0).total_seconds() / probes})
    return [float(r["rms"] or 0.0) for r in rows]


def _session_range(session: dict) -> tuple[datetime, datetime] | None:
    ivs = [i for i in session.get("intervals", []) if i.get("started_at")]
    t0 = session.get("started_at") or (min(i["started_at"] for i in ivs) if ivs else None)
    if t0 is None:
        return None
    ends = [i["ended_at"] for i in ivs if i.get("ended_at")]
    t1 = session.get("ended_at") or (max(ends) if ends else None) or datetime.now(UTC)
    return t0, t1


@st.cache_data(ttl=600, show_spinner=False, max_entries=500)
def _cached_quality(device_id: int, t0: datetime, t1: datetime) -> dict:
    q = _range_blocks(device_id, t0, t1)
    q["rms"] = channel_rms(device_id, t0, t1, q["blocks"])
    return q


EDGE_S = 0.1  # a block starting just before a session's start is not counted in it


def session_quality(session: dict) -> dict:
    """Samples, loss % (sequence gaps, and stretches where the device sent nothing), per-channel RMS and label
    counts of a session (cached once complete)."""
    ivs = session.get("intervals") or []
    out = {"samples": 0, "expected": 0, "lost": 0, "loss_pct": None, "rms": [], "channels": 0, "duration_s": None,
           "gesture_reps": sum(1 for i in ivs if i["kind"] == "gesture" and i.get("started_at") and not i["discarded"]),
           "discarded": sum(1 for i in ivs if i["discarded"])}
    rng = _session_range(session)
    if rng is None or session.get("device_id") is None:
        return out
    t0, t1 = rng
    if session.get("status") in ("completed", "aborted"):
        q = _cached_quality(session["device_id"], t0, t1)
    else:
        q = _range_blocks(session["device_id"], t0, t1)
        q["rms"] = channel_rms(session["device_id"], t0, t1, q["blocks"])
    out.update(q)
    out["duration_s"] = (t1 - t0).total_seconds()
    # A device that stops sending (battery, Wi-Fi, a reboot) leaves no sequence gap among the samples that did
    # arrive: the session's length at the device's rate counts too (less a packet's worth at either edge).
    if q.get("rate") and q["samples"]:
        by_time = int((out["duration_s"] - EDGE_S) * float(q["rate"]))
        if by_time > out["expected"]:
            out["expected"], out["lost"] = by_time, max(0, by_time - q["samples"])
            out["loss_pct"] = 100.0 * out["lost"] / by_time
    out["missing_s"] = out["lost"] / float(q["rate"]) if q.get("rate") else None
    return out


def sessions_overview(user_id: int) -> list[dict]:
    """The user's sessions (newest first) with intervals and quality, for choosing training data."""
    sessions = list_sessions(user_id)
    out = []
    for s in sessions:
        full = get_session(s["id"])
        full["quality"] = session_quality(full)
        out.append(full)
    return out


# ---- signals ---------------------------------------------------------------------------------------
@dataclass
class Signal:
    """Samples of one device over [t0, t1]: `frame` has t (seconds since t0) and ch0..chN-1.

    mode 'raw' holds every sample; 'envelope' holds the min and max of each time bucket (two rows per bucket),
    which keeps spikes visible when a long range is drawn with a few thousand points."""

    t0: datetime
    t1: datetime
    mode: str
    samples: int
    channels: int
    rate: float | None
    frame: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def empty(self) -> bool:
        return self.frame.empty


def _expand_blocks(rows: list[dict], epoch0: float, channels: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(t seconds since epoch0, boot, seq, values (n, channels)) of fetched blocks, in time order."""
    ts, boots, seqs, vals = [], [], [], []
    for r in rows:
        if int(r["channels"]) != channels:
            continue  # a block from a differently configured boot; never mix channel layouts
        n = int(r["n"])
        ts.append(float(r["e0"]) - epoch0 + np.arange(n) / float(r["rate"]))
        boots.append(np.full(n, int(r["boot"]), dtype=np.int64))
        seqs.append(int(r["seq0"]) + np.arange(n))
        vals.append(np.asarray(r["values"], dtype=np.int16).reshape(n, channels))
    if not ts:
        empty = np.empty(0, dtype=np.int64)
        return np.empty(0), empty, empty, np.empty((0, channels), dtype=np.int16)
    return np.concatenate(ts), np.concatenate(boots), np.concatenate(seqs), np.vstack(vals)


_BLOCKS_IN_RANGE = repo.BLOCKS_OVERLAPPING
# The channel layout shown: the range's own (a device reconfigured just before it keeps its new layout).
_RANGE_CHANNELS = "coalesce(max(channels) FILTER (WHERE device_time0 >= %(t0)s), max(channels))"
_BLOCKS_SQL = f"""SELECT extract(epoch FROM device_time0)::float8 AS e0, boot, seq0, n, channels, sample_rate_hz AS rate,
                         values
                  FROM sample_blocks WHERE {_BLOCKS_IN_RANGE} ORDER BY device_time0"""


def _fetch_blocks(device_id: int, t0: datetime, t1: datetime) -> list[dict]:
    return _rows(_BLOCKS_SQL, {"d": device_id, "t0": t0, "t1": t1})


def _settled(t1: datetime) -> bool:
    """A range that ended a while ago no longer changes (late packets arrive within seconds): cacheable."""
    return t1 < datetime.now(UTC) - timedelta(seconds=SETTLED_AFTER_S)


@st.cache_data(ttl=300, show_spinner=False, max_entries=64)
def _signal_cached(device_id: int, t0: datetime, t1: datetime, max_points: int) -> Signal:
    return _signal(device_id, t0, t1, max_points)


def signal(device_id: int, t0: datetime, t1: datetime, max_points: int = MAX_PLOT_POINTS) -> Signal:
    """The device's samples over [t0, t1] for plotting, downsampled in SQL when there are more than max_points.
    Settled ranges are cached, so moving a cursor or ticking a box does not query them again."""
    if _settled(t1):
        return _signal_cached(device_id, t0, t1, max_points)
    return _signal(device_id, t0, t1, max_points)


def _signal(device_id: int, t0: datetime, t1: datetime, max_points: int) -> Signal:
    # counted over the blocks starting in the range (an index range); a range inside one long packet has none
    stats = _one(f"""SELECT coalesce(sum(n) FILTER (WHERE device_time0 >= %(t0)s), 0) AS samples,
                            count(*) FILTER (WHERE device_time0 >= %(t0)s) AS blocks, count(*) AS fetched,
                            {_RANGE_CHANNELS} AS channels, max(sample_rate_hz) AS rate
                     FROM sample_blocks WHERE {_BLOCKS_IN_RANGE}""", {"d": device_id, "t0": t0, "t1": t1}) or {}
    samples, channels = int(stats.get("samples") or 0), int(stats.get("channels") or 0)
    rate = float(stats["rate"]) if stats.get("rate") else None
    cols = [f"ch{c}" for c in range(channels)]
    if not stats.get("fetched"):
        return Signal(t0, t1, "raw", 0, channels, rate, pd.DataFrame(columns=["t", *cols]))
    epoch0 = t0.timestamp()
    span = max((t1 - t0).total_seconds(), 1e-3)
    if samples <= max_points:
        t, _boot, _seq, v = _expand_blocks(_fetch_blocks(device_id, t0, t1), epoch0, channels)
        keep = (t >= 0) & (t <= span)
        frame = pd.DataFrame(v[keep], columns=cols)
        frame.insert(0, "t", t[keep])
        return Signal(t0, t1, "raw", len(frame), channels, rate, frame)
    buckets = max(1, max_points // 2)
    blocks = int(stats.get("blocks") or 1)
    # The first samples of each time bucket, found by one index probe per bucket (a long range is never
    # scanned), about ENVELOPE_VALUES values in all: enough for the min/max look of an EMG envelope.
    per_samples = max(8, ENVELOPE_VALUES // (buckets * channels))
    avg_n = samples / blocks
    per_bucket = max(1, math.ceil(per_samples / avg_n))
    width = span / buckets
    rows = _rows(
        """SELECT k AS bucket, (u.i - 1) %% %(c)s AS ch, min(u.v) AS lo, max(u.v) AS hi
           FROM generate_series(0, %(nb)s - 1) AS k
           CROSS JOIN LATERAL (
               SELECT b.values FROM sample_blocks b
               WHERE b.device_id = %(d)s AND b.channels = %(c)s
                 AND b.device_time0 >= %(t0)s::timestamptz + make_interval(secs => k * %(w)s)
                 AND b.device_time0 < %(t0)s::timestamptz + make_interval(secs => (k + 1) * %(w)s)
               ORDER BY b.device_time0 LIMIT %(per)s) AS blk
           CROSS JOIN LATERAL unnest(blk.values[1:%(nv)s]) WITH ORDINALITY AS u(v, i)
           GROUP BY 1, 2 ORDER BY 1, 2""",
        {"nb": buckets, "w": width, "d": device_id, "t0": t0, "c": channels, "per": per_bucket,
         "nv": per_samples * channels},
    )
    if not rows:
        return Signal(t0, t1, "envelope", samples, channels, rate, pd.DataFrame(columns=["t", *cols]))
    df = pd.DataFrame(rows)
    lo = df.pivot(index="bucket", columns="ch", values="lo")
    hi = df.pivot(index="bucket", columns="ch", values="hi")
    # Two rows per bucket (min at its first third, max at its second) draw the envelope as one line.
    t = np.concatenate([(lo.index.to_numpy() + 1 / 3) * width, (hi.index.to_numpy() + 2 / 3) * width])
    v = np.vstack([lo.to_numpy(), hi.to_numpy()])
    order = np.argsort(t, kind="stable")
    frame = pd.DataFrame(v[order], columns=[f"ch{int(c)}" for c in lo.columns])
    frame.insert(0, "t", t[order])
    return Signal(t0, t1, "envelope", samples, channels, rate, frame)


def spectrum(device_id: int, t0: datetime, t1: datetime, nperseg: int = 256, windows: int = 12) -> pd.DataFrame:
    """Welch power spectrum (dB) per channel from `windows` evenly spread stretches of raw samples.

    Returns columns freq_hz, ch0..chN-1 (empty frame when there is not enough data)."""
    if _settled(t1):
        return _spectrum_cached(device_id, t0, t1, nperseg, windows)
    return _spectrum(device_id, t0, t1, nperseg, windows)


@st.cache_data(ttl=300, show_spinner=False, max_entries=64)
def _spectrum_cached(device_id: int, t0: datetime, t1: datetime, nperseg: int, windows: int) -> pd.DataFrame:
    return _spectrum(device_id, t0, t1, nperseg, windows)


def _spectrum(device_id: int, t0: datetime, t1: datetime, nperseg: int, windows: int) -> pd.DataFrame:
    q = _one("""SELECT max(sample_rate_hz) AS rate, max(channels) AS channels FROM sample_blocks
                WHERE device_id = %s AND device_time0 >= %s AND device_time0 <= %s""", (device_id, t0, t1)) or {}
    if not q.get("rate"):
        return pd.DataFrame()
    rate, channels = float(q["rate"]), int(q["channels"])
    win_s = 4 * nperseg / rate
    span = (t1 - t0).total_seconds()
    n_win = max(1, min(windows, int(span // win_s)))
    starts = [t0 + timedelta(seconds=(span - win_s) * (i + 0.5) / n_win) for i in range(n_win)] if span > win_s \
        else [t0]
    rows = _rows(
        """SELECT w.i, extract(epoch FROM b.device_time0)::float8 AS e0, b.boot, b.seq0, b.n, b.channels,
                  b.sample_rate_hz AS rate, b.values
           FROM unnest(%(starts)s::timestamptz[]) WITH ORDINALITY AS w(ts, i)
           JOIN sample_blocks b ON b.device_id = %(d)s AND b.device_time0 >= w.ts
                AND b.device_time0 < w.ts + make_interval(secs => %(win)s)
           ORDER BY w.i, b.device_time0""",
        {"starts": starts, "d": device_id, "win": win_s},
    )
    if not rows:
        return pd.DataFrame()
    hann = np.hanning(nperseg)
    acc, count = np.zeros((nperseg // 2 + 1, channels)), 0
    by_window: dict[int, list[dict]] = {}
    for r in rows:
        by_window.setdefault(int(r["i"]), []).append(r)
    for blocks in by_window.values():
        _t, _b, _s, v = _expand_blocks(blocks, 0.0, channels)
        x = v.astype(np.float64)
        for start in range(0, len(x) - nperseg + 1, nperseg // 2):
            seg = x[start:start + nperseg]
            seg = (seg - seg.mean(axis=0)) * hann[:, None]
            acc += np.abs(np.fft.rfft(seg, axis=0)) ** 2
            count += 1
    if count == 0:
        return pd.DataFrame()
    psd = acc / count / (rate * (hann ** 2).sum())
    frame = pd.DataFrame(10 * np.log10(psd + 1e-12), columns=[f"ch{c}" for c in range(channels)])
    frame.insert(0, "freq_hz", np.fft.rfftfreq(nperseg, 1 / rate))
    return frame


# Blocks formatted at a time by export_csv (25-sample packets: 50 k samples): an hour at 500 Hz exported in one
# piece held its blocks as Python lists, a DataFrame and two copies of the text (+1 GB for a 150 MB file).
EXPORT_CHUNK_BLOCKS = 2000


def _spreadsheet_safe(text: str) -> str:
    """A gesture name as a CSV cell: one starting with = + - @ gets a leading ' (what a spreadsheet shows as text),
    so a name like =HYPERLINK(...) given through the API is not run as a formula by whoever opens the file."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def export_csv(device_id: int, t0: datetime, t1: datetime, intervals: Sequence[dict] = ()) -> bytes:
    """Raw samples of [t0, t1] as CSV: server time, seconds from t0, boot, sequence number, channels, label. A
    sample is (boot, seq): sequence numbers start again when the device restarts. Read and formatted
    EXPORT_CHUNK_BLOCKS blocks at a time (a server-side cursor), so memory is the file and a chunk."""
    # an interval marked without an end (through the API) labels as far as training takes it
    marked = [((iv["started_at"] - t0).total_seconds(), (iv["ended_at"] - t0).total_seconds(),
               _spreadsheet_safe(iv["label"]))
              for iv in repo.with_label_ends(intervals) if iv.get("started_at") and iv.get("ended_at")
              and not iv.get("discarded")]
    span_s = (t1 - t0).total_seconds()
    with connection() as conn:
        with conn.cursor() as cur:
            cur.execute(f"SELECT {_RANGE_CHANNELS} FROM sample_blocks WHERE {_BLOCKS_IN_RANGE}",
                        {"d": device_id, "t0": t0, "t1": t1})
            channels = int(cur.fetchone()[0] or 0)
        columns = ["time", "t_s", "boot", "seq", *(f"ch{c}" for c in range(channels)), "label"]
        parts = [(",".join(columns) + "\n").encode()]
        with conn.cursor("export_csv", cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.itersize = EXPORT_CHUNK_BLOCKS
            cur.execute(_BLOCKS_SQL, {"d": device_id, "t0": t0, "t1": t1})
            while rows := cur.fetchmany(EXPORT_CHUNK_BLOCKS):
                t, boot, seq, v = _expand_blocks(rows, t0.timestamp(), channels)
                keep = (t >= 0) & (t <= span_s)
                t, boot, seq, v = t[keep], boot[keep], seq[keep], v[keep]
                if not len(t):
                    continue
                frame = pd.DataFrame(v, columns=columns[4:-1])
                frame.insert(0, "seq", seq)
                frame.insert(0, "boot", boot)
                frame.insert(0, "t_s", np.round(t, 6))
                frame.insert(0, "time", pd.to_datetime(t0.timestamp() + t, unit="s", utc=True))
                label = np.full(len(t), "", dtype=object)
                for a, b, name in marked:
                    label[(t >= a) & (t < b)] = name
                frame["label"] = label
                parts.append(frame.to_csv(index=False, header=False).encode())
    return b"".join(parts)


def range_samples(device_id: int, t0: datetime, t1: datetime) -> int:
    return int((_one("""SELECT coalesce(sum(n), 0) AS s FROM sample_blocks
                        WHERE device_id = %s AND device_time0 >= %s AND device_time0 <= %s""",
                     (device_id, t0, t1)) or {}).get("s") or 0)


def device_data_span(device_id: int) -> tuple[datetime, datetime] | None:
    r = _one("""SELECT (SELECT device_time0 FROM sample_blocks WHERE device_id = %(d)s ORDER BY device_time0
                        LIMIT 1) AS first,
                       (SELECT device_time0 FROM sample_blocks WHERE device_id = %(d)s ORDER BY device_time0 DESC
                        LIMIT 1) AS last""", {"d": device_id})
    return (r["first"], r["last"]) if r and r["first"] else None


def server_now() -> datetime:
    """The database clock: samples, cues and videos are all stamped in it."""
    return (_one("SELECT now() AS now") or {}).get("now") or datetime.now(UTC)


# ---- live decisions ----------------------------------------------------------------------------------
def predictions_between(user_id: int, t0: datetime, t1: datetime, limit: int = 5000) -> pd.DataFrame:
    """The user's live decisions in (t0, t1], newest first, with latency = decision time - sample receive time and
    channel_faults = the channels the worker found failed then (a list of {channel, fault, seconds}, or None)."""
    rows = _rows(
        """SELECT decided_at, gesture, confidence::float8 AS confidence, model_id, device_id, sample_received,
                  coalesce(1000 * extract(epoch FROM decided_at - sample_received), latency_ms)::float8 AS latency_ms,
                  channel_faults
           FROM predictions WHERE user_id = %s AND decided_at > %s AND decided_at <= %s
           ORDER BY decided_at DESC LIMIT %s""",
        (user_id, t0, t1, limit),
    )
    return pd.DataFrame(rows, columns=["decided_at", "gesture", "confidence", "model_id", "device_id",
                                       "sample_received", "latency_ms", "channel_faults"])


def too_many_failed(model: dict | None, n_failed: int) -> bool:
    """Whether the inference worker answers the unsure label because `n_failed` of the model's checked channels
    failed (preprocessing.too_many_faults, as the worker judges it)."""
    from ml_model import preprocessing as pp

    ref = pp.channel_reference({**model["metadata"], "channels": model["channels"], "scaler": model["scaler"]}) if model else None
    return bool(ref) and pp.too_many_faults(n_failed, len(ref["channels"]))


# ---- service health ----------------------------------------------------------------------------------
def _check_database(s: Settings) -> dict:
    try:
        row = _one("SELECT max(version) AS v FROM schema_version")
        return {"ok": True, "detail": f"schema version {row['v']}"}
    except Unavailable as e:
        return {"ok": False, "detail": str(e)}
    except psycopg2.Error as e:
        return {"ok": False, "detail": str(e).strip().splitlines()[0]}


def _check_api(s: Settings) -> dict:
    url = f"{s.api_url}/health"
    try:
        r = httpx.get(url, timeout=1.5, verify=tls.httpx_verify(s))
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        status = body.get("status", f"HTTP {r.status_code}")
        return {"ok": r.status_code == 200 and status == "ok", "detail": f"{status} ({url})", "body": body}
    except httpx.HTTPError as e:
        return {"ok": False, "detail": f"not reachable at {url} ({type(e).__name__}); start it with ./start_all.sh"}


def _udp_metrics_url(s: Settings, query: str) -> str:
    return f"{s.udp_metrics_url}?{query}"


def _udp_metrics(s: Settings, url: str) -> httpx.Response:
    """GET the UDP server's /metrics at `url` (_udp_metrics_url); it answers only the service API key."""
    return httpx.get(url, timeout=1.5, headers={"X-API-Key": semg_secrets.service_api_key(s)},
                     verify=tls.httpx_verify(s))


def _check_udp(s: Settings) -> dict:
    url = _udp_metrics_url(s, "devices=0")
    try:
        r = _udp_metrics(s, url)
        body = r.json()
        samples = body.get("samples", {}) if isinstance(body, dict) else {}
        spool_error = body.get("spool_error")
        ok = (r.status_code == 200 and body.get("db_connected", True) and body.get("nats_connected", True)
              and not spool_error)
        detail = (f"{samples.get('stored', 0):,} samples stored, {samples.get('lost', 0):,} lost, "
                  f"db {'up' if body.get('db_connected') else 'DOWN'}, nats {'up' if body.get('nats_connected') else 'DOWN'}")
        if spool_error:
            detail += f"; the spool cannot be written ({spool_error}): packets are dropped"
        return {"ok": bool(ok), "detail": detail, "body": body}
    except (httpx.HTTPError, ValueError) as e:
        return {"ok": False, "detail": f"metrics not reachable at {url} ({type(e).__name__}); is udpserver running?"}


def _check_nats(s: Settings) -> dict:
    from semg import natsio

    async def ping() -> None:
        nc = await natsio.connect_once("ui", s, timeout=1.5)
        try:
            await nc.flush(timeout=1.5)
        finally:
            await nc.close()

    try:
        asyncio.run(asyncio.wait_for(ping(), timeout=3))
        return {"ok": True, "detail": f"connected to {s.nats_addresses}"}
    except Exception as e:  # noqa: BLE001 - any failure means "not reachable"; the page shows the reason
        return {"ok": False, "detail": f"not reachable at {s.nats_addresses} ({type(e).__name__})"}


def _check_disk(s: Settings) -> dict:
    ok, detail = diskspace.check(s)
    return {"ok": ok, "detail": detail}


@st.cache_data(ttl=5, show_spinner=False)
def health() -> dict[str, dict]:
    """Reachability of the database, REST API, UDP ingestion and NATS, and whether the disks the platform writes
    to have room ("disk"; checked in parallel, cached 5 s)."""
    s = settings()
    checks = {"database": _check_database, "api": _check_api, "udp": _check_udp, "nats": _check_nats,
              "disk": _check_disk}
    with ThreadPoolExecutor(max_workers=len(checks)) as ex:
        futures = {name: ex.submit(fn, s) for name, fn in checks.items()}
        return {name: f.result() for name, f in futures.items()}


# ---- live device status (UDP server) ---------------------------------------------------------------
def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


REJECT_HINTS = troubleshooting.REJECT_HINTS
reject_hint = troubleshooting.hint
SILENT_HINT = _capital(troubleshooting.SILENT_HINT) + "."
STOPPED_HINT = _capital(troubleshooting.STOPPED_HINT) + "."
RATE_HINT = _capital(troubleshooting.RATE_HINT) + "."


@st.cache_data(ttl=3, show_spinner=False)
def udp_device_status(device_ids: tuple[int, ...]) -> dict:
    """The UDP server's live counters of these devices (cached 3 s), from GET /metrics?device=...

    {"ok": True, "uptime_s": float, "devices": {id: counters}, "unattributed": {reason: count}} where a
    device the server does not know is absent and `unattributed` holds the server-wide rejections that
    cannot be tied to a device; or {"ok": False, "detail": one line} when the server is not reachable."""
    s = settings()
    ids = sorted({int(i) for i in device_ids})
    url = _udp_metrics_url(s, "device=" + ",".join(map(str, ids)))
    why = None
    try:
        r = _udp_metrics(s, url)
        body = r.json() if r.status_code == 200 else None
        if not isinstance(body, dict):
            why = f"HTTP {r.status_code}"
    except httpx.HTTPError as e:
        why = type(e).__name__
    except ValueError:
        why = "not JSON"
    if why is not None:
        return {"ok": False, "detail": f"The UDP server's status is not available at {url.split('?')[0]} ({why}): "
                                       "is udpserver running? Start the platform with ./start_all.sh."}
    wanted = {str(i) for i in ids}  # an older server answers with every device: keep only these
    devices = {int(k): v for k, v in (body.get("devices") or {}).items() if k in wanted and isinstance(v, dict)}
    own = {str(r) for r in troubleshooting.DEVICE_REASONS}
    unattributed = {k: int(v) for k, v in (body.get("rejected") or {}).items() if k not in own and v}
    return {"ok": True, "uptime_s": float(body.get("uptime_s") or 0.0), "ready": bool(body.get("ready", True)),
            "devices": devices, "unattributed": unattributed}


def explain_device_status(device: dict, counters: dict | None) -> dict:
    """What a device's counters from `udp_device_status` mean for its owner.

    {"state": "receiving" | "rejected" | "silent" | "unknown", "summary": str, "last_accepted_age_s": float | None,
     "totals": str | None, "reasons": [{"reason", "count", "age_s", "text"}], "hint": str | None,
     "rate_note": str | None} (reasons most
    recent first; `text` is what was seen plus the cause and remedy from udpserver/troubleshooting.py; `hint` what
    to check when nothing arrives: a device never heard from is set up wrong, one that stopped lost power or Wi-Fi)."""
    if counters is None:
        return {"state": "unknown", "summary": "not known to the UDP server yet (it loads new devices within a "
                                               "few seconds): reload the page in a moment",
                "last_accepted_age_s": None, "totals": None, "reasons": [], "hint": None, "rate_note": None}
    age = counters.get("last_accepted_age_s")
    ages = counters.get("rejected_age_s") or {}
    reasons = []
    for reason, count in (counters.get("rejected") or {}).items():
        if not count:
            continue
        fact = ""
        if reason == "old_boot" and counters.get("rejected_boot") is not None:
            if counters.get("boot") is None:  # what it had received was before the boot counter's reset
                fact = (f"the device sent boot {counters['rejected_boot']} before its boot counter was reset; "
                        "its next boot is accepted. ")
            else:
                fact = (f"the device sends boot {counters['rejected_boot']}, the server has already received boot "
                        f"{counters['boot']}. ")
        elif reason == "channel_mismatch" and counters.get("rejected_channels") is not None:
            fact = (f"the device sends {counters['rejected_channels']} channel(s), registered with "
                    f"{device.get('channel_count')}. ")
        reasons.append({"reason": reason, "count": int(count), "age_s": ages.get(reason),
                        "text": _capital(fact + _capital(reject_hint(reason))) + "."})
    reasons.sort(key=lambda r: r["age_s"] if r["age_s"] is not None else math.inf)
    recent = [r for r in reasons if r["age_s"] is not None and r["age_s"] <= RECENT_REJECT_S]
    if age is not None and age <= RECEIVING_WITHIN_S:
        state = "receiving"
        summary = f"receiving, but some packets are rejected ({recent[0]['reason']})" if recent else "receiving"
    elif recent:
        state, summary = "rejected", f"not receiving: its packets are rejected ({recent[0]['reason']})"
    else:
        state = "silent"
        summary = ("not receiving: no packet from it since the UDP server started" if age is None
                   else "not receiving: it stopped sending")
    totals = (f"{counters.get('stored_samples', 0):,} samples stored, {counters.get('lost_samples', 0):,} lost "
              f"(sequence gaps), {counters.get('dropped_samples', 0):,} dropped since the UDP server started")
    hint = (SILENT_HINT if age is None else STOPPED_HINT) if state == "silent" else None
    # the header carries a whole number: a registered 333.3 Hz is sent as 333, which is no mismatch
    sent, registered = counters.get("rate_hz"), device.get("sample_rate_hz")
    rate_note = None
    if sent is not None and registered is not None and abs(float(sent) - float(registered)) >= 1.0:
        rate_note = f"The device sends {sent} Hz, registered with {float(registered):g} Hz: {RATE_HINT}"
        if state == "receiving" and summary == "receiving":
            summary = f"receiving, but at {sent} Hz, not the registered {float(registered):g} Hz"
    return {"state": state, "summary": summary, "last_accepted_age_s": age, "totals": totals, "reasons": reasons,
            "hint": hint, "rate_note": rate_note}


def video_path_for(user_id: int, session_id: int) -> tuple[Path, str]:
    """(absolute path, path relative to the video dir) for a new session recording."""
    rel = f"{repo.user_video_folder(user_id)}/session{int(session_id)}-{datetime.now(UTC):%Y%m%dT%H%M%S}.webm"
    root = settings().video_dir
    return root / rel, rel


class SessionStore:
    """capture.IntervalStore backed by semg.repo: how a running capture records its intervals. With `owner`
    (the run's name, CueRun.owner) every write is refused with RunTakenOver once another window has taken the
    run over: a window whose process stalled past its heartbeat must not write what it did after."""

    def __init__(self, session_id: int, owner: str | None = None):
        self.session_id, self.owner = session_id, owner

    def mark(self, interval_id: int, started_at: datetime, ended_at: datetime) -> None:
        mark_interval(interval_id, started_at, ended_at, self.owner)

    def discard(self, interval_id: int) -> None:
        discard_interval(interval_id, self.owner)

    def extend(self, total_ms: int) -> None:
        extend_session_plan(self.session_id, total_ms, self.owner)

    def add(self, kind: str, label: str, repetition: int, planned_start_ms: int, planned_end_ms: int) -> int:
        return add_interval(self.session_id, kind, label, repetition, planned_start_ms, planned_end_ms,
                            self.owner)["id"]


# ---- capture interval journal (semg.journal: the API and the training jobs replay the same journals) -------
IntervalJournal = journal.IntervalJournal
journal_dir = journal.journal_dir


def replay_interval_journals(directory: Path | None = None, session_id: int | None = None) -> dict:
    """Store the interval changes capture runs that are gone left in their journals (called on page load; with
    session_id, that session's at once: its run was taken over from a dead process)."""
    return journal.replay_interval_journals(directory, connection, unavailable=(Unavailable,), session_id=session_id)
