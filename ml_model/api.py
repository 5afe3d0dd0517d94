"""FastAPI service: health, model serving (/predict) and the REST API of the platform.

Run: python -m ml_model.api   (or uvicorn ml_model.api:app --port $API_PORT)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

import psycopg2
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel

from semg import db, natsio
from semg.config import Settings, get_settings, settings_or_exit

log = logging.getLogger("semg.api")


@dataclass
class AppState:
    settings: Settings
    nats: object | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)


async def _connect_nats(state: AppState) -> None:
    """Keep trying in the background: the API serves (and reports NATS down) until NATS is reachable."""
    delay = 0.5
    while state.nats is None:
        try:
            state.nats = await natsio.connect("api", state.settings)
        except Exception as e:  # noqa: BLE001 - any connect failure means "retry later"
            log.warning("NATS not reachable yet (%s); retrying", e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = AppState(settings=get_settings())
    app.state.semg = state
    state.tasks.append(asyncio.create_task(_connect_nats(state)))
    yield
    for t in state.tasks:
        t.cancel()
    if state.nats is not None:
        with contextlib.suppress(Exception):
            await state.nats.drain()


def get_state(request: Request) -> AppState:
    return request.app.state.semg


State = Annotated[AppState, Depends(get_state)]

app = FastAPI(title="sEMG gesture platform API", version="0.1.0", lifespan=lifespan)


class ComponentHealth(BaseModel):
    ok: bool
    detail: str = ""


class Health(BaseModel):
    status: str  # "ok" when every component is reachable, else "degraded"
    database: ComponentHealth
    nats: ComponentHealth


def _check_db(settings: Settings) -> ComponentHealth:
    try:
        with contextlib.closing(db.connect(settings, connect_timeout=2)) as conn, conn.cursor() as cur:
            cur.execute("SELECT max(version) FROM schema_version")
            version = cur.fetchone()[0]
        return ComponentHealth(ok=True, detail=f"schema version {version}")
    except psycopg2.Error as e:
        return ComponentHealth(ok=False, detail=str(e).strip().splitlines()[0])


@app.get("/health", response_model=Health, tags=["health"])
async def health(state: State) -> Health:
    """Reachability of PostgreSQL and NATS. Needs no API key."""
    database = await asyncio.to_thread(_check_db, state.settings)
    nc = state.nats
    nats_ok = nc is not None and nc.is_connected
    nats = ComponentHealth(ok=nats_ok, detail="connected" if nats_ok else "not connected")
    return Health(status="ok" if database.ok and nats_ok else "degraded", database=database, nats=nats)


def main() -> None:
    import uvicorn

    s = settings_or_exit("api")
    logging.basicConfig(level=s.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run("ml_model.api:app", host=s.semg_bind_host, port=s.api_port, log_level=s.log_level.lower(),
                access_log=False)


if __name__ == "__main__":
    main()
