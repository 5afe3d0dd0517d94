"""Free disk space where the platform writes (semg.diskspace): measured on the real filesystems, warned about
below SEMG_MIN_FREE_DISK_MB by `python -m semg.health` (never failing its exit status) and the web UI."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from semg import diskspace, health
from semg.config import Settings, SettingsError, get_settings

MB = 1 << 20


def _settings(state, **env) -> Settings:
    return Settings(semg_state_dir=state, **env)


def test_the_state_directorys_disk_is_checked_against_the_setting(tmp_path):
    state = tmp_path / "not-made-yet" / "state"  # as before the first start: its nearest existing parent counts
    free_mb = shutil.disk_usage(tmp_path).free // MB
    ok, line = diskspace.check(_settings(state, semg_min_free_disk_mb=max(free_mb - 1024, 1)))
    assert ok, line
    assert f"at {state}" in line and "GB free of" in line, line

    ok, line = diskspace.check(_settings(state, semg_min_free_disk_mb=free_mb + 1024))
    assert not ok
    assert f"at {state}" in line and f"under SEMG_MIN_FREE_DISK_MB={free_mb + 1024}" in line, line
    assert "recordings stop being stored" in line, line

    ok, line = diskspace.check(_settings(state, semg_min_free_disk_mb=0))  # 0: never warn
    assert ok, line


def test_a_directory_mounted_elsewhere_is_checked_on_its_own(tmp_path):
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary directory")
    state = tmp_path / "state"
    state.mkdir()
    elsewhere = os.path.join(shm, f"semg-test-videos-{os.getpid()}")  # e.g. a volume of its own for the videos
    os.makedirs(elsewhere, exist_ok=True)
    try:
        (state / "videos").symlink_to(elsewhere)
        s = _settings(state)
        found = diskspace.disks(diskspace.writable_paths(s))
        assert len(found) == 2, found
        by_path = {d.paths[0]: d for d in found}
        assert s.video_dir in by_path and by_path[s.video_dir].total == shutil.disk_usage(elsewhere).total
        on_state = next(d for d in found if d.paths[0] == s.state_dir)
        assert s.pg_data_dir in on_state.paths and state / "spool" in on_state.paths  # each disk once

        # a threshold between the two disks' free space: only the smaller one is named
        small, big = sorted(found, key=lambda d: d.free)
        if big.free // MB - small.free // MB < 2:
            pytest.skip("both disks have the same free space")
        ok, line = diskspace.check(_settings(state, semg_min_free_disk_mb=small.free // MB + 1))
        assert not ok and line.count(" free of ") == 1 and f"at {small.paths[0]}:" in line, line
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_the_automatic_backups_directory_is_one_of_the_disks(tmp_path):
    s = _settings(tmp_path / "state", semg_backup_dir=tmp_path / "backups-not-made-yet")
    assert tmp_path / "backups-not-made-yet" in diskspace.writable_paths(s)
    assert tmp_path / "backups-not-made-yet" not in diskspace.writable_paths(_settings(tmp_path / "state"))


def test_the_setting_is_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("SEMG_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("SEMG_MIN_FREE_DISK_MB", "-1")
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError, match="SEMG_MIN_FREE_DISK_MB"):
            get_settings()
        monkeypatch.setenv("SEMG_MIN_FREE_DISK_MB", "")  # compose passing an unset variable: the default
        assert get_settings().semg_min_free_disk_mb == 2048
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_health_warns_of_a_low_disk_without_failing(settings, monkeypatch, capsys):
    """A full disk is not mended by waiting or restarting: start_all.sh must not fail on it, only say it."""
    services = {"postgres": health.check_postgres(settings), "nats": health.check_nats(settings)}
    assert all(ok for ok, _ in services.values()), services
    # only the session's PostgreSQL and NATS run here; the check of the others is what this test is not about
    monkeypatch.setattr(health, "check_all", lambda s: dict(services))
    monkeypatch.setenv("SEMG_MIN_FREE_DISK_MB", str(10**12))
    get_settings.cache_clear()
    try:
        assert health.main([]) == 0
        out = capsys.readouterr().out
        disk_line = next(line for line in out.splitlines() if " disk " in line)
        assert disk_line.strip().startswith("LOW") and "SEMG_MIN_FREE_DISK_MB" in disk_line, out
        assert health.main(["--json"]) == 0
        figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert figures["disk"]["ok"] is False and figures["postgres"]["ok"] is True, figures

        monkeypatch.setenv("SEMG_MIN_FREE_DISK_MB", "0")
        get_settings.cache_clear()
        assert health.main([]) == 0
        assert next(line for line in capsys.readouterr().out.splitlines() if " disk " in line).strip().startswith("ok")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_a_service_log_warns_when_low_again_every_ten_minutes_and_once_when_there_is_room(caplog):
    now = [0.0]
    log = logging.getLogger("semg.test.disk")
    watch = diskspace.LowSpaceLog(log, repeat_s=600, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger=log.name):
        watch.update(True, "50 GB free")  # room: nothing said
        for t in (5, 10, 300, 599, 605, 900, 1205):
            now[0] = t
            watch.update(False, "0.5 GB free of 50 GB at /state")
        now[0] = 1210
        watch.update(True, "3.0 GB free of 50 GB at /state")
        watch.update(True, "3.0 GB free of 50 GB at /state")
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [("WARNING", "low disk space: 0.5 GB free of 50 GB at /state")] * 3 + [
        ("INFO", "disk space is back above SEMG_MIN_FREE_DISK_MB: 3.0 GB free of 50 GB at /state")], said
