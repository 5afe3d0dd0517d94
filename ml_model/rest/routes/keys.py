"""API key management (admin/service keys only). Keys are shown once; only their SHA-256 is stored."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from ml_model.rest import keys
from ml_model.rest.auth import Admin
from ml_model.rest.deps import Conn
from ml_model.rest.schemas import ApiKey, ApiKeyCreated, KeyCreate
from ml_model.rest.state import State
from semg import repo, secrets

router = APIRouter(tags=["api keys"])


@router.post("/keys", response_model=ApiKeyCreated, status_code=201)
def create_key(body: KeyCreate, _: Admin, conn: Conn) -> dict:
    """Mint a key: 'user' keys are scoped to user_id; 'admin'/'service' keys to everything."""
    return keys.create_key(conn, body.role, body.user_id, body.name, read_only=body.read_only)


@router.get("/keys", response_model=list[ApiKey])
def list_keys(
    _: Admin, conn: Conn,
    user_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    include_revoked: bool = False,
) -> list[dict]:
    return keys.list_keys(conn, user_id=user_id, include_revoked=include_revoked)


@router.delete("/keys/{key_id}", response_model=ApiKey)
def revoke_key(key_id: Annotated[int, Path(ge=1, le=2**63 - 1)], _: Admin, conn: Conn, state: State) -> dict:
    """Revoke a key; it stops working at once. The platform's own service key cannot be revoked here."""
    own = keys.lookup(conn, secrets.service_api_key(state.settings))
    if own is not None and own["id"] == key_id:
        raise repo.Conflict("this is the platform's service key (SEMG_SERVICE_KEY); rotate that setting instead")
    row = keys.revoke_key(conn, key_id)
    state.key_cache.clear()
    return row
