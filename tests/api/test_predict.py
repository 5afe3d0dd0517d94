"""POST /predict and the served models: validation, batches of several users, parity with the Predictor,
hot reload without dropped requests."""

from __future__ import annotations

import asyncio
import base64
import threading
import time

import numpy as np
import pytest

from ml_model import artifacts
from ml_model.rest.demo_models import insert_artifact, random_artifact


def _windows(n, channels=8, win=50, seed=0):
    return np.random.default_rng(seed).integers(-100, 100, size=(n, channels, win))


def test_model_info(api, keys, served, clean_db):
    user, weights, meta = served()
    r = api.get(f"/models/{user['id']}", headers=keys.service)
    assert r.status_code == 200
    info = r.json()
    assert info["artifact_id"] == meta["artifact_id"] and info["classes"] == meta["classes"]
    assert (info["window"], info["step"], info["n_device_channels"]) == (50, 5, 8)
    assert info["size_bytes"] == len(weights) and info["accuracy"] == 0.5 and info["trained_at"]
    assert [m["user_id"] for m in api.get("/models", headers=keys.service).json()] == [user["id"]]
    assert api.get(f"/users/{user['id']}/models", headers=keys.service).json()[0]["artifact_id"] == meta["artifact_id"]
    assert api.get("/models/424242", headers=keys.service).status_code == 404
    # how and with what it was trained, to reproduce it (README: Reproducing a result)
    assert info["environment"] == meta["environment"] and info["environment"]["torch"]
    trained = {"seed": 7, "config": {"max_epochs": 3}, "epochs": 3}
    weights2, meta2 = random_artifact(seed=1)
    insert_artifact(clean_db, user["id"], weights2, {**meta2, "training": trained})
    newest = api.get(f"/users/{user['id']}/models", headers=keys.service).json()[0]
    assert newest["training"] == trained and newest["environment"] == meta2["environment"]


def test_predict_matches_the_predictor(api, keys, served):
    user, weights, meta = served(seed=3)
    x = _windows(5, seed=1)
    r = api.post("/predict", json={"user_id": user["id"], "windows": x.tolist()}, headers=keys.service)
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert res["model_id"] == meta["artifact_id"] and res["classes"] == meta["classes"] and res["error"] is None
    got = np.array([p["probabilities"] for p in res["predictions"]])
    want = artifacts.Predictor(weights, meta).predict_proba(x.astype(np.float32))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [p["gesture"] for p in res["predictions"]] == [meta["classes"][i] for i in want.argmax(1)]
    assert all(abs(p["confidence"] - max(p["probabilities"])) < 1e-6 for p in res["predictions"])


def test_a_model_trained_before_gesture_names_were_nfc_answers_with_the_banks_names(api, keys, served, clean_db):
    """A gesture typed with a decomposed accent (macOS) before names were NFC: the upgrade's migration 0005 made its
    bank entry, labels and plans NFC, but the model trained before kept the name as typed, so its decisions
    ("o" + U+0301 "k") no longer matched the bank's "ók" for a client mapping gestures to actions by name."""
    from semg import repo
    user, _, _ = served(classes=["REST", "o\u0301k"])
    bank = repo.add_gesture(clean_db, user["id"], "\u00f3k")["name"]
    r = api.post("/predict", json={"user_id": user["id"], "windows": _windows(40).tolist()}, headers=keys.service)
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert res["classes"] == ["REST", bank]
    assert {p["gesture"] for p in res["predictions"]} <= {"REST", bank}
    assert api.get(f"/models/{user['id']}", headers=keys.service).json()["classes"] == ["REST", bank]
    assert api.get(f"/users/{user['id']}/models", headers=keys.service).json()[0]["classes"] == ["REST", bank]


def test_user_key_may_predict_for_itself(api, keys, served):
    user, _, _ = served()
    r = api.post("/predict", json={"user_id": user["id"], "windows": _windows(1).tolist()},
                 headers=keys("user", user["id"]))
    assert r.status_code == 200


def test_samples_are_cut_with_the_models_window_and_step(api, keys, served):
    user, weights, meta = served()
    rec = np.random.default_rng(0).integers(-100, 100, size=(149, 8))
    r = api.post("/predict", json={"user_id": user["id"], "samples": rec.tolist(), "include_probabilities": False},
                 headers=keys.service)
    assert r.status_code == 200, r.text
    preds = r.json()["results"][0]["predictions"]
    assert len(preds) == (149 - 50) // 5 + 1 and preds[0]["probabilities"] is None
    wins = np.lib.stride_tricks.sliding_window_view(rec, 50, axis=0)[::5].astype(np.float32)
    want = artifacts.Predictor(weights, meta).predict(wins)[0]
    assert [p["gesture"] for p in preds] == want


