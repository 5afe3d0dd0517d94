"""One settings object for every service, page and script, read from the environment.

Secrets have no defaults: the embedded PostgreSQL/NATS generate theirs on first start and keep them (mode 0600)
under ``$SEMG_STATE_DIR/secrets``; external services must be given theirs explicitly.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUseDefault
from pydantic_settings import BaseSettings, SettingsConfigDict

Port = Annotated[int, Field(ge=1, le=65535)]

# Shortest secrets a person may choose: the UI's sign-in and the API answer anyone who can reach them (the
# generated ones are 16 and 43 characters).
MIN_UI_PASSWORD_CHARS = 12
MIN_SERVICE_KEY_CHARS = 24


class SettingsError(RuntimeError):
    """A setting is missing or invalid; the message names the environment variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    semg_state_dir: Path = Path("./.state")
    # Interface the services people and devices use listen on (UDP ingestion and its metrics, API, web UI); the
    # Docker image sets 0.0.0.0.
    semg_bind_host: str = "127.0.0.1"
    # Interface the embedded PostgreSQL and NATS listen on. Unset: 127.0.0.1 whatever SEMG_BIND_HOST is (only this
    # machine's services use them; letting an ESP32 reach the UDP port must not open the database to the network).
    # Set it (e.g. 0.0.0.0, then firewall) for training or inference workers on other machines.
    semg_internal_bind_host: str | None = None
    # Interface the UDP ingestion port alone listens on. Unset: SEMG_BIND_HOST. An ESP32 on Wi-Fi needs only this
    # port, so SEMG_UDP_BIND_HOST=0.0.0.0 lets boards in while the web UI and the API stay on this computer.
    semg_udp_bind_host: str | None = None

    postgres_host: str | None = None  # unset -> embedded PostgreSQL
    postgres_port: Port = 5432
    postgres_db: str = "sensordb"
    postgres_user: str = "semg"
    postgres_password: SecretStr | None = None

    nats_server: str | None = None  # unset -> embedded NATS
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_port: Port = 4222

    api_port: Port = 8000
    ui_port: Port = 8501
    udp_port: Port = 8081
    # Ingestion metrics endpoint of the UDP server (HTTP, local only by default).
    udp_metrics_port: Port = 8082

    # HTTPS for the web UI, the API and the UDP server's metrics: a PEM certificate (or chain) and its private key,
    # both or neither (semg.tls). Unset = plain HTTP, fine on 127.0.0.1; on a network the UI password and API keys
    # would cross it readable, and browsers allow the capture page's webcam only over HTTPS (or on localhost).
    semg_tls_cert_file: Path | None = None
    semg_tls_key_file: Path | None = None

    # Service-to-service API key used by the inference worker and the UI (generated when embedded).
    semg_service_key: SecretStr | None = None
    # Password of the web UI login (generated when unset and the state dir is writable).
    semg_ui_password: SecretStr | None = None
    # Days a web UI sign-in is remembered by the browser (semg.uisessions) without being used; each use renews
    # it. 0 = never: every page load or new tab asks for the password.
    semg_ui_session_days: float = Field(7.0, ge=0, le=366)

    # Scheduling priority (nice) of training: a job uses a whole core for tens of seconds, and on a small
    # machine shared with the live path it must yield to it (0 = same priority as the live services).
    semg_train_nice: int = Field(10, ge=0, le=19)
    # Training windows overlap (a window every step_ms): many channels at a high rate make them large (16 channels
    # at 4 kHz: ~150 MB per minute recorded as float32, and training holds ~2.6 copies). Above this many MB a job
    # trains on every k-th window instead, so a long recording cannot exhaust the machine's memory.
    semg_train_max_window_mb: int = Field(1024, ge=1)

    # Days the live decisions (table predictions) are kept; the inference worker deletes older ones hourly.
    # 0 = keep forever. Recordings (samples) are never pruned. At most 100 years: more overflows a timestamp.
    semg_prediction_retention_days: int = Field(90, ge=0, le=36500)

    # Below this much free space (MB) on a disk the platform writes to (state directory, embedded database, spool,
    # videos), semg.health and the web UI warn: once it is full, recordings are lost. 0 = no warning.
    semg_min_free_disk_mb: int = Field(2048, ge=0)

    # Automatic backups (python -m semg.backup auto, under supervisord): a backup into this directory every
    # SEMG_BACKUP_EVERY_H hours, the newest SEMG_BACKUP_KEEP kept. Unset = off. Best on another disk.
    semg_backup_dir: Path | None = None
    semg_backup_every_h: float = Field(24.0, gt=0, le=24 * 366)
    semg_backup_keep: int = Field(7, ge=1, le=10_000)
    # the pace a backup is written at (MB/s, 0: as fast as it can): at full speed it slows live recognition
    semg_backup_mb_per_s: float = Field(10.0, ge=0)

    log_level: str = "INFO"

    @field_validator("postgres_host", "nats_server", "nats_user", "semg_tls_cert_file", "semg_tls_key_file",
                     "semg_backup_dir", "semg_internal_bind_host", "semg_udp_bind_host",
                     mode="before")
    @classmethod
    def _blank_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("postgres_password", "nats_password", "semg_service_key", "semg_ui_password", mode="before")
    @classmethod
    def _blank_secret_is_unset(cls, v: object) -> object:
        # `docker run -e SEMG_UI_PASSWORD` or compose passing an unset variable gives "": never a valid secret
        # (an empty UI password would let an empty form sign in); unset means "generated" or "required".
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("semg_ui_password", "semg_service_key")
    @classmethod
    def _long_enough(cls, v: SecretStr | None, info) -> SecretStr | None:
        least = MIN_UI_PASSWORD_CHARS if info.field_name == "semg_ui_password" else MIN_SERVICE_KEY_CHARS
        if v is not None and len(v.get_secret_value().strip()) < least:
            raise ValueError(f"must be at least {least} characters: it guards a service reachable over the "
                             "network (unset it to have one generated)")
        return v

    @field_validator("semg_prediction_retention_days", "semg_min_free_disk_mb", "semg_backup_every_h",
                     "semg_backup_keep", "semg_backup_mb_per_s", "semg_ui_session_days", mode="before")
    @classmethod
    def _blank_is_default(cls, v: object) -> object:
        # compose passing an unset variable gives "": the default, as for the other settings
        if isinstance(v, str) and not v.strip():
            raise PydanticUseDefault()
        return v

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return v

    @model_validator(mode="after")
    def _external_needs_credentials(self) -> Settings:
        if self.postgres_host and self.postgres_password is None:
            raise ValueError("POSTGRES_PASSWORD is required when POSTGRES_HOST is set (external database)")
        if self.nats_server and self.nats_user and self.nats_password is None:
            raise ValueError("NATS_PASSWORD is required when NATS_USER is set")
        if (self.semg_tls_cert_file is None) != (self.semg_tls_key_file is None):
            given, missing = (("SEMG_TLS_CERT_FILE", "SEMG_TLS_KEY_FILE") if self.semg_tls_key_file is None
                              else ("SEMG_TLS_KEY_FILE", "SEMG_TLS_CERT_FILE"))
            raise ValueError(f"{given} is set but {missing} is not: HTTPS needs the certificate and its key")
        return self

    # ---- derived values -------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.semg_state_dir.expanduser().resolve()

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def video_dir(self) -> Path:
        return self.state_dir / "videos"

    @property
    def backup_dir(self) -> Path | None:
        """SEMG_BACKUP_DIR resolved (None: automatic backups off)."""
        return None if self.semg_backup_dir is None else self.semg_backup_dir.expanduser().resolve()

    @property
    def pg_data_dir(self) -> Path:
        return self.state_dir / "pgdata"

    @property
    def embedded_postgres(self) -> bool:
        return self.postgres_host is None

    @property
    def embedded_nats(self) -> bool:
        return self.nats_server is None

    @property
    def service_host(self) -> str:
        """Where local clients reach the services this install runs (they listen on semg_bind_host): a
        specific address such as a LAN IP is used as is, "any" (0.0.0.0) means loopback."""
        return _client_host(self.semg_bind_host)

    @property
    def service_url_host(self) -> str:
        """service_host as it is written in a URL (an IPv6 address in brackets)."""
        return f"[{self.service_host}]" if ":" in self.service_host else self.service_host

    @property
    def udp_bind_host(self) -> str:
        """Where the UDP ingestion port listens (SEMG_UDP_BIND_HOST, else SEMG_BIND_HOST)."""
        return self.semg_udp_bind_host or self.semg_bind_host or "127.0.0.1"

    @property
    def internal_bind_host(self) -> str:
        """Where the embedded PostgreSQL and NATS listen (SEMG_INTERNAL_BIND_HOST, else 127.0.0.1)."""
        return self.semg_internal_bind_host or "127.0.0.1"

    @property
    def internal_url_host(self) -> str:
        """Where clients reach the embedded PostgreSQL and NATS, as written in a URL (IPv6 in brackets)."""
        host = _internal_client_host(self.internal_bind_host)
        return f"[{host}]" if ":" in host else host

    @property
    def postgres_address(self) -> str:
        """The database host clients connect to: POSTGRES_HOST, or the embedded server's address."""
        return self.postgres_host or _internal_client_host(self.internal_bind_host)

    @property
    def tls_files(self) -> tuple[Path, Path] | None:
        """(certificate, key) the HTTP services serve HTTPS with, or None for plain HTTP (semg.tls checks them)."""
        if self.semg_tls_cert_file is None or self.semg_tls_key_file is None:
            return None
        return self.semg_tls_cert_file.expanduser().resolve(), self.semg_tls_key_file.expanduser().resolve()

    @property
    def http_scheme(self) -> str:
        """'https' when the HTTP services serve TLS (SEMG_TLS_CERT_FILE), else 'http'."""
        return "https" if self.tls_files else "http"

    def service_url(self, port: int) -> str:
        """Where local clients reach this install's HTTP service on `port` (scheme, host and port, no path)."""
        return f"{self.http_scheme}://{self.service_url_host}:{port}"

    @property
    def api_url(self) -> str:
        """Where local clients (worker, UI, tests) reach the API."""
        return self.service_url(self.api_port)

    @property
    def ui_url(self) -> str:
        """Where local clients reach the web UI."""
        return self.service_url(self.ui_port)

    @property
    def nats_url(self) -> str:
        if self.nats_server:
            return self.nats_server if "://" in self.nats_server else f"nats://{self.nats_server}"
        return f"nats://{self.internal_url_host}:{self.nats_port}"

    @property
    def nats_addresses(self) -> str:
        """The NATS server(s) as host:port, comma-separated, without any credentials the URLs carry (for messages)."""
        from urllib.parse import urlsplit

        parts = [u if "://" in u else f"nats://{u}" for u in (p.strip() for p in self.nats_url.split(",")) if u]
        return ",".join(f"{p.hostname}:{p.port or 4222}" for p in map(urlsplit, parts))

    @property
    def udp_metrics_url(self) -> str:
        """The UDP server's metrics endpoint (it listens on semg_bind_host)."""
        return f"{self.service_url(self.udp_metrics_port)}/metrics"


