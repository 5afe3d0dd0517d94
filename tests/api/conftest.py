"""Fixtures for the API tests: an in-process app (TestClient, lifespan run) against the session's
PostgreSQL and NATS, and keys of every role."""

from __future__ import annotations

import contextlib

import pytest


@pytest.fixture
def api(clean_db, settings):
    """A TestClient of the API on an empty database (the service key is registered at startup)."""
    from fastapi.testclient import TestClient

    from ml_model.api import app
    with TestClient(app) as client:
        yield client


@pytest.fixture
def keys(api, clean_db):
    """Factory: keys(role, user_id=None) -> header dict; plus .admin and .service headers."""
    from ml_model.rest import keys as keystore
    from semg import secrets

    class Keys:
        service = {"X-API-Key": secrets.service_api_key()}

        def __call__(self, role: str, user_id: int | None = None) -> dict[str, str]:
            row = keystore.create_key(clean_db, role, user_id, f"test {role}")
            return {"X-API-Key": row["key"]}

    k = Keys()
    k.admin = k("admin")
    return k


@pytest.fixture
def make_user(clean_db):
    from semg import repo
    counter = iter(range(1, 10**6))

    def factory(name: str = "Test User") -> dict:
        return repo.create_user(clean_db, f"{name} {next(counter)}", f"user{next(counter)}@example.org")

    return factory


@contextlib.contextmanager
def no_server_errors(client):
    """Fail on any 5xx other than 503 (the documented answer while the database is down) in the block."""
    seen = []
    orig = client.request

    def request(*a, **kw):
        r = orig(*a, **kw)
        if r.status_code >= 500 and r.status_code != 503:
            seen.append((a, r.status_code, r.text))
        return r

    client.request = request
    try:
        yield seen
    finally:
        client.request = orig
    assert not seen, seen


def all_routes(client) -> list[tuple[str, str]]:
    """(METHOD, path template) of every documented endpoint (the OpenAPI schema lists the included routers)."""
    paths = client.get("/openapi.json").json()["paths"]
    return [(m.upper(), p) for p, ops in paths.items() for m in ops]


@pytest.fixture
def parses(monkeypatch):
    """Counts the request bodies FastAPI parses as JSON (starlette's Request.json)."""
    from starlette.requests import Request

    seen = []
    orig = Request.json

    async def json(self):
        seen.append(self.url.path)
        return await orig(self)

    monkeypatch.setattr(Request, "json", json)
    return seen


@pytest.fixture
def served(api, keys, make_user, clean_db):
    """Factory: served(channels=8, rate=200, seed=0) -> (user, weights, meta) with the model loaded."""
    def make(channels: int = 8, rate: float = 200.0, seed: int = 0, classes=None):
        user = make_user()
        kw = {"classes": classes} if classes else {}
        from ml_model.rest.demo_models import insert_artifact, random_artifact

        weights, meta = random_artifact(channels, rate, seed=seed, **kw)
        meta["artifact_id"] = insert_artifact(clean_db, user["id"], weights, meta)
        return user, weights, meta
    return make
