"""`python -m semg.backup`: everything stored (database rows, sample values, videos) goes into one file and comes
back whole into a new install; a restore never overwrites anything and is all or nothing. Real PostgreSQL (the
test session's server, with a second database as the new install), real pg_dump/pg_restore."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from psycopg2 import sql

from ml_model.rest import keys
from semg import backup, db, repo, uisessions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "streamlit_apps"))
import ui_seed  # noqa: E402  (the UI tests' data seeding: samples generated inside PostgreSQL)

REPO = Path(__file__).resolve().parents[2]
TARGET_DB = "semg_restore_target"
OLD_SERVICE_KEY, NEW_SERVICE_KEY = "semg_" + "o" * 40, "semg_" + "n" * 40


def _tables(conn) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")
        return [r[0] for r in cur.fetchall()]


def _rows(conn, table: str) -> list:
    """Every row; of api_keys those that are not the install's own service key."""
    where = sql.SQL(" WHERE role <> 'service'" if table == "api_keys" else "")
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT * FROM {}{} ORDER BY 1, 2").format(sql.Identifier(table), where))
        return [tuple(r) for r in cur.fetchall()]


@pytest.fixture
def source(clean_db, settings):
    """A user with gestures, a device, 20,000 samples, a session with its video file, a trained model, API key."""
    conn = clean_db
    base = ui_seed.seed_user(conn)
    uid, did = base["user"]["id"], base["device"]["id"]
    start = datetime.now(UTC) - timedelta(minutes=5)
    samples = ui_seed.seed_samples(conn, uid, did, start, 20_000, channels=8, rate=1000.0)
    session = ui_seed.seed_session(conn, uid, did, start + timedelta(seconds=1), repetitions=2)
    ui_seed.seed_job(conn, uid, [session["id"]])
    ui_seed.seed_predictions(conn, uid, n=20)
    key = keys.create_key(conn, "user", uid, "backup test")["key"]
    keys.ensure_key(conn, OLD_SERVICE_KEY, "service", "service")  # as the old install's API made at its start
    rel = f"user{uid}/session{session['id']}.webm"
    video = settings.video_dir / rel
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(os.urandom(50_000))
    repo.add_video(conn, uid, session["id"], rel, start, start + timedelta(seconds=20), size=50_000)
    return {"conn": conn, "user": uid, "samples": samples, "video": rel, "key": key, "session": session["id"]}


@pytest.fixture
def target(settings, tmp_path, db_conn):
    """A new install on the same server: its own database (schema from the migrations, no rows) and state dir."""
    with db_conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TARGET_DB)))
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TARGET_DB)))
    state = tmp_path / "new-install"
    (state / "secrets").mkdir(parents=True)
    shutil.copy(settings.secrets_dir / "postgres_password", state / "secrets" / "postgres_password")
    s = settings.model_copy(update={"semg_state_dir": state, "postgres_db": TARGET_DB})
    with contextlib.closing(db.connect(s)) as conn:
        db.migrate(conn)
        keys.ensure_key(conn, NEW_SERVICE_KEY, "service", "service")  # the new install's API has started
    yield s
    with db_conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TARGET_DB)))


def test_a_backup_restored_into_a_new_install_holds_everything(source, target, settings, tmp_path):
    """Every row of every table, but the web UI's remembered sign-ins: not in the backup, and one made in the new
    install (its administrator opened the UI first) does not make the restore refuse."""
    out = tmp_path / "semg.tar"
    old_sign_in = uisessions.create(source["conn"], "the old install's UI password", 7)
    with contextlib.closing(db.connect(target)) as new:
        new_sign_in = uisessions.create(new, "the new install's UI password", 7)
    manifest = backup.create(out, settings)
    assert manifest["counts"]["users"] == 1 and manifest["counts"]["samples"] == source["samples"]
    assert manifest["videos"] == 1 and manifest["videos_missing"] == []
    assert backup.show(out) == manifest

    result = backup.restore(out, target)
    assert result["restored"] == manifest["counts"], result
    src = source["conn"]
    with contextlib.closing(db.connect(target)) as new:
        new.autocommit = True
        assert _tables(new) == _tables(src)
        for table in _tables(src):  # every row of every table, sample values included
            if table not in ("schema_version", "ui_sessions"):
                assert _rows(new, table) == _rows(src, table), table
        assert not uisessions.resume(new, old_sign_in, "the old install's UI password", 7)
        assert uisessions.resume(new, new_sign_in, "the new install's UI password", 7)
        # the user's key works; the new install's service key still does, the old install's does not
        assert keys.lookup(new, source["key"])["user_id"] == source["user"]
        assert keys.lookup(new, NEW_SERVICE_KEY)["role"] == "service"
        assert keys.lookup(new, OLD_SERVICE_KEY) is None
        # ids go on after the restored ones (the identity sequences came along)
        other = repo.create_user(new, "After Restore", "after@example.org")
        assert other["id"] > source["user"]
    assert (target.video_dir / source["video"]).read_bytes() == (settings.video_dir / source["video"]).read_bytes()
    assert not list(target.video_dir.rglob("*.restoring"))


