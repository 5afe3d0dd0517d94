"""Test harness: one real PostgreSQL and one real NATS per test session, on free ports in a temporary
state dir, never touching a developer's running instance. Every test sees them through the ordinary
settings (environment variables), exactly as the services do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MYO_DATA = Path(os.environ.get("SEMG_MYO_DATA", REPO.parent / "shared" / "data" / "myo-armband" / "pretraining"))

# Settings the suite must never inherit from a developer's shell.
_OWN_VARS = ["POSTGRES_HOST", "POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD", "NATS_SERVER", "NATS_USER",
             "NATS_PASSWORD", "SEMG_SERVICE_KEY", "SEMG_UI_PASSWORD", "SEMG_BIND_HOST", "SEMG_INTERNAL_BIND_HOST",
             "SEMG_UDP_BIND_HOST"]


def _free_port(udp: bool = False) -> int:
    from semg.embedded import free_port
    return free_port(udp)


@pytest.fixture(autouse=True)
def _main_module_as_it_was():
    """Streamlit's script runner (AppTest) installs its script as sys.modules["__main__"] and leaves it there: a
    later test in the same process that starts a multiprocessing "spawn" child (the fault tests' sensor fleet) had
    the child re-run that script ("NameError: name '__args' is not defined"), so nothing streamed."""
    main = sys.modules.get("__main__")
    yield
    if main is not None and sys.modules.get("__main__") is not main:
        sys.modules["__main__"] = main


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("semg-state")
    os.chmod(d, 0o755)
    # the embedded postgres runs unprivileged when we are root: it must be able to enter every parent
    for parent in d.parents:
        if str(parent).startswith(str(Path(d.anchor) / "tmp")) and parent != Path("/tmp"):
            with contextlib.suppress(PermissionError):
                os.chmod(parent, os.stat(parent).st_mode | 0o011)
    return d


@pytest.fixture(scope="session")
def test_env(state_dir) -> dict[str, str]:
    """The environment of the test session: temporary state dir and free ports for every service."""
    for var in _OWN_VARS:
        os.environ.pop(var, None)
    env = {
        "SEMG_STATE_DIR": str(state_dir),
        "POSTGRES_PORT": str(_free_port()),
        "NATS_PORT": str(_free_port()),
        "API_PORT": str(_free_port()),
        "UI_PORT": str(_free_port()),
        "UDP_PORT": str(_free_port(udp=True)),
        "UDP_METRICS_PORT": str(_free_port()),
        "POSTGRES_DB": "sensordb",
    }
    os.environ.update(env)
    from semg.config import get_settings
    get_settings.cache_clear()
    return env


class Services:
    """The session's PostgreSQL and NATS processes; tests may stop/start them for fault injection."""

    def __init__(self, env: dict[str, str]):
        self.env = {**os.environ, **env}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = Path(env["SEMG_STATE_DIR"]) / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str) -> None:
        log = open(self.logs / f"test-{name}.log", "ab")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "semg.embedded", name], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.wait_ready(name)

    def wait_ready(self, name: str, timeout: float = 60) -> None:
        from semg.embedded import port_in_use
        port = int(self.env["POSTGRES_PORT" if name == "postgres" else "NATS_PORT"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited: see {self.logs}/test-{name}.log")
            if port_in_use(port):
                if name == "postgres":
                    from semg import db
                    db.wait_until_ready(timeout=max(1, deadline - time.monotonic()))
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not start within {timeout}s")

    def stop(self, name: str, sig: int = signal.SIGINT) -> None:
        p = self.procs.pop(name, None)
        if p and p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@pytest.fixture(scope="session")
def services(test_env):
    svc = Services(test_env)
    svc.start("postgres")
    svc.start("nats")
    from semg import db
    db.init(wait=30)
    yield svc
    svc.stop_all()


@pytest.fixture(scope="session")
def settings(services):
    from semg.config import get_settings
    return get_settings()


@pytest.fixture
def db_conn(services):
    """A psycopg2 connection (autocommit) to the session's database."""
    from semg import db
    conn = db.connect()
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def clean_db(db_conn):
    """Empty every data table (keeps the schema) and the webcam videos, so a test starts from nothing: ids start
    again at 1, and a video left under videos/user1/ by an earlier test would belong to this test's user 1."""
    from semg.config import get_settings
    with db_conn.cursor() as cur:
        cur.execute("""SELECT string_agg(format('%I', tablename), ', ') FROM pg_tables
                       WHERE schemaname = 'public' AND tablename <> 'schema_version'""")
        tables = cur.fetchone()[0]
        cur.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    videos = get_settings().video_dir
    if videos.is_dir():
        for entry in videos.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return db_conn


@pytest.fixture
def nats_admin(services):
    """An async factory for an admin NATS connection: `nc = await nats_admin()`."""
    from semg import natsio
    clients = []

    async def factory(**kw):
        nc = await natsio.connect("admin", **kw)
        clients.append(nc)
        return nc

    yield factory
    for nc in clients:
        if not nc.is_closed:
            with contextlib.suppress(Exception):
                asyncio.get_event_loop().run_until_complete(nc.close())


def require_myo_data() -> Path:
    if not (MYO_DATA / "Female0").is_dir():
        pytest.skip(f"Myo-armband data set not found at {MYO_DATA} (set SEMG_MYO_DATA to its pretraining folder)")
    return MYO_DATA
