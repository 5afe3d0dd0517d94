"""Map domain and infrastructure errors to HTTP answers so no request ends in a 500.

RepoError subclasses carry messages meant for people: NotFound -> 404, Conflict -> 409, Invalid -> 422.
A database outage is a 503 with a clear message (clients may retry); constraint violations that slip past
the repository are 409/422, never a stack trace.
"""

from __future__ import annotations

import logging

import numpy as np
import psycopg2
import psycopg2.errors
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ml_model.rest.pool import DatabaseUnavailable
from ml_model.rest.serving import InputError
from semg import repo
from semg.db import first_line

log = logging.getLogger("semg.api.errors")


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The API's error answer: {"detail": ...} (also sent by the ASGI middlewares, before any route runs)."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


MAX_BODY_BYTES = 128 * 2**20  # above the largest legitimate /predict batch; parsing more would cost GBs
# Callers whose key is not a verified admin or service key: a `user` key, or one that could not be checked (the
# database is down). FastAPI parses and validates JSON on the event loop, where the worst body of this size (deep
# nested lists of one-digit numbers) costs ~0.1 s, not the ~6 s a 128 MB body did, stalling /predict for everyone.
# As data_b64 (base64 int16) it still holds ~98k values: 245 windows of 8 x 50, or a minute of 8 channels at 200 Hz.
USER_MAX_BODY_BYTES = 256 * 2**10
# Within those bytes the parse cost is set by how many values the JSON holds: 256 KiB of one-value windows
# ([[0]],[[0]],...) took ~0.1 s of the event loop, the same bytes as data_b64 ~0.2 ms. At most ~0.8 us per
# value (measured worst case), 8192 values cost at most ~6 ms: 20 nested-list windows of 8 x 50, ~900 samples
# of 8 channels, far more than any other route's body holds (a 10,000-character note is one value).
USER_MAX_JSON_VALUES = 8192
TRUSTED_ROLES = ("admin", "service")
ROLE_SCOPE_KEY = "semg.role"  # the ASGI scope entry where KeyBeforeBody records the verified key's role


def _too_large(limit: int, trusted: bool) -> str:
    if trusted:
        return f"request body too large (at most {limit} bytes)"
    return (f"request body too large: at most {limit} bytes ({limit // 1024} KiB) for a user API key (or one that "
            f"could not be verified). Send /predict data as data_b64 (the compact form: base64 of little-endian int16, "
            f"with its shape) or split it into several requests")


_STRUCTURE = np.zeros(256, dtype=bool)
_STRUCTURE[list(b"[{,")] = True


def json_values(body: bytes) -> int:
    """How many values a JSON text holds, from its bytes, without parsing it: every '[', '{' and ',' outside
    strings (a container counts as its first element's place). Exact for valid UTF-8 JSON: the number of values
    below the top one, plus one per empty container. For invalid JSON it counts the values before the first
    error, which is what a parser reads before it gives up. Bytes that cannot be UTF-8 JSON (NUL: UTF-16/32,
    which json.loads accepts) are counted without skipping strings, never fewer than the parser would read.

    body: bytes of any length -> int >= 0. O(len(body)) in numpy; ~0.5 ms for 256 KiB.
    """
    b = np.frombuffer(body, dtype=np.uint8)
    marks = np.flatnonzero(_STRUCTURE[b])
    if not len(marks) or 0 in b:
        return len(marks)
    quotes = np.flatnonzero(b == 0x22)
    backslash = b == 0x5C
    if len(quotes) and backslash.any():
        # a quote is escaped when an odd number of backslashes runs up to it
        plain = np.flatnonzero(~backslash)
        before = np.searchsorted(plain, quotes) - 1  # the last non-backslash before each quote
        start = np.where(before >= 0, plain[np.maximum(before, 0)], -1)
        quotes = quotes[(quotes - 1 - start) % 2 == 0]
    # a mark is outside strings when an even number of (unescaped) quotes precedes it
    return int(np.count_nonzero(np.searchsorted(quotes, marks) % 2 == 0))


def _too_many_values(limit: int) -> str:
    return (f"request body holds too many JSON values: at most {limit} (numbers, strings, lists, objects) for a "
            f"user API key (or one that could not be verified). Send /predict data as data_b64 (base64 of "
            f"little-endian int16, with its shape) or split it into several requests")


