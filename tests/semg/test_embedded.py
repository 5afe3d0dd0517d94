"""The embedded PostgreSQL's data-directory lock (postmaster.pid), with the real bundled binaries: a lock
held by a live postmaster (on another port) is never removed; a lock left behind by a dead one, or whose PID
now belongs to an unrelated process (a container restart reuses PIDs), is."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest

from semg.embedded import free_port, port_in_use

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("embedded-state")
    for p in (d, *d.parents):  # embedded postgres runs unprivileged when we are root
        if str(p).startswith("/tmp/"):
            with contextlib.suppress(PermissionError):
                os.chmod(p, os.stat(p).st_mode | 0o011)
    return d


def _env(state: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("POSTGRES_HOST", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "SEMG_BIND_HOST")}
    return {**env, "SEMG_STATE_DIR": str(state), "POSTGRES_PORT": str(port)}


def _start(state: Path, port: int) -> subprocess.Popen:
    log = open(state / f"postgres-{port}.log", "ab")  # noqa: SIM115 - the child keeps it
    p = subprocess.Popen([sys.executable, "-m", "semg.embedded", "postgres"], env=_env(state, port),
                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert p.poll() is None, (state / f"postgres-{port}.log").read_text()[-2000:]
        if port_in_use(port):
            with contextlib.suppress(psycopg2.OperationalError):
                _connect(state, port).close()
                return p
        time.sleep(0.2)
    p.kill()
    raise AssertionError("embedded postgres did not start")


def _connect(state: Path, port: int):
    return psycopg2.connect(host="127.0.0.1", port=port, dbname="postgres", user="semg", connect_timeout=10,
                            password=(state / "secrets" / "postgres_password").read_text().strip())


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _run_second(state: Path, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semg.embedded", "postgres"], env=_env(state, port),
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_lock_of_a_postmaster_running_on_another_port_is_kept(state):
    first_port, second_port = free_port(), free_port()
    first = _start(state, first_port)
    try:
        lock = state / "pgdata" / "postmaster.pid"
        before = lock.read_text()
        r = _run_second(state, second_port)  # POSTGRES_PORT changed while the old server still runs
        assert r.returncode == 2, r.stderr
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"PID {first.pid}" in err and f"port {first_port}" in err, err
        assert lock.exists() and lock.read_text() == before, "the running postmaster's lock file was removed"
        assert not port_in_use(second_port)
        with _connect(state, first_port) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        _stop(first)


@pytest.mark.parametrize("owner", ["dead", "unrelated"])
def test_stale_lock_is_removed_and_postgres_starts(state, owner):
    """Left by a killed postmaster: its PID is gone, or (container restart) now belongs to another process."""
    port = free_port()
    first = _start(state, port)
    lock = state / "pgdata" / "postmaster.pid"
    content = lock.read_text()
    _stop(first)
    assert not lock.exists()
    other = subprocess.Popen(["sleep", "600"])
    try:
        if owner == "dead":
            other.kill()
            other.wait()
        lines = content.splitlines()
        lock.write_text("\n".join([str(other.pid), *lines[1:]]) + "\n")
        if os.geteuid() == 0:
            st = (state / "pgdata").stat()
            os.chown(lock, st.st_uid, st.st_gid)
        second = _start(state, free_port())
        try:
            assert lock.read_text().splitlines()[0] == str(second.pid)
        finally:
            _stop(second)
    finally:
        other.kill()
        other.wait()
