"""Rotating each generated secret as README.md says (`python -m semg.secrets rotate WHAT`): the new one works,
the old one stops working, the files stay private."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

from semg import db, secrets
from semg.embedded import nats_config_path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _restore_secrets(services, settings):
    """Put every secret back afterwards: the rest of the suite shares this database and NATS."""
    d = settings.secrets_dir
    names = ("postgres_password", "nats_users.json", "service_api_key", "ui_password")
    secrets.service_api_key(settings)
    secrets.ui_password(settings)
    saved = {n: (d / n).read_text() for n in names}
    yield
    from psycopg2 import sql
    with contextlib.closing(db.connect(settings)) as conn, conn, conn.cursor() as cur:
        cur.execute(sql.SQL("ALTER ROLE {} PASSWORD %s").format(sql.Identifier(settings.postgres_user)),
                    (saved["postgres_password"].strip(),))
    for n, text in saved.items():
        secrets._write_private(d / n, text)
    from semg.embedded import write_nats_config
    write_nats_config(settings)
    services.stop("nats")
    services.start("nats")


def rotate(what: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semg.secrets", "rotate", what], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


def _private(p: Path) -> None:
    assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_rotate_the_database_password(settings):
    old = secrets.postgres_password(settings)
    r = rotate("postgres")
    assert r.returncode == 0, r.stderr
    new = secrets.postgres_password(settings)
    assert new != old and len(new) >= 24
    _private(settings.secrets_dir / "postgres_password")
    assert not list(settings.secrets_dir.glob("postgres_password.*")), "a staged copy was left behind"
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=settings.postgres_port, dbname=settings.postgres_db,
                         user=settings.postgres_user, password=old, connect_timeout=5)
    with contextlib.closing(db.connect(settings)) as conn, conn.cursor() as cur:  # services read the file
        cur.execute("SELECT 1")


def test_a_rotation_interrupted_after_the_server_took_the_password_locks_nobody_out(settings):
    """The crash window of `rotate postgres`: the server has the staged password, the file still the old one."""
    from psycopg2 import sql
    staged = settings.secrets_dir / "postgres_password.new"
    new = "interrupted-" + secrets._secrets.token_urlsafe(12)
    secrets._write_private(staged, new)
    with contextlib.closing(db.connect(settings)) as conn, conn, conn.cursor() as cur:
        cur.execute(sql.SQL("ALTER ROLE {} PASSWORD %s").format(sql.Identifier(settings.postgres_user)), (new,))
    # ... and the process died here. Every service's next connection still gets in, and completes the rotation:
    with contextlib.closing(db.connect(settings)) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    assert secrets.postgres_password(settings) == new and not staged.exists()
    # a later rotation starts from a consistent state
    r = rotate("postgres")
    assert r.returncode == 0, r.stderr
    with contextlib.closing(db.connect(settings)) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")


def test_the_ui_keeps_connecting_after_a_database_password_rotation(settings, page):
    import data
    kw = {**db.connect_kwargs(settings), "connect_timeout": 5}
    pool = data._FreshPasswordPool(0, 2, **kw)  # as the UI's cached pool: created before the rotation
    try:
        assert rotate("postgres").returncode == 0
        conn = pool.getconn()  # a new connection after the rotation
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        pool.putconn(conn)
    finally:
        pool.closeall()
    at = page("Main.py")
    at.run()
    assert not at.exception


def test_rotation_refuses_secrets_set_in_the_environment(settings):
    for what, var in [("postgres", "POSTGRES_PASSWORD"), ("service-key", "SEMG_SERVICE_KEY"),
                      ("ui-password", "SEMG_UI_PASSWORD")]:
        r = rotate(what, **{var: "x" * 24})
        assert r.returncode == 2 and var in r.stderr and "Traceback" not in r.stderr, (what, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
        # the message itself, not its repr in quotes
        assert r.stderr.startswith(f"semg.secrets rotate {what}: {var} is set: "), r.stderr


def test_rotation_with_the_database_down_is_one_plain_line(settings):
    from semg.embedded import free_port
    r = rotate("postgres", POSTGRES_PORT=str(free_port()))  # nothing listens there
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("semg.secrets rotate postgres: connection to server at "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_rotate_nats_passwords(services, settings):
    import asyncio

    import nats

    old = {s: secrets.nats_credentials(s, settings) for s in secrets.NATS_SERVICES}
    r = rotate("nats")
    assert r.returncode == 0 and "restart" in r.stdout, r.stderr
    new = {s: secrets.nats_credentials(s, settings) for s in secrets.NATS_SERVICES}
    assert all(new[s][1] != old[s][1] for s in old)
    _private(settings.secrets_dir / "nats_users.json")
    _private(nats_config_path(settings))
    assert old["ingest"][1] not in nats_config_path(settings).read_text()
    services.stop("nats")  # what ./stop_all.sh && ./start_all.sh does to it
    services.start("nats")

    async def attempt(user: str, password: str) -> bool:
        try:
            nc = await nats.connect(settings.nats_url, user=user, password=password, allow_reconnect=False,
                                    max_reconnect_attempts=0, connect_timeout=3)
        except Exception:  # noqa: BLE001 - refused
            return False
        await nc.close()
        return True

    assert asyncio.run(attempt(*old["ingest"])) is False
    assert asyncio.run(attempt(*new["ingest"])) is True


def test_rotated_service_key_is_revoked_at_the_next_api_start(clean_db, settings):
    from fastapi.testclient import TestClient

    from ml_model.api import app
    old = {"X-API-Key": secrets.service_api_key(settings)}
    with TestClient(app) as api:
        assert api.get("/users", headers=old).status_code == 200
    r = rotate("service-key")
    assert r.returncode == 0, r.stderr
    new = {"X-API-Key": secrets.service_api_key(settings)}
    assert new != old
    _private(settings.secrets_dir / "service_api_key")
    with TestClient(app) as api:  # the restarted API
        assert api.get("/users", headers=new).status_code == 200
        assert api.get("/users", headers=old).status_code == 401


def test_rotate_the_ui_password(settings, page):
    old = secrets.ui_password(settings)
    r = rotate("ui-password")
    assert r.returncode == 0, r.stderr
    # what it says to do agrees with README.md: no restart, remembered sign-ins end at their next click
    assert "signed out at its next click" in r.stdout and "stop_all" not in r.stdout, r.stdout
    new = secrets.ui_password(settings)
    assert new != old
    _private(settings.secrets_dir / "ui_password")
    for password, ok in [(old, False), (new, True)]:
        at = page("Main.py", login=False)
        at.run()
        at.text_input(key="semg_login_password").input(password)
        next(b for b in at.button if b.label == "Sign in").click()
        at.run()
        signed_in = "semg_authenticated" in at.session_state and bool(at.session_state["semg_authenticated"])
        assert signed_in is ok, "the new password signs in, the old one no longer does"