def test_compact_base64_form(api, keys, served):
    user, weights, meta = served()
    x = _windows(3)
    for dtype in ("int16", "float32"):
        data = base64.b64encode(x.astype("<i2" if dtype == "int16" else "<f4").tobytes()).decode()
        r = api.post("/predict", json={"user_id": user["id"], "data_b64": data, "shape": [3, 8, 50], "dtype": dtype},
                     headers=keys.service)
        assert r.status_code == 200, r.text
        got = np.array([p["probabilities"] for p in r.json()["results"][0]["predictions"]])
        np.testing.assert_allclose(got, artifacts.Predictor(weights, meta).predict_proba(x.astype(np.float32)),
                                   atol=1e-5)


def test_batch_of_several_users_and_models(api, keys, served):
    a = served(seed=1)
    b = served(seed=2)
    c = served(channels=4, rate=500, seed=3)  # another architecture/window: its own group
    many = served(seed=4)
    items = [
        {"user_id": a[0]["id"], "windows": _windows(2, seed=1).tolist()},
        {"user_id": b[0]["id"], "windows": _windows(1, seed=2).tolist()},
        {"user_id": c[0]["id"], "windows": _windows(3, channels=4, win=125, seed=3).tolist()},
        {"user_id": many[0]["id"], "windows": _windows(40, seed=4).tolist()},  # runs on its own predictor
        {"user_id": 424242, "windows": _windows(1).tolist()},
        {"user_id": a[0]["id"], "windows": _windows(1, channels=4).tolist()},
    ]
    r = api.post("/predict", json={"items": items}, headers=keys.service)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["user_id"] for x in res] == [it["user_id"] for it in items]
    for (user, weights, meta), it, out in zip([a, b, c, many], items, res, strict=False):
        want = artifacts.Predictor(weights, meta).predict_proba(np.array(it["windows"], dtype=np.float32))
        np.testing.assert_allclose([p["probabilities"] for p in out["predictions"]], want, atol=1e-5)
        assert out["model_id"] == meta["artifact_id"]
    assert res[4]["error"] == {"status": 404, "detail": "user 424242 has no trained model"}
    assert res[5]["error"]["status"] == 422 and "8-channel" in res[5]["error"]["detail"]