def _client_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "", None) else bind_host  # noqa: S104


def _internal_client_host(bind_host: str) -> str:
    """Where clients reach the embedded PostgreSQL and NATS listening on `bind_host`: PostgreSQL on '::' listens
    for IPv6 only (it sets IPV6_V6ONLY), so 127.0.0.1 is refused there; ::1 reaches it, and NATS on '::' too."""
    return "::1" if bind_host == "::" else _client_host(bind_host)


def describe_error(err: ValidationError) -> str:
    """One line naming the offending variable(s), e.g. ``API_PORT='abc': Input should be a valid integer``."""
    parts = []
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "__root__"]
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        if loc:
            var = loc[0].upper()
            inp = e.get("input")
            shown = "" if inp is None or "password" in var.lower() or "key" in var.lower() else f"={inp!r}"
            parts.append(f"{var}{shown}: {msg}")
        else:
            parts.append(msg)
    return "invalid setting: " + "; ".join(parts)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings. Raises SettingsError with a one-line message on bad values."""
    try:
        return Settings()
    except ValidationError as err:
        raise SettingsError(describe_error(err)) from None


def settings_or_exit(service: str) -> Settings:
    """For service entry points: print one line naming the bad variable and exit(2) instead of a traceback."""
    try:
        return get_settings()
    except SettingsError as err:
        print(f"{service}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _shell_exports(s: Settings) -> str:
    """Variables supervisord.conf and the shell scripts need, as `export` lines (values shell-quoted)."""
    import shlex

    from semg import secrets

    values = {
        "SEMG_STATE_DIR": str(s.state_dir),
        "SEMG_BIND_HOST": s.semg_bind_host,
        "UI_PORT": str(s.ui_port),
        "SEMG_EMBEDDED_PG": "true" if s.embedded_postgres else "false",
        "SEMG_EMBEDDED_NATS": "true" if s.embedded_nats else "false",
        "SEMG_BACKUP_AUTOSTART": "true" if s.semg_backup_dir is not None else "false",
        "SEMG_SUPERVISOR_USER": "semg",  # semg.health uses the same name
        "SEMG_SUPERVISOR_PASSWORD": secrets.get_or_create("supervisor_password", s),
    }
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in values.items())


if __name__ == "__main__":
    # `python -m semg.config` prints the effective settings (secrets hidden); `... shell` prints exports.
    settings = settings_or_exit("semg.config")
    if sys.argv[1:] == ["shell"]:
        print(_shell_exports(settings))
    else:
        effective = {"semg_udp_bind_host": settings.udp_bind_host,  # unset: what they fall back to
                     "semg_internal_bind_host": settings.internal_bind_host}
        for name, value in {**settings.model_dump(), **effective}.items():
            print(f"{name.upper()}={'***' if isinstance(value, SecretStr) else value}")
