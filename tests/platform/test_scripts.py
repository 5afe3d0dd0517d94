"""The two-command experience, end to end: start_all.sh / stop_all.sh on a temporary state dir and free
ports; the Docker entrypoint run outside Docker; wrong settings refused with one line, nothing started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest

from semg.embedded import free_port
from semg.procs import ours

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _env(state: Path, **extra) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if k in ("PATH", "HOME", "LANG", "LC_ALL", "SEMG_VENV", "TMPDIR")}
    env = {
        **keep,
        "SEMG_STATE_DIR": str(state),
        "POSTGRES_PORT": str(free_port()), "NATS_PORT": str(free_port()), "API_PORT": str(free_port()),
        "UI_PORT": str(free_port()), "UDP_PORT": str(free_port(udp=True)), "UDP_METRICS_PORT": str(free_port()),
        "SEMG_START_TIMEOUT": "240",
    }
    env.update(extra)
    return env


@pytest.fixture
def state(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    for p in (tmp_path, *tmp_path.parents):  # embedded postgres runs unprivileged when we are root
        if str(p).startswith("/tmp/"):
            with contextlib.suppress(PermissionError):
                os.chmod(p, os.stat(p).st_mode | 0o011)
    yield d
    if ours(str(d)):  # never leave a half-stopped instance behind a failing test
        subprocess.run([str(REPO / "stop_all.sh")], env=_env(d), capture_output=True, timeout=180)


def _run(cmd: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / cmd)], env=env, capture_output=True, text=True, timeout=timeout, cwd="/")


def _health(env: dict) -> dict:
    r = subprocess.run([sys.executable, "-m", "semg.health", "--json"], env=env, capture_output=True, text=True,
                       timeout=60)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _connect(env: dict, state: Path):
    return psycopg2.connect(host="127.0.0.1", port=int(env["POSTGRES_PORT"]), dbname="sensordb", user="semg",
                            password=(state / "secrets" / "postgres_password").read_text().strip())


def test_start_stop_start_keeps_data_and_leaves_nothing(state):
    backups = state.parent / "backups"  # automatic backups on (semg.backup auto under supervisord)
    env = _env(state, SEMG_BACKUP_DIR=str(backups))
    t0 = time.monotonic()
    r = _run("start_all.sh", env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first_start = time.monotonic() - t0
    assert f"http://127.0.0.1:{env['UI_PORT']}" in r.stdout
    deadline = time.monotonic() + 60  # the first automatic backup is made at once
    while not list(backups.glob("semg-backup-*.tar")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(list(backups.glob("semg-backup-*.tar"))) == 1, (state / "logs" / "backup.log").read_text()[-2000:]
    health = _health(env)
    assert health and all(v["ok"] for v in health.values()), health
    assert {"postgres", "nats", "api", "udpserver", "ui", "inference", "trainer", "backup", "disk",
            "backups"} <= set(health)

    # re-running while up is harmless and quick
    t1 = time.monotonic()
    r = _run("start_all.sh", env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert time.monotonic() - t1 < 30

    # ... but not with other settings, which the running services do not have: it says so at once (it used to
    # wait SEMG_START_TIMEOUT for a UI on the new port and blame the services) and leaves them running
    t1 = time.monotonic()
    r = _run("start_all.sh", {**env, "UI_PORT": str(free_port()), "LOG_LEVEL": "info"})
    assert r.returncode == 1 and "UI_PORT;" in r.stderr and "./stop_all.sh" in r.stderr, r.stderr[-2000:]
    assert "LOG_LEVEL" not in r.stderr  # the default, as it runs
    assert time.monotonic() - t1 < 30
    assert all(v["ok"] for v in _health(env).values())

    # ... and when a service does not answer, it reports that and leaves the running install running
    (api_pid,) = [p for p in ours(str(state)) if b"ml_model.api" in Path(f"/proc/{p}/cmdline").read_bytes()]
    supervisord_pid = int((state / "run" / "supervisord.pid").read_text())
    os.kill(api_pid, signal.SIGSTOP)
    try:
        r = _run("start_all.sh", {**env, "SEMG_START_TIMEOUT": "3"})
    finally:
        os.kill(api_pid, signal.SIGCONT)
    assert r.returncode == 1 and "left running" in r.stderr, r.stderr[-2000:]
    os.kill(supervisord_pid, 0)  # still there

    # a user's own shell that carries SEMG_STATE_DIR (they exported it) is not the platform's to stop
    users_shell = subprocess.Popen(["sleep", "300"], env={**env, "SEMG_STATE_DIR": str(state)})

    with contextlib.closing(_connect(env, state)) as conn, conn, conn.cursor() as cur:
        cur.execute("INSERT INTO users (name, email) VALUES ('Persist', 'persist@example.org')")

    r = _run("stop_all.sh", env, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ours(str(state)) == [], "processes left after stop_all.sh"
    assert users_shell.poll() is None, "stop_all.sh killed a process that is not the platform's"
    users_shell.kill()
    users_shell.wait()
    for port in ("API_PORT", "UI_PORT", "POSTGRES_PORT", "NATS_PORT"):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", int(env[port]))) != 0, f"{port} still answers"

    t2 = time.monotonic()
    r = _run("start_all.sh", env)
    assert r.returncode == 0, r.stderr[-2000:]
    second_start = time.monotonic() - t2
    with contextlib.closing(_connect(env, state)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM users WHERE email = 'persist@example.org'")
        assert cur.fetchone()[0] == 1
    assert len(list(backups.glob("semg-backup-*.tar"))) == 1  # the last one is not a day old: none made now
    r = _run("stop_all.sh", env, timeout=240)
    assert r.returncode == 0 and ours(str(state)) == []
    print(json.dumps({"first_start_s": round(first_start, 1), "second_start_s": round(second_start, 1)}))


def test_services_left_by_a_killed_supervisord_are_named_and_stop_all_ends_them(state):
    """supervisord killed (OOM killer, kill -9) while its services run on: start_all.sh says so and what to do,
    instead of six 'port already in use' lines about the platform's own processes."""
    env = _env(state)
    r = _run("start_all.sh", env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    supervisord_pid = int((state / "run" / "supervisord.pid").read_text())
    os.kill(supervisord_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while supervisord_pid in ours(str(state)) and time.monotonic() < deadline:
        time.sleep(0.2)
    services = ours(str(state))
    assert services
    r = _run("start_all.sh", env)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and "without their supervisor" in errors[0] and "./stop_all.sh" in errors[0], r.stderr
    assert str(services[0]) in errors[0] and "in use" not in r.stderr
    r = _run("stop_all.sh", env, timeout=240)
    assert r.returncode == 0 and ours(str(state)) == [], r.stderr[-2000:]


def test_port_in_use_is_refused_with_one_line_and_nothing_starts(state):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = _env(state, API_PORT=str(busy.getsockname()[1]))
        r = _run("start_all.sh", env, timeout=300)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert any("API_PORT" in ln and "in use" in ln for ln in errors), r.stderr
    assert "Traceback" not in r.stderr
    assert ours(str(state)) == []


def test_the_logs_are_private_to_the_platforms_account(state):
    """PostgreSQL logs a failed statement with its values (a user's name, email and notes when the email is taken)
    and supervisord writes every log 0644: the logs folder was 0755, so any account on the host could read them."""
    (state / "logs").mkdir()
    os.chmod(state / "logs", 0o755)  # as an earlier version left it
    r = subprocess.run(["bash", "-c", '. scripts/lib.sh && SEMG_PYTHON="$1" && semg_export_env', "-", sys.executable],
                       env=_env(state, SEMG_REPO=str(REPO)), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((state / "logs").stat().st_mode) == 0o700
    assert stat.S_IMODE(state.stat().st_mode) == 0o755  # the embedded PostgreSQL's account must still enter it


@pytest.mark.parametrize("var,value,needle", [
    ("UDP_PORT", "not-a-port", "UDP_PORT"),
    ("POSTGRES_HOST", "127.0.0.1", "POSTGRES_PASSWORD"),
    ("SEMG_TLS_CERT_FILE", "/etc/ssl/semg.pem", "SEMG_TLS_KEY_FILE"),
])
def test_invalid_setting_is_refused_with_one_line(state, var, value, needle):
    r = _run("start_all.sh", _env(state, **{var: value}), timeout=300)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
    assert ours(str(state)) == []


def test_unreachable_external_database_is_refused(state):
    dead = free_port()
    env = _env(state, POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=str(dead), POSTGRES_PASSWORD="x" * 16)
    r = _run("start_all.sh", env, timeout=300)
    assert r.returncode != 0
    assert "POSTGRES_HOST" in r.stderr and "unreachable" in r.stderr and "Traceback" not in r.stderr
    assert ours(str(state)) == []


def test_docker_entrypoint_runs_everything_in_foreground_and_stops_cleanly(state):
    env = _env(state, SEMG_VENV=str(Path(sys.executable).parent.parent), SEMG_BIND_HOST="127.0.0.1")
    proc = subprocess.Popen([str(REPO / "docker-entrypoint.sh"), "--create-db"], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # semg.health keeps checking (once a second) until every service is healthy, as start_all.sh waits;
        # meanwhile the entrypoint must stay up
        waiting = subprocess.Popen([sys.executable, "-m", "semg.health", "--wait", "240", "--json"],
                                   env={**env, "SEMG_SUPERVISOR_PASSWORD": ""}, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            while waiting.poll() is None:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        finally:
            if waiting.poll() is None:
                waiting.kill()
        out, err = waiting.communicate(timeout=60)
        health = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        assert health and all(v["ok"] for v in health.values()), (health, err[-2000:])
        with contextlib.closing(_connect(env, state)) as conn, conn.cursor() as cur:
            cur.execute("SELECT max(version) FROM schema_version")
            assert cur.fetchone()[0] >= 1
        # a ./start_all.sh run in the container (docker exec) finds the code it would start running, not "other code"
        pid = (state / "run" / "supervisord.pid").read_text().strip()
        r = subprocess.run([sys.executable, "-m", "semg.procs", "code-changed", pid], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
        proc.wait(timeout=120)
    deadline = time.monotonic() + 30
    while ours(str(state)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ours(str(state)) == []


def test_entrypoint_rejects_unknown_arguments(state):
    r = subprocess.run([str(REPO / "docker-entrypoint.sh"), "--bogus"], env=_env(state), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "--bogus" in r.stderr