class BodySizeLimit:
    """ASGI middleware: a request body over its limit gets 413, whether it says its length or streams it.

    Checked before anything parses it (FastAPI reads and parses the body before the API key is checked). The limit
    is ``max_bytes`` for a verified admin or service key (KeyBeforeBody, outside this, records the role in the
    scope), else the smaller ``user_max_bytes``: a user key, or a key nobody could verify, may not make the event
    loop parse seconds' worth of JSON. Such a body is read whole (it is small) and also gets 413 when it holds
    more than ``user_max_values`` JSON values (json_values), the other measure of its parse cost.
    """

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES, user_max_bytes: int = USER_MAX_BODY_BYTES,
                 user_max_values: int = USER_MAX_JSON_VALUES) -> None:
        self.app, self.max_bytes, self.user_max_bytes = app, max_bytes, user_max_bytes
        self.user_max_values = user_max_values

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trusted = scope.get(ROLE_SCOPE_KEY) in TRUSTED_ROLES
        limit = self.max_bytes if trusted else min(self.max_bytes, self.user_max_bytes)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await error_response(413, _too_large(limit, trusted))(scope, receive, send)
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

        async def counted() -> dict:
            """The whole body as one message, once its values are counted (an early disconnect as it came)."""
            chunks = []
            while True:
                message = await limited()
                if message["type"] != "http.request":
                    return message
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            if json_values(body) > self.user_max_values:
                raise HTTPException(413, _too_many_values(self.user_max_values))
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, limited if trusted else counted, send)


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


_NOT_JSON = ("the request body must be JSON sent with the header Content-Type: application/json (got Content-Type: "
             "{}). curl -d sends a form unless given -H 'Content-Type: application/json'; Python requests: json=body")


# FastAPI's whole answer to a JSON body it could not decode (e.g. not UTF-8): it says neither why nor what to send
_FASTAPI_UNREADABLE = "There was an error parsing the body"
_UNREADABLE = ("the request body could not be read as JSON: it must be UTF-8 text (JSON escapes like \\u00fc for "
               "other characters are fine)")


def _not_json(errors: list) -> bool:
    """FastAPI parses a body as JSON only when its Content-Type says so (none counts as not: CSRF); otherwise the
    model gets the raw bytes and the 422 said only "Input should be a valid dictionary or object"."""
    return len(errors) == 1 and errors[0].get("type") == "model_attributes_type" and \
        tuple(errors[0].get("loc") or ()) == ("body",) and isinstance(errors[0].get("input"), bytes | bytearray)


def install(app: FastAPI) -> None:
    app.add_middleware(BodySizeLimit)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 (a list of {loc, msg, type, ...}), with at most MAX_REPORTED_ERRORS errors."""
        errors = e.errors()
        if _not_json(errors):
            return error_response(415, _NOT_JSON.format(request.headers.get("content-type") or "none"))
        shown = [_reported(err) for err in errors[:MAX_REPORTED_ERRORS]]
        if len(errors) > MAX_REPORTED_ERRORS:
            shown.append({"type": "too_many_errors", "loc": ["body"],
                          "msg": f"and {len(errors) - MAX_REPORTED_ERRORS} more errors"})
        return JSONResponse({"detail": jsonable_encoder(shown)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 400 and e.detail == _FASTAPI_UNREADABLE:
            return error_response(400, _UNREADABLE)
        return await http_exception_handler(request, e)

    @app.exception_handler(repo.NotFound)
    async def _not_found(_: Request, e: repo.NotFound) -> JSONResponse:
        return error_response(404, str(e))

    @app.exception_handler(repo.Conflict)
    async def _conflict(_: Request, e: repo.Conflict) -> JSONResponse:
        return error_response(409, str(e))

    @app.exception_handler(repo.RepoError)
    async def _invalid(_: Request, e: repo.RepoError) -> JSONResponse:
        return error_response(422, str(e))

    @app.exception_handler(InputError)
    async def _bad_input(_: Request, e: InputError) -> JSONResponse:
        return error_response(422, str(e))

    @app.exception_handler(DatabaseUnavailable)
    async def _db_down(_: Request, e: DatabaseUnavailable) -> JSONResponse:
        return error_response(503, str(e), {"Retry-After": "5"})

    @app.exception_handler(psycopg2.errors.TransactionRollbackError)
    async def _cancelled(_: Request, e: psycopg2.Error) -> JSONResponse:
        # A deadlock (or serialization failure) with a change made at the same moment: PostgreSQL cancelled this
        # one whole; the database is up and the same request normally succeeds at once.
        return error_response(503, f"another change made at the same moment conflicted with this one and the "
                                   f"database cancelled it ({first_line(e)}); nothing was changed: try again",
                              {"Retry-After": "1"})

    @app.exception_handler(psycopg2.OperationalError)
    @app.exception_handler(psycopg2.InterfaceError)
    async def _db_error(_: Request, e: psycopg2.Error) -> JSONResponse:
        return error_response(503, f"database unavailable: {first_line(e)}", {"Retry-After": "5"})

    @app.exception_handler(psycopg2.IntegrityError)
    async def _integrity(_: Request, e: psycopg2.IntegrityError) -> JSONResponse:
        return error_response(409, f"conflicts with stored data: {first_line(e)}")

    @app.exception_handler(psycopg2.DataError)
    async def _data(_: Request, e: psycopg2.DataError) -> JSONResponse:
        return error_response(422, f"invalid value: {first_line(e)}")
