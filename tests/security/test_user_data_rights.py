"""A person's rights over their data: deleting a user removes every trace of them (rows in every table,
samples, video files and folders, models, predictions, API keys, jobs), through the API and through the UI;
and a user (or an admin) can export all of it as one zip."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
import time
import zipfile
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2.extras
import pytest

from ml_model.rest import keys as keystore
from semg import repo

CHANNELS = 4
BLOCKS, PER_BLOCK = 6, 10


def _value(seq: int, ch: int) -> int:
    return (seq * 7 + ch * 1000) % 30000 - 15000


def seed_person(conn, video_dir, name: str) -> dict:
    """A user with something in every table that can hold their data, plus a video file on disk
    (`conn` in autocommit mode, as the clean_db fixture gives it)."""
    from ml_model.rest.demo_models import insert_artifact, random_artifact
    n = zlib.crc32(name.encode()) % 10**6
    user = repo.create_user(conn, name, f"{name.lower().replace(' ', '.')}.{n}@example.org", notes=f"notes of {name}")
    uid = user["id"]
    for g in ("fist", "open hand"):
        repo.add_gesture(conn, uid, g, channels_used=[0, 1], channel_purposes={"0": "flexors"})
    dev = repo.register_device(conn, uid, CHANNELS, 500.0, name=f"{name} armband")
    t0 = datetime.now(UTC) - timedelta(minutes=2)
    rows = [(uid, dev["id"], 1, b * PER_BLOCK, PER_BLOCK, CHANNELS, 500.0, b * PER_BLOCK * 2.0,
             t0 + timedelta(milliseconds=b * PER_BLOCK * 2), t0 + timedelta(milliseconds=b * PER_BLOCK * 2 + 5),
             [_value(b * PER_BLOCK + i, c) for i in range(PER_BLOCK) for c in range(CHANNELS)])
            for b in range(BLOCKS)]
    with conn.cursor() as cur:
        psycopg2.extras.execute_values(cur, """INSERT INTO sample_blocks (user_id, device_id, boot, seq0, n, channels,
            sample_rate_hz, device_millis0, device_time0, server_ts, values) VALUES %s""", rows)
    s = repo.create_session(conn, uid, dev["id"], ["fist", "open hand"], 2, 1.0, 1.0, name="morning")
    repo.start_session(conn, s["id"], at=t0)
    for iv in s["intervals"]:
        repo.mark_interval(conn, iv["id"], t0 + timedelta(milliseconds=iv["planned_start_ms"]),
                           t0 + timedelta(milliseconds=iv["planned_end_ms"]))
    repo.end_session(conn, s["id"], at=t0 + timedelta(seconds=9))
    job = repo.schedule_job(conn, uid, [s["id"]], {"epochs": 2})
    weights, meta = random_artifact(CHANNELS, 500.0, seed=n % 1000)
    model_id = insert_artifact(conn, uid, weights, meta, job_id=job["id"])
    with conn.cursor() as cur:
        for i in range(5):
            cur.execute("""INSERT INTO predictions (user_id, model_id, gesture, confidence, device_id, decided_at)
                           VALUES (%s, %s, 'fist', 0.9, %s, now() - make_interval(secs => %s))""",
                        (uid, model_id, dev["id"], i))
    key = keystore.create_key(conn, "user", uid, f"{name}'s phone")
    video_rel = f"user{uid}/session{s['id']}.webm"
    video = video_dir / video_rel
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(b"\x1aE\xdf\xa3 webm of " + name.encode())
    repo.add_video(conn, uid, s["id"], video_rel, t0, t0 + timedelta(seconds=5), frame_count=150, fps=30,
                   size=video.stat().st_size)
    return {"user": user, "device": dev, "session": s, "job": job, "model_id": model_id, "weights": weights,
            "key": key, "video": video, "email": user["email"]}


def traces(conn, person: dict) -> dict[str, int]:
    """Rows anywhere that belong to the person: every table with a user_id column, plus the child tables
    reached through their devices, sessions and jobs; and their files."""
    uid = person["user"]["id"]
    found = {}
    with conn.cursor() as cur:
        cur.execute("""SELECT table_name FROM information_schema.columns
                       WHERE table_schema = 'public' AND column_name = 'user_id'
                         AND table_name IN (SELECT table_name FROM information_schema.tables
                                            WHERE table_schema = 'public' AND table_type = 'BASE TABLE')""")
        for (table,) in cur.fetchall():
            cur.execute(f"SELECT count(*) FROM {table} WHERE user_id = %s", (uid,))  # noqa: S608 - catalog names
            found[table] = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM users WHERE id = %s OR email = %s", (uid, person["email"]))
        found["users"] = cur.fetchone()[0]
        for table, col, val in [("sample_blocks", "device_id", person["device"]["id"]),
                                ("devices", "id", person["device"]["id"]),
                                ("session_intervals", "session_id", person["session"]["id"]),
                                ("training_job_sessions", "job_id", person["job"]["id"]),
                                ("job_logs", "job_id", person["job"]["id"]),
                                ("model_artifacts", "id", person["model_id"]),
                                ("predictions", "device_id", person["device"]["id"]),
                                ("api_keys", "id", person["key"]["id"])]:
            cur.execute(f"SELECT count(*) FROM {table} WHERE {col} = %s", (val,))  # noqa: S608
            found[f"{table}.{col}"] = cur.fetchone()[0]
    found["video_file"] = int(person["video"].exists())
    found["video_folder"] = int(person["video"].parent.exists())
    return found


def assert_gone(conn, person: dict) -> None:
    left = {k: v for k, v in traces(conn, person).items() if v}
    assert not left, f"traces left of user {person['user']['id']}: {left}"


def assert_intact(conn, person: dict) -> None:
    t = traces(conn, person)
    for k in ("users", "sample_blocks", "predictions", "api_keys", "videos", "training_jobs", "model_artifacts",
              "job_logs.job_id", "video_file"):
        assert t[k] > 0, (k, t)


@pytest.fixture
def two_people(clean_db, settings):
    return (seed_person(clean_db, settings.video_dir, "Ada Lovelace"),
            seed_person(clean_db, settings.video_dir, "Alan Turing"))


# ---- deletion -----------------------------------------------------------------------------------------
def test_delete_through_the_api_leaves_no_trace(api, admin_key, two_people, clean_db):
    ada, alan = two_people
    uid = ada["user"]["id"]
    own = {"X-API-Key": ada["key"]["key"]}
    assert api.get(f"/users/{uid}", headers=own).status_code == 200
    assert all(traces(clean_db, ada).values()), traces(clean_db, ada)

    r = api.delete(f"/users/{uid}", headers=own)  # a user may delete themselves
    assert r.status_code == 200, r.text
    assert r.json()["videos_removed"] == 1

    assert_gone(clean_db, ada)
    assert_intact(clean_db, alan)
    assert api.get(f"/users/{uid}", headers=own).status_code == 401  # their key went with them
    assert api.get(f"/users/{uid}", headers=admin_key).status_code == 404
    assert api.get(f"/users/{uid}/export", headers=admin_key).status_code == 404
    assert api.get(f"/models/{uid}", headers=admin_key).status_code == 404


def test_delete_through_the_ui_leaves_no_trace(page, two_people, clean_db):
    from tests.streamlit_apps.ui_checks import assert_clean, texts
    ada, alan = two_people
    at = page("pages/1_User_Management.py", user_id=ada["user"]["id"])
    at.run()
    next(b for b in at.button if b.label.startswith("Delete")).click()
    at.run()
    assert "ALL their data" in texts(at)
    next(b for b in at.button if b.label.startswith("Yes, delete permanently")).click()
    at.run()
    assert_clean(at)
    assert "Deleted Ada Lovelace" in texts(at) and "1 video file(s) removed" in texts(at)
    assert_gone(clean_db, ada)
    assert_intact(clean_db, alan)


# ---- export -------------------------------------------------------------------------------------------
def check_export(blob: bytes, person: dict, other: dict) -> dict:
    """The zip holds exactly this person's data, complete, and nothing of anyone else or any credential."""
    zf = zipfile.ZipFile(io.BytesIO(blob))
    assert zf.testzip() is None
    names = set(zf.namelist())
    uid, dev, mid = person["user"]["id"], person["device"]["id"], person["model_id"]
    expected = {"manifest.json", "user.json", "gestures.json", "devices.json", "sessions.json", "jobs.json",
                "predictions.json", "api_keys.json", "videos.json", f"samples/device_{dev}.csv",
                f"models/model_{mid}.safetensors", f"models/model_{mid}.json",
                f"videos/user{uid}/session{person['session']['id']}.webm"}
    assert names == expected, names ^ expected
    manifest = json.loads(zf.read("manifest.json"))
    assert manifest["user_id"] == uid and manifest["format"] == repo.EXPORT_FORMAT
    assert manifest["counts"]["samples"] == BLOCKS * PER_BLOCK and manifest["counts"]["predictions"] == 5
    assert manifest["missing_video_files"] == []

    assert json.loads(zf.read("user.json"))["email"] == person["email"]
    assert [g["name"] for g in json.loads(zf.read("gestures.json"))] == ["fist", "open hand"]
    sessions = json.loads(zf.read("sessions.json"))
    assert len(sessions) == 1 and len(sessions[0]["intervals"]) == len(person["session"]["intervals"])
    jobs = json.loads(zf.read("jobs.json"))
    assert jobs[0]["id"] == person["job"]["id"] and jobs[0]["logs"]
    assert len(json.loads(zf.read("predictions.json"))) == 5
    keys = json.loads(zf.read("api_keys.json"))
    assert [(k["id"], k["read_only"]) for k in keys] == [(person["key"]["id"], False)]  # what each key may do

    rows = list(csv.reader(io.StringIO(zf.read(f"samples/device_{dev}.csv").decode())))
    assert rows[0][:3] == ["device_id", "boot", "seq"] and rows[0][-1] == f"ch{CHANNELS - 1}"
    body = rows[1:]
    assert [int(r[2]) for r in body] == list(range(BLOCKS * PER_BLOCK))
    assert all([int(v) for v in r[6:]] == [_value(int(r[2]), c) for c in range(CHANNELS)] for r in body)

    weights = zf.read(f"models/model_{mid}.safetensors")
    assert weights == person["weights"]
    meta = json.loads(zf.read(f"models/model_{mid}.json"))
    assert meta["sha256"] == hashlib.sha256(weights).hexdigest() and meta["classes"]
    assert zf.read(f"videos/user{uid}/session{person['session']['id']}.webm") == person["video"].read_bytes()

    everything = b"\n".join(zf.read(n) for n in names if not n.endswith((".safetensors", ".webm")))
    # no credentials: not the device key, not the API key nor its hash
    assert person["device"]["secret_key_hex"].encode() not in everything
    assert person["key"]["key"].encode() not in everything
    assert keystore.key_hash(person["key"]["key"]).encode() not in everything
    # nothing of anyone else
    assert other["email"].encode() not in everything and other["user"]["name"].encode() not in everything
    return manifest


