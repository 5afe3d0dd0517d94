"""Choosing the model served to a user (roll back without retraining) and going back to the newest:
PUT/DELETE /users/{user_id}/served-model, what GET /models and the model list say, and other API instances
following the change through models.updated."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from ml_model.rest import keys as keystore
from ml_model.rest.demo_models import insert_artifact, random_artifact


def _job(conn, user_id: int, queued: str) -> int:
    """A completed training job queued `queued` (a PostgreSQL interval) before now."""
    with conn.cursor() as cur:
        cur.execute("""INSERT INTO training_jobs (user_id, status, progress, created_at, finished_at)
                       VALUES (%s, 'completed', 100, now() - %s::interval, now()) RETURNING id""", (user_id, queued))
        return cur.fetchone()[0]


@pytest.fixture
def two_models(make_user, clean_db):
    """A user with an older model (classes REST/a/b) and the newer one of a later training (the default classes):
    (user, older id, newer id)."""
    user = make_user()
    uid = user["id"]
    w, m = random_artifact(8, 200.0, seed=1, classes=("REST", "a", "b"))
    older = insert_artifact(clean_db, uid, w, m, job_id=_job(clean_db, uid, "2 hours"))
    w, m = random_artifact(8, 200.0, seed=2)
    newer = insert_artifact(clean_db, uid, w, m, job_id=_job(clean_db, uid, "1 hour"))
    return user, older, newer


def _decided_by(api, headers, uid: int) -> int:
    body = {"user_id": uid, "windows": np.zeros((1, 8, 50)).tolist()}
    r = api.post("/predict", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["model_id"]


def test_a_chosen_model_is_served_at_once_and_the_newest_again_after_delete(api, keys, two_models):
    user, older, newer = two_models
    uid = user["id"]
    mine = keys("user", uid)
    assert _decided_by(api, keys.service, uid) == newer
    info = api.get(f"/models/{uid}", headers=mine).json()
    assert (info["artifact_id"], info["served"], info["chosen"], info["chosen_at"]) == (newer, True, False, None)

    r = api.put(f"/users/{uid}/served-model", json={"artifact_id": older}, headers=mine)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["user_id"], body["artifact_id"], body["chosen"]) == (uid, older, True) and body["chosen_at"]
    # this instance serves it at once: no poll, no message waited for
    assert _decided_by(api, keys.service, uid) == older
    info = api.get(f"/models/{uid}", headers=mine).json()
    assert (info["artifact_id"], info["chosen"], info["chosen_at"]) == (older, True, body["chosen_at"])
    assert info["classes"] == ["REST", "a", "b"]
    assert {m["artifact_id"]: m["served"] for m in api.get("/models", headers=keys.admin).json()} == {older: True}
    listed = {m["artifact_id"]: (m["served"], m["chosen"]) for m in
              api.get(f"/users/{uid}/models", headers=mine).json()}
    assert listed == {older: (True, True), newer: (False, False)}

    r = api.delete(f"/users/{uid}/served-model", headers=mine)
    assert r.status_code == 200, r.text
    assert r.json() == {"user_id": uid, "artifact_id": newer, "job_id": r.json()["job_id"], "chosen": False,
                        "chosen_at": None} and r.json()["job_id"]
    assert _decided_by(api, keys.service, uid) == newer
    assert api.get(f"/models/{uid}", headers=mine).json()["chosen"] is False


def test_who_may_choose_and_what_is_refused(api, keys, two_models, make_user, clean_db):
    user, older, newer = two_models
    uid = user["id"]
    other = make_user()
    w, m = random_artifact(8, 200.0, seed=3)
    theirs = insert_artifact(clean_db, other["id"], w, m)
    read_only = {"X-API-Key": keystore.create_key(clean_db, "user", uid, "controller", read_only=True)["key"]}
    path = f"/users/{uid}/served-model"
    for method, headers, status in [("PUT", {}, 401), ("DELETE", {}, 401),
                                    ("PUT", read_only, 403), ("DELETE", read_only, 403),
                                    ("PUT", keys("user", other["id"]), 403), ("DELETE", keys("user", other["id"]), 403)]:
        r = api.request(method, path, json={"artifact_id": older} if method == "PUT" else None, headers=headers)
        assert r.status_code == status, (method, headers, r.text)
    # another user's model, a missing one: the same 404 (a user key learns no other ids)
    for artifact_id in (theirs, 424242):
        r = api.put(path, json={"artifact_id": artifact_id}, headers=keys.admin)
        assert r.status_code == 404 and r.json()["detail"].startswith(f"user {uid} has no model {artifact_id}"), r.text
    # true was model 1 and "1" too (lax coercion): only a number chooses
    for body in ({"artifact_id": 0}, {"artifact_id": "x"}, {}, {"artifact_id": older, "user_id": 1},
                 {"artifact_id": True}, {"artifact_id": str(older)}, {"artifact_id": 2**63}, {"artifact_id": -1}):
        assert api.put(path, json=body, headers=keys.admin).status_code == 422, body
    assert api.put("/users/424242/served-model", json={"artifact_id": older}, headers=keys.admin).status_code == 404
    assert api.delete("/users/424242/served-model", headers=keys.admin).status_code == 404
    for bad in ("x", "-1", "0", str(2**63), "1.5"):  # a user id that is no id: 422, never a 500
        assert api.put(f"/users/{bad}/served-model", json={"artifact_id": older}, headers=keys.admin).status_code \
            == 422, bad
        assert api.delete(f"/users/{bad}/served-model", headers=keys.admin).status_code == 422, bad
    assert _decided_by(api, keys.service, uid) == newer  # nothing refused changed anything
    # an admin key may choose for any user
    assert api.put(path, json={"artifact_id": older}, headers=keys.admin).json()["artifact_id"] == older


@pytest.fixture
def no_poll(monkeypatch):
    """The in-process API never polls for models (set before its lifespan starts): only models.updated moves it."""
    import ml_model.api
    monkeypatch.setattr(ml_model.api, "MODEL_POLL_S", 3600.0)


def test_another_api_instance_follows_the_choice_through_models_updated(no_poll, api, keys, two_models, settings,
                                                                         state_dir):
    """The choice made on one API instance (a server process) is served by another (this process's app, which does
    not poll) as soon as models.updated arrives."""
    from ml_model.api import app
    from tests.inference.conftest import ApiServer

    user, older, newer = two_models
    uid = user["id"]
    registry = app.state.semg.models
    assert _decided_by(api, keys.service, uid) == newer
    deadline = time.monotonic() + 30
    while app.state.semg.nats is None:  # subscribed to models.updated
        assert time.monotonic() < deadline, "the in-process API did not connect to NATS"
        time.sleep(0.05)
    server = ApiServer(settings.api_url, state_dir / "logs" / "test-api-served.log")
    server.start()
    try:
        r = httpx.put(f"{settings.api_url}/users/{uid}/served-model", json={"artifact_id": older},
                      headers=keys("user", uid), timeout=30)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 20
        while registry.cached(uid).artifact_id != older:
            assert time.monotonic() < deadline, "the other instance never switched (models.updated not sent?)"
            time.sleep(0.05)
        assert registry.cached(uid).chosen_at is not None
        assert _decided_by(api, keys.service, uid) == older
        r = httpx.delete(f"{settings.api_url}/users/{uid}/served-model", headers=keys("user", uid), timeout=30)
        assert r.status_code == 200 and r.json()["artifact_id"] == newer, r.text
        deadline = time.monotonic() + 20
        while registry.cached(uid).artifact_id != newer:
            assert time.monotonic() < deadline, "the other instance never went back to the newest model"
            time.sleep(0.05)
        assert registry.cached(uid).chosen_at is None
    finally:
        server.stop()


def test_the_model_of_the_job_queued_last_is_served_whichever_finishes_last(api, keys, make_user, clean_db):
    """Two jobs at once: the long one queued first stores its model last; the quick one's stays served."""
    from ml_model.api import app

    uid = make_user()["id"]
    long_job, quick_job = _job(clean_db, uid, "2 hours"), _job(clean_db, uid, "1 hour")
    w, m = random_artifact(8, 200.0, seed=4)
    quick = insert_artifact(clean_db, uid, w, m, job_id=quick_job)
    assert _decided_by(api, keys.service, uid) == quick
    w, m = random_artifact(8, 200.0, seed=5)
    insert_artifact(clean_db, uid, w, m, job_id=long_job)  # stored last, as the trainer does when it ends
    app.state.semg.models.refresh_all()  # the poll after it (models.updated reloads the user alike)
    assert _decided_by(api, keys.service, uid) == quick
    assert api.get(f"/models/{uid}", headers=keys.admin).json()["artifact_id"] == quick


def test_a_model_that_does_not_load_is_not_chosen(api, keys, two_models, clean_db):
    """A model whose weights do not load is refused (422, saying why) and nothing changes: before, it was stored as
    chosen and every page said it was used, while the API went on serving the previous model."""
    user, older, newer = two_models
    uid = user["id"]
    with clean_db.cursor() as cur:
        cur.execute("UPDATE model_artifacts SET weights = %s WHERE id = %s", (b"not a model", older))
    r = api.put(f"/users/{uid}/served-model", json={"artifact_id": older}, headers=keys("user", uid))
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"model {older} cannot be served: it does not load ("), r.text
    info = api.get(f"/models/{uid}", headers=keys.admin).json()
    assert (info["artifact_id"], info["chosen"]) == (newer, False)
    assert _decided_by(api, keys.service, uid) == newer
