"""Back up and restore what the platform stores: the database (users, devices and their keys, every sample,
sessions, models, jobs, decisions, API keys) and the webcam videos, in one tar file.

    python -m semg.backup create FILE.tar     # while the platform runs: one consistent snapshot of the database
    python -m semg.backup restore FILE.tar    # into an install whose database holds nothing yet
    python -m semg.backup show FILE.tar       # what a backup holds
    python -m semg.backup auto                # every SEMG_BACKUP_EVERY_H into SEMG_BACKUP_DIR (supervisord runs it)

The secrets of the state directory (database password, service key, UI password) and the web UI's remembered
sign-ins are not in the backup: a new
install makes its own, and the devices' and users' keys, which live in the database, keep working. A backup made
by an older platform version is restored into a newer one (the data migrations since are applied to its rows),
not the other way round; restoring never overwrites anything: it refuses a database that holds any row (sign-ins
aside), and video files that already exist.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath

import psycopg2
from psycopg2 import sql

from semg import db, diskspace, secrets
from semg.config import Settings, SettingsError, get_settings

FORMAT = "semg-backup"
FORMAT_VERSION = 1
MANIFEST, DUMP, VIDEOS = "manifest.json", "database.dump", "videos"
# what a manifest and a restore report: name -> (table, expression); "samples" is the samples in sample_blocks (a
# manifest of the first backups called that "sample_blocks")
COUNTED = {"users": ("users", "count(*)"), "devices": ("devices", "count(*)"),
           "samples": ("sample_blocks", "coalesce(sum(n), 0)"), "capture_sessions": ("capture_sessions", "count(*)"),
           "videos": ("videos", "count(*)"), "model_artifacts": ("model_artifacts", "count(*)"),
           "predictions": ("predictions", "count(*)")}
# not in a backup, and not "data" a restore refuses to overwrite: the web UI's remembered sign-ins (an
# administrator who opened the UI before restoring has one), which name no user and restore nothing of worth
NOT_BACKED_UP = ("ui_sessions",)


log = logging.getLogger("semg.backup")
# the automatic backups (fullmatch: `$` would also match before a final newline); nothing else is pruned
AUTO_NAME = re.compile(r"semg-backup-(\d{8}T\d{6}Z)\.tar", re.ASCII)
AUTO_RETRY_S = 600.0
# create's and restore's temporary directories (tempfile.mkdtemp's names), each with LOCK held (flock) by its
# backup or restore for as long as it runs; one whose lock can be taken was left by one that was stopped
TEMP_NAME = re.compile(r"\.semg-(?:backup|restore)-[a-z0-9_]{8}", re.ASCII)
LOCK = ".lock"


class BackupError(RuntimeError):
    """A backup cannot be made or restored; the message says why and what to do."""


def _pg_tool(name: str) -> str:
    from semg.embedded import pg_bin_dir
    with contextlib.suppress(Exception):
        tool = pg_bin_dir() / name
        if tool.exists():
            return str(tool)
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} not found (it comes with the pgserver package, or install PostgreSQL's client)")
    return found


def _pg_args(s: Settings) -> tuple[list[str], dict]:
    kw = db.connect_kwargs(s)
    env = {**os.environ, "PGPASSWORD": secrets.postgres_password(s), "PGCONNECT_TIMEOUT": "10"}
    return ["-h", str(kw["host"]), "-p", str(kw["port"]), "-U", str(kw["user"]), "-d", str(kw["dbname"])], env


# A backup is written at SEMG_BACKUP_MB_PER_S (10 by default) and flushed to the disk every FLUSH_EVERY bytes. At full
# speed (~20 MB/s here, pg_dump's compression the limit) its CPU and writes compete with the decisions and with the
# database's commits on the same disk: the live path's p99 at 10 users went from 19-20 ms to 83-93 ms while backups
# ran, at 10 MB/s to 33-34 ms, at 5 MB/s 33-36 ms (bench/backup.py --live). A daily backup takes minutes instead.
FLUSH_EVERY = 8 << 20
_clock, _sleep = time.monotonic, time.sleep  # the pace's; a test's own clock replaces them


class _PacedFile(io.RawIOBase):
    """A file being written (`f`, binary), at most `bytes_per_s` (0: no limit) until `full_speed` is set, its data
    sent to the disk every FLUSH_EVERY bytes rather than left to go out in bursts. pg_dump, writing into a pipe read
    at that pace, waits."""

    def __init__(self, f, bytes_per_s: float, full_speed: threading.Event | None = None) -> None:
        self.f, self.bytes_per_s, self.full_speed = f, bytes_per_s, full_speed
        self.written, self._unflushed, self._start = 0, 0, _clock()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = self.f.write(b)
        self.written += n
        self._unflushed += n
        if self._unflushed >= FLUSH_EVERY:
            self.flush_to_disk()
        if self.full_speed is not None and self.full_speed.is_set():
            return n
        if self.bytes_per_s and (ahead := self._start + self.written / self.bytes_per_s - _clock()) > 0:
            _sleep(ahead)
        return n

    def tell(self) -> int:
        return self.f.tell()

    def flush_to_disk(self) -> None:
        self.f.flush()
        os.fdatasync(self.f.fileno())
        self._unflushed = 0


def _dump_member(cmd: list[str], env: dict, out: _PacedFile, stderr_path: Path) -> int:
    """Run pg_dump (`cmd`, writing to its stdout) into `out` as the tar member DUMP: a header written after the
    data, once its size is known (GNU format: one 512-byte block for any size). The dump is never a file of its
    own, so it is written once rather than twice. Returns the member's size."""
    start = out.tell()
    out.write(bytes(tarfile.BLOCKSIZE))  # the header's place
    with open(stderr_path, "w+b") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err)
        size = 0
        try:
            while chunk := proc.stdout.read(1 << 20):
                out.write(chunk)
                size += len(chunk)
        finally:
            proc.stdout.close()
            rc = proc.wait()
        if rc != 0:
            err.seek(0)
            lines = [ln for ln in err.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            raise BackupError(f"pg_dump failed: {' | '.join(lines[-3:]) or f'exit status {rc}'}")
    out.write(bytes(-size % tarfile.BLOCKSIZE))
    end = out.tell()
    info = tarfile.TarInfo(DUMP)
    info.size, info.mode, info.mtime = size, 0o600, int(datetime.now(UTC).timestamp())
    out.f.seek(start)
    out.f.write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
    out.f.seek(end)
    return size


def _try_lock(fd: int) -> bool | None:
    """Take an exclusive flock on `fd`: True, False when someone else holds it, None when it cannot be had at all
    (a file system without locks: a backup there goes on without, and nothing there is taken for a leftover)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _open_lock(path: str | Path, dir_fd: int | None = None) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)


def _is_linked_as(path: str | Path, fd: int) -> bool:
    """Whether `path` is the file open as `fd` (not removed or moved away meanwhile)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


@contextlib.contextmanager
def _temp_dir(kind: str, parent: Path):
    """A new directory .semg-<kind>-XXXXXXXX in `parent` whose LOCK this process holds until the directory is
    removed on leaving: _remove_stale leaves it alone while this process lives, and removes it if it is killed."""
    for _ in range(10):
        work = Path(tempfile.mkdtemp(prefix=f".semg-{kind}-", dir=parent))
        try:
            fd = _open_lock(work / LOCK)
        except FileNotFoundError:  # _remove_stale took it for a leftover before it was locked: make another
            continue
        try:
            if _try_lock(fd) is False or not _is_linked_as(work / LOCK, fd):
                continue  # the same, a moment later: it is being removed
            try:
                yield work
            finally:
                shutil.rmtree(work, ignore_errors=True)  # the lock still held
            return
        finally:
            os.close(fd)
    raise BackupError(f"no temporary directory could be made in {parent}")


def _disk_usage(path: str) -> int:
    total = 0
    for top, dirs, files in os.walk(path):  # does not follow symbolic links
        for name in dirs + files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_blocks * 512
    return total


def _claim_stale(path: str) -> str | None:
    """`path`, a directory named TEMP_NAME, moved to `path`.removing if no running backup or restore holds its lock
    (then it is a leftover; one made before the lock file existed gets one here); else None. Moved away while
    locked, so that a backup that made it a moment ago and has not locked it yet finds it gone and makes another."""
    gone = f"{path}.removing"
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = _open_lock(LOCK, dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        if _try_lock(fd) is not True or not _is_linked_as(os.path.join(path, LOCK), fd) or os.path.lexists(gone):
            return None
        os.rename(path, gone)
        return gone
    finally:
        os.close(fd)


def _remove_stale(parent: Path) -> int:
    """Remove the temporary directories that backups or restores which were stopped (killed, the power gone) left
    in `parent`: directories named exactly TEMP_NAME whose lock nobody holds (and TEMP_NAME.removing, one this was
    removing when it was stopped itself); never one in use, nor anything else. One INFO line says what went and
    the room that came back; returns that room in bytes."""
    removed, freed = [], 0
    try:
        entries = sorted(os.scandir(parent), key=lambda e: e.name)
    except OSError as e:
        log.warning("%s cannot be read for what stopped backups left (%s)", parent, e.strerror or e)
        return 0
    for entry in entries:
        claimed = entry.name.endswith(".removing") and TEMP_NAME.fullmatch(entry.name.removesuffix(".removing"))
        if not (claimed or TEMP_NAME.fullmatch(entry.name)):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            gone = entry.path if claimed else _claim_stale(entry.path)
            if gone is None:
                continue
            size = _disk_usage(gone)
            shutil.rmtree(gone)
        except FileNotFoundError:  # removed meanwhile by another (one of ours: it is named so)
            continue
        except OSError as e:
            log.warning("%s, left by a stopped backup or restore, cannot be removed (%s)", entry.path,
                        e.strerror or e)
            continue
        removed.append(entry.name)
        freed += size
    if removed:
        log.info("removed what stopped backups or restores left in %s: %s (%.1f MB freed)", parent,
                 ", ".join(removed), freed / 2**20)
    return freed


def _schema_version(cur) -> int:
    cur.execute("SELECT max(version) FROM schema_version")
    return int(cur.fetchone()[0])


def _counts(cur) -> dict[str, int]:
    out = {}
    for name, (table, expr) in COUNTED.items():
        cur.execute(sql.SQL("SELECT {} FROM {}").format(sql.SQL(expr), sql.Identifier(table)))
        out[name] = int(cur.fetchone()[0])
    return out


def create(out: Path, settings: Settings | None = None, full_speed: threading.Event | None = None) -> dict:
    """Write a backup to `out` (a new file) and return its manifest. The database is read in one snapshot (the
    platform may keep running and recording); the videos of that snapshot are copied as they are on disk. Written
    at SEMG_BACKUP_MB_PER_S, at full speed from when `full_speed` is set (the platform is stopping)."""
    s = settings or get_settings()
    out = Path(out)
    exists = BackupError(f"{out} exists: give a new file name (a backup never overwrites)")
    if out.exists():
        raise exists
    if not out.parent.is_dir():
        raise BackupError(f"{out.parent} is not a directory")
    _remove_stale(out.parent)
    with _temp_dir("backup", out.parent) as work:
        part = work / "backup.tar"
        # it holds the devices' secret keys and the API key hashes: for the owner only
        with open(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb") as f:
            paced = _PacedFile(f, s.semg_backup_mb_per_s * 2**20, full_speed)
            with contextlib.closing(db.connect(s)) as conn:
                conn.autocommit = False  # the snapshot lives as long as this transaction
                conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_export_snapshot()")  # pg_dump reads exactly what this transaction sees
                    snapshot = cur.fetchone()[0]
                    version, counts = _schema_version(cur), _counts(cur)
                    cur.execute("SELECT path FROM videos ORDER BY id")
                    video_paths = [r[0] for r in cur.fetchall()]
                    args, env = _pg_args(s)
                    # data only, in foreign-key order; the schema comes from the restoring install's own
                    # migrations. gzip level 1: an hour of 8-channel EMG at 500 Hz in 0.8 s and 31 MB, level 6 (the
                    # default) 7.4 s and 26 MB (bench/backup.py's data); noise-like samples hardly compress further
                    _dump_member([_pg_tool("pg_dump"), *args, "--format=custom", "--compress=1", "--data-only",
                                  f"--snapshot={snapshot}", "--exclude-table-data=public.schema_version",
                                  *(f"--exclude-table-data=public.{t}" for t in NOT_BACKED_UP)],
                                 env, paced, work / "pg_dump.err")
                conn.rollback()
            root = s.video_dir
            copied, missing = [], []
            with tarfile.open(fileobj=paced, mode="w") as tar:  # goes on after the dump's member
                for rel in video_paths:
                    try:  # a video deleted (with its user) since the snapshot is listed as missing
                        tar.add(root / rel, arcname=f"{VIDEOS}/{rel}", recursive=False)
                        copied.append(rel)
                    except FileNotFoundError:
                        missing.append(rel)
                # last: a file cut between members has none, so it is never taken for a whole backup
                manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "schema_version": version,
                            "created_at": datetime.now(UTC).isoformat(), "counts": counts, "videos": len(copied),
                            "videos_missing": missing}
                data = json.dumps(manifest, indent=1).encode()
                info = tarfile.TarInfo(MANIFEST)
                info.size, info.mtime = len(data), int(datetime.now(UTC).timestamp())
                tar.addfile(info, io.BytesIO(data))
            paced.flush_to_disk()
        try:
            os.link(part, out)  # fails rather than replace a file made meanwhile
        except FileExistsError:
            raise exists from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP) or out.exists():
                raise
            os.rename(part, out)  # no hard links there (a FAT/exFAT USB disk): checked just before instead
        with contextlib.suppress(OSError):  # the backup's name survives a power loss too (not on every filesystem)
            diskspace.sync_dir(out.parent)
        return manifest


def _video_rel(name: str) -> str | None:
    """The relative video path of a member name `videos/...`, or None when the name is anything else."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or len(p.parts) < 2 or p.parts[0] != VIDEOS:
        return None
    return str(PurePosixPath(*p.parts[1:]))


def read_manifest(tar: tarfile.TarFile) -> tuple[dict, dict[str, tarfile.TarInfo]]:
    """(manifest, video member by relative path) after checking every member; BackupError for anything else."""
    members = {}
    for m in tar.getmembers():
        if m.name in members:
            raise BackupError(f"not a backup of this platform: {m.name!r} appears twice")
        members[m.name] = m
    for name in (MANIFEST, DUMP):
        if name not in members or not members[name].isreg():
            raise BackupError(f"it has no {name}: a backup cut short, or not a backup of this platform")
    videos = {}
    for name, m in members.items():
        if name in (MANIFEST, DUMP):
            continue
        rel = _video_rel(name)
        if rel is None or not m.isreg():
            raise BackupError(f"not a backup of this platform: unexpected member {name!r}")
        videos[rel] = m
    try:
        manifest = json.loads(tar.extractfile(members[MANIFEST]).read())
    except (ValueError, UnicodeDecodeError) as e:
        raise BackupError(f"the backup's {MANIFEST} is not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError("not a backup of this platform (its manifest names another format)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BackupError(f"backup format version {manifest.get('format_version')!r}; this version reads "
                          f"{FORMAT_VERSION}")
    if manifest.get("videos") != len(videos):
        raise BackupError(f"the backup holds {len(videos)} video file(s) where its manifest lists "
                          f"{manifest.get('videos')!r}: it is damaged")
    return manifest, videos


def _open(src: Path) -> tuple[tarfile.TarFile, dict, dict[str, tarfile.TarInfo]]:
    """(open tar, manifest, video members) of the backup `src`; BackupError when it cannot be read as one (a file
    cut short, a copy stopped part way, ends mid-member)."""
    tar = None
    try:
        tar = tarfile.open(src, "r:")
        return (tar, *read_manifest(tar))
    except BaseException as e:
        if tar is not None:
            tar.close()
        if isinstance(e, (OSError, tarfile.TarError)):
            raise BackupError(f"{src} cannot be read as a backup ({e})") from None
        raise


def show(src: Path) -> dict:
    tar, manifest, _ = _open(src)
    tar.close()
    return manifest


def _same_content(path: Path, tar: tarfile.TarFile, member: tarfile.TarInfo) -> bool:
    with open(path, "rb") as mine, tar.extractfile(member) as theirs:
        while chunk := theirs.read(1 << 20):
            if mine.read(len(chunk)) != chunk:
                return False
        return mine.read(1) == b""


def _left_by_restore(root: Path, rel: str, tar: tarfile.TarFile, member: tarfile.TarInfo) -> bool:
    """Whether root/rel.restoring is this backup's video as a restore left it: a regular file (not a symbolic link
    to one elsewhere) inside `root`, with the member's content, and its name root/rel free."""
    tmp = root / f"{rel}.restoring"
    try:
        st = os.lstat(tmp)
    except OSError:
        return False
    resolved_root = root.resolve()
    if (not stat.S_ISREG(st.st_mode) or st.st_size != member.size or os.path.lexists(root / rel)
            or (tmp.parent.resolve() != resolved_root and resolved_root not in tmp.parent.resolve().parents)):
        return False
    return _same_content(tmp, tar, member)


