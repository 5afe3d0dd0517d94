"""`X-API-Key` authentication and per-user authorisation as FastAPI dependencies.

Verified keys are cached so the hot /predict path costs no database round trip (and a slow commit elsewhere
never stalls it); revoking a key through the API drops it from the cache at once, a key revoked elsewhere
(the CLI) stops working within KEY_REVALIDATE_S.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Annotated

import psycopg2
from fastapi import Depends, HTTPException, Path, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader

from ml_model.rest import keys
from ml_model.rest.errors import ROLE_SCOPE_KEY, TRUSTED_ROLES, error_response
from ml_model.rest.pool import DatabaseUnavailable
from ml_model.rest.state import AppState, State

KEY_TTL_S = 5.0
# A key checked longer ago than this is checked again before its request is answered (the answer cached before is
# used only when the database cannot say): served stale up to KEY_MAX_STALE_S, a key revoked with the CLI passed
# once more whenever it came back within a minute, however long after its revocation.
KEY_REVALIDATE_S = 2 * KEY_TTL_S
KEY_MAX_STALE_S = 60.0
MAX_CACHED_KEYS = 10_000
TOUCH_INTERVAL_S = 60.0  # last_used_at is informative: at most one write per key and minute
HEADER = "X-API-Key"

log = logging.getLogger("semg.api.auth")

api_key_header = APIKeyHeader(name=HEADER, auto_error=False, description="API key (admin, service or user role)")


@dataclass(frozen=True)
class Principal:
    key_id: int
    role: str  # 'admin' | 'service' | 'user'
    user_id: int | None  # set for role 'user' only
    read_only: bool = False  # may only read (READ_METHODS)

    @property
    def is_admin(self) -> bool:
        return self.role in ("admin", "service")

    def can_access(self, user_id: int | None) -> bool:
        return self.is_admin or (user_id is not None and self.user_id == user_id)

    def check_user(self, user_id: int | None) -> None:
        if not self.can_access(user_id):
            raise HTTPException(403, "this API key may only access its own user's data")


class KeyCache:
    """Verified keys by SHA-256. A valid entry older than KEY_TTL_S is still served (up to KEY_REVALIDATE_S)
    while one background check refreshes it, so no request ever waits for the database on a hot key; an older
    one ('old') is checked first, and served up to KEY_MAX_STALE_S only when the database cannot be reached.

    ``clear()`` (a key revoked, a user deleted) starts a new generation: a check that began before it may have
    read the key as valid, so its answer is not cached (``put`` with the older generation is ignored).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._entries: dict[str, tuple[Principal | None, float]] = {}
        self._refreshing: set[str] = set()
        self._touched: dict[int, float] = {}
        # the last key check could not reach the database: 'old' entries are then served as 'stale' (one request
        # waits for the outage to be noticed, not every one: the live worker's must not wait for a connect timeout)
        self.unreachable = False

    def get(self, digest: str) -> tuple[str, Principal | None]:
        """('fresh' | 'stale' | 'old' | 'miss', principal)."""
        with self._lock:
            hit = self._entries.get(digest)
        if hit is None:
            return "miss", None
        age = time.monotonic() - hit[1]
        if age < KEY_TTL_S:
            return "fresh", hit[0]
        if hit[0] is not None and age < KEY_MAX_STALE_S:
            return ("stale" if age < KEY_REVALIDATE_S else "old"), hit[0]
        return "miss", None

    @property
    def generation(self) -> int:
        return self._generation

    def put(self, digest: str, principal: Principal | None, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            if len(self._entries) > MAX_CACHED_KEYS:  # bounded: wrong keys must not grow it without end
                # ... nor push out the valid ones: a flood of made-up keys would otherwise send every caller to the
                # database (and during an outage turn their requests into 503s before KEY_MAX_STALE_S)
                self._entries = {d: e for d, e in self._entries.items() if e[0] is not None}
                if len(self._entries) > MAX_CACHED_KEYS:
                    self._entries.clear()
            self._entries[digest] = (principal, time.monotonic())

    def start_refresh(self, digest: str) -> bool:
        with self._lock:
            if digest in self._refreshing:
                return False
            self._refreshing.add(digest)
            return True

    def end_refresh(self, digest: str) -> None:
        with self._lock:
            self._refreshing.discard(digest)

    def due_for_touch(self, key_id: int) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._touched.get(key_id, -1e9) < TOUCH_INTERVAL_S:
                return False
            self._touched[key_id] = now
            return True

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()


def _verify(state: AppState, key: str) -> Principal | None:
    with state.pool.connection() as conn:
        row = keys.lookup(conn, key)
        if row is None:
            return None
        if state.key_cache.due_for_touch(row["id"]):
            keys.touch(conn, [row["id"]])
    return Principal(key_id=row["id"], role=row["role"], user_id=row["user_id"], read_only=bool(row["read_only"]))


async def _refresh(state: AppState, key: str, digest: str) -> None:
    generation = state.key_cache.generation
    try:
        state.key_cache.put(digest, await run_in_threadpool(_verify, state, key), generation)
        state.key_cache.unreachable = False
    except Exception as e:  # noqa: BLE001 - keep serving the cached answer; the next request tries again
        state.key_cache.unreachable = True
        log.debug("background key check failed: %s", e)
    finally:
        state.key_cache.end_refresh(digest)


READ_METHODS = ("GET", "HEAD")
READ_ONLY_DETAIL = "this API key is read-only: it may only read (GET); use a key that is not read-only to change data"


def check_method(principal: Principal, method: str) -> None:
    """403 for a read-only key asking to do anything but read."""
    if principal.read_only and method.upper() not in READ_METHODS:
        raise HTTPException(403, READ_ONLY_DETAIL)


async def get_principal(
    state: State, key: Annotated[str | None, Security(api_key_header)], request: Request
) -> Principal:
    """The caller behind X-API-Key; 401 when it is missing, unknown or revoked; 403 for a read-only key that asks to
    change something."""
    principal = await verified_principal(state, key)
    check_method(principal, request.method)
    return principal


async def verified_principal(state: AppState, key: str | None) -> Principal:
    """The caller behind a key; 401 when it is missing, unknown or revoked."""
    if not key:
        raise HTTPException(401, f"missing API key: send it in the {HEADER} header",
                            headers={"WWW-Authenticate": HEADER})
    digest = keys.key_hash(key)
    status, principal = state.key_cache.get(digest)
    if status == "old" and state.key_cache.unreachable:
        status = "stale"
    if status in ("miss", "old"):
        generation = state.key_cache.generation
        try:
            checked = await run_in_threadpool(_verify, state, key)
            if state.key_cache.generation != generation and checked is not None:
                checked = await run_in_threadpool(_verify, state, key)  # revoked meanwhile? ask again
        except (DatabaseUnavailable, psycopg2.Error):
            state.key_cache.unreachable = True
            if status == "miss":
                raise
            checked = principal  # the database cannot say (an outage): keep the answer cached before, not put
        else:
            state.key_cache.unreachable = False
            state.key_cache.put(digest, checked, generation)
        principal = checked
    elif status == "stale" and state.key_cache.start_refresh(digest):
        task = asyncio.get_running_loop().create_task(_refresh(state, key, digest))
        state.tasks.append(task)
        task.add_done_callback(lambda t: state.tasks.remove(t) if t in state.tasks else None)
    if principal is None:
        raise HTTPException(401, "invalid or revoked API key", headers={"WWW-Authenticate": HEADER})
    return principal


Caller = Annotated[Principal, Depends(get_principal)]


async def require_admin(p: Caller) -> Principal:
    if not p.is_admin:
        raise HTTPException(403, "this endpoint needs an admin or service API key")
    return p


Admin = Annotated[Principal, Depends(require_admin)]


async def user_scope(user_id: Annotated[int, Path(ge=1, le=2**63 - 1, description="user id")], p: Caller) -> int:
    """The path's user_id, once the caller is allowed to touch that user's data (else 403)."""
    p.check_user(user_id)
    return user_id


UserScoped = Annotated[int, Depends(user_scope)]


OPEN_PATHS = ("/health",)  # the one route that needs no key (it reads no body)
# Requests with a body that one user key (or one nobody could verify) may have under way at once. Each such body
# costs up to a few ms of the event loop and its /predict windows queue for the one inference thread before the
# live worker's: without a bound, one key on many connections slowed live recognition for everyone.
USER_MAX_IN_FLIGHT = 2
UNVERIFIED = "unverified"  # the in-flight count of all keys that could not be verified (not a SHA-256 hex digest)


class KeyBeforeBody:
    """ASGI middleware: a request that carries a body is answered 401 before its body is read unless its
    X-API-Key is valid. FastAPI reads and parses a route's body before it checks the key, so without this anyone
    could make the API parse up to MAX_BODY_BYTES of JSON (over a GB of memory and seconds of a blocked event
    loop, stalling /predict for everyone) with no key at all. Every route that takes a body needs a key.

    The verified key's role goes into the scope (ROLE_SCOPE_KEY) for BodySizeLimit, inside this: only admin and
    service keys may send up to MAX_BODY_BYTES; a user key, or one that could not be verified (the database is
    down), gets USER_MAX_BODY_BYTES. Such a key may have USER_MAX_IN_FLIGHT requests with a body under way at
    once (all keys that could not be verified together); one more gets 429 before its body is read."""

    def __init__(self, app, user_max_in_flight: int = USER_MAX_IN_FLIGHT) -> None:
        self.app, self.user_max_in_flight = app, user_max_in_flight
        self.in_flight: dict[str, int] = {}  # key hash -> requests under way (one event loop: no lock needed)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scope.pop(ROLE_SCOPE_KEY, None)  # only ever set here, from a verified key
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        has_body = b"transfer-encoding" in headers or (length is not None and length.strip() not in (b"", b"0"))
        if not has_body:
            await self.app(scope, receive, send)
            return
        state = getattr(scope["app"].state, "semg", None)
        key = headers.get(HEADER.lower().encode(), b"").decode("latin-1")
        try:
            if state is not None:
                principal = await verified_principal(state, key or None)
                scope[ROLE_SCOPE_KEY] = principal.role
                check_method(principal, scope["method"])  # refused before its body is read
        except HTTPException as e:
            await error_response(e.status_code, e.detail, e.headers)(scope, receive, send)
            return
        except Exception:  # noqa: BLE001, S110 - e.g. the database is down: the route gives its usual answer
            pass  # (and the body, unverified, gets the user limits)
        if scope.get(ROLE_SCOPE_KEY) in TRUSTED_ROLES:
            await self.app(scope, receive, send)
            return
        # A key nobody could verify (the database is down) counts under one shared name: under its own, every
        # made-up key would be a new count and anyone could have any number of bodies parsed at once.
        verified = ROLE_SCOPE_KEY in scope
        digest = keys.key_hash(key) if verified else UNVERIFIED
        if self.in_flight.get(digest, 0) >= self.user_max_in_flight:
            detail = (f"too many requests at once with this API key: a user key may have {self.user_max_in_flight} "
                      f"requests with a body under way; wait for their answers") if verified else (
                      f"the database is unavailable, so this API key cannot be verified, and keys that cannot be "
                      f"verified may have {self.user_max_in_flight} requests with a body under way together; "
                      f"retry later")
            await error_response(429, detail, {"Retry-After": "1"})(scope, receive, send)
            return
        self.in_flight[digest] = self.in_flight.get(digest, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            if self.in_flight[digest] <= 1:
                del self.in_flight[digest]
            else:
                self.in_flight[digest] -= 1
