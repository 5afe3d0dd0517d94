"""PostgreSQL access shared by every service: connection parameters, connections, schema migrations.

Usage from the shell:
    python -m semg.db init [--wait SECONDS]   # create the database if absent, apply schema + migrations
    python -m semg.db migrate                  # apply pending migrations only
    python -m semg.db status                   # print the applied schema versions
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql

from semg import secrets
from semg.config import Settings, SettingsError, get_settings

log = logging.getLogger("semg.db")

DB_DIR = Path(__file__).resolve().parent.parent / "db"
BASELINE = DB_DIR / "postgres.sql"
MIGRATIONS_DIR = DB_DIR / "migrations"
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any constant works; it serialises concurrent migrators (several services starting at once).
_MIGRATION_LOCK = 0x5E3C0DB


def first_line(err: BaseException) -> str:
    """The first line of an error's message (psycopg2's go on for lines), or its type when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# The training worker's waiting connection is named so: the web UI tells an idle worker from none by it
TRAINER_APPLICATION_NAME = "semg-trainer"


def connect_kwargs(settings: Settings | None = None, dbname: str | None = None) -> dict:
    s = settings or get_settings()
    return {
        "host": s.postgres_address,
        "port": s.postgres_port,
        "dbname": dbname or s.postgres_db,
        "user": s.postgres_user,
        "password": secrets.postgres_password(s),
        "connect_timeout": 5,
        "application_name": "semg",
    }


class SchemaTooNewError(psycopg2.OperationalError):
    """A connection to a database a newer platform version migrated: refused as a database that cannot be used, so
    every service handles it as it handles the database being down (the UDP server keeps samples in its spool)."""


def connect(settings: Settings | None = None, dbname: str | None = None, **extra) -> psycopg2.extensions.connection:
    """A new connection. Callers own it (use `with contextlib.closing(connect()) as conn`).

    If the password is refused and a rotation left a staged password (it crashed after the server took it,
    before the file was replaced), the staged one is tried and, when the server takes it, made the password.
    A connection to the platform's database raises SchemaTooNewError when a newer version migrated it: this code
    would write rows the newer one reads wrongly (`semg.db init` alone refused it, the services ran on).
    """
    s = settings or get_settings()
    kw = connect_kwargs(s, dbname)
    kw.update(extra)
    try:
        conn = psycopg2.connect(**kw)
    except psycopg2.OperationalError as e:
        staged = secrets.staged_postgres_password(s)
        if staged is None or "password authentication failed" not in str(e):
            raise
        conn = psycopg2.connect(**{**kw, "password": staged})
        secrets.promote_staged_postgres_password(s)
    if kw["dbname"] == s.postgres_db:
        refuse_newer_schema(conn)
    return conn