def test_a_backup_file_is_readable_by_its_owner_only(source, settings, tmp_path):
    """It holds the devices' secret keys and the API key hashes: not for the other accounts of the machine."""
    out = tmp_path / "semg.tar"
    old = os.umask(0o022)
    try:
        backup.create(out, settings)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o600


def test_a_restore_never_overwrites_and_is_all_or_nothing(source, target, settings, tmp_path):
    out = tmp_path / "semg.tar"
    backup.create(out, settings)
    with pytest.raises(backup.BackupError, match="never overwrites"):
        backup.create(out, settings)

    # a video file of the same name is in the way: nothing is restored
    in_the_way = target.video_dir / source["video"]
    in_the_way.parent.mkdir(parents=True)
    in_the_way.write_bytes(b"someone else's")
    with pytest.raises(backup.BackupError, match="exist already"):
        backup.restore(out, target)
    assert in_the_way.read_bytes() == b"someone else's"
    in_the_way.unlink()
    # one left by a restore that was stopped: refused, naming the very file to remove
    left = in_the_way.with_name(in_the_way.name + ".restoring")
    left.write_bytes(b"half a video")
    named = f"left by a restore that was stopped.*remove them first: {re.escape(str(left))}$"
    with pytest.raises(backup.BackupError, match=named):
        backup.restore(out, target)
    assert left.read_bytes() == b"half a video"
    left.unlink()

    # a dump the server refuses part way (here: cut short): one transaction, so no row and no video stays
    cut = tmp_path / "cut.tar"
    with tarfile.open(out) as tar, tarfile.open(cut, "w") as w:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name == backup.DUMP:
                data = data[: len(data) * 2 // 3]
                m.size = len(data)
            w.addfile(m, io.BytesIO(data))
    with pytest.raises(backup.BackupError, match="pg_restore"):
        backup.restore(cut, target)
    with contextlib.closing(db.connect(target)) as new, new.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")
        assert cur.fetchone()[0] == 0
    assert not [p for p in target.video_dir.rglob("*") if p.is_file()]

    # restored once; a second restore finds rows and refuses, changing nothing
    backup.restore(out, target)
    with pytest.raises(backup.BackupError, match="holds nothing yet.*users"):
        backup.restore(out, target)
    with contextlib.closing(db.connect(target)) as new, new.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")
        assert cur.fetchone()[0] == 1


def test_a_backup_file_cut_short_is_refused_with_a_message(source, target, settings, tmp_path):
    """As when a copy of it stopped part way: tarfile finds the end of a member missing."""
    out = tmp_path / "semg.tar"
    backup.create(out, settings)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size * 2 // 3])
    with pytest.raises(backup.BackupError, match="cannot be read as a backup"):
        backup.restore(cut, target)
    with pytest.raises(backup.BackupError, match="cannot be read as a backup"):
        backup.show(cut)
    assert not target.video_dir.exists() or not [p for p in target.video_dir.rglob("*") if p.is_file()]

    # cut exactly between two members, it is a well-formed tar: the manifest, written last, is missing
    with tarfile.open(out) as tar:
        names = tar.getnames()
        assert names[-1] == backup.MANIFEST and names[0] == backup.DUMP, names
        ends = [m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers()]
    cut.write_bytes(out.read_bytes()[: ends[-2]])
    with pytest.raises(backup.BackupError, match="no manifest.json"):
        backup.restore(cut, target)
    # a video member left out of a whole-looking file: the manifest's count says so
    damaged = tmp_path / "damaged.tar"
    with tarfile.open(out) as tar, tarfile.open(damaged, "w") as w:
        for m in tar.getmembers():
            if not m.name.startswith("videos/"):
                w.addfile(m, tar.extractfile(m))
    with pytest.raises(backup.BackupError, match="holds 0 video file.*lists 1: it is damaged"):
        backup.restore(damaged, target)
    assert not target.video_dir.exists() or not [p for p in target.video_dir.rglob("*") if p.is_file()]


def test_a_video_that_cannot_be_put_in_place_after_the_commit_is_kept(source, target, settings, tmp_path,
                                                                        monkeypatch):
    """Once the rows are committed the restore cannot be repeated (the database holds rows): a video whose name
    was taken meanwhile (or on a disk without hard links) stays beside its place, and the error says where."""
    out = tmp_path / "semg.tar"
    backup.create(out, settings)
    in_the_way = target.video_dir / source["video"]
    restore_data = backup._restore_data

    def and_meanwhile_a_file_of_that_name(*args):
        restore_data(*args)
        in_the_way.write_bytes(b"someone else's")

    monkeypatch.setattr(backup, "_restore_data", and_meanwhile_a_file_of_that_name)
    with pytest.raises(backup.BackupError, match="rows were restored.*could not be put in place.*restoring"):
        backup.restore(out, target)
    assert in_the_way.read_bytes() == b"someone else's"
    kept = in_the_way.with_name(in_the_way.name + ".restoring")
    assert kept.read_bytes() == (settings.video_dir / source["video"]).read_bytes()


def test_the_service_key_of_an_api_starting_during_the_restore_is_kept(source, target, settings, tmp_path):
    """The new install's API starts (and adds its service key) while the rows are being restored."""
    out = tmp_path / "semg.tar"
    backup.create(out, settings)
    with contextlib.closing(db.connect(target)) as conn, conn.cursor() as cur:
        conn.autocommit = True
        cur.execute("DELETE FROM api_keys")  # the API has not started yet
    holder = db.connect(target)  # holds the restore's COPY into users, after it began its transaction
    with holder.cursor() as cur:
        cur.execute("LOCK TABLE users IN EXCLUSIVE MODE")  # its emptiness check (a SELECT) still passes
    results: dict = {}

    def run(name, fn):
        try:
            results[name] = fn()
        except Exception as e:
            results[name] = e

    def api_start():
        with contextlib.closing(db.connect(target)) as conn:
            keys.ensure_key(conn, NEW_SERVICE_KEY, "service", "service")

    restoring = threading.Thread(target=run, args=("restore", lambda: backup.restore(out, target)))
    restoring.start()
    try:
        with contextlib.closing(db.connect(target)) as watch, watch.cursor() as cur:
            watch.autocommit = True
            for _ in range(1200):
                cur.execute("""SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                               WHERE datname = %s AND application_name = 'psql' AND wait_event_type = 'Lock')""",
                            (TARGET_DB,))
                if cur.fetchone()[0] or not restoring.is_alive():
                    break
                time.sleep(0.05)
        api = threading.Thread(target=run, args=("api", api_start))
        api.start()
        api.join(timeout=1)  # it may wait for the restore (as it should) or be done
    finally:
        holder.commit()
        holder.close()
    restoring.join(timeout=120)
    api.join(timeout=120)
    assert not isinstance(results["restore"], Exception), results["restore"]
    assert results["api"] is None
    with contextlib.closing(db.connect(target)) as new:
        assert keys.lookup(new, NEW_SERVICE_KEY)["role"] == "service"
        assert keys.lookup(new, source["key"])["user_id"] == source["user"]


def _tar_with(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


@pytest.mark.parametrize("case", ["traversal", "absolute", "symlink", "no_dump", "other_format", "schema"])
def test_a_file_that_is_not_a_backup_of_this_version_is_refused_before_anything_is_written(case, target, tmp_path):
    good = {"format": backup.FORMAT, "format_version": backup.FORMAT_VERSION, "schema_version": 7, "videos": 0}
    with contextlib.closing(db.connect(target)) as conn, conn.cursor() as cur:
        cur.execute("SELECT max(version) FROM schema_version")
        good["schema_version"] = cur.fetchone()[0]
    members = {backup.MANIFEST: json.dumps(good).encode(), backup.DUMP: b"x"}
    symlink = None
    expected = "unexpected member"
    if case == "traversal":
        members["videos/../../../escaped.webm"] = b"x"
    elif case == "absolute":
        members["/tmp/escaped.webm"] = b"x"
    elif case == "symlink":
        symlink = "videos/user1/link.webm"
    elif case == "no_dump":
        del members[backup.DUMP]
        expected = "it has no database.dump"
    elif case == "other_format":
        members[backup.MANIFEST] = json.dumps({**good, "format": "zip"}).encode()
        expected = "another format"
    else:  # made by a newer platform version
        members[backup.MANIFEST] = json.dumps({**good, "schema_version": good["schema_version"] + 1}).encode()
        expected = "upgrade this install first"
    src = _tar_with(tmp_path / f"{case}.tar", members, symlink)
    with pytest.raises(backup.BackupError, match=expected):
        backup.restore(src, target)
    assert not list(tmp_path.rglob("escaped.webm"))
    assert not target.video_dir.exists() or not [p for p in target.video_dir.rglob("*") if p.is_file()]


def test_the_command_line(source, settings, tmp_path):
    out = tmp_path / "cli.tar"
    env = {**os.environ, "LOG_LEVEL": "ERROR"}
    r = subprocess.run([sys.executable, "-m", "semg.backup", "create", str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"backup written to {out}: 1 users, {source['samples']:,} samples, 1 videos" in r.stdout
    assert json.loads(r.stdout.splitlines()[-1])["counts"]["users"] == 1
    r = subprocess.run([sys.executable, "-m", "semg.backup", "restore", str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "holds nothing yet" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "semg.backup", "show", str(tmp_path / "missing.tar")], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot be read as a backup" in r.stderr and "Traceback" not in r.stderr



def test_a_backup_of_an_older_version_is_restored_with_the_migrations_since(settings, db_conn, target, tmp_path):
    """A backup made at schema version 4 (before gesture names were made NFC, 0005) into today's install: its rows
    come back as the migrations since would have left them."""
    old_db = "semg_backup_v4"
    with db_conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(old_db)))
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(old_db)))
    old = target.model_copy(update={"postgres_db": old_db, "semg_state_dir": target.state_dir})
    try:
        with contextlib.closing(db.connect(old)) as conn, conn, conn.cursor() as cur:
            cur.execute(db.BASELINE.read_text())
            for version, name, path in db.migrations():
                if version <= 4:
                    cur.execute(path.read_text())
                    cur.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)", (version, name))
            decomposed = "cafe\u0301"  # as typed on macOS, stored before 0005
            cur.execute("INSERT INTO users (name, email) VALUES ('Old', 'old@example.org') RETURNING id")
            uid = cur.fetchone()[0]
            cur.execute("INSERT INTO gestures (user_id, name) VALUES (%s, %s) RETURNING id", (uid, decomposed))
            gid = cur.fetchone()[0]
            cur.execute("""INSERT INTO devices (user_id, channel_count, sample_rate_hz, secret_key)
                           VALUES (%s, 8, 200, %s) RETURNING id""", (uid, os.urandom(32)))
            did = cur.fetchone()[0]
            cur.execute("""INSERT INTO capture_sessions (user_id, device_id, status, plan)
                           VALUES (%s, %s, 'completed', %s) RETURNING id""",
                        (uid, did, json.dumps({"gestures": [decomposed]})))
            sid = cur.fetchone()[0]
            cur.execute("""INSERT INTO session_intervals (session_id, ordinal, kind, label, planned_start_ms,
                                                          planned_end_ms)
                           VALUES (%s, 0, 'gesture', %s, 0, 2000)""", (sid, decomposed))
        out = tmp_path / "v4.tar"
        assert backup.create(out, old)["schema_version"] == 4

        result = backup.restore(out, target)
        assert (result["backup_schema_version"], result["schema_version"]) == (4, max(v for v, _, _ in db.migrations()))
        with contextlib.closing(db.connect(target)) as new, new.cursor() as cur:
            cur.execute("SELECT id, name FROM gestures")
            assert cur.fetchall() == [(gid, "caf\u00e9")]  # NFC now (0005)
            cur.execute("SELECT label, gesture_id FROM session_intervals")
            assert cur.fetchall() == [("caf\u00e9", gid)]  # and linked to its gesture (0005)
            cur.execute("SELECT plan->'gestures' FROM capture_sessions")
            assert cur.fetchone()[0] == ["caf\u00e9"]
            cur.execute("SELECT boot_offset FROM devices")  # 0002's column, as the migration left it
            assert cur.fetchone()[0] == 0
    finally:
        with db_conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(old_db)))


