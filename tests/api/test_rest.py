"""The REST API for everything the UI does: users, gestures, devices, capture sessions, training jobs,
predictions -- happy paths, malformed bodies, unknown ids and conflicts (never a 500)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import threading
import time

import pytest

from semg import repo
from tests.api.conftest import all_routes, no_server_errors


def test_openapi_documents_every_resource(api):
    paths = api.get("/openapi.json").json()["paths"]
    for p in ["/health", "/predict", "/models", "/models/{user_id}", "/users", "/users/{user_id}",
              "/users/{user_id}/gestures", "/gestures/{gesture_id}", "/gesture-library", "/users/{user_id}/devices",
              "/devices/{device_id}", "/devices/{device_id}/rotate-key", "/devices/{device_id}/reset-boot",
              "/sessions/plan", "/users/{user_id}/sessions",
              "/sessions/{session_id}", "/sessions/{session_id}/start", "/sessions/{session_id}/end",
              "/intervals/{interval_id}/mark", "/intervals/{interval_id}/discard", "/sessions/{session_id}/intervals", "/users/{user_id}/jobs", "/jobs",
              "/jobs/{job_id}", "/jobs/{job_id}/logs", "/jobs/{job_id}/cancel", "/users/{user_id}/predictions",
              "/keys", "/keys/{key_id}"]:
        assert p in paths, p
    schemes = api.get("/openapi.json").json()["components"]["securitySchemes"]
    assert any(s.get("name") == "X-API-Key" for s in schemes.values())


def test_the_documentation_pages_need_no_internet_and_no_key(api):
    """/docs and /redoc loaded Swagger UI and ReDoc from cdn.jsdelivr.net: blank pages on a lab network without
    internet. Every script and style they load now comes from the API itself, without an API key."""
    import re
    for page, assets in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc.standalone.js",))):
        r = api.get(page)
        assert r.status_code == 200, (page, r.status_code)
        loaded = re.findall(r'(?:src|href)=["\']([^"\']+)', r.text)
        assert loaded and not [u for u in loaded if "://" in u or u.startswith("//")], (page, loaded)
        for asset in assets:
            [url] = [u for u in loaded if u.endswith(asset)]
            got = api.get(url)
            assert got.status_code == 200 and len(got.content) > 100_000, (url, got.status_code)
    assert api.get("/openapi.json").status_code == 200


def test_users(api, keys):
    with no_server_errors(api):
        r = api.post("/users", json={"name": " Ada ", "email": "ada@example.org", "notes": "left arm"},
                     headers=keys.admin)
        assert r.status_code == 201, r.text
        ada = r.json()
        assert ada["name"] == "Ada" and ada["notes"] == "left arm"
        assert api.post("/users", json={"name": "Ada 2", "email": "ADA@example.org"},
                        headers=keys.admin).status_code == 409
        assert api.post("/users", json={"name": "x", "email": "not-an-email"}, headers=keys.admin).status_code == 422
        assert api.post("/users", json={"name": "", "email": "a@b.org"}, headers=keys.admin).status_code == 422
        assert api.post("/users", json={"email": "a@b.org"}, headers=keys.admin).status_code == 422
        assert api.post("/users", content=b"[", headers={**keys.admin, "Content-Type": "application/json"}
                        ).status_code == 422

        r = api.patch(f"/users/{ada['id']}", json={"notes": "right arm"}, headers=keys.admin)
        assert r.status_code == 200 and r.json()["notes"] == "right arm" and r.json()["name"] == "Ada"
        assert api.patch(f"/users/{ada['id']}", json={"email": "bad"}, headers=keys.admin).status_code == 422
        assert api.patch(f"/users/{ada['id']}", json={"role": "admin"}, headers=keys.admin).status_code == 422
        assert api.get("/users?search=ada", headers=keys.admin).json()[0]["id"] == ada["id"]
        assert api.get("/users?search=zzz", headers=keys.admin).json() == []
        assert api.get("/users?limit=0", headers=keys.admin).status_code == 422
        assert api.get("/users/424242", headers=keys.admin).status_code == 404
        assert api.get("/users/0", headers=keys.admin).status_code == 422
        assert api.get("/users/abc", headers=keys.admin).status_code == 422
        assert api.get(f"/users/{2**70}", headers=keys.admin).status_code == 422

        ada_key = keys("user", ada["id"])
        assert api.get(f"/users/{ada['id']}", headers=ada_key).status_code == 200
        r = api.delete(f"/users/{ada['id']}", headers=keys.admin)
        assert r.status_code == 200 and r.json()["id"] == ada["id"]
        assert api.get(f"/users/{ada['id']}", headers=ada_key).status_code == 401  # its keys went with it
        assert api.get(f"/users/{ada['id']}", headers=keys.admin).status_code == 404
        assert api.delete(f"/users/{ada['id']}", headers=keys.admin).status_code == 404


def test_gestures(api, keys, make_user):
    uid = make_user()["id"]
    mine = keys("user", uid)
    with no_server_errors(api):
        lib = api.get("/gesture-library", headers=mine).json()
        assert any(g["name"] == "fist" for g in lib)
        r = api.post(f"/users/{uid}/gestures", json={"name": "fist", "channels_used": [0, 3],
                                                     "channel_purposes": {"0": "flexors"}}, headers=mine)
        assert r.status_code == 201, r.text
        g = r.json()
        assert g["channels_used"] == [0, 3] and g["channel_purposes"] == {"0": "flexors"}
        assert api.post(f"/users/{uid}/gestures", json={"name": "fist"}, headers=mine).status_code == 409
        assert api.post(f"/users/{uid}/gestures", json={"name": "REST"}, headers=mine).status_code == 422
        assert api.post(f"/users/{uid}/gestures", json={"name": "x", "channels_used": [16]},
                        headers=mine).status_code == 422
        assert api.post(f"/users/{uid}/gestures", json={"name": "x", "channel_purposes": {"a": "b"}},
                        headers=mine).status_code == 422
        assert api.post("/users/424242/gestures", json={"name": "x"}, headers=keys.admin).status_code == 404
        r = api.patch(f"/gestures/{g['id']}", json={"description": "power grip"}, headers=mine)
        assert r.status_code == 200 and r.json()["description"] == "power grip" and r.json()["name"] == "fist"
        assert api.patch("/gestures/424242", json={"description": "x"}, headers=keys.admin).status_code == 404
        assert [x["name"] for x in api.get(f"/users/{uid}/gestures", headers=mine).json()] == ["fist"]
        assert api.delete(f"/gestures/{g['id']}", headers=mine).status_code == 204
        assert api.delete(f"/gestures/{g['id']}", headers=mine).status_code == 404
        assert api.get("/users/424242/gestures", headers=keys.admin).status_code == 404


def test_devices(api, keys, make_user):
    uid = make_user()["id"]
    with no_server_errors(api):
        r = api.post(f"/users/{uid}/devices", json={"channel_count": 8, "sample_rate_hz": 200, "name": "armband"},
                     headers=keys.admin)
        assert r.status_code == 201, r.text
        dev = r.json()
        assert len(dev["secret_key_hex"]) == 64 and dev["protocol"] == "binary"
        got = api.get(f"/devices/{dev['id']}", headers=keys.admin).json()
        assert "secret_key_hex" not in got and got["name"] == "armband"  # shown once only
        r = api.post(f"/devices/{dev['id']}/rotate-key", headers=keys.admin)
        assert r.status_code == 200 and r.json()["secret_key_hex"] != dev["secret_key_hex"]
        assert r.json()["key_rotated_at"] is not None

        legacy = api.post(f"/users/{uid}/devices", json={"channel_count": 4, "sample_rate_hz": 500,
                                                         "protocol": "legacy"}, headers=keys.admin)
        assert legacy.status_code == 201 and legacy.json()["secret_key_hex"] is None
        assert api.post(f"/devices/{legacy.json()['id']}/rotate-key", headers=keys.admin).status_code == 422
        # after re-flashing a device (its boot counter starts again): its owner resets the server's expectation
        mine, other = keys("user", uid), keys("user", make_user()["id"])
        r = api.post(f"/devices/{dev['id']}/reset-boot", headers=mine)
        assert r.status_code == 200 and r.json()["id"] == dev["id"], r.text
        assert len(r.json()["secret_key_hex"]) == 64 and r.json()["secret_key_hex"] != dev["secret_key_hex"]
        assert api.post(f"/devices/{dev['id']}/reset-boot", headers=other).status_code == 403
        assert api.post(f"/devices/{legacy.json()['id']}/reset-boot", headers=mine).status_code == 422
        assert api.post("/devices/424242/reset-boot", headers=keys.admin).status_code == 404
        assert api.post(f"/users/{uid}/devices", json={"channel_count": 4, "sample_rate_hz": 500,
                                                       "protocol": "legacy"}, headers=keys.admin).status_code == 409
        for bad in ({"channel_count": 0, "sample_rate_hz": 200}, {"channel_count": 17, "sample_rate_hz": 200},
                    {"channel_count": 8, "sample_rate_hz": 0}, {"channel_count": 8, "sample_rate_hz": 200,
                                                                "protocol": "udp"}, {}):
            assert api.post(f"/users/{uid}/devices", json=bad, headers=keys.admin).status_code == 422, bad
        assert {d["id"] for d in api.get(f"/users/{uid}/devices", headers=keys.admin).json()} == \
            {dev["id"], legacy.json()["id"]}
        assert len(api.get("/devices", headers=keys.admin).json()) == 2
        assert api.delete(f"/devices/{dev['id']}", headers=keys.admin).status_code == 204
        assert api.get(f"/devices/{dev['id']}", headers=keys.admin).status_code == 404
        assert api.post("/devices/424242/rotate-key", headers=keys.admin).status_code == 404


def test_capture_session_lifecycle(api, keys, make_user):
    uid = make_user()["id"]
    mine = keys("user", uid)
    with no_server_errors(api):
        for name in ("fist", "open hand"):
            api.post(f"/users/{uid}/gestures", json={"name": name}, headers=mine)
        dev = api.post(f"/users/{uid}/devices", json={"channel_count": 8, "sample_rate_hz": 200}, headers=mine).json()
        plan = api.post("/sessions/plan", json={"gestures": ["fist", "open hand"], "repetitions": 2, "hold_s": 3,
                                                "rest_s": 2}, headers=mine)
        assert plan.status_code == 200
        assert len(plan.json()) == 9 and plan.json()[-1]["planned_end_ms"] == 2 * 2 * 5000 + 2000
        assert api.post("/sessions/plan", json={"gestures": [], "repetitions": 2, "hold_s": 3, "rest_s": 2},
                        headers=mine).status_code == 422
        assert api.post("/sessions/plan", json={"gestures": ["a", "a"], "repetitions": 2, "hold_s": 3, "rest_s": 2},
                        headers=mine).status_code == 422

        body = {"gestures": ["fist", "open hand"], "repetitions": 2, "hold_s": 3, "rest_s": 2,
                "device_id": dev["id"], "name": "day 1"}
        r = api.post(f"/users/{uid}/sessions", json=body, headers=mine)
        assert r.status_code == 201, r.text
        s = r.json()
        assert s["status"] == "planned" and len(s["intervals"]) == 9
        assert api.post(f"/users/{uid}/sessions", json={**body, "gestures": ["pinch"]}, headers=mine).status_code == 422

        t0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
        r = api.post(f"/sessions/{s['id']}/start", json={"at": t0.isoformat()}, headers=mine)
        assert r.status_code == 200 and r.json()["status"] == "recording"
        iv = s["intervals"][1]
        r = api.post(f"/intervals/{iv['id']}/mark", json={"started_at": (t0 + dt.timedelta(seconds=2)).isoformat(),
                                                          "ended_at": (t0 + dt.timedelta(seconds=5)).isoformat()},
                     headers=mine)
        assert r.status_code == 200 and r.json()["started_at"].startswith("2024-05-01T12:00:02")
        assert api.post(f"/intervals/{iv['id']}/mark", json={"started_at": t0.isoformat(),
                                                             "ended_at": t0.isoformat()}, headers=mine).status_code == 422
        assert api.post(f"/intervals/{iv['id']}/mark", json={"started_at": "yesterday"}, headers=mine).status_code == 422
        assert api.post(f"/intervals/{iv['id']}/discard", headers=mine).json()["discarded"] is True
        redo = api.post(f"/sessions/{s['id']}/intervals", json={"kind": "gesture", "label": "fist", "repetition": 0,
                                                                "planned_start_ms": 20000, "planned_end_ms": 23000},
                        headers=mine)
        assert redo.status_code == 201 and redo.json()["ordinal"] == 9 and redo.json()["gesture_id"]
        assert api.post(f"/sessions/{s['id']}/intervals", json={"kind": "gesture", "label": "pinch", "repetition": 0,
                                                                "planned_start_ms": 0, "planned_end_ms": 1},
                        headers=mine).status_code == 422
        assert api.post(f"/sessions/{s['id']}/intervals", json={"kind": "rest", "label": "REST", "repetition": 0,
                                                                "planned_start_ms": 5, "planned_end_ms": 5},
                        headers=mine).status_code == 422
        assert api.post("/intervals/424242/discard", headers=keys.admin).status_code == 404
        r = api.post(f"/sessions/{s['id']}/end", json={"status": "completed"}, headers=mine)
        assert r.status_code == 200 and r.json()["status"] == "completed"
        assert api.post(f"/sessions/{s['id']}/end", headers=mine).status_code == 409
        assert api.post(f"/sessions/{s['id']}/start", headers=mine).status_code == 409
        assert api.post(f"/sessions/{s['id']}/end", json={"status": "weird"}, headers=mine).status_code == 422
        full = api.get(f"/sessions/{s['id']}", headers=mine).json()
        assert full["intervals"][1]["discarded"] is True and full["ended_at"]
        assert [x["id"] for x in api.get(f"/users/{uid}/sessions", headers=mine).json()] == [s["id"]]
        assert api.get("/sessions/424242", headers=keys.admin).status_code == 404


def _device(api, headers, uid) -> int:
    return api.post(f"/users/{uid}/devices", json={"channel_count": 8, "sample_rate_hz": 200},
                    headers=headers).json()["id"]


def _completed_session(api, headers, uid) -> int:
    api.post(f"/users/{uid}/gestures", json={"name": "fist"}, headers=headers)
    s = api.post(f"/users/{uid}/sessions", json={"gestures": ["fist"], "repetitions": 2, "hold_s": 1, "rest_s": 1,
                                                 "device_id": _device(api, headers, uid)}, headers=headers).json()
    api.post(f"/sessions/{s['id']}/end", headers=headers)
    return s["id"]


def test_training_jobs(api, keys, make_user):
    uid = make_user()["id"]
    mine = keys("user", uid)
    with no_server_errors(api):
        sid = _completed_session(api, mine, uid)
        r = api.post(f"/users/{uid}/jobs", json={"session_ids": [sid], "params": {"epochs": 5}}, headers=mine)
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["status"] == "scheduled" and job["session_ids"] == [sid] and job["params"] == {"epochs": 5}
        assert api.get(f"/jobs/{job['id']}", headers=mine).json()["status"] == "scheduled"
        logs = api.get(f"/jobs/{job['id']}/logs", headers=mine).json()
        assert logs and "scheduled" in logs[0]["message"]
        assert api.get(f"/jobs/{job['id']}/logs?after_id={logs[-1]['id']}", headers=mine).json() == []
        assert [j["id"] for j in api.get("/jobs", headers=mine).json()] == [job["id"]]
        assert [j["id"] for j in api.get(f"/jobs?user_id={uid}", headers=keys.admin).json()] == [job["id"]]
        r = api.post(f"/jobs/{job['id']}/cancel", headers=mine)
        assert r.status_code == 200 and r.json()["status"] == "canceled"
        assert api.post(f"/jobs/{job['id']}/cancel", headers=mine).status_code == 409

        for bad in ({"session_ids": []}, {"session_ids": ["x"]}, {"session_ids": [sid], "params": {"epochs": 0}},
                    {"params": {}}):
            assert api.post(f"/users/{uid}/jobs", json=bad, headers=mine).status_code == 422, bad
        # parameters the trainer would ignore or fail on hours later are refused now, saying why
        for params, says in (({"epoch": 5}, "unknown training parameters ['epoch']"), ({"epochs": True}, "epochs"),
                             ({"window_ms": "250"}, "window_ms"), ({"step_ms": 0}, "step_ms"),
                             ({"seed": -1}, "seed"), ({"base_artifact_id": "latest"}, "base_artifact_id")):
            r = api.post(f"/users/{uid}/jobs", json={"session_ids": [sid], "params": params}, headers=mine)
            assert r.status_code == 422 and says in r.text, (params, r.text)
        ok = {"epochs": 5, "window_ms": 200, "step_ms": 25.5, "seed": 3}
        r = api.post(f"/users/{uid}/jobs", json={"session_ids": [sid], "params": ok}, headers=mine)
        assert r.status_code == 201 and r.json()["params"] == ok
        api.post(f"/jobs/{r.json()['id']}/cancel", headers=mine)
        assert api.post(f"/users/{uid}/jobs", json={"session_ids": [424242]}, headers=mine).status_code == 404
        planned = api.post(f"/users/{uid}/sessions", json={"gestures": ["fist"], "repetitions": 1, "hold_s": 1,
                                                           "rest_s": 1}, headers=mine).json()
        assert api.post(f"/users/{uid}/jobs", json={"session_ids": [planned["id"]]}, headers=mine).status_code == 422
        assert api.get("/jobs/424242", headers=keys.admin).status_code == 404
        assert api.get("/jobs/424242/logs", headers=keys.admin).status_code == 404
        assert api.post("/jobs/424242/cancel", headers=keys.admin).status_code == 404
        assert api.post("/users/424242/jobs", json={"session_ids": [sid]}, headers=keys.admin).status_code == 404
        # sessions of two sensor setups: refused now, naming the mismatch, not failed later by the worker
        setups = []
        for channels, rate in ((8, 1000), (8, 200)):
            dev = api.post(f"/users/{uid}/devices", json={"channel_count": channels, "sample_rate_hz": rate},
                           headers=mine).json()
            s = api.post(f"/users/{uid}/sessions", json={"gestures": ["fist"], "repetitions": 1, "hold_s": 1,
                                                         "rest_s": 1, "device_id": dev["id"]}, headers=mine).json()
            api.post(f"/sessions/{s['id']}/end", headers=mine)
            setups.append(s["id"])
        r = api.post(f"/users/{uid}/jobs", json={"session_ids": setups}, headers=mine)
        assert r.status_code == 422 and f"session {setups[1]}: 200 Hz" in r.text, r.text
        # one repetition of each gesture recorded: nothing to hold out, so a job from scratch is refused now (the
        # worker failed it once its turn came), saying what to record; a base to fine-tune is what it can take
        one = api.post(f"/users/{uid}/sessions", json={"gestures": ["fist"], "repetitions": 1, "hold_s": 1,
                                                       "rest_s": 1, "device_id": _device(api, mine, uid)},
                       headers=mine).json()
        t0 = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
        api.post(f"/sessions/{one['id']}/start", json={"at": t0.isoformat()}, headers=mine)
        for iv in one["intervals"]:
            r = api.post(f"/intervals/{iv['id']}/mark", headers=mine, json={
                "started_at": (t0 + dt.timedelta(milliseconds=iv["planned_start_ms"])).isoformat(),
                "ended_at": (t0 + dt.timedelta(milliseconds=iv["planned_end_ms"])).isoformat()})
            assert r.status_code == 200, r.text
        api.post(f"/sessions/{one['id']}/end", headers=mine)
        before = len(api.get("/jobs", headers=mine).json())
        r = api.post(f"/users/{uid}/jobs", json={"session_ids": [one["id"]]}, headers=mine)
        assert r.status_code == 422 and "this session holds one repetition of each gesture" in r.text, r.text
        assert "fine-tune a pretrained base" in r.text and len(api.get("/jobs", headers=mine).json()) == before


def write_quiet_journal(settings, session: dict, t0: dt.datetime) -> os.PathLike:
    """The interval journal a capture window leaves when its marks could not be stored and it was closed: every
    interval marked as planned from t0, untouched for a minute."""
    d = settings.state_dir / "capture-journal"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = d / f"session{session['id']}-1-test.jsonl"
    head = {"v": 1, "session_id": session["id"], "session_created_at": session["created_at"]}
    path.write_text("".join(json.dumps({**head, "op": "mark", "interval_id": iv["id"],
                                        "started_at": (t0 + dt.timedelta(milliseconds=iv["planned_start_ms"])).isoformat(),
                                        "ended_at": (t0 + dt.timedelta(milliseconds=iv["planned_end_ms"])).isoformat()})
                            + "\n" for iv in session["intervals"]))
    quiet = time.time() - 60
    os.utime(path, (quiet, quiet))
    return path


def test_scheduling_a_job_stores_the_labels_waiting_in_capture_journals(api, keys, make_user, settings):
    """A capture window that could not store its interval times leaves them in a journal on the server; they
    were stored only by the next UI page load, so a job scheduled through the API trained without them."""
    uid = make_user()["id"]
    mine = keys("user", uid)
    api.post(f"/users/{uid}/gestures", json={"name": "fist"}, headers=mine)
    s = api.post(f"/users/{uid}/sessions", json={"gestures": ["fist"], "repetitions": 2, "hold_s": 1, "rest_s": 1,
                                                 "device_id": _device(api, mine, uid)}, headers=mine).json()
    t0 = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    api.post(f"/sessions/{s['id']}/start", json={"at": t0.isoformat()}, headers=mine)
    path = write_quiet_journal(settings, s, t0)
    try:
        api.post(f"/sessions/{s['id']}/end", headers=mine)
        r = api.post(f"/users/{uid}/jobs", json={"session_ids": [s["id"]]}, headers=mine)
        assert r.status_code == 201, r.text
        ivs = api.get(f"/sessions/{s['id']}", headers=mine).json()["intervals"]
        assert len(ivs) == 5 and all(iv["started_at"] and iv["ended_at"] for iv in ivs), ivs
        assert dt.datetime.fromisoformat(ivs[0]["started_at"]) == t0
        assert not path.exists()
    finally:
        path.unlink(missing_ok=True)


def test_recent_predictions(api, keys, make_user, clean_db):
    uid = make_user()["id"]
    with clean_db.cursor() as cur:
        cur.execute("""INSERT INTO predictions (user_id, gesture, confidence, decided_at)
                       SELECT %s, 'fist', 0.9, now() - make_interval(secs => g) FROM generate_series(1, 5) g""", (uid,))
        cur.execute("""UPDATE predictions SET channel_faults = '[{"channel": 3, "fault": "flat", "seconds": 2.5}]'
                       WHERE id = (SELECT min(id) FROM predictions WHERE user_id = %s)""", (uid,))  # the newest
    with no_server_errors(api):
        r = api.get(f"/users/{uid}/predictions?limit=3", headers=keys("user", uid))
        assert r.status_code == 200 and len(r.json()) == 3 and r.json()[0]["gesture"] == "fist"
        assert [p["channel_faults"] for p in r.json()] == [[{"channel": 3, "fault": "flat", "seconds": 2.5}], None, None]
        since = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=2.5)).isoformat()
        assert len(api.get(f"/users/{uid}/predictions", params={"since": since}, headers=keys.admin).json()) == 2
        assert api.get(f"/users/{uid}/predictions?limit=0", headers=keys.admin).status_code == 422
        assert api.get(f"/users/{uid}/predictions?since=never", headers=keys.admin).status_code == 422
        assert api.get("/users/424242/predictions", headers=keys.admin).status_code == 404


@pytest.mark.parametrize("role", ["admin", "user"])
def test_no_endpoint_answers_500_to_garbage(api, keys, make_user, role):
    """Every route with odd ids, odd query values and odd bodies: 2xx/4xx, never 5xx."""
    uid = make_user()["id"]
    headers = keys.admin if role == "admin" else keys("user", uid)
    bodies = [None, {}, [], "x", {"name": None}, {"user_id": -1, "windows": "x"}, {"at": "nope"},
              {"session_ids": [2**70]}, {"role": "user", "user_id": 2**70}, {"channel_count": "8"}]
    ids = ["1", str(uid), "0", "-5", "abc", str(2**63), str(2**64), "1.5"]
    routes = all_routes(api)
    assert len(routes) > 30
    with no_server_errors(api) as errors:
        for method, path in routes:
            for ident in ids:
                concrete = re.sub(r"\{[a-z_]+\}", ident, path)
                for body in bodies if method in ("POST", "PATCH") else [None]:
                    api.request(method, concrete, json=body, headers=headers,
                                params={"limit": ident, "after_id": ident, "since": ident, "user_id": ident})
    assert not errors


def test_a_nul_character_in_a_name_is_a_422_naming_the_field(api, keys, make_user):
    """A NUL in a name reached psycopg2 ('A string literal cannot contain NUL') and came back as a 500."""
    uid = make_user()["id"]
    mine = keys("user", uid)
    with no_server_errors(api):
        for path, body, field in (("/users", {"name": "A\x00", "email": "nul@example.org"}, "user name"),
                                  (f"/users/{uid}/gestures", {"name": "fi\x00st"}, "gesture name"),
                                  (f"/users/{uid}/devices", {"channel_count": 8, "sample_rate_hz": 200,
                                                             "name": "d\x00"}, "device name")):
            r = api.post(path, json=body, headers=keys.admin if path == "/users" else mine)
            assert r.status_code == 422 and f"{field} must not contain a NUL character" in r.text, (path, r.text)
        r = api.patch(f"/users/{uid}", json={"name": "B\x00"}, headers=mine)
        assert r.status_code == 422 and "user name must not contain a NUL" in r.text, r.text


def test_a_base_model_that_is_missing_or_another_users_is_refused_when_the_job_is_scheduled(api, keys, make_user,
                                                                                             clean_db):
    """Both were queued (201) and failed only when a training worker took the job, after any jobs before it."""
    from ml_model.rest.demo_models import insert_artifact, random_artifact

    uid, other = make_user()["id"], make_user()["id"]
    mine = keys("user", uid)
    sid = _completed_session(api, mine, uid)
    weights, meta = random_artifact(8, 200.0)
    theirs = insert_artifact(clean_db, other, weights, meta)
    own = insert_artifact(clean_db, uid, weights, meta)
    with no_server_errors(api):
        for base in (theirs, 424242):
            r = api.post(f"/users/{uid}/jobs", json={"session_ids": [sid], "params": {"base_artifact_id": base}},
                         headers=mine)
            assert r.status_code == 404, r.text
            assert r.json()["detail"] == (f"base model {base} not found: give the id of a shared base model or of "
                                          f"one of user {uid}'s own models")
        assert api.get("/jobs", headers=mine).json() == []
        r = api.post(f"/users/{uid}/jobs", json={"session_ids": [sid], "params": {"base_artifact_id": 2**63}},
                     headers=mine)
        assert r.status_code == 422 and "base_artifact_id" in r.text
        r = api.post(f"/users/{uid}/jobs", json={"session_ids": [sid], "params": {"base_artifact_id": own}},
                     headers=mine)
        assert r.status_code == 201, r.text
        api.post(f"/jobs/{r.json()['id']}/cancel", headers=mine)


def test_the_shared_bases_are_listed_for_any_key_and_fine_tune_a_job(api, keys, make_user, clean_db):
    """A job may fine-tune a shared base (params.base_artifact_id), but only the web UI could list them: a
    researcher scripting the API had no way to find an id. GET /bases lists them."""
    from ml_model import jobs
    from ml_model.rest.demo_models import random_artifact

    uid = make_user()["id"]
    mine = keys("user", uid)
    weights, meta = random_artifact(8, 200.0)
    base = jobs.store_artifact(clean_db, None, None, weights, {**meta, "pretrain": {"source": "myo-armband"}})
    with no_server_errors(api):
        [listed] = api.get("/bases", headers=mine).json()
        assert listed["artifact_id"] == base and listed["sample_rate_hz"] == 200.0, listed
        assert listed["channels"] == list(range(8)) and listed["pretrain"] == {"source": "myo-armband"}
        assert api.get("/bases").status_code == 401
        sid = _completed_session(api, mine, uid)
        r = api.post(f"/users/{uid}/jobs", json={"session_ids": [sid], "params": {"base_artifact_id": base}},
                     headers=mine)
        assert r.status_code == 201, r.text
        api.post(f"/jobs/{r.json()['id']}/cancel", headers=mine)


def test_every_docs_example_is_a_request_the_api_takes(api, keys, served):
    """/docs "Try it out" offered bodies Swagger made up from the types, and the API refused nearly all of them
    (422: 'string' as an email, sample rate 0, single and batch fields at once in /predict, 'additionalProp1' as a
    training parameter, an admin key with a user_id). Each documented example, with the ids of data that exist put
    in, is taken as it is."""
    spec = api.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def examples(op) -> list:
        content = op["requestBody"]["content"]["application/json"]
        if named := content.get("examples"):
            return [e["value"] for e in named.values()]
        schema = content["schema"]
        ref = next(s["$ref"] for s in [schema, *schema.get("anyOf", [])] if "$ref" in s)
        return schemas[ref.rsplit("/", 1)[1]].get("examples", [])

    documented = {(m.upper(), p): examples(op) for p, ops in spec["paths"].items() for m, op in ops.items()
                  if "requestBody" in op}
    assert all(documented.values()), [route for route, bodies in documented.items() if not bodies]
    ids: dict[str, int] = {}

    def fill(value):
        if isinstance(value, dict):
            return {k: ([ids["session_id"]] if k == "session_ids" else ids[k] if k in ids and isinstance(v, int)
                        else fill(v)) for k, v in value.items()}
        return [fill(v) for v in value] if isinstance(value, list) else value

    def send(method, path, created=None):
        out = []
        for body in documented.pop((method, path)):
            r = api.request(method, path.format(**ids), json=fill(body), headers=keys.admin)
            out.append(r)
            if r.status_code // 100 != 2 and path != "/predict":
                raise AssertionError(f"{method} {path} {fill(body)}: {r.status_code} {r.text}")
            if created:
                ids[created] = r.json()["id"]
        return out

    with no_server_errors(api):
        send("POST", "/users", "user_id")
        send("PATCH", "/users/{user_id}")
        send("POST", "/users/{user_id}/gestures", "gesture_id")
        send("PATCH", "/gestures/{gesture_id}")
        send("POST", "/users/{user_id}/devices", "device_id")
        send("POST", "/sessions/plan")
        send("POST", "/users/{user_id}/sessions", "session_id")
        send("POST", "/sessions/{session_id}/start")
        send("POST", "/sessions/{session_id}/intervals", "interval_id")
        send("POST", "/intervals/{interval_id}/mark")
        send("POST", "/sessions/{session_id}/end")
        # the rest of the session as a capture marks it (one marked interval is one repetition: nothing for a job
        # from scratch to hold out, refused when scheduled)
        session = api.get("/sessions/{session_id}".format(**ids), headers=keys.admin).json()
        began = dt.datetime.fromisoformat(session["started_at"])
        for iv in session["intervals"]:
            if iv["started_at"] is None:
                assert api.post(f"/intervals/{iv['id']}/mark", headers=keys.admin, json={
                    "started_at": (began + dt.timedelta(milliseconds=iv["planned_start_ms"])).isoformat(),
                    "ended_at": (began + dt.timedelta(milliseconds=iv["planned_end_ms"])).isoformat()}).status_code == 200
        send("POST", "/users/{user_id}/jobs")
        send("POST", "/keys")
        user, _, meta = served(channels=2)
        ids["user_id"], ids["artifact_id"] = user["id"], meta["artifact_id"]
        send("PUT", "/users/{user_id}/served-model")
        for r in send("POST", "/predict"):
            # the shape is the example's, not this model's: the model says what it reads, nothing else is wrong
            if r.status_code == 422:
                detail = r.json()["detail"]
                assert isinstance(detail, str) and "50 samples" in detail and "channel" not in detail, r.text
            else:
                assert r.status_code == 200 and all("windows of 50 samples" in x["error"]["detail"]
                                                    for x in r.json()["results"]), r.text
    assert not documented, f"examples not tried: {list(documented)}"


def test_a_body_that_is_not_utf8_is_400_saying_what_to_send(api, keys):
    """A Latin-1 name (as some tools send it) was answered only "There was an error parsing the body"."""
    body = '{"name": "Jürgen Müller", "email": "jm@example.org"}'
    r = api.post("/users", content=body.encode("latin-1"),
                 headers={**keys.admin, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["detail"].startswith("the request body could not be read as JSON: it must be UTF-8"), r.text
    r = api.post("/users", content=body.encode(), headers={**keys.admin, "Content-Type": "application/json"})
    assert r.status_code == 201 and r.json()["name"] == "Jürgen Müller"
    assert api.get("/users/424242", headers=keys.admin).json() == {"detail": "user 424242 not found"}
    r = api.get("/users", headers={"X-API-Key": "semg_wrong"})  # other HTTP errors as before, headers included
    assert r.status_code == 401 and r.headers["www-authenticate"] == "X-API-Key"


def test_a_gesture_naming_a_channel_the_sessions_device_lacks_is_refused_when_the_job_is_scheduled(api, keys,
                                                                                                  make_user):
    """Training reads the channels of every gesture of the bank: one gesture naming channel 5 of a 4-channel
    device (accepted when added, the user may have bigger devices) failed every later job, but only in the worker."""
    uid = make_user()["id"]
    mine = keys("user", uid)
    dev = api.post(f"/users/{uid}/devices", json={"channel_count": 4, "sample_rate_hz": 500}, headers=mine).json()
    api.post(f"/users/{uid}/gestures", json={"name": "fist"}, headers=mine)
    s = api.post(f"/users/{uid}/sessions", json={"gestures": ["fist"], "repetitions": 1, "hold_s": 1, "rest_s": 1,
                                                 "device_id": dev["id"]}, headers=mine).json()
    api.post(f"/sessions/{s['id']}/end", headers=mine)
    g = api.post(f"/users/{uid}/gestures", json={"name": "pinch", "channels_used": [1, 5]}, headers=mine)
    assert g.status_code == 201, g.text
    with no_server_errors(api):
        r = api.post(f"/users/{uid}/jobs", json={"session_ids": [s["id"]]}, headers=mine)
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == ("gesture 'pinch' of the bank uses channel 5, but these sessions were recorded "
                                      "with 4 channels (0 to 3), and training reads the channels of every gesture "
                                      "of the bank: change that gesture's channels first")
        assert api.get("/jobs", headers=mine).json() == []
        api.patch(f"/gestures/{g.json()['id']}", json={"channels_used": [1, 3]}, headers=mine)
        assert api.post(f"/users/{uid}/jobs", json={"session_ids": [s["id"]]}, headers=mine).status_code == 201


def test_a_session_without_a_device_is_refused_when_the_job_is_scheduled(api, keys, make_user):
    """A session created without device_id, or whose device was deleted (with its samples), was queued and failed
    in the worker ('has no device (it was deleted)')."""
    uid = make_user()["id"]
    mine = keys("user", uid)
    api.post(f"/users/{uid}/gestures", json={"name": "fist"}, headers=mine)
    dev = api.post(f"/users/{uid}/devices", json={"channel_count": 4, "sample_rate_hz": 500}, headers=mine).json()
    plan = {"gestures": ["fist"], "repetitions": 1, "hold_s": 1, "rest_s": 1}
    none = api.post(f"/users/{uid}/sessions", json=plan, headers=mine).json()
    gone = api.post(f"/users/{uid}/sessions", json={**plan, "device_id": dev["id"]}, headers=mine).json()
    for s in (none, gone):
        api.post(f"/sessions/{s['id']}/end", headers=mine)
    assert api.post(f"/users/{uid}/jobs", json={"session_ids": [gone["id"]]}, headers=mine).status_code == 201
    assert api.delete(f"/devices/{dev['id']}", headers=mine).status_code == 204
    with no_server_errors(api):
        for s in (none, gone):
            r = api.post(f"/users/{uid}/jobs", json={"session_ids": [s["id"]]}, headers=mine)
            assert r.status_code == 422, r.text
            assert r.json()["detail"] == (f"session {s['id']} has no device (none was given when it was created, or "
                                          "it was deleted with its samples), so it holds no samples to train on")


def test_a_session_ended_before_it_started_is_422_saying_so(api, keys, make_user):
    """The answer was the database's CHECK constraint: 'capture_sessions: is not valid (new row for relation
    "capture_sessions" violates check constraint "capture_sessions_check")'. Also for the default end (now) of a
    session whose start was given in the future."""
    uid = make_user()["id"]
    mine = keys("user", uid)
    api.post(f"/users/{uid}/gestures", json={"name": "fist"}, headers=mine)
    plan = {"gestures": ["fist"], "repetitions": 1, "hold_s": 1, "rest_s": 1}
    s = api.post(f"/users/{uid}/sessions", json=plan, headers=mine).json()
    start = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=4)  # ahead, within the clock skew a start may have
    assert api.post(f"/sessions/{s['id']}/start", json={"at": start.isoformat()}, headers=mine).status_code == 200
    with no_server_errors(api):
        for body in ({"status": "aborted", "at": "2020-01-01T00:00:00Z"}, None):
            r = api.post(f"/sessions/{s['id']}/end", json=body, headers=mine)
            assert r.status_code == 422, r.text
            detail = r.json()["detail"]
            assert detail.startswith(f"session {s['id']} cannot end at ") and "it started later, at " in detail, detail
            assert detail.endswith("give an end (at) after its start") and "constraint" not in detail, detail
        assert api.get(f"/sessions/{s['id']}", headers=mine).json()["status"] == "recording"
        end = start + dt.timedelta(seconds=5)
        r = api.post(f"/sessions/{s['id']}/end", json={"at": end.isoformat()}, headers=mine)
        assert r.status_code == 200 and r.json()["status"] == "completed", r.text


def test_an_interval_planned_beyond_the_columns_range_is_422_naming_the_field(api, keys, make_user):
    """planned_end_ms 99999999999999 was answered 'value: is not valid (integer out of range)'."""
    uid = make_user()["id"]
    mine = keys("user", uid)
    api.post(f"/users/{uid}/gestures", json={"name": "fist"}, headers=mine)
    s = api.post(f"/users/{uid}/sessions", json={"gestures": ["fist"], "repetitions": 1, "hold_s": 1, "rest_s": 1},
                 headers=mine).json()
    with no_server_errors(api):
        for field in ("planned_start_ms", "planned_end_ms"):
            body = {"kind": "rest", "label": "REST", "repetition": 0, "planned_start_ms": 0, "planned_end_ms": 5,
                    field: 99_999_999_999_999}
            r = api.post(f"/sessions/{s['id']}/intervals", json=body, headers=mine)
            assert r.status_code == 422, r.text
            assert [e["loc"] for e in r.json()["detail"]] == [["body", field]], r.text
        body = {"kind": "rest", "label": "REST", "repetition": 0, "planned_start_ms": 2**31 - 2,
                "planned_end_ms": 2**31 - 1}
        assert api.post(f"/sessions/{s['id']}/intervals", json=body, headers=mine).status_code == 201


def test_a_change_cancelled_by_a_deadlock_says_so_and_can_be_retried(api, keys, clean_db):
    """A rename locks its gesture, then relabels the intervals recorded with it; another transaction holding one of
    those intervals and then wanting the gesture makes a deadlock, which PostgreSQL breaks by cancelling one side.
    Cancelled in the API, it answered 503 'database unavailable: deadlock detected' (and the pool closed every idle
    connection, as after an outage): the database was up, nothing was changed, and the same request succeeds."""
    import psycopg2.errors

    from semg import db
    user = repo.create_user(clean_db, "Dee", "dee@example.org")
    gesture = repo.add_gesture(clean_db, user["id"], "fist")
    session = repo.create_session(clean_db, user["id"], None, ["fist"], 1, 1.0, 1.0)
    interval = next(i for i in session["intervals"] if i["kind"] == "gesture")
    for attempt in range(3):  # the side that waited first is normally the one cancelled: the API's, here
        other = db.connect()
        try:
            with other.cursor() as cur:
                cur.execute("UPDATE session_intervals SET discarded = discarded WHERE id = %s", (interval["id"],))
                out = {}
                rename = threading.Thread(target=lambda: out.update(r=api.patch(
                    f"/gestures/{gesture['id']}", json={"name": f"grip {attempt}"}, headers=keys.admin)))
                rename.start()
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:  # the rename holds the gesture and waits for our interval
                    cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                "AND application_name = 'semg-api'")
                    if cur.fetchone()[0]:
                        break
                    time.sleep(0.01)
                try:
                    cur.execute("UPDATE gestures SET description = 'x' WHERE id = %s", (gesture["id"],))
                except psycopg2.errors.DeadlockDetected:
                    other.rollback()  # we were cancelled this time, the rename went through: try again
                rename.join(30)
            other.rollback()
        finally:
            other.close()
        if out["r"].status_code != 200:
            break
    r = out["r"]
    assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
    said = r.json()["detail"]
    assert "deadlock detected" in said and "nothing was changed: try again" in said and "unavailable" not in said, said
    assert api.patch(f"/gestures/{gesture['id']}", json={"name": "grip"}, headers=keys.admin).status_code == 200
    assert repo.get_session(clean_db, session["id"])["intervals"][interval["ordinal"]]["label"] == "grip"