def refuse_newer_schema(conn: psycopg2.extensions.connection) -> None:
    """Close `conn` and raise SchemaTooNewError if a newer platform version migrated its database (nothing before
    the schema exists); leaves no transaction open."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('schema_version') IS NOT NULL")
            problem = None
            if cur.fetchone()[0]:
                cur.execute("SELECT version FROM schema_version")
                problem = schema_too_new([r[0] for r in cur.fetchall()])
        conn.rollback()
    except BaseException:
        conn.close()
        raise
    if problem:
        conn.close()
        raise SchemaTooNewError(problem)


def wait_until_ready(settings: Settings | None = None, timeout: float = 60.0, dbname: str = "postgres") -> None:
    """Block until the server accepts connections; raise ConnectionError naming host:port after `timeout`."""
    s = settings or get_settings()
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with contextlib.closing(connect(s, dbname=dbname, connect_timeout=2)):
                return
        except psycopg2.OperationalError as e:
            last = e
            time.sleep(0.3)
    where = f"{s.postgres_address}:{s.postgres_port}"
    reason = str(last).strip().splitlines()[0] if last else "timeout"
    raise ConnectionError(f"PostgreSQL at {where} not reachable after {timeout:.0f}s: {reason}")


def create_database(settings: Settings | None = None) -> bool:
    """Create POSTGRES_DB if it does not exist. Returns True if it was created."""
    s = settings or get_settings()
    with contextlib.closing(connect(s, dbname="postgres")) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (s.postgres_db,))
            if cur.fetchone():
                return False
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(s.postgres_db)))
            log.info("created database %s", s.postgres_db)
            return True


def migrations() -> list[tuple[int, str, Path]]:
    """Ordered (version, name, path) of db/migrations/NNNN_name.sql files (versions start at 2). Each must be
    safe to run again on a database it already changed (IF NOT EXISTS; data changes only where still needed):
    restoring an older backup (semg.backup) runs the newer ones over its rows."""
    found = []
    if MIGRATIONS_DIR.is_dir():
        for p in sorted(MIGRATIONS_DIR.iterdir()):
            m = _MIGRATION_NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), m.group(2), p))
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions) or any(v < 2 for v in versions):
        raise RuntimeError(f"migration versions must be unique and >= 2: {versions}")
    return found


# In a SchemaTooNew message, and what semg.health looks for to stop waiting at once (no restart mends it)
SCHEMA_TOO_NEW = "newer than this platform version knows"


class SchemaTooNew(RuntimeError):
    """The database holds migrations this code does not have: a newer platform version ran on it."""


def schema_too_new(versions) -> str | None:
    """Why this code must not run on a database with these applied schema versions, or None when it may.

    An older checkout started on a database a newer one migrated (a `git checkout` back after `git pull`) would
    write rows without what the newer code relies on (a gesture name stored as typed where the newer one
    normalised every name once, in a migration that does not run again), and nothing would say so."""
    newest, known = max(versions, default=1), max((v for v, _, _ in migrations()), default=1)
    if newest <= known:
        return None
    return (f"the database's schema is v{newest}, {SCHEMA_TOO_NEW} (v{known}): a newer version ran on it. Start "
            f"that version again (git checkout or git pull it, then ./start_all.sh); this one could store data "
            f"the newer one reads wrongly. To go back to this version, restore a backup made with it into a new "
            f"SEMG_STATE_DIR")


def migrate(conn: psycopg2.extensions.connection) -> list[int]:
    """Apply the baseline schema and every pending migration, each in its own transaction.

    Returns the versions applied now. Safe to run concurrently and repeatedly. Raises SchemaTooNew, changing
    nothing, on a database a newer platform version has migrated.
    """
    applied_now: list[int] = []
    old_autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            with conn.cursor() as cur:  # before the baseline: a newer schema may no longer take its statements
                cur.execute("SELECT to_regclass('schema_version') IS NOT NULL")
                if cur.fetchone()[0]:
                    cur.execute("SELECT version FROM schema_version")
                    if problem := schema_too_new([r[0] for r in cur.fetchall()]):
                        raise SchemaTooNew(problem)
            conn.commit()
            with conn, conn.cursor() as cur:
                cur.execute(BASELINE.read_text())
            with conn.cursor() as cur:
                cur.execute("SELECT version FROM schema_version")
                done = {r[0] for r in cur.fetchall()}
            conn.commit()
            for version, name, path in migrations():
                if version in done:
                    continue
                with conn, conn.cursor() as cur:
                    cur.execute(path.read_text())
                    cur.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)", (version, name))
                applied_now.append(version)
                log.info("applied migration %04d_%s", version, name)
        finally:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
            conn.commit()
    finally:
        conn.autocommit = old_autocommit
    return applied_now


def init(settings: Settings | None = None, wait: float = 60.0) -> None:
    """Wait for the server, create the database if absent and bring its schema up to date."""
    s = settings or get_settings()
    wait_until_ready(s, timeout=wait)
    create_database(s)
    with contextlib.closing(connect(s)) as conn:
        migrate(conn)


@contextlib.contextmanager
def transaction(settings: Settings | None = None) -> Iterator[psycopg2.extensions.cursor]:
    """A cursor inside one transaction on a fresh connection: commit on success, rollback on error."""
    with contextlib.closing(connect(settings)) as conn:
        with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            yield cur


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m semg.db", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="create the database if absent and apply the schema")
    i.add_argument("--wait", type=float, default=60.0, help="seconds to wait for PostgreSQL")
    sub.add_parser("migrate", help="apply pending migrations")
    sub.add_parser("status", help="show applied schema versions")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        s = get_settings()
        if args.cmd == "init":
            init(s, wait=args.wait)
            print(f"database {s.postgres_db} ready")
        elif args.cmd == "migrate":
            with contextlib.closing(connect(s)) as conn:
                print("applied:", migrate(conn) or "nothing (up to date)")
        else:
            with contextlib.closing(connect(s)) as conn, conn.cursor() as cur:
                cur.execute("SELECT version, name, applied_at FROM schema_version ORDER BY version")
                for v, n, t in cur.fetchall():
                    print(f"{v:04d} {n} {t:%Y-%m-%d %H:%M:%S}")
    except (SettingsError, ConnectionError, SchemaTooNew) as e:
        print(f"semg.db: {e}", file=sys.stderr)
        return 2
    except psycopg2.Error as e:
        print(f"semg.db: database error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