def test_every_migration_runs_again_on_a_database_it_already_changed(target):
    """What restoring an older backup relies on (semg.db.migrations): a new migration that is not safe to run
    again fails here."""
    with contextlib.closing(db.connect(target)) as conn:
        for version, name, path in db.migrations():
            with conn.cursor() as cur:
                cur.execute(path.read_text())  # raises on e.g. a plain ADD COLUMN or CREATE INDEX
            conn.rollback()


def test_a_backup_is_written_where_there_are_no_hard_links(source, settings, tmp_path, monkeypatch):
    """A FAT or exFAT USB disk, the usual place for a copy, refuses link(2) with EPERM: the file is renamed there."""
    import errno

    def no_links(src, dst, *a, **kw):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(backup.os, "link", no_links)
    out = tmp_path / "usb.tar"
    manifest = backup.create(out, settings)
    assert backup.show(out) == manifest and oct(out.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".semg-backup-")] == []
    with pytest.raises(backup.BackupError, match="never overwrites"):
        backup.create(out, settings)


def _run_auto_until(s, caplog, said: str, times: int = 1, timeout: float = 60) -> list[str]:
    """backup.run_auto in a thread until the log has said `said` `times` times (or `timeout`), then stopped;
    returns every message it logged."""
    import logging

    stop = threading.Event()
    worker = threading.Thread(target=backup.run_auto, args=(s, stop), daemon=True)
    with caplog.at_level(logging.INFO, logger="semg.backup"):
        worker.start()
        deadline = time.monotonic() + timeout
        while sum(said in r.getMessage() for r in caplog.records) < times and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        worker.join(60)
    assert not worker.is_alive()
    return [r.getMessage() for r in caplog.records]


