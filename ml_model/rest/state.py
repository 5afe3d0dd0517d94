"""Process-wide state of the API service, created in the lifespan and reached through `request.app.state`."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import Depends, Request

from semg.config import Settings

if TYPE_CHECKING:
    from ml_model.rest.auth import KeyCache
    from ml_model.rest.pool import ConnectionPool
    from ml_model.rest.serving import ModelRegistry

T = TypeVar("T")


@dataclass
class AppState:
    settings: Settings
    pool: ConnectionPool
    key_cache: KeyCache
    models: ModelRegistry
    nats: Any = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    # One thread runs every forward pass: torch calls never overlap (no thread oversubscription on small
    # machines) and the event loop stays free while a batch runs.
    inference_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference"))

    async def run_inference(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.inference_executor, functools.partial(fn, *args))


async def get_state(request: Request) -> AppState:
    # async on purpose: FastAPI runs a plain-def dependency in its thread pool, and that hand-off on every
    # request (/predict included) cost more than the lookup itself
    return request.app.state.semg


State = Annotated[AppState, Depends(get_state)]
