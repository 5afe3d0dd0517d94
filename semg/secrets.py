"""Secrets generated on first start and kept under $SEMG_STATE_DIR/secrets with mode 0600 (never in the repo)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets as _secrets
import tempfile
from pathlib import Path

from semg.config import Settings, get_settings

log = logging.getLogger("semg.secrets")

# Services that get their own NATS identity (and subject permissions) on the embedded server.
NATS_SERVICES = ("ingest", "inference", "api", "trainer", "ui", "admin")


def _private_temp(path: Path, text: str) -> Path:
    """A 0600 file with `text` next to `path`, under a name of its own (services start concurrently)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:  # mkstemp creates it 0600
        f.write(text)
    return Path(tmp)


def _write_private(path: Path, text: str) -> None:
    os.replace(_private_temp(path, text), path)  # atomic: a crash never leaves half a secret


def _create_private(path: Path, text: str) -> bool:
    """Create `path` with `text` unless it exists (then False): two first starts never keep different secrets."""
    tmp = _private_temp(path, text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def get_or_create(name: str, settings: Settings | None = None, nbytes: int = 24) -> str:
    """Read secret `name`, generating a random URL-safe one the first time."""
    s = settings or get_settings()
    path = s.secrets_dir / name
    for _ in range(3):
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            value = None
        if value:
            return value
        if value is not None:  # an empty file: never an empty password
            log.warning("secret file %s is empty; generating a new secret", path)
            path.unlink(missing_ok=True)
        value = _secrets.token_urlsafe(nbytes)
        if _create_private(path, value):
            return value
        # another service created it at the same moment: use theirs
    raise OSError(f"cannot create the secret file {path}")


def postgres_password(settings: Settings | None = None) -> str:
    s = settings or get_settings()
    if s.postgres_password is not None:
        return s.postgres_password.get_secret_value()
    return get_or_create("postgres_password", s)


def nats_credentials(service: str, settings: Settings | None = None) -> tuple[str | None, str | None]:
    """(user, password) for a service: the external ones from the settings, else its embedded identity."""
    s = settings or get_settings()
    if not s.embedded_nats:
        pw = s.nats_password.get_secret_value() if s.nats_password else None
        return s.nats_user, pw
    if service not in NATS_SERVICES:
        raise ValueError(f"unknown NATS service identity {service!r}")
    path = s.secrets_dir / "nats_users.json"
    users = json.loads(path.read_text()) if path.exists() else {}
    if any(name not in users for name in NATS_SERVICES):
        fresh = {**{name: _secrets.token_urlsafe(24) for name in NATS_SERVICES}, **users}
        if users:  # an older file without a newer identity: add it (start_all.sh does this before start)
            _write_private(path, json.dumps(fresh, indent=1))
        elif not _create_private(path, json.dumps(fresh, indent=1)):
            fresh = json.loads(path.read_text())  # created by another service at the same moment: use theirs
        users = fresh
    return service, users[service]


def ensure_all(settings: Settings | None = None) -> None:
    """Create every generated secret now (start_all.sh's preflight), before services race to create them."""
    s = settings or get_settings()
    if s.embedded_postgres:
        postgres_password(s)
    if s.embedded_nats:
        nats_credentials(NATS_SERVICES[0], s)
    service_api_key(s)
    ui_password(s)


def nats_inbox_prefix(service: str, settings: Settings | None = None) -> str:
    """Reply-inbox subject prefix of a service: its own on the embedded server (where its permissions allow
    only that one), NATS's usual ``_INBOX`` on an external server, whose permissions the operator sets."""
    s = settings or get_settings()
    if not s.embedded_nats:
        return "_INBOX"
    if service not in NATS_SERVICES:
        raise ValueError(f"unknown NATS service identity {service!r}")
    return f"_INBOX_{service}"


def service_api_key(settings: Settings | None = None) -> str:
    """The API key internal services (inference worker, UI) present to the REST API."""
    s = settings or get_settings()
    if s.semg_service_key is not None:
        return s.semg_service_key.get_secret_value()
    return get_or_create("service_api_key", s, nbytes=32)


def ui_password(settings: Settings | None = None) -> str:
    s = settings or get_settings()
    if s.semg_ui_password is not None:
        return s.semg_ui_password.get_secret_value()
    return get_or_create("ui_password", s, nbytes=12)


# ---- rotation (python -m semg.secrets rotate WHAT) --------------------------------------------------------------
def rotate_postgres(settings: Settings | None = None) -> None:
    """A new password for the embedded database's role: set on the running server, then kept in the file.

    Services read the file whenever they open a connection, so they keep working; open connections stay open.
    """
    from psycopg2 import sql

    from semg import db

    s = settings or get_settings()
    if s.postgres_password is not None:
        raise RuntimeError("POSTGRES_PASSWORD is set: change the password on the server and in the environment")
    path = s.secrets_dir / "postgres_password"
    staged = path.with_suffix(".new")
    # A staged password of an interrupted rotation may be the server's: connect() finds out (and promotes it)
    # before it is replaced, so it is never lost.
    with contextlib.closing(db.connect(s)):
        pass
    staged.unlink(missing_ok=True)  # the current file works: that one was never taken
    new = _secrets.token_urlsafe(24)
    _write_private(staged, new)  # on disk before the server knows it: a crash never locks us out
    committing = False
    try:
        with contextlib.closing(db.connect(s)) as conn:
            with conn.cursor() as cur:
                cur.execute("SET LOCAL password_encryption = 'scram-sha-256'")
                cur.execute(sql.SQL("ALTER ROLE {} PASSWORD %s").format(sql.Identifier(s.postgres_user)), (new,))
            committing = True
            conn.commit()
    except BaseException:
        # Before the commit the server surely kept the old password; from the commit on it may have taken the
        # new one, so the staged file stays (connect() falls back to it and promotes it).
        if not committing:
            staged.unlink(missing_ok=True)
        raise
    os.replace(staged, path)


def staged_postgres_password(settings: Settings | None = None) -> str | None:
    """The new password of a rotation that did not finish (see rotate_postgres), if any."""
    s = settings or get_settings()
    try:
        return (s.secrets_dir / "postgres_password.new").read_text().strip() or None
    except FileNotFoundError:
        return None


def promote_staged_postgres_password(settings: Settings | None = None) -> None:
    """The server took the staged password: it becomes the password (every service reads the file)."""
    s = settings or get_settings()
    staged = s.secrets_dir / "postgres_password.new"
    with contextlib.suppress(FileNotFoundError):
        os.replace(staged, s.secrets_dir / "postgres_password")
        log.warning("an interrupted password rotation was completed: %s is now the database password", staged)


def rotate_nats(settings: Settings | None = None) -> None:
    """New passwords for every embedded NATS identity (the server and the services pick them up at a restart)."""
    s = settings or get_settings()
    if not s.embedded_nats:
        raise RuntimeError("NATS_SERVER is set: rotate NATS_USER/NATS_PASSWORD on that server and in the environment")
    users = {name: _secrets.token_urlsafe(24) for name in NATS_SERVICES}
    _write_private(s.secrets_dir / "nats_users.json", json.dumps(users, indent=1))
    from semg.embedded import nats_config_path, write_nats_config
    if nats_config_path(s).exists():
        write_nats_config(s)


def rotate_file(name: str, settings: Settings | None = None, env_var: str = "", nbytes: int = 24) -> None:
    s = settings or get_settings()
    if env_var and getattr(s, env_var.lower()) is not None:
        raise RuntimeError(f"{env_var} is set: change it in the environment instead")
    _write_private(s.secrets_dir / name, _secrets.token_urlsafe(nbytes))


_NEXT = {
    "postgres": "done: the database and every new connection use the new password",
    "nats": "written: restart everything to apply it (./stop_all.sh && ./start_all.sh)",
    "service-key": "written: restart everything (./stop_all.sh && ./start_all.sh); the API revokes the old key",
    "ui-password": "written: the next sign-in needs it; every signed-in page is signed out at its next click "
                   "(with SEMG_UI_SESSION_DAYS=0, or signed in while the database was down: when the platform "
                   "restarts)",
}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m semg.secrets", description="Rotate a generated secret.")
    p.add_argument("action", choices=["rotate"])
    p.add_argument("what", choices=list(_NEXT))
    args = p.parse_args(argv)
    try:
        s = get_settings()
        if args.what == "postgres":
            rotate_postgres(s)
        elif args.what == "nats":
            rotate_nats(s)
        elif args.what == "service-key":
            rotate_file("service_api_key", s, "SEMG_SERVICE_KEY", nbytes=32)
        else:
            rotate_file("ui_password", s, "SEMG_UI_PASSWORD", nbytes=12)
    except Exception as e:  # noqa: BLE001 - one line for the operator
        from semg.db import first_line
        print(f"semg.secrets rotate {args.what}: {first_line(e)}", file=sys.stderr)
        return 2
    print(f"{args.what}: {_NEXT[args.what]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
