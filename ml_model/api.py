"""FastAPI service: health, model serving (/predict) and the REST API of the platform.

Run: python -m ml_model.api   (or uvicorn ml_model.api:app --port $API_PORT)
Operator commands (no server needed, only the database):
    python -m ml_model.api create-key --role admin [--name NAME]     # mint the first admin key
    python -m ml_model.api create-key --role user --user-id 3
    python -m ml_model.api list-keys | revoke-key ID

Every endpoint but /health needs an API key in the X-API-Key header (see ml_model/rest/auth.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator

import psycopg2

# Loaded at start, not by the first model load (preprocessing imports it lazily, so the live worker never does):
# that took 0.7 s or more, and a worker listing the served models meanwhile saw none of them.
import scipy.signal  # noqa: F401
import torch
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ValidationError

from ml_model.rest import auth, errors, keys
from ml_model.rest.auth import KeyBeforeBody, KeyCache
from ml_model.rest.pool import ConnectionPool, DatabaseUnavailable
from ml_model.rest.routes import jobs as jobs_routes
from ml_model.rest.routes import keys as keys_routes
from ml_model.rest.routes import live as live_routes
from ml_model.rest.routes import models as models_routes
from ml_model.rest.routes import sessions as sessions_routes
from ml_model.rest.routes import users as users_routes
from ml_model.rest.serving import ModelRegistry
from ml_model.rest.state import AppState, State
from semg import db, natsio, procs, secrets, tls
from semg.config import SettingsError, get_settings, settings_or_exit
from semg.messages import MODELS_POLL_S, MODELS_UPDATED, ModelUpdated

log = logging.getLogger("semg.api")

# Fallback for a missed models.updated (NATS down, or published before we subscribed); follows renamed gestures.
MODEL_POLL_S = MODELS_POLL_S


async def _connect_nats(state: AppState) -> None:
    """Keep trying in the background: the API serves (and reports NATS down) until NATS is reachable."""
    delay = 0.5
    while state.nats is None:
        try:
            nc = await natsio.connect("api", state.settings)
        except Exception as e:  # noqa: BLE001 - any connect failure means "retry later"
            log.warning("NATS not reachable yet (%s); retrying", e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)
            continue

        async def on_model_updated(msg) -> None:
            try:
                update = ModelUpdated.model_validate_json(msg.data)
            except ValidationError as e:
                log.warning("ignoring malformed %s message: %s", MODELS_UPDATED, e.errors()[:1])
                return
            log.info("models.updated: user %s artifact %s", update.userid, update.artifact_id)
            await _refresh(state, update.userid)

        await nc.subscribe(MODELS_UPDATED, cb=on_model_updated)
        state.nats = nc


async def _refresh(state: AppState, user_id: int | None = None) -> None:
    """Reload one user's model (or all) off the event loop; database trouble is logged, not raised."""
    try:
        if user_id is None:
            await asyncio.to_thread(state.models.refresh_all)
        else:
            await asyncio.to_thread(state.models.refresh_user, user_id)
    except (DatabaseUnavailable, psycopg2.Error) as e:
        log.warning("model refresh failed (%s); will retry", str(e).strip().splitlines()[0])


async def _startup_and_poll(state: AppState, ready: bool) -> None:
    """Until the database answers: register the service key and load every model; then poll slowly."""
    delay = 0.5
    while not ready:
        try:
            await asyncio.to_thread(_ensure_service_key, state)
            await asyncio.to_thread(state.models.refresh_all)
            ready = True
        except (DatabaseUnavailable, psycopg2.Error) as e:
            log.warning("database not ready (%s); retrying", str(e).strip().splitlines()[0])
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)
    while True:
        await asyncio.sleep(MODEL_POLL_S)
        await _refresh(state)


SERVICE_KEY_NAME = "platform service key"