def test_export_through_the_api_owner_or_admin_only(api, admin_key, user_key, two_people):
    ada, alan = two_people
    uid = ada["user"]["id"]
    r = api.get(f"/users/{uid}/export", headers={"X-API-Key": ada["key"]["key"]})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert f"semg-user-{uid}-export.zip" in r.headers["content-disposition"]
    check_export(r.content, ada, alan)

    by_admin = api.get(f"/users/{uid}/export", headers=admin_key)
    assert by_admin.status_code == 200
    check_export(by_admin.content, ada, alan)

    assert api.get(f"/users/{uid}/export", headers={"X-API-Key": alan["key"]["key"]}).status_code == 403
    assert api.get(f"/users/{uid}/export").status_code == 401
    assert api.get(f"/users/{uid}/export", headers={"X-API-Key": "semg_wrong"}).status_code == 401
    assert api.get("/users/987654321/export", headers=admin_key).status_code == 404


def test_exports_are_made_one_per_key_and_two_at_once(api, admin_key, two_people, monkeypatch):
    """An export holds a pooled database connection while it is made (a minute for a few million samples): 16 at
    once with one user key (a script retrying on its timeout) took every pooled connection, and every other
    request needing the database waited 10 s and got 503, for everyone. Now one per key and two at once; more
    get 429 without taking a connection."""
    from ml_model.rest.routes import users as users_routes
    ada, alan = two_people
    own = {"X-API-Key": ada["key"]["key"]}
    theirs = {"X-API-Key": alan["key"]["key"]}
    release, started = threading.Event(), []
    real = users_routes.repo.export_user_data

    def slow(conn, user_id, video_dir, out):
        started.append(user_id)
        release.wait(30)
        return real(conn, user_id, video_dir, out=out)

    monkeypatch.setattr(users_routes.repo, "export_user_data", slow)
    answers: dict[str, object] = {}

    def export(name: str, uid: int, headers: dict) -> None:
        answers[name] = api.get(f"/users/{uid}/export", headers=headers)

    def wait_started(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(started) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(started) == n, started

    first = threading.Thread(target=export, args=("ada", ada["user"]["id"], own))
    first.start()
    try:
        wait_started(1)
        again = api.get(f"/users/{ada['user']['id']}/export", headers=own)
        assert again.status_code == 429 and again.headers["retry-after"] == "30", again.text
        assert "one at a time per key" in again.json()["detail"]
        second = threading.Thread(target=export, args=("alan", alan["user"]["id"], theirs))
        second.start()
        wait_started(2)
        full = api.get(f"/users/{ada['user']['id']}/export", headers=admin_key)
        assert full.status_code == 429 and "2 exports are being made" in full.json()["detail"], full.text
        assert api.get(f"/users/{alan['user']['id']}", headers=theirs).status_code == 200
    finally:
        release.set()
        first.join(30)
        second.join(30)
    assert answers["ada"].status_code == 200 and answers["alan"].status_code == 200
    check_export(answers["ada"].content, ada, alan)
    assert len(started) == 2
    assert api.get(f"/users/{ada['user']['id']}/export", headers=own).status_code == 200  # its place is free
    assert api.get("/openapi.json").json()["paths"]["/users/{user_id}/export"]["get"]["responses"]["429"]


def test_export_through_the_ui(page, two_people):
    import data
    ada, alan = two_people
    at = page("pages/1_User_Management.py", user_id=ada["user"]["id"])
    at.run()
    buttons = [el for el in at.get("download_button") if "Export" in el.proto.label]
    assert buttons and buttons[0].proto.label == "Export Ada Lovelace's data (zip)"
    check_export(data.export_user(ada["user"]["id"]), ada, alan)


def test_export_is_a_consistent_snapshot_and_leaves_the_connection_as_it_was(clean_db, settings, two_people):
    ada, alan = two_people
    assert clean_db.autocommit
    blob = repo.export_user_data(clean_db, ada["user"]["id"], settings.video_dir)
    assert clean_db.autocommit and clean_db.get_transaction_status() == 0  # idle, still autocommit
    check_export(blob, ada, alan)
    out = io.BytesIO()
    manifest = repo.export_user_data(clean_db, alan["user"]["id"], settings.video_dir, out=out)
    assert manifest["user_id"] == alan["user"]["id"]
    check_export(out.getvalue(), alan, ada)
    with pytest.raises(repo.NotFound):
        repo.export_user_data(clean_db, 987654321, settings.video_dir)


def test_an_export_too_large_for_the_ui_is_sent_to_the_api(page, two_people, clean_db, monkeypatch, settings):
    """The web UI builds the export zip in its own memory for the download button: a user with hours of recordings
    and webcam videos (hundreds of MB) could take the UI process down. Above MAX_UI_EXPORT_BYTES (estimated from
    what is stored) the page offers no button and gives the API's command, which streams the zip to a file."""
    import data
    ada, _alan = two_people
    uid = ada["user"]["id"]
    size, at_least = data.export_size_estimate(uid)
    assert size > 0 and not at_least  # her samples and decisions count, all of them
    with clean_db.cursor() as cur:
        cur.execute("SELECT coalesce(sum(n::bigint * channels), 0) FROM sample_blocks WHERE user_id = %s", (uid,))
        assert size >= cur.fetchone()[0] * data.EXPORT_BYTES_PER_VALUE
    assert size >= len(data.export_user(uid))  # an estimate on the safe side of the real zip

    monkeypatch.setattr(data, "MAX_UI_EXPORT_BYTES", size - 1)
    at = page("pages/1_User_Management.py", user_id=uid)
    at.run()
    assert not [el for el in at.get("download_button") if "Export" in el.proto.label]
    [cmd] = [c.value for c in at.code if "/export" in c.value]
    assert f"{settings.api_url}/users/{uid}/export" in cmd and "X-API-Key" in cmd
    assert "too much to build in the web UI" in " ".join(m.value for m in at.caption)


def test_a_user_streaming_for_months_is_counted_up_to_a_cap(page, two_people, clean_db, monkeypatch):
    """The export estimate and the delete confirmation counted every sample block and decision of the user: one
    streaming for months has hundreds of millions (about 3.4 M decisions a day at 40 a second), and counting them
    took longer than the web UI's 20 s statement timeout, which the page then reported as the database not being
    reachable. They count up to COUNT_MAX_* and say "more than" (here with caps below what Ada has)."""
    import data
    ada, _alan = two_people
    uid = ada["user"]["id"]
    with clean_db.cursor() as cur:
        cur.execute("SELECT (SELECT count(*) FROM sample_blocks WHERE user_id = %(u)s), "
                    "(SELECT sum(n) FROM sample_blocks WHERE user_id = %(u)s), "
                    "(SELECT count(*) FROM predictions WHERE user_id = %(u)s)", {"u": uid})
        blocks, samples, decisions = cur.fetchone()
    assert blocks > 3 and decisions > 3
    exact = data.user_data_counts(uid)
    assert (exact["samples"], exact["predictions"]) == (samples, decisions)
    assert not exact["samples_more"] and not exact["predictions_more"]

    monkeypatch.setattr(data, "COUNT_MAX_BLOCKS", 3)
    monkeypatch.setattr(data, "COUNT_MAX_DECISIONS", 2)
    capped = data.user_data_counts(uid)
    assert capped["samples_more"] and capped["predictions_more"] and capped["predictions"] == 2
    assert 0 < capped["samples"] < samples  # the samples of the 3 blocks counted
    assert {k: capped[k] for k in ("gestures", "devices", "sessions", "models")} == \
        {k: exact[k] for k in ("gestures", "devices", "sessions", "models")}
    data.export_size_estimate.clear()
    size, at_least = data.export_size_estimate(uid)
    assert at_least and size > data.MAX_UI_EXPORT_BYTES  # not built in the UI: the API streams it

    at = page("pages/1_User_Management.py", user_id=uid)
    at.run()
    assert not [el for el in at.get("download_button") if "Export" in el.proto.label]
    assert f"{ada['user']['name']}'s data is more than" in " ".join(m.value for m in at.caption)
    button = [b for b in at.button if b.label.startswith("Delete")]
    assert button, [b.label for b in at.button]
    button[0].click()
    at.run()
    said = " ".join(w.value for w in at.warning)
    assert f"more than {capped['samples']:,} samples" in said and "more than 2 prediction(s)" in said, said


def test_a_video_deleted_while_the_export_runs_is_listed_as_missing(clean_db, settings, two_people, monkeypatch):
    """A video deleted between the export's check that it exists and its copy into the zip (its session deleted in
    another tab) failed the whole export with FileNotFoundError (a 500 from the API). The file is removed here at
    exactly that moment, by the first call that copies a file into the zip."""
    ada, alan = two_people
    real_write = zipfile.ZipFile.write

    def delete_then_write(self, filename, *args, **kwargs):
        Path(filename).unlink()
        return real_write(self, filename, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "write", delete_then_write)
    blob = repo.export_user_data(clean_db, ada["user"]["id"], settings.video_dir)
    zf = zipfile.ZipFile(io.BytesIO(blob))
    assert zf.testzip() is None
    manifest = json.loads(zf.read("manifest.json"))
    video = f"user{ada['user']['id']}/session{ada['session']['id']}.webm"
    assert manifest["missing_video_files"] == [video] and manifest["counts"]["video_files"] == 0
    assert not [n for n in zf.namelist() if n.startswith("videos/")]
    assert manifest["counts"]["samples"] == BLOCKS * PER_BLOCK  # the rest is all there
