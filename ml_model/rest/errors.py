"""Map domain and infrastructure errors to HTTP answers so no request ends in a 500.

RepoError subclasses carry messages meant for people: NotFound -> 404, Conflict -> 409, Invalid -> 422.
A database outage is a 503 with a clear message (clients may retry); constraint violations that slip past
the repository are 409/422, never a stack trace.
"""

from __future__ import annotations

import logging

import psycopg2
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ml_model.rest.pool import DatabaseUnavailable
from ml_model.rest.serving import InputError
from semg import repo
from semg.db import first_line

log = logging.getLogger("semg.api.errors")


def _answer(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


MAX_BODY_BYTES = 128 * 2**20  # above the largest legitimate /predict batch; parsing more would cost GBs
# Callers whose key is not a verified admin or service key: a `user` key, or one that could not be checked (the
# database is down). FastAPI parses and validates JSON on the event loop, where the worst body of this size (deep
# nested lists of one-digit numbers) costs ~0.1 s, not the ~6 s a 128 MB body did, stalling /predict for everyone.
# As data_b64 (base64 int16) it still holds ~98k values: 245 windows of 8 x 50, or a minute of 8 channels at 200 Hz.
USER_MAX_BODY_BYTES = 256 * 2**10
TRUSTED_ROLES = ("admin", "service")
ROLE_SCOPE_KEY = "semg.role"  # the ASGI scope entry where KeyBeforeBody records the verified key's role


def _too_large(limit: int, trusted: bool) -> str:
    if trusted:
        return f"request body too large (at most {limit} bytes)"
    return (f"request body too large: at most {limit} bytes ({limit // 1024} KiB) for a user API key (or one that "
            f"could not be verified). Send /predict data as data_b64 (the compact form: base64 of little-endian int16, "
            f"with its shape) or split it into several requests")


class BodySizeLimit:
    """ASGI middleware: a request body over its limit gets 413, whether it says its length or streams it.

    Checked before anything parses it (FastAPI reads and parses the body before the API key is checked). The limit
    is ``max_bytes`` for a verified admin or service key (KeyBeforeBody, outside this, records the role in the
    scope), else the smaller ``user_max_bytes``: a user key, or a key nobody could verify, may not make the event
    loop parse seconds' worth of JSON.
    """

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES, user_max_bytes: int = USER_MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes, self.user_max_bytes = app, max_bytes, user_max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trusted = scope.get(ROLE_SCOPE_KEY) in TRUSTED_ROLES
        limit = self.max_bytes if trusted else min(self.max_bytes, self.user_max_bytes)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _answer(413, _too_large(limit, trusted))(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, _too_large(limit, trusted))
            return message

        await self.app(scope, limited, send)


MAX_REPORTED_ERRORS = 20
MAX_ECHOED_INPUT = 200  # characters


def _reported(error: dict) -> dict:
    """A validation error as the 422 shows it: the bad value only when it is short (FastAPI echoed every input,
    e.g. a whole 256 KiB list for an unexpected field, and encoding it took longer than parsing the body)."""
    out = {k: v for k, v in error.items() if k != "input"}
    value = error.get("input")
    if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and
                                                                  len(value) <= MAX_ECHOED_INPUT):
        out["input"] = value
    return out


def install(app: FastAPI) -> None:
    app.add_middleware(BodySizeLimit)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 (a list of {loc, msg, type, ...}), with at most MAX_REPORTED_ERRORS errors."""
        errors = e.errors()
        shown = [_reported(err) for err in errors[:MAX_REPORTED_ERRORS]]
        if len(errors) > MAX_REPORTED_ERRORS:
            shown.append({"type": "too_many_errors", "loc": ["body"],
                          "msg": f"and {len(errors) - MAX_REPORTED_ERRORS} more errors"})
        return JSONResponse({"detail": jsonable_encoder(shown)}, status_code=422)

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
