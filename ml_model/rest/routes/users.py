"""Users, their gesture banks and their devices."""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Iterator
from typing import Annotated, BinaryIO

from fastapi import APIRouter, HTTPException, Path, Query, Response
from fastapi.responses import StreamingResponse

from ml_model.rest import queries
from ml_model.rest.auth import Admin, Caller, UserScoped
from ml_model.rest.deps import Conn
from ml_model.rest.schemas import (
    Device,
    DeviceCreate,
    DeviceWithKey,
    Gesture,
    GestureCreate,
    GestureUpdate,
    LibraryGesture,
    User,
    UserCreate,
    UserDeleted,
    UserUpdate,
)
from ml_model.rest.state import State
from semg import repo

router = APIRouter()
PathId = Annotated[int, Path(ge=1, le=2**63 - 1)]


# ---- users -------------------------------------------------------------------------------------------
@router.get("/users", response_model=list[User], tags=["users"])
def list_users(
    caller: Caller, conn: Conn,
    search: Annotated[str | None, Query(max_length=200, description="part of the name or email")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[dict]:
    """All users (admin/service), or just the caller's own user (user key)."""
    if caller.is_admin:
        return repo.list_users(conn, search=search, limit=limit, offset=offset)
    return repo.list_users(conn, search=search, limit=limit, offset=offset, only_user=caller.user_id)


@router.post("/users", response_model=User, status_code=201, tags=["users"])
def create_user(body: UserCreate, _: Admin, conn: Conn) -> dict:
    """Create a user (admin/service). Its id is the `userid` of its devices' packets and NATS subjects."""
    return repo.create_user(conn, body.name, body.email, body.notes)


@router.get("/users/{user_id}", response_model=User, tags=["users"])
def get_user(user_id: UserScoped, conn: Conn) -> dict:
    return repo.get_user(conn, user_id)


@router.patch("/users/{user_id}", response_model=User, tags=["users"])
def update_user(user_id: UserScoped, body: UserUpdate, conn: Conn) -> dict:
    """Change name, email or notes (fields left out stay as they are)."""
    return repo.update_user(conn, user_id, name=body.name, email=body.email, notes=body.notes)


@router.delete("/users/{user_id}", response_model=UserDeleted, tags=["users"])
def delete_user(user_id: UserScoped, conn: Conn, state: State) -> dict:
    """Delete the user and ALL their data (samples, sessions, videos, models, predictions, keys)."""
    deleted = repo.delete_user(conn, user_id, state.settings.video_dir)
    state.models.forget(user_id)
    state.key_cache.clear()  # the user's keys went with it: stop honouring them at once
    return deleted


_EXPORT_CHUNK = 1 << 20


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    try:
        f.seek(0)
        while chunk := f.read(_EXPORT_CHUNK):
            yield chunk
    finally:
        f.close()


# An export holds a pooled database connection and a worker thread while it is made (a minute for ~5 M samples):
# 16 at once (one script retrying on its timeout is enough) took every pooled connection, and every other request
# that needed the database waited 10 s and got 503, for everyone. At most this many are made at once, and one per
# API key; more get 429.
EXPORTS_AT_ONCE = 2
EXPORT_RETRY_AFTER_S = 30


class ExportSlots:
    """The exports being made, by API key id (thread-safe: export_user runs in the thread pool)."""

    def __init__(self, at_once: int = EXPORTS_AT_ONCE) -> None:
        self.at_once = at_once
        self._lock = threading.Lock()
        self._keys: set[int] = set()

    @contextlib.contextmanager
    def take(self, key_id: int) -> Iterator[None]:
        """Hold a place while an export is made; HTTPException 429 when the key has one under way or all are
        taken."""
        retry = {"Retry-After": str(EXPORT_RETRY_AFTER_S)}
        with self._lock:
            if key_id in self._keys:
                raise HTTPException(429, "an export with this API key is being made: wait for it (one at a time "
                                         "per key)", headers=retry)
            if len(self._keys) >= self.at_once:
                raise HTTPException(429, f"{self.at_once} exports are being made: retry in "
                                         f"{EXPORT_RETRY_AFTER_S} s", headers=retry)
            self._keys.add(key_id)
        try:
            yield
        finally:
            with self._lock:
                self._keys.discard(key_id)


export_slots = ExportSlots()


@router.get(
    "/users/{user_id}/export", tags=["users"], response_class=StreamingResponse,
    responses={200: {"description": "a zip of all the user's data", "content": {"application/zip": {}}},
               429: {"description": f"an export with this key is being made, or {EXPORTS_AT_ONCE} are (Retry-After)",
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
)
def export_user(user_id: UserScoped, caller: Caller, state: State) -> StreamingResponse:
    """Download ALL the user's data as a zip (owner or admin): their rows as JSON, samples as CSV per device,
    model weights and metadata, and their video files. See manifest.json inside.

    One export at a time per API key, and at most 2 at once on the server (each holds a database connection
    while it is made): 429 with Retry-After otherwise."""
    f = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # noqa: SIM115 - closed by _chunks when sent
    try:
        # the place first, then a pooled connection: a refused export takes none
        with export_slots.take(caller.key_id), state.pool.connection() as conn:
            repo.export_user_data(conn, user_id, state.settings.video_dir, out=f)
    except BaseException:
        f.close()
        raise
    return StreamingResponse(
        _chunks(f), media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="semg-user-{user_id}-export.zip"'},
    )


# ---- gestures ----------------------------------------------------------------------------------------
@router.get("/gesture-library", response_model=list[LibraryGesture], tags=["gestures"])
def gesture_library(_: Caller) -> list[dict]:
    """Common gestures to quick-add to a user's bank."""
    return repo.GESTURE_LIBRARY


@router.get("/users/{user_id}/gestures", response_model=list[Gesture], tags=["gestures"])
def list_gestures(user_id: UserScoped, conn: Conn) -> list[dict]:
    repo.get_user(conn, user_id)
    return repo.list_gestures(conn, user_id)


@router.post("/users/{user_id}/gestures", response_model=Gesture, status_code=201, tags=["gestures"])
def add_gesture(user_id: UserScoped, body: GestureCreate, conn: Conn) -> dict:
    """Add a gesture to the user's bank (REST is built in and cannot be added)."""
    repo.get_user(conn, user_id)
    return repo.add_gesture(conn, user_id, body.name, body.description, body.channels_used, body.channel_purposes)


@router.patch("/gestures/{gesture_id}", response_model=Gesture, tags=["gestures"])
def update_gesture(gesture_id: PathId, body: GestureUpdate, caller: Caller, conn: Conn, state: State) -> dict:
    """Change a gesture; a new name is also what its user's served model answers from now on (no retraining)."""
    owner = queries.gesture_owner(conn, gesture_id)
    caller.check_user(owner)
    gesture = repo.update_gesture(conn, gesture_id, name=body.name, description=body.description,
                                  channels_used=body.channels_used, channel_purposes=body.channel_purposes)
    state.models.follow_renames(owner, conn)
    return gesture


@router.delete("/gestures/{gesture_id}", status_code=204, tags=["gestures"])
def delete_gesture(gesture_id: PathId, caller: Caller, conn: Conn) -> Response:
    caller.check_user(queries.gesture_owner(conn, gesture_id))
    repo.delete_gesture(conn, gesture_id)
    return Response(status_code=204)


# ---- devices -----------------------------------------------------------------------------------------
@router.get("/devices", response_model=list[Device], tags=["devices"])
def list_all_devices(caller: Caller, conn: Conn) -> list[dict]:
    """Every registered device (admin/service), or the caller's own (user key), as /users and /jobs answer."""
    return repo.list_devices(conn, None if caller.is_admin else caller.user_id)


@router.get("/users/{user_id}/devices", response_model=list[Device], tags=["devices"])
def list_devices(user_id: UserScoped, conn: Conn) -> list[dict]:
    repo.get_user(conn, user_id)
    return repo.list_devices(conn, user_id)


@router.post("/users/{user_id}/devices", response_model=DeviceWithKey, status_code=201, tags=["devices"])
def register_device(user_id: UserScoped, body: DeviceCreate, conn: Conn) -> dict:
    """Register a sensor. A binary device's HMAC key is in this response only (put it in the sketch)."""
    repo.get_user(conn, user_id)
    return repo.register_device(conn, user_id, body.channel_count, body.sample_rate_hz, body.protocol, body.name)


@router.get("/devices/{device_id}", response_model=Device, tags=["devices"])
def get_device(device_id: PathId, caller: Caller, conn: Conn) -> dict:
    dev = repo.get_device(conn, device_id)
    caller.check_user(dev["user_id"])
    return dev


@router.post("/devices/{device_id}/rotate-key", response_model=DeviceWithKey, tags=["devices"])
def rotate_device_key(device_id: PathId, caller: Caller, conn: Conn) -> dict:
    """Give a binary device a new key (returned once); packets signed with the old key are rejected."""
    caller.check_user(queries.device_owner(conn, device_id))
    return repo.rotate_device_key(conn, device_id)


@router.post("/devices/{device_id}/reset-boot", response_model=DeviceWithKey, tags=["devices"])
def reset_device_boot(device_id: PathId, caller: Caller, conn: Conn) -> dict:
    """After re-flashing a binary device (which restarts its boot counter), accept its next boot: without this
    its packets are rejected as `old_boot`. The device gets a new key too (returned once; flash it), since
    with the old key any packet captured before would pass as a newer boot. The UDP server applies both
    within a few seconds."""
    caller.check_user(queries.device_owner(conn, device_id))
    return repo.reset_device_boot(conn, device_id)


@router.delete("/devices/{device_id}", status_code=204, tags=["devices"])
def delete_device(device_id: PathId, caller: Caller, conn: Conn) -> Response:
    """Delete the device and its stored samples."""
    caller.check_user(queries.device_owner(conn, device_id))
    repo.delete_device(conn, device_id)
    return Response(status_code=204)
