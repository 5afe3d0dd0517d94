"""Health of every service of a running platform, as start_all.sh and the tests see it.

    python -m semg.health               # one line per service, exit 0 when all are healthy; and the free
                                        # disk space (a warning, never the exit status: no restart mends it)
    python -m semg.health --wait 120    # keep checking until healthy (exit 1 on timeout, or at once when
                                        # supervisord gave up on a service: FATAL)
    python -m semg.health --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable

import httpx
import psycopg2

from semg import db, diskspace, tls
from semg.config import Settings, SettingsError, get_settings


def _http_ok(s: Settings, url: str, problem: Callable[[httpx.Response], str | None] | None = None) -> tuple[bool, str]:
    """(ok, detail) of a GET: up when it answers 200 and `problem` (given the answer) finds none."""
    try:
        r = httpx.get(url, timeout=2, verify=tls.httpx_verify(s))
    except httpx.HTTPError as e:
        return False, f"{url}: {type(e).__name__}"
    if r.status_code != 200:
        return False, f"{url}: HTTP {r.status_code}"
    found = problem(r) if problem is not None else None
    return (False, f"{url}: {found}") if found else (True, url)


def _status_not_ok(r: httpx.Response) -> str | None:
    body = r.json()
    return None if body.get("status") == "ok" else json.dumps(body)[:200]


def _spool_not_writable(r: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        error = r.json().get("spool_error")
        if error:
            return f"the spool cannot be written ({error}): packets are dropped"
    return None


def check_postgres(s: Settings) -> tuple[bool, str]:
    try:
        with contextlib.closing(db.connect(s, connect_timeout=2)) as conn, conn.cursor() as cur:
            cur.execute("SELECT max(version) FROM schema_version")
            return True, f"{s.postgres_address}:{s.postgres_port}/{s.postgres_db} schema v{cur.fetchone()[0]}"
    except psycopg2.Error as e:  # db.SchemaTooNewError too: db.connect refuses a schema a newer version made
        return False, db.first_line(e)


def check_udpserver(s: Settings) -> tuple[bool, str]:
    """Up, and able to journal what it accepts (degraded only by PostgreSQL or NATS being away is up: it spools)."""
    return _http_ok(s, f"{s.service_url(s.udp_metrics_port)}/health", _spool_not_writable)


# What a NATS server answers to a user or password it does not know: waiting does not mend it
NATS_REFUSES_CREDENTIALS = "authorization violation"


def check_nats(s: Settings) -> tuple[bool, str]:
    """A connection with the UI's identity (subscribe-only) and one round trip to the server."""
    from semg import natsio

    where = s.nats_addresses

    async def probe() -> float:
        nc = await natsio.connect_once("ui", s, timeout=2)
        try:
            return await nc.rtt()
        finally:
            await nc.close()

    try:
        rtt = asyncio.run(asyncio.wait_for(probe(), 5))
    except Exception as e:  # noqa: BLE001 - any failure is "down", with its reason
        reason = str(e).strip()[:200] or "no answer"
        if NATS_REFUSES_CREDENTIALS in reason.lower():
            hint = ("(credentials rotated with semg.secrets while it ran? ./stop_all.sh, then ./start_all.sh)"
                    if s.embedded_nats else "(check NATS_USER / NATS_PASSWORD)")
            reason = f"{reason}: the server refuses this install's NATS credentials {hint}"
        return False, f"nats://{where}: {type(e).__name__}: {reason}"
    return True, f"nats://{where} (round trip {rtt * 1000:.1f} ms)"


def supervisor_states(s: Settings) -> dict[str, str]:
    """Program -> state from this instance's supervisord (XML-RPC on its socket), or {} if it is not running."""
    sock = s.state_dir / "run" / "supervisor.sock"
    pw_file = s.secrets_dir / "supervisor_password"
    if not sock.exists() or not pw_file.exists():
        return {}
    import xmlrpc.client

    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport("semg", pw_file.read_text().strip(), f"unix://{sock}")
    try:
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        return {p["name"]: p["statename"] for p in proxy.supervisor.getAllProcessInfo()}
    except (OSError, xmlrpc.client.Error):
        return {}


def check_all(s: Settings) -> dict[str, tuple[bool, str]]:
    results: dict[str, tuple[bool, str]] = {"postgres": check_postgres(s)}
    results["nats"] = check_nats(s)
    results["api"] = _http_ok(s, f"{s.api_url}/health", _status_not_ok)
    results["udpserver"] = check_udpserver(s)
    results["ui"] = _http_ok(s, f"{s.ui_url}/_stcore/health")
    states = supervisor_states(s)
    for prog in ("inference", "trainer", *(("backup",) if s.semg_backup_dir is not None else ())):
        if states:
            st = states.get(prog, "missing")
            results[prog] = (st == "RUNNING", f"supervisor: {st}")
    if states:
        for prog in ("postgres", "nats", "api", "udpserver", "ui"):
            st = states.get(prog)
            if st not in (None, "RUNNING") and not (prog in ("postgres", "nats") and st == "STOPPED"):
                ok, detail = results.get(prog, (True, ""))
                results[prog] = (False, f"supervisor: {st}; {detail}")
    return results


# reported after the services, with their own word when not ok; waiting does not mend them, so they never fail the
# exit status
WARNINGS = {"disk": "LOW ", "backups": "LATE"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m semg.health")
    p.add_argument("--wait", type=float, default=0, help="seconds to keep trying until all are healthy")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        s = get_settings()
    except SettingsError as e:
        print(f"semg.health: {e}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.wait
    while True:
        results = check_all(s)
        healthy = all(ok for ok, _ in results.values())
        # supervisord starts a FATAL program (too many quick exits) never again by itself, a database a newer
        # version migrated stays so, and a NATS server refusing the credentials (rotated while it ran) keeps
        # refusing them: waiting cannot mend any of them
        gave_up = any(detail.startswith("supervisor: FATAL") or db.SCHEMA_TOO_NEW in detail
                      or NATS_REFUSES_CREDENTIALS in detail.lower() for _, detail in results.values())
        if healthy or gave_up or time.monotonic() >= deadline:
            break
        time.sleep(1)
    results["disk"] = diskspace.check(s)
    if s.semg_backup_dir is not None:
        from semg import backup
        results["backups"] = backup.auto_status(s)
    if args.json:
        print(json.dumps({k: {"ok": ok, "detail": d} for k, (ok, d) in results.items()}))
    else:
        for name, (ok, detail) in results.items():
            print(f"  {'ok  ' if ok else WARNINGS.get(name, 'DOWN')} {name:<10} {detail}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