@pytest.mark.parametrize("body,fragment", [
    ({"windows": [[[1.0] * 50] * 8]}, "user_id is required"),
    ({"user_id": "{uid}"}, "exactly one of"),
    ({"user_id": "{uid}", "windows": [[[1.0] * 50] * 8], "samples": [[1.0] * 8]}, "exactly one of"),
    ({"user_id": "{uid}", "windows": [[[1.0] * 50] * 4]}, "8-channel"),
    ({"user_id": "{uid}", "windows": [[[1.0] * 49] * 8]}, "windows of 50 samples"),
    ({"user_id": "{uid}", "windows": [[[1.0] * 50] * 7 + [[1.0] * 49]]}, "ragged"),
    ({"user_id": "{uid}", "windows": [[["a"] * 50] * 8]}, "valid number"),
    ({"user_id": "{uid}", "windows": []}, "no windows"),
    ({"user_id": "{uid}", "windows": [[1.0] * 50]}, "valid list"),
    ({"user_id": "{uid}", "samples": [[1.0] * 8] * 10}, "at least 50 samples"),
    ({"user_id": "{uid}", "data_b64": "!!!", "shape": [1, 8, 50]}, "base64"),
    ({"user_id": "{uid}", "data_b64": "AAAA", "shape": [1, 8, 50]}, "needs 800"),
    ({"user_id": "{uid}", "data_b64": "AAAA"}, "needs its shape"),
    ({"user_id": "{uid}", "data_b64": "AAAA", "shape": [1, 8, 50], "dtype": "float64"}, "int16"),
    ({"user_id": 0, "windows": [[[1.0] * 50] * 8]}, "greater than or equal to 1"),
    ({"items": []}, "at least 1 item"),
    ({"items": [{"user_id": "{uid}", "samples": [[0.0] * 8] * 50}], "user_id": "{uid}"}, "not both"),
    ({"user_id": "{uid}", "windows": [[[1.0] * 50] * 8], "bogus": 1}, "Extra inputs"),
])
def test_malformed_predict_requests_are_422(api, keys, served, body, fragment):
    user, _, _ = served()
    import json
    text = json.dumps(body).replace('"{uid}"', str(user["id"]))
    r = api.post("/predict", content=text, headers={**keys.service, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert fragment in r.text


def test_non_finite_values_are_422(api, keys, served):
    user, _, _ = served()
    x = _windows(1).astype(np.float32)
    x[0, 0, 0] = np.nan
    data = base64.b64encode(x.astype("<f4").tobytes()).decode()
    r = api.post("/predict", json={"user_id": user["id"], "data_b64": data, "shape": [1, 8, 50], "dtype": "float32"},
                 headers=keys.service)
    assert r.status_code == 422 and "NaN" in r.text
    row = "[" + ",".join(["Infinity"] * 50) + "]"
    text = f'{{"user_id": {user["id"]}, "windows": [[{",".join([row] * 8)}]]}}'
    r = api.post("/predict", content=text, headers={**keys.service, "Content-Type": "application/json"})
    assert r.status_code == 422


def test_finite_values_that_overflow_the_model_are_422_not_null_probabilities(api, keys, served):
    """1e30 is a valid float32, but the model's arithmetic overflows on it: the API answered 200 with null
    confidences (the schema says a number) and the first class as the gesture."""
    user, _, _ = served()
    huge = (np.ones((2, 8, 50), dtype=np.float32) * 1e30).tolist()
    r = api.post("/predict", json={"user_id": user["id"], "windows": huge}, headers=keys.service)
    assert r.status_code == 422, r.text
    assert "no finite probabilities for 2 of 2 windows" in r.json()["detail"] and "int16" in r.json()["detail"]
    other, _, _ = served(seed=1)
    items = [{"user_id": user["id"], "windows": huge}, {"user_id": other["id"], "windows": _windows(1).tolist()}]
    r = api.post("/predict", json={"items": items}, headers=keys.service)
    assert r.status_code == 200, r.text
    bad, good = r.json()["results"]
    assert bad["error"]["status"] == 422 and bad["predictions"] == [] and "finite" in bad["error"]["detail"]
    assert good["error"] is None and isinstance(good["predictions"][0]["confidence"], float)


def test_not_json_is_422(api, keys):
    r = api.post("/predict", content=b"{nope", headers={**keys.service, "Content-Type": "application/json"})
    assert r.status_code == 422


def test_unknown_user_is_404(api, keys):
    r = api.post("/predict", json={"user_id": 424242, "windows": _windows(1).tolist()}, headers=keys.service)
    assert r.status_code == 404 and "no trained model" in r.json()["detail"]


def _announce(user_id: int, artifact_id: int) -> None:
    from semg import natsio
    from semg.messages import MODELS_UPDATED, ModelUpdated

    async def send() -> None:
        nc = await natsio.connect("admin")
        await nc.publish(MODELS_UPDATED, ModelUpdated(userid=user_id, artifact_id=artifact_id).model_dump_json().encode())
        await nc.flush()
        await nc.close()

    asyncio.run(send())


def test_hot_reload_within_two_seconds_without_dropping_requests(api, keys, served, clean_db):
    user, _, meta = served(seed=1)
    uid = user["id"]
    body = {"user_id": uid, "windows": _windows(2).tolist()}
    assert api.post("/predict", json=body, headers=keys.service).json()["results"][0]["model_id"] == meta["artifact_id"]

    statuses: list[int] = []
    model_ids: list[int] = []
    stop = threading.Event()

    def hammer() -> None:  # requests keep flowing while the model is swapped
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            r = api.post("/predict", json=body, headers=keys.service)
            statuses.append(r.status_code)
            if r.status_code == 200:
                model_ids.append(r.json()["results"][0]["model_id"])

    t = threading.Thread(target=hammer)
    t.start()
    try:
        time.sleep(0.3)
        weights, new_meta = random_artifact(8, 200, seed=99, classes=("REST", "a", "b"))
        new_id = insert_artifact(clean_db, uid, weights, new_meta)
        t0 = time.monotonic()
        _announce(uid, new_id)
        while api.get(f"/models/{uid}", headers=keys.service).json()["artifact_id"] != new_id:
            assert time.monotonic() - t0 < 2.0, "new model not live within 2 s"
            time.sleep(0.02)
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    assert statuses and set(statuses) == {200}
    assert model_ids[0] == meta["artifact_id"] and model_ids[-1] == new_id
    r = api.post("/predict", json=body, headers=keys.service).json()["results"][0]
    assert r["classes"] == ["REST", "a", "b"]


def test_poll_finds_a_model_without_notification(api, keys, served, clean_db):
    """models.updated missed: the registry's refresh (the slow poll) still picks the model up."""
    from ml_model.api import app
    user, _, _ = served()
    weights, meta = random_artifact(8, 200, seed=5)
    new_id = insert_artifact(clean_db, user["id"], weights, meta)
    assert app.state.semg.models.refresh_all() >= 1
    assert api.get(f"/models/{user['id']}", headers=keys.service).json()["artifact_id"] == new_id


def test_a_renamed_gesture_is_answered_by_its_new_name_without_retraining(api, keys, make_user, clean_db):
    """The served model answered with the names it was trained under until the next training: 'fist' renamed
    'power grip' was still decided 'fist' live, and a client mapping gestures to actions by name got a name no
    longer in the bank. Renamed through the API: at once; through the web UI (another process): by the poll."""
    from ml_model.api import app
    from ml_model.jobs import INTERVAL_COLUMNS
    from semg import repo
    user = make_user()
    uid = user["id"]
    ids = {g: repo.add_gesture(clean_db, uid, g)["id"] for g in ("fist", "open hand", "pinch")}
    dev = repo.register_device(clean_db, uid, 8, 200.0)
    session = repo.create_session(clean_db, uid, dev["id"], ["fist", "open hand", "pinch"], 1, 2.0, 1.0)
    # the model learnt from this session's intervals, as a training job records them (meta["data"])
    intervals = [[iv["id"], iv["label"], iv["repetition"], 0, 1] for iv in session["intervals"]]
    weights, meta = random_artifact(8, 200, classes=("REST", "fist", "open hand", "pinch"))
    meta["data"] = {"sessions": [{"id": session["id"], "intervals": intervals}], "interval_columns": INTERVAL_COLUMNS}
    artifact_id = insert_artifact(clean_db, uid, weights, meta)
    body = {"user_id": uid, "windows": _windows(30).tolist()}

    def answers() -> tuple[list, set, dict]:
        (res,) = api.post("/predict", json=body, headers=keys.service).json()["results"]
        info = api.get(f"/models/{uid}", headers=keys.service).json()
        assert res["model_id"] == info["artifact_id"] == artifact_id and info["classes"] == res["classes"]
        return res["classes"], {p["gesture"] for p in res["predictions"]}, info["renamed"]

    assert answers()[0] == ["REST", "fist", "open hand", "pinch"]
    r = api.patch(f"/gestures/{ids['fist']}", json={"name": "power grip"}, headers=keys("user", uid))
    assert r.status_code == 200, r.text
    classes, decided, renamed = answers()
    assert classes == ["REST", "power grip", "open hand", "pinch"] and decided <= set(classes)
    assert renamed == {"fist": "power grip"}

    # the web UI renames in the database (repo.update_gesture); the API follows on its next poll
    repo.update_gesture(clean_db, ids["open hand"], name="open palm")
    app.state.semg.models.refresh_all()
    assert answers()[0] == ["REST", "power grip", "open palm", "pinch"]
    # two names swapped (through a third): each class follows its gesture, not the name
    for gid, to in ((ids["pinch"], "tmp"), (ids["fist"], "pinch"), (ids["pinch"], "power grip")):
        repo.update_gesture(clean_db, gid, name=to)
    app.state.semg.models.refresh_all()
    classes, decided, renamed = answers()
    assert classes == ["REST", "pinch", "open palm", "power grip"], classes
    assert renamed == {"fist": "pinch", "open hand": "open palm", "pinch": "power grip"}
    # the metrics and the model history keep the names it was trained under
    history = api.get(f"/users/{uid}/models", headers=keys.service).json()
    assert history[0]["classes"] == ["REST", "fist", "open hand", "pinch"]


def test_deleted_user_stops_being_served(api, keys, served):
    user, _, _ = served()
    assert api.delete(f"/users/{user['id']}", headers=keys.admin).status_code == 200
    assert api.get(f"/models/{user['id']}", headers=keys.admin).status_code == 404
    r = api.post("/predict", json={"user_id": user["id"], "windows": _windows(1).tolist()}, headers=keys.service)
    assert r.status_code == 404


def test_too_many_windows_are_refused_before_they_are_cut(api, keys, served):
    """1M samples (200k windows of this model) are refused without building the 320 MB float32 window copy."""
    import tracemalloc

    user, _, _ = served()
    n = 1_000_000
    data = base64.b64encode(np.zeros((n, 8), "<i2").tobytes()).decode()
    body = {"user_id": user["id"], "data_b64": data, "shape": [n, 8], "dtype": "int16"}
    tracemalloc.start()
    try:
        r = api.post("/predict", json=body, headers=keys.service)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status_code == 422 and "too many windows" in r.json()["detail"]
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"  # the request itself is ~21 MB of base64


def test_an_oversized_body_is_413_before_it_is_parsed():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from ml_model.rest.errors import BodySizeLimit, install

    app = FastAPI()
    install(app)
    app.user_middleware.clear()
    app.add_middleware(BodySizeLimit, max_bytes=1000)

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        return {"n": len(body["x"])}

    with TestClient(app) as client:
        assert client.post("/echo", json={"x": "a" * 100}).json() == {"n": 100}
        r = client.post("/echo", json={"x": "a" * 2000})
        assert r.status_code == 413 and "too large" in r.json()["detail"]

        def chunks():  # no Content-Length: counted as it streams in
            yield b'{"x": "'
            for _ in range(30):
                yield b"a" * 100
            yield b'"}'

        r = client.post("/echo", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text


def _predict_body(user_id: int, size: int) -> bytes:
    """A valid nested-list /predict body of exactly `size` bytes (windows, then spaces)."""
    import json

    window = np.full((8, 50), -123).tolist()
    n = (size - 100) // (len(json.dumps(window)) + 2)
    body = json.dumps({"user_id": user_id, "windows": [window] * n}).encode()
    assert len(body) <= size
    return body.ljust(size)


def _streamed(body: bytes):
    """The body in 16 KiB chunks with no Content-Length (Transfer-Encoding: chunked)."""
    def chunks():
        for i in range(0, len(body), 16384):
            yield body[i:i + 16384]
    return chunks()


def test_a_user_keys_body_over_its_limit_is_413_before_it_is_parsed(api, keys, served, parses):
    """Any valid key could send 128 MB of nested-list JSON to /predict, which FastAPI parses on the event loop
    (~6 s for 117 MB, /predict stalled for everyone). A user key may send USER_MAX_BODY_BYTES, which still holds
    245 windows of 8 x 50 int16 samples as data_b64, or ~61 s of 8 channels at 200 Hz; admin and service keys
    keep MAX_BODY_BYTES."""
    from ml_model.rest.errors import USER_MAX_BODY_BYTES

    user, _, _ = served()
    mine = {**keys("user", user["id"]), "Content-Type": "application/json"}
    body = _predict_body(user["id"], USER_MAX_BODY_BYTES + 1)
    r = api.post("/predict", content=body, headers=mine)
    assert r.status_code == 413, r.text[:300]
    detail = r.json()["detail"]
    assert str(USER_MAX_BODY_BYTES) in detail and "data_b64" in detail and "split" in detail
    r = api.post("/predict", content=_streamed(body), headers=mine)
    assert r.status_code == 413 and r.json()["detail"] == detail, r.text[:300]
    assert parses == []
    # under the limit a user key is served as before, e.g. a minute of data in the compact form
    for data in (_windows(245).astype("<i2"), np.random.default_rng(0).integers(-500, 500, (12_280, 8), "<i2")):
        compact = {"user_id": user["id"], "data_b64": base64.b64encode(data.tobytes()).decode(),
                   "shape": list(data.shape), "include_probabilities": False}
        r = api.post("/predict", json=compact, headers=mine)
        assert len(r.request.content) <= USER_MAX_BODY_BYTES
        assert r.status_code == 200, r.text[:300]
        n = len(data) if data.ndim == 3 else (len(data) - 50) // 5 + 1
        assert len(r.json()["results"][0]["predictions"]) == n
    # the oversized body with a service or admin key is served
    for trusted in (keys.service, keys.admin):
        r = api.post("/predict", content=body, headers={**trusted, "Content-Type": "application/json"})
        assert r.status_code == 200, r.text[:300]
        r = api.post("/predict", content=_streamed(body), headers={**trusted, "Content-Type": "application/json"})
        assert r.status_code == 200, r.text[:300]
    assert len(parses) == 2 + 4
    docs = api.get("/openapi.json").json()["paths"]["/predict"]["post"]
    assert f"{USER_MAX_BODY_BYTES // 2**10} KiB" in docs["description"] and "data_b64" in docs["description"]
    assert f"{USER_MAX_BODY_BYTES // 2**10} KiB" in docs["responses"]["413"]["description"]


def test_a_key_that_cannot_be_verified_gets_the_user_limit(api, keys, served, parses, monkeypatch):
    """The database is down and the key is not cached: nobody knows its role, so its body gets the small limit
    (the route then answers 503 for it, but only after FastAPI has parsed the body)."""
    from ml_model.api import app
    from ml_model.rest.errors import USER_MAX_BODY_BYTES
    from ml_model.rest.pool import DatabaseUnavailable

    user, _, _ = served()
    admin = {**keys("admin"), "Content-Type": "application/json"}  # never used yet: not in the key cache

    def down():
        raise DatabaseUnavailable("database unavailable: test")

    small = {"user_id": user["id"], "windows": _windows(1).tolist()}
    assert api.post("/predict", json=small, headers=keys.service).status_code == 200  # key and model now cached
    monkeypatch.setattr(app.state.semg.pool, "connection", down)
    body = _predict_body(user["id"], USER_MAX_BODY_BYTES + 1)
    r = api.post("/predict", content=body, headers=admin)
    assert r.status_code == 413 and str(USER_MAX_BODY_BYTES) in r.json()["detail"], r.text[:300]
    assert api.post("/predict", content=_streamed(body), headers=admin).status_code == 413
    assert parses == ["/predict"]  # only the service key's first request
    # under the limit, the route gives its usual answer for an unverifiable key
    r = api.post("/predict", json=small, headers=admin)
    assert r.status_code == 503, r.text[:300]
    # a service key already verified (cached) keeps the large limit while the database is down
    r = api.post("/predict", content=body, headers={**keys.service, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text[:300]


def test_a_422_for_a_big_body_is_short(api, keys, served):
    """Each bad value was one validation error and FastAPI's 422 listed them all, echoing every input: 256 KiB of
    empty strings took seconds of the event loop and answered ~6 MB. (A user key may no longer send that many
    values: the same bodies are 413 for it, before they are parsed.)"""
    from ml_model.rest.errors import MAX_REPORTED_ERRORS, USER_MAX_BODY_BYTES, USER_MAX_JSON_VALUES

    user, _, _ = served()
    mine = {**keys("user", user["id"]), "Content-Type": "application/json"}
    admin = {**keys.admin, "Content-Type": "application/json"}
    n = (USER_MAX_BODY_BYTES - 100) // 8
    head = b'{"user_id": %d, ' % user["id"]
    for body in (head + b'"windows": [' + b",".join([b'[[""]]'] * n) + b"]}",  # 43k bad values
                 head + b'"samples": [' + b",".join([b'[0,""]'] * n) + b"]}",
                 head + b'"windows": [[[0]]], "junk": [' + b",".join([b'[[0]]'] * n) + b"]}"):  # not echoed
        assert len(body) <= USER_MAX_BODY_BYTES
        r = api.post("/predict", content=body, headers=mine)
        assert r.status_code == 413 and f"at most {USER_MAX_JSON_VALUES}" in r.json()["detail"], r.text[:300]
        r = api.post("/predict", content=body, headers=admin)
        assert r.status_code == 422 and len(r.content) < 1000, (len(r.content), r.text[:300])
        (error,) = r.json()["detail"]
        assert error["loc"][0] == "body" and error["msg"] and error["type"]
    assert error["type"] == "extra_forbidden" and "input" not in error
    # a body with many independent mistakes: the first MAX_REPORTED_ERRORS, and how many more there were
    bad = {"user_id": "x", "items": [{"user_id": 0, "windows": [[["a"]]]} for _ in range(30)]}
    detail = api.post("/predict", json=bad, headers=keys.service).json()["detail"]
    assert len(detail) == MAX_REPORTED_ERRORS + 1 and detail[-1]["type"] == "too_many_errors"
    assert detail[0]["input"] == "x"


def test_a_body_not_sent_as_json_is_415_saying_which_header_to_send(api, keys, served):
    """curl -d (a form) and Python requests' data= (no Content-Type) were answered 422 "Input should be a valid
    dictionary or object to extract fields from", about a body that was valid JSON."""
    import json
    user, _, _ = served()
    body = json.dumps({"user_id": user["id"], "windows": _windows(1).tolist()}).encode()
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {**keys.service, **({"Content-Type": content_type} if content_type else {})}
        r = api.post("/predict", content=body, headers=headers)
        assert r.status_code == 415, (content_type, r.text)
        assert "Content-Type: application/json" in r.json()["detail"] and (content_type or "none") in r.json()["detail"]
    r = api.post("/users", content=b'{"name": "A", "email": "a@example.org"}', headers=keys.admin)
    assert r.status_code == 415 and "-H 'Content-Type: application/json'" in r.json()["detail"]
    # a JSON body that is not an object stays a 422
    r = api.post("/predict", json=[1, 2], headers=keys.service)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "model_attributes_type"
    r = api.post("/predict", content=body, headers={**keys.service, "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_a_users_model_downloads_as_onnx_int8_and_torchscript_through_the_api(api, keys, served):
    """README promises the API does everything the UI does, but the UI's ONNX / int8 / TorchScript downloads had
    no route: a researcher scripting the API could not get a model to run off the platform."""
    import io

    import torch

    from ml_model import export

    user, weights, meta = served(seed=5)
    other, _, other_meta = served(seed=6)
    mine = keys("user", user["id"])
    x = _windows(4, seed=2).astype(np.float32)
    want = artifacts.Predictor(weights, meta).predict_proba(x)
    url = f"/users/{user['id']}/models/{meta['artifact_id']}/export"
    r = api.get(url, headers=mine)  # ONNX by default
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"].startswith('attachment; filename="semg-')
    assert r.headers["content-disposition"].endswith('.onnx"')
    np.testing.assert_allclose(export.run_onnx(r.content, x), want, atol=1e-5)
    r = api.get(url, params={"format": "torchscript"}, headers=mine)
    assert r.status_code == 200 and r.headers["content-disposition"].endswith('.pt"'), r.text
    ts = torch.jit.load(io.BytesIO(r.content))
    with torch.no_grad():
        np.testing.assert_allclose(ts(torch.from_numpy(x)).numpy(), want, atol=1e-5)
    r = api.get(url, params={"format": "onnx-int8"}, headers=mine)
    assert r.status_code == 200 and r.headers["content-disposition"].endswith('.int8.onnx"')
    assert (export.run_onnx(r.content, x).argmax(1) == want.argmax(1)).mean() >= 0.5
    # another user's model is not there for this key, whichever way it is asked for
    theirs = f"/users/{user['id']}/models/{other_meta['artifact_id']}/export"
    r = api.get(theirs, headers=mine)
    assert r.status_code == 404 and "GET /users/" in r.json()["detail"], r.text
    assert api.get(f"/users/{other['id']}/models/{other_meta['artifact_id']}/export", headers=mine).status_code == 403
    assert api.get(url, params={"format": "tflite"}, headers=mine).status_code == 422


def test_listing_and_serving_models_leave_out_what_each_job_trained_on(api, keys, served, clean_db):
    """meta['data'] lists every interval a job trained on (~65 bytes each): GET /users/{id}/models parsed it for
    every model the user has (41 models of 5,000 intervals: 1-1.5 s a request, 0.01 s without), and the API held
    it in memory for every served model, though neither shows or uses it. The stored artifact keeps it."""
    from ml_model.rest.demo_models import insert_artifact, random_artifact
    from semg import repo
    user, _, _ = served()
    weights, meta = random_artifact(seed=1)
    data = {"sessions": [{"id": 1, "device_id": 1, "intervals": [[1, "fist", 0, 1.0, 2.0]]}], "n_windows": 1}
    artifact_id = insert_artifact(clean_db, user["id"], weights, {**meta, "data": data})
    assert api.get(f"/models/{user['id']}", headers=keys.service).json()["artifact_id"] == artifact_id
    served_model = api.app.state.semg.models.cached(user["id"])
    assert served_model.artifact_id == artifact_id and "data" not in served_model.meta
    assert [m["artifact_id"] for m in api.get(f"/users/{user['id']}/models", headers=keys.service).json()][0] == \
        artifact_id
    assert all("data" not in m["metadata"] for m in repo.list_models(clean_db, user["id"]))
    assert repo.latest_model(clean_db, user["id"])["metadata"]["data"] == data  # kept in the artifact