def _ensure_service_key(state: AppState) -> None:
    """Register the current service key and revoke the ones it replaced (a rotated key stops working)."""
    key = secrets.service_api_key(state.settings)
    with state.pool.connection() as conn:
        keys.ensure_key(conn, key, "service", SERVICE_KEY_NAME)
        with conn, conn.cursor() as cur:
            cur.execute("""UPDATE api_keys SET revoked_at = now()
                           WHERE role = 'service' AND name = %s AND key_hash <> %s AND revoked_at IS NULL
                           RETURNING id""", (SERVICE_KEY_NAME, keys.key_hash(key)))
            if old := [r[0] for r in cur.fetchall()]:
                log.warning("revoked %d replaced service key(s): %s", len(old), old)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    torch.set_num_threads(1)  # small per-request batches: one thread is fastest and leaves the other cores free
    pool = ConnectionPool(settings)
    state = AppState(settings=settings, pool=pool, key_cache=KeyCache(), models=ModelRegistry(pool))
    app.state.semg = state
    # Load the models before serving when the database is up; otherwise the background task keeps trying.
    ready = False
    try:
        await asyncio.to_thread(_ensure_service_key, state)
        await asyncio.to_thread(state.models.refresh_all)
        await state.run_inference(state.models.warm_up)
        ready = True
    except (DatabaseUnavailable, psycopg2.Error) as e:
        log.warning("starting without the database (%s)", str(e).strip().splitlines()[0])
    state.tasks.append(asyncio.create_task(_startup_and_poll(state, ready)))
    state.tasks.append(asyncio.create_task(_connect_nats(state)))
    procs.tune_live_process()  # startup objects leave the collector's scans; quicker GIL hand-offs
    yield
    for t in state.tasks:
        t.cancel()
    if state.nats is not None:
        with contextlib.suppress(Exception):
            await state.nats.drain()
    state.inference_executor.shutdown(wait=True)
    pool.close()


DOCS_STATIC_URL = "/docs-static"
# FastAPIOffline: FastAPI with /docs and /redoc served from files installed with it (FastAPI's own pages load
# Swagger UI and ReDoc from a CDN, so they were blank on a lab network without internet)
app = FastAPIOffline(
    title="sEMG gesture platform API", version="0.2.0", lifespan=lifespan, static_url=DOCS_STATIC_URL,
    description="Live gesture inference and the REST API of the platform. Every endpoint except /health and this "
                "documentation (/docs, /redoc, /openapi.json) needs an API key in the `X-API-Key` header: admin "
                "and service keys reach everything, a user key only its own user's data.",
)
errors.install(app)
app.add_middleware(KeyBeforeBody)  # outermost: no body is read for a caller without a valid key
for r in (models_routes, users_routes, sessions_routes, jobs_routes, keys_routes, live_routes):
    app.include_router(r.router)

# Error answers every keyed endpoint may give (ml_model/rest/errors.py, auth.py): documented in the schema, so
# clients (and schemathesis, tests/fuzz) can rely on it. A 422 is FastAPI's validation list or one message.
_ERRORS = {
    400: "the request body could not be read as JSON (it is not UTF-8)",
    401: "missing, unknown or revoked API key",
    403: "this API key may not access that user's data (or this endpoint)",
    404: "a referenced user, device, session, job, gesture, key or model does not exist",
    409: "conflicts with stored data (duplicate, or the state does not allow it)",
    413: f"the request body is too large: at most {errors.USER_MAX_BODY_BYTES // 2**10} KiB and "
         f"{errors.USER_MAX_JSON_VALUES} JSON values with a user API key (or one that could not be verified), "
         f"{errors.MAX_BODY_BYTES // 2**20} MiB with an admin or service key",
    415: "the request body is not sent as JSON (its Content-Type header is not application/json)",
    429: f"a user API key already has {auth.USER_MAX_IN_FLIGHT} requests with a body under way (while the database "
         f"is down: the keys that cannot be verified, together); retry after their answers (Retry-After)",
    503: "the database is unavailable; retry later (Retry-After)",
}


def _openapi() -> dict:
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps["Error"] = {"title": "Error", "type": "object", "required": ["detail"],
                      "properties": {"detail": {"title": "Detail", "type": "string"}}}
    error = {"$ref": "#/components/schemas/Error"}
    for path, ops in schema["paths"].items():
        if path == "/health":
            continue
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            for code, text in _ERRORS.items():
                if code in (400, 409, 413, 415, 429) and method == "get":
                    continue
                responses.setdefault(str(code), {"description": text, "content": {"application/json": {"schema": error}}})
            invalid = responses.setdefault("422", {"description": "Validation Error",
                                                   "content": {"application/json": {"schema": error}}})
            body = invalid.setdefault("content", {}).setdefault("application/json", {})
            if body.get("schema", error) != error:
                body["schema"] = {"anyOf": [body["schema"], error]}
    app.openapi_schema = schema
    return schema


app.openapi = _openapi  # type: ignore[method-assign]


class ComponentHealth(BaseModel):
    ok: bool
    detail: str = ""


class Health(BaseModel):
    status: str  # "ok" when every component is reachable, else "degraded"
    database: ComponentHealth
    nats: ComponentHealth
    models_loaded: int = 0


