"""The embedded PostgreSQL's data-directory lock (postmaster.pid), with the real bundled binaries: a lock
held by a live postmaster (on another port) is never removed; a lock left behind by a dead one, or whose PID
now belongs to an unrelated process (a container restart reuses PIDs), is."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest

from semg.embedded import free_port, port_in_use

REPO = Path(__file__).resolve().parents[2]


def _state_dir(tmp_path_factory, name: str) -> Path:
    d = tmp_path_factory.mktemp(name)
    for p in (d, *d.parents):  # embedded postgres runs unprivileged when we are root
        if str(p).startswith("/tmp/"):
            with contextlib.suppress(PermissionError):
                os.chmod(p, os.stat(p).st_mode | 0o011)
    return d


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return _state_dir(tmp_path_factory, "embedded-state")


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


def test_a_first_start_cut_short_during_initdb_starts_the_next_time(tmp_path_factory):
    """The power lost (or everything killed) while the very first start initialises the cluster: the next start
    initialises it again and PostgreSQL starts. It used to find a half-made data directory it then refused at
    every start ("could not find the database system"), until someone deleted it by hand."""
    state = _state_dir(tmp_path_factory, "initdb-cut")
    first = subprocess.Popen([sys.executable, "-m", "semg.embedded", "init-postgres"], env=_env(state, free_port()),
                             cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # initdb writes PG_VERSION first and the control file near its end: cut in between
        while not any(state.rglob("PG_VERSION")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert first.poll() is None, "initdb finished before the cut could be made"
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # initdb and its postgres --boot with it
        first.wait()
    assert not (state / "pgdata" / "global" / "pg_control").exists()
    _stop(_start(state, free_port()))  # started, and a password login answered
    assert not list(state.glob(".initdb-*")), "the generated password was left in a scratch directory"
    assert not (state / ".pgdata.initdb").exists()


@contextlib.contextmanager
def _embedded_services(tmp_path_factory, monkeypatch, name: str, listen_host: str, **settings: str):
    """The embedded PostgreSQL and NATS as supervisord starts them, with `settings` (env vars) set here too; yields
    (Settings, pg_port, nats_port) once both listen on `listen_host`; stops them after."""
    from semg.config import get_settings

    state = _state_dir(tmp_path_factory, name)
    pg_port, nats_port = free_port(), free_port()
    env = {**_env(state, pg_port), "NATS_PORT": str(nats_port), **settings}
    env.pop("NATS_SERVER", None)
    procs = {what: subprocess.Popen([sys.executable, "-m", "semg.embedded", what], env=env, cwd=REPO,
                                    stdout=open(state / f"{what}.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
             for what in ("postgres", "nats")}
    try:
        for key in ("SEMG_STATE_DIR", "POSTGRES_PORT", "NATS_PORT", *settings):
            monkeypatch.setenv(key, env[key])
        for key in {"POSTGRES_HOST", "NATS_SERVER", "SEMG_BIND_HOST", "SEMG_INTERNAL_BIND_HOST"} - set(settings):
            monkeypatch.delenv(key, raising=False)
        get_settings.cache_clear()
        deadline = time.monotonic() + 120
        while not (port_in_use(pg_port, listen_host) and port_in_use(nats_port, listen_host)):
            for what, p in procs.items():
                assert p.poll() is None, (state / f"{what}.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the embedded services did not start"
            time.sleep(0.2)
        yield get_settings(), pg_port, nats_port
    finally:
        for p in procs.values():
            _stop(p)
        monkeypatch.undo()
        get_settings.cache_clear()


def _reached(s) -> str:
    """Connect to the database and to NATS as the services do; the address the database saw us come to."""
    import asyncio

    from semg import db, natsio
    db.wait_until_ready(s, timeout=60)
    with contextlib.closing(db.connect(s, dbname="postgres")) as conn, conn.cursor() as cur:
        cur.execute("SELECT inet_server_addr()::text")
        server_addr = cur.fetchone()[0].split("/")[0]

    async def ping() -> None:
        nc = await natsio.connect("admin", s, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)
        try:
            await nc.flush(timeout=5)
        finally:
            await nc.close()

    asyncio.run(ping())
    return server_addr


def test_services_bound_to_one_address_are_reached_there(tmp_path_factory, monkeypatch):
    """SEMG_BIND_HOST and SEMG_INTERNAL_BIND_HOST set to one address each (LAN IPs; here the loopback aliases
    127.0.0.2 and .3): the embedded PostgreSQL and NATS listen only on the internal one, and every client goes
    where its service listens (database and NATS there, API and UDP metrics URLs on the other), not to 127.0.0.1
    where nothing listens."""
    public, host = "127.0.0.2", "127.0.0.3"
    with _embedded_services(tmp_path_factory, monkeypatch, "bound-state", host, SEMG_BIND_HOST=public,
                            SEMG_INTERNAL_BIND_HOST=host) as (s, pg_port, nats_port):
        assert s.postgres_address == host and s.nats_url == f"nats://{host}:{nats_port}"
        assert s.api_url.startswith(f"http://{public}:") and s.udp_metrics_url.startswith(f"http://{public}:")
        for elsewhere in ("127.0.0.1", public):
            assert not port_in_use(pg_port, elsewhere) and not port_in_use(nats_port, elsewhere), elsewhere
        assert _reached(s) == host


def test_database_and_nats_on_every_ipv6_interface_are_reached(tmp_path_factory, monkeypatch):
    """SEMG_INTERNAL_BIND_HOST=:: (workers on other machines of an IPv6 lab network): PostgreSQL listens on '::'
    for IPv6 only (it sets IPV6_V6ONLY), but every client connected to 127.0.0.1, so no service reached the
    database. Clients now go to ::1, which both PostgreSQL and NATS on '::' answer."""
    with _embedded_services(tmp_path_factory, monkeypatch, "ipv6-state", "::1",
                            SEMG_INTERNAL_BIND_HOST="::") as (s, _pg_port, _nats_port):
        assert _reached(s) == "::1"


@pytest.mark.parametrize("bind", ["0.0.0.0", "192.0.2.7"])  # noqa: S104 - what a maker sets for an ESP32
def test_opening_the_services_to_the_network_keeps_the_database_and_nats_on_loopback(bind, tmp_path, monkeypatch):
    """SEMG_BIND_HOST=0.0.0.0 (the README's first step for an ESP32 on Wi-Fi) also put the embedded PostgreSQL
    and NATS on every interface, with pg_hba open to any address: the database and the message bus exposed to the
    network for the sake of a UDP port. They stay on 127.0.0.1 unless SEMG_INTERNAL_BIND_HOST says otherwise."""
    from semg.config import Settings
    from semg.embedded import _write_hba, postgres_command, write_nats_config

    for key in ("SEMG_INTERNAL_BIND_HOST", "POSTGRES_HOST", "NATS_SERVER"):
        monkeypatch.delenv(key, raising=False)
    s = Settings(semg_state_dir=tmp_path, semg_bind_host=bind)
    (tmp_path / "pgdata").mkdir()
    _write_hba(s)
    assert "listen_addresses=127.0.0.1" in postgres_command(s)
    assert json.loads(write_nats_config(s).read_text())["host"] == "127.0.0.1"
    assert "0.0.0.0/0" not in (tmp_path / "pgdata" / "pg_hba.conf").read_text()
    assert s.postgres_address == "127.0.0.1" and s.nats_url.startswith("nats://127.0.0.1:")

    s = Settings(semg_state_dir=tmp_path, semg_bind_host=bind, semg_internal_bind_host="0.0.0.0")  # noqa: S104
    _write_hba(s)
    assert "listen_addresses=0.0.0.0" in postgres_command(s)
    assert json.loads(write_nats_config(s).read_text())["host"] == "0.0.0.0"
    assert "host  all all 0.0.0.0/0 scram-sha-256" in (tmp_path / "pgdata" / "pg_hba.conf").read_text()
    assert s.postgres_address == "127.0.0.1"


def _preflight(state: Path, host: str, udp_host: str = "", **ports: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    env.update({"SEMG_STATE_DIR": str(state), "SEMG_BIND_HOST": host, "SEMG_UDP_BIND_HOST": udp_host})
    for var in ("POSTGRES_PORT", "NATS_PORT", "API_PORT", "UI_PORT", "UDP_PORT", "UDP_METRICS_PORT"):
        env[var] = str(ports.get(var) or free_port(udp=var == "UDP_PORT"))
    return subprocess.run([sys.executable, "-m", "semg.embedded", "preflight"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize("host", ["192.0.2.1", "no-such-host.invalid"])
def test_a_bind_host_this_machine_does_not_have_is_named_not_reported_as_busy_ports(tmp_path, host):
    """A typo in SEMG_BIND_HOST, or a LAN address the machine no longer has: one line about SEMG_BIND_HOST,
    not six 'port already in use' that send the user hunting for processes that do not exist."""
    r = _preflight(tmp_path, host)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"SEMG_BIND_HOST={host} cannot be listened on"), r.stderr
    assert "in use" not in r.stderr and "Traceback" not in r.stderr


def test_the_udp_port_is_checked_where_semg_udp_bind_host_says(tmp_path):
    """The UDP port alone may listen elsewhere (SEMG_UDP_BIND_HOST): an address this machine lacks is named under
    that variable, and a busy UDP port is found there, not on SEMG_BIND_HOST's interface."""
    r = _preflight(tmp_path, "127.0.0.1", udp_host="192.0.2.1")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("SEMG_UDP_BIND_HOST=192.0.2.1 cannot be listened on"), r.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.6", 0))
        port = busy.getsockname()[1]
        r = _preflight(tmp_path, "127.0.0.1", udp_host="127.0.0.6", UDP_PORT=port)
        assert r.stderr.strip() == f"UDP_PORT {port} is already in use on 127.0.0.6", r.stderr
        assert _preflight(tmp_path, "127.0.0.7", udp_host="127.0.0.8", UDP_PORT=port).returncode == 0


def test_an_ipv6_bind_host_is_checked_with_ipv6_sockets(tmp_path):
    """The services listen on an IPv6 SEMG_BIND_HOST (the UDP server picks AF_INET6 for it): preflight checks it
    the same way, passing free ports and naming a busy one."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    r = _preflight(tmp_path, "::1")
    assert r.returncode == 0, r.stderr
    with socket.socket(socket.AF_INET6) as busy:
        busy.bind(("::1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _preflight(tmp_path, "::1", API_PORT=port)
    assert r.returncode == 2
    assert r.stderr.strip() == f"API_PORT {port} is already in use on ::1", r.stderr


def test_free_ports_are_below_the_ephemeral_range_and_free():
    """A port from the ephemeral range (binding port 0) may be given to any client connection as its source port
    before the server meant for it binds it: CI's udpserver once found its metrics port 60401 in use."""
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if not ranges.exists():
        pytest.skip("no Linux ephemeral port range to check against")
    low = int(ranges.read_text().split()[0])
    for udp in (False, True):
        ports = {free_port(udp) for _ in range(20)}
        assert all(1024 <= p < low for p in ports), (udp, sorted(ports), low)
        assert len(ports) > 1  # drawn, not one fixed port every caller would share
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
        for p in ports:
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", p))