def _finish_placing(cur, root: Path, tar: tarfile.TarFile, videos: dict[str, tarfile.TarInfo]) -> int:
    """Put in place the videos a restore of this backup left as *.restoring when it was stopped (killed, the power
    gone) after its rows committed: their rows are in the database, their files not under their names. Only a file
    with the backup's content (a regular file in the video directory) whose name is free and whose row is there.
    Returns how many were put in place (a file stopped between its link and the removal of its *.restoring name
    counts too: that name is removed)."""
    linked = 0
    for rel in videos:  # stopped after the link: both names are the one regular file; the spare one goes
        tmp, final = root / f"{rel}.restoring", root / rel
        with contextlib.suppress(OSError):
            a, b = os.lstat(tmp), os.lstat(final)
            if stat.S_ISREG(a.st_mode) and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
                tmp.unlink()
                linked += 1
    left = {rel: root / f"{rel}.restoring" for rel, m in videos.items()
            if os.path.lexists(root / f"{rel}.restoring") and _left_by_restore(root, rel, tar, m)}
    if not left:
        return linked
    cur.execute("SELECT path FROM videos WHERE path = ANY(%s)", (list(left),))
    placed = linked
    for (rel,) in cur.fetchall():
        try:
            os.link(left[rel], root / rel, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP) or os.path.lexists(root / rel):
                raise
            os.rename(left[rel], root / rel)  # no hard links there
        else:
            left[rel].unlink()
        placed += 1
    return placed