def _check_db(state: AppState) -> ComponentHealth:
    """On a pooled connection: /health needs no key, and a fresh SCRAM login per call cost ~4 ms of CPU, so
    anyone polling it could have slowed live recognition."""
    try:
        with state.pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT max(version) FROM schema_version")
            version = cur.fetchone()[0]
        return ComponentHealth(ok=True, detail=f"schema version {version}")
    except (DatabaseUnavailable, psycopg2.Error) as e:
        # /health answers anyone: the reason (host, port, role, server messages) goes to the log, not the network
        now = time.monotonic()
        if now - _health_logged[0] > 30:
            _health_logged[0] = now
            log.warning("health: database not reachable: %s", db.first_line(e))
        return ComponentHealth(ok=False, detail="not reachable (the API's log says why)")


_health_logged = [-1e9]  # monotonic time of the last health warning (at most one per 30 s while polled)


@app.get("/health", response_model=Health, tags=["health"])
async def health(state: State) -> Health:
    """Reachability of PostgreSQL and NATS. Needs no API key."""
    database = await asyncio.to_thread(_check_db, state)
    nc = state.nats
    nats_ok = nc is not None and nc.is_connected
    nats = ComponentHealth(ok=nats_ok, detail="connected" if nats_ok else "not connected")
    return Health(status="ok" if database.ok and nats_ok else "degraded", database=database, nats=nats,
                  models_loaded=len(state.models.all()))


# ---- command line ------------------------------------------------------------------------------------
def _serve() -> None:
    import uvicorn

    from ml_model.rest.connections import KEEP_ALIVE_S, GuardedHttp

    s = settings_or_exit("api")
    logging.basicConfig(level=s.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tls_context = tls.server_context(s)
    except tls.TlsError as e:
        print(f"api: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    https = {}
    if tls_context is not None:
        https = {"ssl_certfile": str(s.tls_files[0]), "ssl_context_factory": lambda _config, _default: tls_context,
                 "loop": "ml_model.rest.connections:handshake_bound_loop"}
    uvicorn.run("ml_model.api:app", host=s.semg_bind_host, port=s.api_port, log_level=s.log_level.lower(),
                access_log=False, http=GuardedHttp, timeout_keep_alive=KEEP_ALIVE_S,
                # a stopping server waits this long for open responses (a live decision stream never ends by
                # itself), then closes them: supervisord's stopwaitsecs is 20
                timeout_graceful_shutdown=5, **https)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ml_model.api", description="sEMG platform API server and key tool")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("serve", help="run the API server (the default)")
    c = sub.add_parser("create-key", help="mint an API key and print it (shown once)")
    c.add_argument("--role", choices=keys.ROLES, required=True)
    c.add_argument("--user-id", type=int, default=None, help="the user a 'user' key is scoped to")
    c.add_argument("--name", default="", help="a label to recognise the key by")
    c.add_argument("--read-only", action="store_true",
                   help="the key may only read (GET): for an app that follows a user's decisions")
    ls = sub.add_parser("list-keys", help="list keys (prefixes only)")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    rv = sub.add_parser("revoke-key", help="revoke a key by id")
    rv.add_argument("key_id", type=int)
    args = p.parse_args(argv)
    if args.cmd == "create-key" and (args.role == "user") != (args.user_id is not None):
        c.error("--user-id is required with --role user" if args.role == "user" else
                f"--user-id goes only with --role user (an '{args.role}' key belongs to no user)")
    if args.cmd in (None, "serve"):
        _serve()
        return 0
    try:
        s = get_settings()
        with contextlib.closing(db.connect(s)) as conn:
            if args.cmd == "create-key":
                row = keys.create_key(conn, args.role, args.user_id, args.name, read_only=args.read_only)
                print(f"created {'read-only ' if row['read_only'] else ''}{row['role']} key id {row['id']}"
                      + (f" for user {row['user_id']}" if row["user_id"] else "")
                      + "; store it now, it is not shown again:", file=sys.stderr)
                print(row["key"])
            elif args.cmd == "list-keys":
                for row in keys.list_keys(conn, include_revoked=args.all):
                    state = f"revoked {row['revoked_at']:%Y-%m-%d %H:%M}" if row["revoked_at"] else "active"
                    role = row["role"] + (" (read-only)" if row["read_only"] else "")
                    print(f"{row['id']:>5} {role:<20} user={row['user_id'] or '-':<6} {row['key_prefix']}… "
                          f"{state:<25} {row['name']}")
            else:
                row = keys.revoke_key(conn, args.key_id)
                print(f"revoked key {row['id']} ({row['key_prefix']}…)")
    except (SettingsError, ValueError) as e:
        print(f"ml_model.api {args.cmd}: {e}", file=sys.stderr)
        return 2
    except psycopg2.Error as e:
        print(f"ml_model.api {args.cmd}: database error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
