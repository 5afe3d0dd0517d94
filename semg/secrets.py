"""Secrets generated on first start and kept under $SEMG_STATE_DIR/secrets with mode 0600 (never in the repo)."""

from __future__ import annotations

import json
import os
import secrets as _secrets
from pathlib import Path

from semg.config import Settings, get_settings

# Services that get their own NATS identity (and subject permissions) on the embedded server.
NATS_SERVICES = ("ingest", "inference", "api", "trainer", "ui", "admin")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # atomic: a crash never leaves half a secret


def get_or_create(name: str, settings: Settings | None = None, nbytes: int = 24) -> str:
    """Read secret `name`, generating a random URL-safe one the first time."""
    s = settings or get_settings()
    path = s.secrets_dir / name
    if path.exists():
        return path.read_text().strip()
    value = _secrets.token_urlsafe(nbytes)
    _write_private(path, value)
    return value


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
        for name in NATS_SERVICES:
            users.setdefault(name, _secrets.token_urlsafe(24))
        _write_private(path, json.dumps(users, indent=1))
    return service, users[service]


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