def restore(src: Path, settings: Settings | None = None) -> dict:
    """Restore the backup `src` into this install, whose database must hold no rows yet. All or nothing: the
    data goes in one transaction, and the videos are put in place only once it committed. Run again after a
    restore stopped once its rows committed, it puts the videos that restore left beside their place in place."""
    s = settings or get_settings()
    tar, manifest, videos = _open(src)
    placed: list[Path] = []
    unplaced: list[str] = []
    committed = False
    with tar, contextlib.closing(db.connect(s)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            version = _schema_version(cur)
            made = manifest.get("schema_version")
            if not isinstance(made, int) or isinstance(made, bool) or not 1 <= made <= version:
                raise BackupError(f"the backup was made with database schema version {made!r} and this install has "
                                  f"{version}: upgrade this install first (a newer platform version made it)")
            # an older backup's rows get what the migrations since did to the data, in the same transaction (each
            # migration is written to run again safely: IF NOT EXISTS, and data changes only where still needed)
            later = [path.read_text() for v, _, path in db.migrations() if v > made]
            cur.execute("""SELECT tablename FROM pg_tables WHERE schemaname = 'public'
                           AND tablename <> 'schema_version' AND tablename <> ALL(%s) ORDER BY tablename""",
                        (list(NOT_BACKED_UP),))
            holding = []
            for (table,) in cur.fetchall():
                # the API's own service key is there from its first start: it is kept (see _BEFORE)
                where = sql.SQL(" WHERE role <> 'service'" if table == "api_keys" else "")
                cur.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {}{})").format(sql.Identifier(table), where))
                if cur.fetchone()[0]:
                    holding.append(table)
            if holding:
                finished = _finish_placing(cur, s.video_dir, tar, videos)
                if finished:
                    return {"restored": _counts(cur), "videos": len(videos), "videos_put_in_place": finished,
                            "schema_version": version, "backup_schema_version": made,
                            "created_at": manifest.get("created_at")}
                raise BackupError("a backup is restored only into a database that holds nothing yet, so nothing "
                                  f"stored is overwritten; this one has rows in {', '.join(holding)}")
        root = s.video_dir
        there = [rel for rel in videos if (root / rel).exists()]
        if there:
            raise BackupError(f"{len(there)} video file(s) of the backup exist already under {root} (e.g. "
                              f"{there[0]}): move them away first")
        # a restore stopped before its commit (its rows rolled back) left these; not removed here: one running now
        # (into the same empty database) writes the same names
        left = [root / f"{rel}.restoring" for rel in videos if os.path.lexists(root / f"{rel}.restoring")]
        if left:
            more = f" and {len(left) - 10} more *.restoring under {root}" if len(left) > 10 else ""
            raise BackupError(f"{len(left)} file(s) left by a restore that was stopped are in the way: remove them "
                              f"first: {' '.join(shlex.quote(str(p)) for p in left[:10])}{more}")
        s.state_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale(s.state_dir)
        with _temp_dir("restore", s.state_dir) as work:
            try:
                for rel, m in videos.items():  # beside their place first: in place only after the data committed
                    tmp = root / f"{rel}.restoring"
                    tmp.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        o = open(tmp, "xb")
                    except FileExistsError:
                        raise BackupError(f"{tmp} exists (made just now by another restore?)") from None
                    placed.append(tmp)
                    with tar.extractfile(m) as f, o:
                        shutil.copyfileobj(f, o)
                dump = work / DUMP
                with tar.extractfile(DUMP) as f, open(dump, "wb") as o:
                    shutil.copyfileobj(f, o)
                _restore_data(s, dump, work, later)
                committed = True
                for tmp in placed:
                    try:
                        os.link(tmp, tmp.with_suffix(""))
                    except OSError as e:  # the rows are in: the file is kept for putting in place by hand
                        unplaced.append(f"{tmp} ({e.strerror or e})")
                    else:
                        tmp.unlink()
            finally:
                if not committed:
                    for tmp in placed:
                        tmp.unlink(missing_ok=True)
        if unplaced:
            raise BackupError(f"the database rows were restored, but {len(unplaced)} video file(s) could not be put "
                              f"in place: rename them without their '.restoring' suffix: {'; '.join(unplaced)}")
        with conn.cursor() as cur:
            counts = _counts(cur)
    return {"restored": counts, "videos": len(videos), "schema_version": version, "backup_schema_version": made,
            "created_at": manifest.get("created_at")}