def test_automatic_backups_come_every_interval_and_only_the_newest_are_kept(source, settings, tmp_path, caplog):
    directory = tmp_path / "auto"
    directory.mkdir()
    (directory / "my-own-copy.tar").write_bytes(b"not ours to prune")
    s = settings.model_copy(update={"semg_backup_dir": directory, "semg_backup_every_h": 1.5 / 3600,
                                    "semg_backup_keep": 2})
    said = _run_auto_until(s, caplog, "backup written to", times=3)
    written = [m for m in said if "backup written to" in m]
    assert len(written) >= 3, said
    kept = backup.auto_backups(directory)
    assert len(kept) == 2 and (directory / "my-own-copy.tar").exists()
    assert backup.show(kept[-1][1])["counts"]["samples"] == source["samples"]
    ok, line = backup.auto_status(s)
    assert ok and kept[-1][1].name in line and "2 kept" in line, line
    # late: the newest is more than two intervals old
    ok, line = backup.auto_status(s, now=kept[-1][0] + timedelta(seconds=4))
    assert not ok and "the backup log says why" in line, line


def test_automatic_backups_never_fill_the_disk(source, settings, tmp_path, caplog):
    directory = tmp_path / "auto"
    s = settings.model_copy(update={"semg_backup_dir": directory, "semg_min_free_disk_mb": 10**12})
    said = _run_auto_until(s, caplog, "automatic backup failed", timeout=30)
    failed = [m for m in said if "automatic backup failed" in m]
    assert failed and "MB needed" in failed[0] and "trying again in 10 minutes" in failed[0], failed
    assert backup.auto_backups(directory) == [] and list(directory.iterdir()) == []
    ok, line = backup.auto_status(s)
    assert ok and "none in" in line, line  # nothing yet is not late: the log says why


