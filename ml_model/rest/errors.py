"""Map domain and infrastructure errors to HTTP answers so no request ends in a 500.

RepoError subclasses carry messages meant for people: NotFound -> 404, Conflict -> 409, Invalid -> 422.
A database outage is a 503 with a clear message (clients may retry); constraint violations that slip past
the repository are 409/422, never a stack trace.
"""

from __future__ import annotations

import logging

import psycopg2
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from ml_model.rest.pool import DatabaseUnavailable
from ml_model.rest.serving import InputError
from semg import repo
from semg.db import first_line

log = logging.getLogger("semg.api.errors")


def _answer(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


MAX_BODY_BYTES = 128 * 2**20  # above the largest legitimate /predict batch; parsing more would cost GBs


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, whether it says its length or streams it.

    Checked before anything parses it (FastAPI reads and parses the body before the API key is checked).
    """

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _answer(413, f"request body too large (at most {self.max_bytes} bytes)")(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, f"request body too large (at most {self.max_bytes} bytes)")
            return message

        await self.app(scope, limited, send)


def install(app: FastAPI) -> None:
    app.add_middleware(BodySizeLimit)

    @app.exception_handler(repo.NotFound)
    async def _not_found(_: Request, e: repo.NotFound) -> JSONResponse:
        return _answer(404, str(e))

    @app.exception_handler(repo.Conflict)
    async def _conflict(_: Request, e: repo.Conflict) -> JSONResponse:
        return _answer(409, str(e))

    @app.exception_handler(repo.RepoError)
    async def _invalid(_: Request, e: repo.RepoError) -> JSONResponse:
        return _answer(422, str(e))

    @app.exception_handler(InputError)
    async def _bad_input(_: Request, e: InputError) -> JSONResponse:
        return _answer(422, str(e))

    @app.exception_handler(DatabaseUnavailable)
    async def _db_down(_: Request, e: DatabaseUnavailable) -> JSONResponse:
        return _answer(503, str(e), {"Retry-After": "5"})

    @app.exception_handler(psycopg2.OperationalError)
    @app.exception_handler(psycopg2.InterfaceError)
    async def _db_error(_: Request, e: psycopg2.Error) -> JSONResponse:
        return _answer(503, f"database unavailable: {first_line(e)}", {"Retry-After": "5"})

    @app.exception_handler(psycopg2.IntegrityError)
    async def _integrity(_: Request, e: psycopg2.IntegrityError) -> JSONResponse:
        return _answer(409, f"conflicts with stored data: {first_line(e)}")

    @app.exception_handler(psycopg2.DataError)
    async def _data(_: Request, e: psycopg2.DataError) -> JSONResponse:
        return _answer(422, f"invalid value: {first_line(e)}")