# Run around the backup's rows, in the same transaction. The install's own service key stays what its services
# use; the backup's service keys (the old install's internal credential) are not restored as credentials here.
_BEFORE = """BEGIN;
-- users and model_artifacts refer to each other (a user's chosen model, migration 0010): checked at the commit
SET CONSTRAINTS ALL DEFERRED;
-- an API starting meanwhile waits to add its service key until this committed: else _AFTER would delete it
LOCK TABLE public.api_keys IN SHARE ROW EXCLUSIVE MODE;
CREATE TEMP TABLE semg_own_service_keys ON COMMIT DROP AS
  SELECT user_id, name, role, key_prefix, key_hash, created_at, last_used_at, revoked_at
  FROM public.api_keys WHERE role = 'service';
DELETE FROM public.api_keys WHERE role = 'service';
"""
_AFTER = """
DELETE FROM public.api_keys WHERE role = 'service';
INSERT INTO public.api_keys (user_id, name, role, key_prefix, key_hash, created_at, last_used_at, revoked_at)
  SELECT user_id, name, role, key_prefix, key_hash, created_at, last_used_at, revoked_at
  FROM pg_temp.semg_own_service_keys;
COMMIT;
"""


def _restore_data(s: Settings, dump: Path, work: Path, migrations: list[str]) -> None:
    """The dump's rows into the database in one transaction: pg_restore's SQL is fed to psql between _BEFORE and
    `migrations` (SQL of those newer than the backup) + _AFTER, and COMMIT is sent only once pg_restore has read
    the whole archive without error (a cut or damaged archive ends the connection with the transaction open, which
    rolls it back)."""
    args, env = _pg_args(s)
    with open(work / "pg_restore.err", "w+") as rerr, open(work / "psql.err", "w+") as perr:
        reader = subprocess.Popen([_pg_tool("pg_restore"), "--data-only", "--file=-", str(dump)],
                                  stdout=subprocess.PIPE, stderr=rerr, env=env)
        writer = subprocess.Popen([_pg_tool("psql"), *args, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=perr, env=env)
        try:
            writer.stdin.write(_BEFORE.encode())
            while chunk := reader.stdout.read(1 << 20):
                writer.stdin.write(chunk)
            if reader.wait() == 0:
                # pg_restore's SQL empties search_path; the migrations name their tables unqualified
                writer.stdin.write(b"\nSET search_path TO public;\n")
                # the deferred checks now, on every row: an ALTER TABLE of a migration below refuses a table
                # with checks still pending
                writer.stdin.write(b"SET CONSTRAINTS ALL IMMEDIATE;\n")
                for text in migrations:
                    writer.stdin.write(f"\n{text}\n".encode())
                writer.stdin.write(_AFTER.encode())
        except BrokenPipeError:  # psql stopped at an error (ON_ERROR_STOP): its stderr says which
            pass
        finally:
            with contextlib.suppress(BrokenPipeError):
                writer.stdin.close()
            if reader.poll() is None:
                reader.kill()
            reader.wait()
            writer.wait()
        rerr.seek(0)
        perr.seek(0)
        why = [ln for ln in (perr.read() + rerr.read()).splitlines() if ln.strip()]
    if reader.returncode != 0 or writer.returncode != 0:
        raise BackupError("the database rows could not be restored, so nothing was: "
                          + (" | ".join(why[-3:]) or f"exit status {reader.returncode}/{writer.returncode}"))


# ---- automatic backups ------------------------------------------------------------------------------
FUTURE_SLACK = timedelta(hours=1)


def auto_backups(directory: Path, before: datetime | None = None) -> list[tuple[datetime, Path]]:
    """The automatic backups in `directory`, oldest first, with the time in their name; with `before`, only those
    named before it (one named in the future, made while the clock was ahead, would otherwise hold off every
    later backup until that time, or be kept in place of them)."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for p in directory.iterdir():
            if not ((m := AUTO_NAME.fullmatch(p.name)) and p.is_file()):
                continue
            try:
                made = datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            except ValueError:  # not a time (a file named by hand): not ours, and no reason to stop
                continue
            if before is None or made <= before:
                found.append((made, p))
    return sorted(found)


def auto_status(s: Settings, now: datetime | None = None) -> tuple[bool, str]:
    """(on time, one line) for semg.health: the last automatic backup; late when it is older than two intervals.
    None yet is not late (the program makes one as soon as it can; its log says why it cannot)."""
    now = now or datetime.now(UTC)
    every = timedelta(hours=s.semg_backup_every_h)
    directory = s.backup_dir
    try:
        done = auto_backups(directory, before=now + FUTURE_SLACK)
    except OSError as e:
        return False, f"{directory} cannot be read ({e.strerror or e})"
    if not done:
        return True, f"none in {directory} yet (every {s.semg_backup_every_h:g} h)"
    last, path = done[-1]
    age = now - last
    line = f"last {last:%Y-%m-%d %H:%M} UTC ({path.name}, {len(done)} kept in {directory}), every {s.semg_backup_every_h:g} h"
    if age > 2 * every:
        return False, f"{line}: the last is {age.total_seconds() / 3600:.0f} h old; the backup log says why"
    return True, line


def run_auto(s: Settings, stop: threading.Event, clock=lambda: datetime.now(UTC)) -> None:
    """Until `stop`: a backup into SEMG_BACKUP_DIR whenever the newest there is SEMG_BACKUP_EVERY_H old (at once
    when there is none), then all but the newest SEMG_BACKUP_KEEP automatic ones deleted. A failure is logged
    and tried again in 10 minutes; a disk without room for one more (the last one's size above
    SEMG_MIN_FREE_DISK_MB) is not filled."""
    directory = s.backup_dir
    directory.mkdir(parents=True, exist_ok=True)
    every = timedelta(hours=s.semg_backup_every_h)
    log.info("automatic backups into %s every %g h, the newest %d kept", directory, s.semg_backup_every_h,
             s.semg_backup_keep)
    _wait_for_schema(s, stop)
    while not stop.is_set():
        now = clock()
        done = auto_backups(directory, before=now + FUTURE_SLACK)
        if done and (wait := (done[-1][0] + every - now).total_seconds()) > 0:
            stop.wait(min(wait, 3600.0))  # looked at again hourly: a clock change, a backup removed by hand
            continue
        try:
            _remove_stale(directory)  # before the free space is measured: what it gives back counts
            need = (done[-1][1].stat().st_size if done else 0) + s.semg_min_free_disk_mb * diskspace.MB
            free = shutil.disk_usage(directory).free
            if free < need:
                raise BackupError(f"{free >> 20} MB free in {directory}, {need >> 20} MB needed (the last "
                                  "backup's size, and SEMG_MIN_FREE_DISK_MB): free space there or lower "
                                  "SEMG_BACKUP_KEEP")
            out = directory / f"semg-backup-{now:%Y%m%dT%H%M%SZ}.tar"
            m = create(out, s, full_speed=stop)  # stopping: finish it before supervisord's wait ends
            log.info("backup written to %s: %d users, %d samples, %d videos, %.1f MB", out, m["counts"]["users"],
                     m["counts"]["samples"], m["videos"], out.stat().st_size / 2**20)
            for _, old in auto_backups(directory, before=now + FUTURE_SLACK)[:-s.semg_backup_keep]:
                old.unlink(missing_ok=True)
                log.info("removed the old backup %s (SEMG_BACKUP_KEEP=%d)", old.name, s.semg_backup_keep)
        except (BackupError, OSError, psycopg2.Error) as e:
            log.error("automatic backup failed: %s; trying again in %.0f minutes", str(e).strip().splitlines()[0],
                      AUTO_RETRY_S / 60)
            stop.wait(AUTO_RETRY_S)


def _wait_for_schema(s: Settings, stop: threading.Event) -> None:
    """Until the database answers with its schema: at a first start this program runs before the schema is made,
    and a failed backup is tried again only 10 minutes later."""
    while not stop.is_set():
        try:
            with contextlib.closing(db.connect(s, connect_timeout=5)) as conn, conn.cursor() as cur:
                _schema_version(cur)
                return
        except (psycopg2.Error, TypeError):  # TypeError: no version row yet
            stop.wait(2.0)


def _auto_main(s: Settings) -> int:
    logging.basicConfig(level=s.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if s.semg_backup_dir is None:
        print("semg.backup auto: SEMG_BACKUP_DIR is not set (automatic backups are off)", file=sys.stderr)
        return 2
    try:  # a directory that cannot be made is a setting to mend: say so once, and supervisord reports the exit
        s.backup_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"semg.backup auto: SEMG_BACKUP_DIR={s.semg_backup_dir} cannot be made ({e.strerror or e})",
              file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())  # a backup under way finishes at full speed (or the wait ends)
    run_auto(s, stop)
    log.info("automatic backups stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m semg.backup", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("create", "write a backup to a new FILE"), ("restore", "restore FILE into this install "
                       "(its database must hold nothing yet)"), ("show", "print FILE's manifest")):
        sub.add_parser(name, help=text).add_argument("file", type=Path)
    sub.add_parser("auto", help="a backup into SEMG_BACKUP_DIR every SEMG_BACKUP_EVERY_H hours (runs until stopped)")
    args = p.parse_args(argv)
    if args.command == "auto":
        try:
            return _auto_main(get_settings())
        except SettingsError as e:
            print(f"semg.backup: {e}", file=sys.stderr)
            return 2
    try:
        if args.command == "show":
            print(json.dumps(show(args.file)))
            return 0
        s = get_settings()
        # on stderr: what the leftovers of stopped backups or restores removed first gave back (_remove_stale)
        logging.basicConfig(level=s.log_level, format="semg.backup: %(message)s")
        if args.command == "create":
            m = create(args.file, s)
            print(f"backup written to {args.file}: {m['counts']['users']} users, {m['counts']['samples']:,} "
                  f"samples, {m['videos']} videos (schema version {m['schema_version']})")
            print(json.dumps(m))
        else:
            r = restore(args.file, s)
            if r.get("videos_put_in_place"):
                print(f"{args.file} had been restored, but a stop left {r['videos_put_in_place']} of its videos "
                      "beside their place: now in place")
            else:
                print(f"restored {args.file}: {r['restored']['users']} users, {r['restored']['samples']:,} "
                      f"samples, {r['videos']} videos")
            print(json.dumps(r))
        return 0
    except (BackupError, SettingsError, OSError) as e:  # OSError: e.g. no permission to write FILE's directory
        print(f"semg.backup: {e}", file=sys.stderr)
        return 1
    except psycopg2.Error as e:
        print(f"semg.backup: the database cannot be reached: {db.first_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