def test_auto_without_a_usable_directory_says_so(settings, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SEMG_BACKUP_DIR"}
    r = subprocess.run([sys.executable, "-m", "semg.backup", "auto"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "SEMG_BACKUP_DIR is not set" in r.stderr, r.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    r = subprocess.run([sys.executable, "-m", "semg.backup", "auto"], env={**env, "SEMG_BACKUP_DIR": str(a_file / "x")},
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot be made" in r.stderr and "Traceback" not in r.stderr, r.stderr
    ok, line = backup.auto_status(settings.model_copy(update={"semg_backup_dir": a_file / "x"}))
    assert not ok and "cannot be read (Not a directory)" in line, line  # health says so instead of failing


def test_a_file_named_like_a_backup_but_without_a_time_is_not_ours_and_stops_nothing(settings, tmp_path):
    (tmp_path / "semg-backup-20241399T000000Z.tar").write_bytes(b"made by hand")  # month 13, day 99
    ours = tmp_path / "semg-backup-20240101T000000Z.tar"
    ours.write_bytes(b"")
    assert backup.auto_backups(tmp_path) == [(datetime(2024, 1, 1, tzinfo=UTC), ours)]
    ok, line = backup.auto_status(settings.model_copy(update={"semg_backup_dir": tmp_path}),
                                  now=datetime(2024, 1, 1, 1, tzinfo=UTC))
    assert ok and ours.name in line and "1 kept" in line, line


def test_only_exactly_the_automatic_backups_name_is_pruned(tmp_path):
    ours = tmp_path / "semg-backup-20240101T000000Z.tar"
    ours.write_bytes(b"")
    (tmp_path / "semg-backup-20240102T000000Z.tar\n").write_bytes(b"made by hand")  # `$` matches before a newline
    (tmp_path / "semg-backup-\u0662\u0660\u0662\u0664\u0660\u0661\u0660\u0663T000000Z.tar").write_bytes(b"by hand")
    assert backup.auto_backups(tmp_path) == [(datetime(2024, 1, 1, tzinfo=UTC), ours)]


@pytest.mark.parametrize("free_mb, started", [(8.5, False), (9.5, True)])
def test_the_free_space_needed_is_the_last_backups_size_and_the_reserve(settings, tmp_path, monkeypatch, caplog,
                                                                        free_mb, started):
    """create() streams the database dump into the backup (never a file of its own beside it), so room for one more
    backup of the last one's size above SEMG_MIN_FREE_DISK_MB is enough; less is not filled."""
    import logging

    last = tmp_path / "semg-backup-20240101T000000Z.tar"
    with open(last, "wb") as f:
        f.truncate(8 * backup.diskspace.MB)
    s = settings.model_copy(update={"semg_backup_dir": tmp_path, "semg_min_free_disk_mb": 1})
    usage = shutil.disk_usage(tmp_path)._replace(free=int(free_mb * backup.diskspace.MB))
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage)
    monkeypatch.setattr(backup, "_wait_for_schema", lambda *_: None)
    made = []

    def create(out, _s, full_speed=None):
        made.append(out)
        raise backup.BackupError("not here")

    monkeypatch.setattr(backup, "create", create)

    class OneRound(threading.Event):
        def wait(self, timeout=None):
            self.set()
            return True

    with caplog.at_level(logging.INFO, logger="semg.backup"):
        backup.run_auto(s, OneRound())
    assert bool(made) == started, "a backup was started on a disk it can fill" if made else "room was refused"
    assert any("MB needed" in r.getMessage() for r in caplog.records) != started, \
        [r.getMessage() for r in caplog.records]


def test_a_backup_is_written_at_its_pace_and_the_same_with_none(source, settings, tmp_path, monkeypatch):
    """SEMG_BACKUP_MB_PER_S: the file goes out at that pace (a fake clock, moved on only by the pacing's sleeps, so
    the time slept is what the pace asks for); 0 sleeps never, nor a backup told to finish at full speed (the
    automatic one when the platform stops). The files hold the same."""
    clock = [0.0]

    def sleep(s):
        clock[0] += s

    monkeypatch.setattr(backup, "_clock", lambda: clock[0])
    monkeypatch.setattr(backup, "_sleep", sleep)
    rate_mb = 0.25
    paced = tmp_path / "paced.tar"
    m = backup.create(paced, settings.model_copy(update={"semg_backup_mb_per_s": rate_mb}))
    size = paced.stat().st_size
    assert size > 256 * 1024, "too small a backup to see its pace"
    # the tar's closing blocks are written at the end, the last write's pace is kept: within one write of it
    assert size / (rate_mb * 2**20) - 0.1 <= clock[0] <= size / (rate_mb * 2**20), (clock[0], size)
    clock[0] = 0.0
    fast = tmp_path / "fast.tar"
    assert backup.create(fast, settings.model_copy(update={"semg_backup_mb_per_s": 0}))["counts"] == m["counts"]
    assert clock[0] == 0.0
    stopping = threading.Event()
    stopping.set()
    backup.create(tmp_path / "stopping.tar", settings.model_copy(update={"semg_backup_mb_per_s": rate_mb}), stopping)
    assert clock[0] == 0.0
    with tarfile.open(paced) as a, tarfile.open(fast) as b:
        assert [(x.name, x.size) for x in a.getmembers()] == [(x.name, x.size) for x in b.getmembers()]
        assert a.extractfile(backup.DUMP).read()[:5] == b"PGDMP"  # pg_dump's custom format


def test_a_backup_named_in_the_future_holds_nothing_off(source, settings, tmp_path, caplog):
    """One made while the clock was ahead (then set back) must neither delay the next backups until that time nor
    be kept in their place."""

    directory = tmp_path / "auto"
    directory.mkdir()
    future = directory / "semg-backup-20991231T000000Z.tar"
    future.write_bytes(b"made while the clock was ahead")
    s = settings.model_copy(update={"semg_backup_dir": directory, "semg_backup_keep": 1})
    said = _run_auto_until(s, caplog, "backup written to")
    made = backup.auto_backups(directory, before=datetime.now(UTC))
    assert len(made) == 1 and backup.show(made[0][1])["counts"]["users"] == 1, said
    assert future.exists()  # not ours to judge: left as it is
    ok, line = backup.auto_status(s)
    assert ok and made[0][1].name in line, line


class _OneRound(threading.Event):
    """run_auto's stop event that ends it at its first wait (after one round)."""

    def wait(self, timeout=None):
        self.set()
        return True


def _wait_for(what: str, condition, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def test_what_an_interrupted_backup_left_is_removed_and_nothing_else(clean_db, settings, tmp_path, monkeypatch,
                                                                     caplog):
    """A backup killed part way (SIGKILL, power loss, supervisord's stop wait ending) leaves its temporary
    directory, possibly a partial multi-GB dump, beside the backups. The automatic backups remove such leftovers,
    never the temporary directory of a backup still running (here a real `python -m semg.backup create` held up
    by a table lock), and nothing that is not exactly ours."""
    import logging

    directory = tmp_path / "auto"
    directory.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not ours")
    not_ours = [directory / ".semg-backup-mine", directory / ".semg-backup-abcdefgh.old",
                directory / "semg-backup-abcdefgh", directory / ".semg-backup-ABCDEFGH",
                directory / ".semg-copy-abcdefgh"]
    for d in not_ours:
        d.mkdir()
        (d / "keep.txt").write_text("not ours")
    a_file = directory / ".semg-backup-f1le0000"
    a_file.write_text("a file, not a directory")
    a_link = directory / ".semg-backup-l1nk0000"
    a_link.symlink_to(elsewhere, target_is_directory=True)
    known = {p.name for p in directory.iterdir()}

    def temp_dirs() -> set[str]:
        return {p.name for p in directory.iterdir() if p.name.startswith(".semg-backup-")} - known

    def waiting_on_the_lock() -> int:
        with clean_db.cursor() as cur:
            cur.execute("""SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'""",
                        (settings.postgres_db,))
            return cur.fetchone()[0]

    holder = db.connect(settings)  # every backup waits for it at its first count of the rows
    procs = []
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        for name in ("live", "killed"):
            had = temp_dirs()
            cmd = [sys.executable, "-m", "semg.backup", "create", str(directory / f"{name}.tar")]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "LOG_LEVEL": "ERROR"},
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            _wait_for(f"the {name} backup waits with its temporary directory",
                      lambda: len(temp_dirs() - had) == 1 and waiting_on_the_lock() >= len(procs))
            procs[-1].temp = (temp_dirs() - had).pop()
        live, killed = procs
        killed.kill()
        # and one left by a version before the lock file (made now: each `create` above removed such leftovers)
        before_locks = directory / ".semg-backup-0ld_v3r5"
        before_locks.mkdir()
        (before_locks / backup.DUMP).write_bytes(os.urandom(1 << 20))
        killed.wait(timeout=30)
        assert (directory / killed.temp).is_dir()

        monkeypatch.setattr(backup, "create", lambda out, _s, **_: (_ for _ in ()).throw(backup.BackupError("not now")))
        measured, disk_usage = [], shutil.disk_usage  # the free space needed is measured with the room given back
        monkeypatch.setattr(shutil, "disk_usage", lambda p: (measured.append(before_locks.exists()), disk_usage(p))[1])
        s = settings.model_copy(update={"semg_backup_dir": directory, "semg_min_free_disk_mb": 0})
        with caplog.at_level(logging.INFO, logger="semg.backup"):
            backup.run_auto(s, _OneRound())
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "removed" in r.getMessage()]

        assert not (directory / killed.temp).exists() and not before_locks.exists(), sorted(os.listdir(directory))
        assert (directory / live.temp).is_dir() and live.poll() is None  # still at work
        assert all((d / "keep.txt").read_text() == "not ours" for d in not_ours)
        assert a_file.read_text() == "a file, not a directory"
        assert a_link.is_symlink() and (elsewhere / "keep.txt").exists()
        assert measured == [False]
        assert len(said) == 1 and killed.temp in said[0] and before_locks.name in said[0] and "MB" in said[0], said
    finally:
        holder.rollback()
        holder.close()
        for p in procs:
            if p.poll() is None and p is not procs[0]:
                p.kill()
    out, err = live.communicate(timeout=120)
    assert live.returncode == 0, err  # the live backup was not disturbed
    assert backup.show(directory / "live.tar")["counts"]["users"] == 0
    assert temp_dirs() == set() and {p.name for p in directory.iterdir()} == known | {"live.tar"}


def test_a_backup_and_a_restore_remove_what_stopped_ones_left_but_not_what_running_ones_use(clean_db, target,
                                                                                           settings, tmp_path):
    """`create` in the directory it writes to, `restore` in the state directory: leftovers (with a lock file no
    one holds, or half removed when the removing was stopped) go; one whose lock is held stays."""
    import fcntl

    def leftover(path: Path, locked: bool = False) -> Path:
        path.mkdir()
        (path / backup.DUMP).write_bytes(b"part of a dump")
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT)  # backup.LOCK
        if locked:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.append(fd)
        else:
            os.close(fd)
        return path

    held: list[int] = []
    try:
        stale = [leftover(tmp_path / ".semg-backup-abcdefgh"), leftover(tmp_path / ".semg-backup-12345678.removing")]
        running = leftover(tmp_path / ".semg-backup-runn1ng_", locked=True)
        out = tmp_path / "semg.tar"
        backup.create(out, settings)
        assert not any(p.exists() for p in stale) and (running / backup.DUMP).exists()

        target.state_dir.mkdir(parents=True, exist_ok=True)
        stale = leftover(target.state_dir / ".semg-restore-abcdefgh")
        running = leftover(target.state_dir / ".semg-restore-runn1ng_", locked=True)
        backup.restore(out, target)
        assert not stale.exists() and (running / backup.DUMP).exists()
        assert {p.name for p in target.state_dir.iterdir() if p.name.startswith(".semg-")} == {running.name}
    finally:
        for fd in held:
            os.close(fd)


def test_a_restore_stopped_after_its_commit_is_finished_by_running_it_again(source, target, settings, tmp_path):
    """A restore killed (or the power gone) after its rows committed, while it put the videos in place, left them
    as *.restoring: the rows said the session has a video, the file was not there, and running the restore again
    was refused (the database holds rows) with no word about them. Running it again now puts them in place."""
    out = tmp_path / "semg.tar"
    backup.create(out, settings)
    backup.restore(out, target)
    video = target.video_dir / source["video"]
    content = video.read_bytes()
    video.rename(video.with_name(video.name + ".restoring"))  # where the stop left it

    r = backup.restore(out, target)
    assert r["videos_put_in_place"] == 1 and r["restored"]["users"] >= 1
    assert video.read_bytes() == content and not list(target.video_dir.rglob("*.restoring"))
    # stopped between the link and the removal of the spare name: that name goes
    os.link(video, video.with_name(video.name + ".restoring"))
    assert backup.restore(out, target)["videos_put_in_place"] == 1
    assert video.read_bytes() == content and not list(target.video_dir.rglob("*.restoring"))
    # once all is in place, running it again is refused as before
    with pytest.raises(backup.BackupError, match="holds nothing yet"):
        backup.restore(out, target)


def test_finishing_a_stopped_restore_places_only_the_backups_own_files(source, target, settings, tmp_path):
    """Running a restore again puts a video left as *.restoring in place. It took any file of the backup's size
    there: a symbolic link to a file elsewhere (outside the video directory) was followed and that file linked in
    under the video's name, and a file of the same size with other content was put in place as the video."""
    out = tmp_path / "semg.tar"
    backup.create(out, settings)
    backup.restore(out, target)
    video = target.video_dir / source["video"]
    content = video.read_bytes()
    video.unlink()
    left = video.with_name(video.name + ".restoring")
    elsewhere = tmp_path / "not-a-video"
    elsewhere.write_bytes(b"x" * len(content))
    left.symlink_to(elsewhere)
    with pytest.raises(backup.BackupError, match="holds nothing yet"):
        backup.restore(out, target)
    assert not os.path.lexists(video) and elsewhere.stat().st_nlink == 1
    left.unlink()
    left.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))  # the size of the backup's, not its content
    with pytest.raises(backup.BackupError, match="holds nothing yet"):
        backup.restore(out, target)
    assert not os.path.lexists(video)
    left.write_bytes(content)
    assert backup.restore(out, target)["videos_put_in_place"] == 1 and video.read_bytes() == content


def test_a_chosen_served_model_survives_a_backup_and_restore(source, target, settings, tmp_path):
    """users.served_artifact_id (migration 0010) points at model_artifacts, which points back at users: the
    data-only restore must still take the rows in, and the choice (and its time) must come back."""
    conn, uid = source["conn"], source["user"]
    first = repo.list_models(conn, uid)[0]["id"]
    second = ui_seed.seed_job(conn, uid, [source["session"]])  # a newer training: the first model is chosen back
    assert repo.latest_model(conn, uid)["job_id"] == second["id"]
    chosen = repo.choose_served_model(conn, uid, first)
    assert chosen["id"] == first and chosen["chosen_at"] is not None
    out = tmp_path / "semg.tar"
    backup.create(out, settings)

    backup.restore(out, target)
    with contextlib.closing(db.connect(target)) as new:
        served = repo.latest_model(new, uid)
        assert (served["id"], served["chosen_at"]) == (first, chosen["chosen_at"])
        assert repo.served_models(new) == repo.served_models(conn)
