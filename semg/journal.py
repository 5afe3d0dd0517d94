"""The capture interval journal, shared by every process that reads or writes capture labels.

A capture run's interval changes (marks, discards, redo extensions) are appended to its journal file (under
$SEMG_STATE_DIR/capture-journal/) before they are written to the database, and the file goes once all are
stored. The run touches the file on every flush; a file left untouched for JOURNAL_LEASE_S belongs to a run that
is gone (browser session closed, UI restarted) or stuck, and replay_interval_journals stores what it holds. It
runs on every UI page load, when a training job is scheduled through the REST API and before a training job
reads its sessions, so no job trains on labels that are still waiting in a journal. Every change is an
idempotent UPDATE of an existing row (no insert) and replayed marks leave the discarded flag alone, so
replaying a change twice, or while its run writes the same changes, adds nothing and changes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import psycopg2
import psycopg2.extensions

from semg import db, diskspace, repo
from semg.config import Settings, get_settings

log = logging.getLogger("semg.journal")

JOURNAL_VERSION = 1
JOURNAL_LEASE_S = 10.0  # a live run touches its journal every tick (0.2 s)
JOURNAL_RETRY_S = 15.0  # after the database was unreachable, replays are skipped for this long
JOURNAL_LOCK_WAIT_S = 30.0  # a replay waits this long for a journal another replay is storing
_retry_at = 0.0


def journal_dir(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).state_dir / "capture-journal"


class IntervalJournal:
    """capture.Journal as a JSON-lines file (0600) under the state dir, one per run while it has changes not
    stored yet. Writes hold an exclusive flock, as a replay does from reading the file to removing it."""

    def __init__(self, session: dict, directory: Path | None = None):
        self.session_id = int(session["id"])
        self.session_created_at = session["created_at"].isoformat()
        self.directory = directory or journal_dir()
        self.path: Path | None = None
        self._fd: int | None = None
        self._closer: weakref.finalize | None = None
        self._torn = False  # a write failed half-way: start the next one on a fresh line

    def _open(self) -> None:
        """A new journal file, returned locked (it is locked before it has its journal name)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = f"session{self.session_id}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp = self.directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.path = self.directory / f"{name}.jsonl"
            os.rename(tmp, self.path)
            with contextlib.suppress(OSError):  # the records fsynced into it later must be found under this name
                diskspace.sync_dir(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fd, self._torn = fd, False
        self._closer = weakref.finalize(self, os.close, fd)

    def _close(self) -> None:
        if self._closer is not None:
            self._closer()
        self._fd = self._closer = None

    def save(self, pending: list[dict], new: int) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
                self._close()  # a replay stored and removed it while this run was quiet
            if self._fd is None:
                self._open()
                records = pending
            else:
                records = pending[len(pending) - new:] if new else []
            if records:
                head = {"v": JOURNAL_VERSION, "session_id": self.session_id,
                        "session_created_at": self.session_created_at}
                payload = b"".join(json.dumps({**head, **r}, separators=(",", ":")).encode() + b"\n"
                                   for r in records)
                view = memoryview(b"\n" + payload if self._torn else payload)
                self._torn = True
                while view:
                    view = view[os.write(self._fd, view):]
                os.fsync(self._fd)
                self._torn = False
            else:
                os.utime(self._fd)  # still alive: replays leave this file alone
        finally:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def clear(self) -> None:
        if self._fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        finally:
            self._close()


def _journal_line(line: bytes) -> dict:
    """One journal line as a checked record; ValueError says what is wrong with it."""
    try:
        rec = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    if rec.get("v") != JOURNAL_VERSION:
        raise ValueError(f"unknown version {rec.get('v')!r}")

    def count(key: str) -> int:
        v = rec.get(key)
        if type(v) is not int or v <= 0:
            raise ValueError(f"{key} must be a positive integer, not {v!r}")
        return v

    def moment(key: str) -> datetime:
        try:
            t = datetime.fromisoformat(rec[key])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{key} must be an ISO date-time, not {rec.get(key)!r}") from None
        if t.tzinfo is None:
            raise ValueError(f"{key} has no time zone")
        return t

    out = {"op": rec.get("op"), "session_id": count("session_id"), "session_created_at": moment("session_created_at")}
    if out["op"] == "mark":
        out.update(interval_id=count("interval_id"), started_at=moment("started_at"), ended_at=moment("ended_at"))
    elif out["op"] == "discard":
        out["interval_id"] = count("interval_id")
    elif out["op"] == "extend":
        out["total_ms"] = count("total_ms")
    elif out["op"] == "video":
        out.update(user_id=count("user_id"), started_at=moment("started_at"), ended_at=moment("ended_at"))
        if not isinstance(rec.get("path"), str) or not rec["path"]:
            raise ValueError(f"path must be a relative file path, not {rec.get('path')!r}")
        for key in ("frame_count", "bytes"):
            if type(rec.get(key)) is not int or rec[key] < 0:
                raise ValueError(f"{key} must be a non-negative integer, not {rec.get(key)!r}")
        for key, kind in (("fps", (int, float)), ("width", int), ("height", int)):
            if rec.get(key) is not None and (isinstance(rec[key], bool) or not isinstance(rec[key], kind)):
                raise ValueError(f"{key} must be a number or null, not {rec.get(key)!r}")
        out.update({k: rec.get(k) for k in ("path", "frame_count", "bytes", "fps", "width", "height")})
    else:
        raise ValueError(f"unknown op {out['op']!r}")
    return out


def _lock(fd: int) -> bool:
    """Take the journal's lock, waiting while another holder has it: its run writing a change (an instant), or
    another replay storing it (a page load, the API, another job worker), which must be done before this
    caller goes on to read the sessions. False after JOURNAL_LOCK_WAIT_S."""
    deadline = time.monotonic() + JOURNAL_LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def _replay_journal_file(path: Path, result: dict, connection: Callable[[], contextlib.AbstractContextManager],
                         force: bool = False) -> None:
    """Store one journal's changes in order, unless its run is alive (unless `force`: its run was taken over).
    The database being unreachable raises (the file is kept)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # cleared meanwhile
    try:
        if not _lock(fd):  # another replay has been storing it for long (a very slow database): kept
            result["pending"] += 1
            log.warning("capture journal %s is held by another replay for over %.0f s; kept for later", path,
                        JOURNAL_LOCK_WAIT_S)
            return
        try:
            st_path, st_fd = os.stat(path), os.fstat(fd)
        except FileNotFoundError:
            return
        if (st_path.st_dev, st_path.st_ino) != (st_fd.st_dev, st_fd.st_ino):
            return
        # An mtime further ahead than the lease is from before the clock stepped back: a live run would have
        # touched the file since (every tick), so it is not alive.
        if not force and abs(time.time() - st_fd.st_mtime) < JOURNAL_LEASE_S:
            result["live"] += 1  # its run is alive (another window) and stores its changes itself
            return
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read()
        records, bad = [], []
        for lineno, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                records.append((lineno, _journal_line(line)))
            except ValueError as e:
                bad.append(line)
                log.error("capture journal %s line %d skipped, it is corrupt (%s): %.200r", path, lineno, e, line)
        sessions: dict[tuple, set[int] | None] = {}
        with connection() as conn:
            for lineno, rec in records:
                sid, key = rec["session_id"], (rec["session_id"], rec["session_created_at"])
                if key not in sessions:
                    sessions[key] = _journal_session(conn, path, rec)
                ids = sessions[key]
                if ids is None or (rec["op"] in ("mark", "discard") and rec["interval_id"] not in ids):
                    if ids is not None:
                        log.warning("capture journal %s line %d skipped: interval %s is not in session %s",
                                    path, lineno, rec["interval_id"], sid)
                    result["dropped"] += 1
                    continue
                try:
                    if rec["op"] == "mark":  # a redo's discard may be stored already: keep it
                        repo.mark_interval(conn, rec["interval_id"], rec["started_at"], rec["ended_at"],
                                           keep_discarded=True)
                    elif rec["op"] == "discard":
                        repo.discard_interval(conn, rec["interval_id"])
                    elif rec["op"] == "video":
                        _replay_video(conn, path, lineno, rec)
                    else:
                        repo.extend_session_plan(conn, sid, rec["total_ms"])
                except repo.RepoError as e:
                    log.warning("capture journal %s line %d could not be stored, skipped: %s", path, lineno, e)
                    result["dropped"] += 1
                    continue
                result["stored"] += 1
        if bad:
            rejected = path.with_suffix(".rejected")
            with open(os.open(rejected, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600), "ab") as f:
                f.write(b"".join(line + b"\n" for line in bad))
            log.error("capture journal %s: %d corrupt line(s) kept in %s; everything else was stored", path,
                      len(bad), rejected)
            result["bad_lines"] += len(bad)
        os.unlink(path)
        result["files"] += 1
    finally:
        os.close(fd)


def register_video(conn, user_id: int, session_id: int, path: str, started_at: datetime, ended_at: datetime,
                   frame_count: int, fps: float | None, width: int | None, height: int | None, size: int) -> bool:
    """Register a session's webcam recording (path relative to the video dir) unless it is registered already
    (a replay after the write went through, or of a journal its window then stored itself). False when it was."""
    if any(v["path"] == path for v in repo.list_videos(conn, user_id, session_id)):
        return False
    repo.add_video(conn, user_id, session_id, path, started_at, ended_at, frame_count, fps, width, height, size)
    return True


def _replay_video(conn, path: Path, lineno: int, rec: dict) -> None:
    if not (get_settings().video_dir / rec["path"]).is_file():
        raise repo.NotFound(f"the video file {rec['path']} no longer exists")
    if register_video(conn, rec["user_id"], rec["session_id"], rec["path"], rec["started_at"], rec["ended_at"],
                      rec["frame_count"], rec["fps"], rec["width"], rec["height"], rec["bytes"]):
        log.info("capture journal %s line %d: video %s registered", path, lineno, rec["path"])


def journal_video(session: dict, video: dict, directory: Path | None = None) -> Path:
    """Write (0600, synced) the registration of a finished session's webcam recording before it is stored, so
    a failed write (or a process that dies) leaves it to the next replay: the file is never left with nothing
    pointing to it. `video` holds the videos row's fields (path relative to the video dir); remove the
    returned file once it is stored."""
    directory = directory or journal_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    rec = {"v": JOURNAL_VERSION, "session_id": int(session["id"]), "session_created_at": session["created_at"].isoformat(),
           "op": "video", "user_id": int(session["user_id"]), "path": video["path"],
           "started_at": video["started_at"].isoformat(), "ended_at": video["ended_at"].isoformat(),
           **{k: video[k] for k in ("frame_count", "bytes", "fps", "width", "height")}}
    name = f"video-session{int(session['id'])}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp = directory / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(rec, separators=(",", ":")).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        final = directory / f"{name}.jsonl"
        os.rename(tmp, final)
        with contextlib.suppress(OSError):
            diskspace.sync_dir(directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return final


def _journal_session(conn, path: Path, rec: dict) -> set[int] | None:
    """The interval ids of the journal's session, or None (logged) when that session is gone -- also when
    its id now names another session (the database was recreated)."""
    try:
        session = repo.get_session(conn, rec["session_id"])
    except repo.NotFound:
        session = None
    if session is None or session["created_at"] != rec["session_created_at"]:
        log.warning("capture journal %s: session %s no longer exists (deleted, or the database was recreated); "
                    "its changes are skipped", path, rec["session_id"])
        return None
    return {i["id"] for i in session["intervals"]}


@contextlib.contextmanager
def _own_connection(settings: Settings | None = None) -> Iterator[psycopg2.extensions.connection]:
    with contextlib.closing(db.connect(settings)) as conn:
        yield conn


UNAVAILABLE = (psycopg2.OperationalError, psycopg2.InterfaceError)


def replay_interval_journals(directory: Path | None = None, connection: Callable[[], contextlib.AbstractContextManager] | None = None,
                             unavailable: tuple[type[BaseException], ...] = UNAVAILABLE,
                             session_id: int | None = None) -> dict:
    """Store the interval changes capture runs that are gone left in their journals (called on every UI page
    load, by the REST API before it schedules a job and by a training job before it reads its sessions).

    `connection()` gives a database connection as a context manager (default: a new one from the settings);
    an `unavailable` error from it keeps the journals and pauses replays for JOURNAL_RETRY_S. Returns counts: stored, dropped (their session or interval no longer exists), bad_lines, files done,
    live (its run is alive), pending (kept: the database is unreachable, or an unexpected error).
    With `session_id`, only that session's journals, young or not, and regardless of a recent unreachable
    database: its run was taken over from a dead process, which can write no more, and the new run must start
    from everything the old one recorded."""
    global _retry_at
    result = dict.fromkeys(("stored", "dropped", "bad_lines", "files", "live", "pending"), 0)
    directory = directory or journal_dir()
    connection = connection or _own_connection
    try:
        pattern = "*.jsonl" if session_id is None else f"*session{int(session_id)}-*.jsonl"
        paths = [p for p in directory.glob(pattern) if p.is_file()]
    except OSError:
        return result
    if not paths or (session_id is None and time.monotonic() < _retry_at):
        result["pending"] = len(paths)
        return result

    def age(p: Path) -> tuple[int, str]:  # oldest first: a run's earlier file before its later one
        try:
            return p.stat().st_mtime_ns, p.name
        except OSError:
            return 0, p.name

    for n, path in enumerate(sorted(paths, key=age)):
        try:
            _replay_journal_file(path, result, connection, force=session_id is not None)
        except unavailable as e:
            _retry_at = time.monotonic() + JOURNAL_RETRY_S
            result["pending"] += len(paths) - n
            log.warning("capture journals kept for later (%d file(s)): %s", len(paths) - n, db.first_line(e))
            break
        except Exception:
            result["pending"] += 1
            log.exception("capture journal %s could not be replayed; it is kept and tried again later", path)
    return result
