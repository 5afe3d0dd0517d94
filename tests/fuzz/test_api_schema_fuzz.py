"""Schemathesis against the API's own OpenAPI schema: every operation gets generated requests (valid and
invalid), with a valid admin key and with none. No answer may be a 5xx, and every answer must match what
the schema documents (status code, content type, body schema). Bounded examples, deterministic seed."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

MAX_EXAMPLES = int(os.environ.get("SEMG_FUZZ_API_EXAMPLES", "12"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
STATUSES: Counter = Counter()  # (run, status) -> requests, printed at the end (pytest -s)
FUZZ_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])


@pytest.fixture(scope="module")
def api_app(services, settings):
    """The API app with its lifespan started by schemathesis on a database with some data to find."""
    from semg import db
    conn = db.connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("""SELECT string_agg(format('%I', tablename), ', ') FROM pg_tables
                       WHERE schemaname = 'public' AND tablename <> 'schema_version'""")
        cur.execute(f"TRUNCATE {cur.fetchone()[0]} RESTART IDENTITY CASCADE")
    _seed(conn)
    from ml_model.api import app
    yield app, conn
    print(json.dumps({"schemathesis_requests": {f"{run} {code}": n for (run, code), n in sorted(STATUSES.items())}}))
    from schemathesis.python import asgi
    asgi.shutdown_lifespans()  # other test modules start the same app with their own lifespan
    conn.close()


def _seed(conn) -> None:
    """Users 1-3 with gestures, devices, a completed session, a job, a model and predictions: ids the generated
    requests will hit (small integers)."""
    from datetime import UTC, datetime, timedelta

    from ml_model.rest.demo_models import insert_artifact, random_artifact
    from semg import repo
    for i in range(1, 4):
        u = repo.create_user(conn, f"Fuzz {i}", f"fuzz{i}@example.org")
        repo.add_gesture(conn, u["id"], "fist")
        dev = repo.register_device(conn, u["id"], 4, 500.0)
        s = repo.create_session(conn, u["id"], dev["id"], ["fist"], 1, 1.0, 1.0)
        t0 = datetime.now(UTC) - timedelta(minutes=5)
        repo.start_session(conn, s["id"], at=t0)
        repo.end_session(conn, s["id"], at=t0 + timedelta(seconds=3))
        repo.schedule_job(conn, u["id"], [s["id"]], {"epochs": 1})
        weights, meta = random_artifact(4, 500.0, seed=i)
        insert_artifact(conn, u["id"], weights, meta)
        with conn.cursor() as cur:
            cur.execute("INSERT INTO predictions (user_id, gesture, confidence) VALUES (%s, 'fist', 0.5)", (u["id"],))


@pytest.fixture(scope="module")
def admin_headers(api_app):
    from ml_model.rest import keys as keystore
    _, conn = api_app
    for i in range(40):  # the admin key gets a large id: generated DELETE /keys/{small id} do not revoke it
        keystore.create_key(conn, "user", 1 + i % 3, f"decoy {i}")
    return {"X-API-Key": keystore.create_key(conn, "admin", None, "schemathesis")["key"]}


def _load_schema():
    """The schema as the app generates it (no server or lifespan needed to collect the tests); requests go to
    the app in-process, whose lifespan schemathesis starts at the first call (after the fixtures ran)."""
    from ml_model.api import app
    loaded = schemathesis.openapi.from_dict(app.openapi())
    loaded.app = app
    # a live decision stream never ends by itself (tests/api/test_live.py runs it against a real server)
    return loaded.exclude(path="/users/{user_id}/predictions/live")


schema = _load_schema()


@schema.parametrize()
@FUZZ_SETTINGS
def test_with_an_admin_key_no_5xx_and_answers_match_the_schema(case, api_app, admin_headers):
    # set on the case itself: schemathesis generates the X-API-Key security parameter (and drops it in some
    # negative cases); this run is about everything else, with a valid key
    case.headers = {**(case.headers or {}), **admin_headers}
    STATUSES["admin", case.call_and_validate(checks=CHECKS).status_code] += 1


@schema.parametrize()
@settings(FUZZ_SETTINGS, max_examples=max(3, MAX_EXAMPLES // 4))
def test_without_a_key_everything_but_health_is_401(case, api_app):
    # whatever X-API-Key schemathesis generates (none, empty, random) is not a valid key
    response = case.call_and_validate(checks=CHECKS)
    STATUSES["no key", response.status_code] += 1
    documented = case.method.lower() in schema.raw_schema["paths"][case.path]
    if not documented:  # e.g. TRACE /predict: 405; GET /sessions/plan is GET /sessions/{id}: 401
        assert response.status_code in (401, 405), (case.method, case.formatted_path, response.status_code)
    elif case.path == "/health":
        assert response.status_code == 200
    elif response.status_code == 400:  # FastAPI reads the body before any dependency runs: refused all the same
        assert response.json() == {"detail": "There was an error parsing the body"}
    else:
        assert response.status_code == 401, (case.method, case.formatted_path, response.status_code, response.text)
