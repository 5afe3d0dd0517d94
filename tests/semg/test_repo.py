"""semg.repo against the real database: validation, conflicts, sessions, job queue states."""

import psycopg2.extras
import pytest

from semg import repo


@pytest.fixture
def user(clean_db):
    return repo.create_user(clean_db, "Ann", "ann@example.org")


def test_user_crud_and_unique_email(clean_db, user):
    assert repo.get_user(clean_db, user["id"])["email"] == "ann@example.org"
    with pytest.raises(repo.Conflict, match="already exists"):
        repo.create_user(clean_db, "Other", "ANN@example.org")
    with pytest.raises(repo.Invalid, match="valid email"):
        repo.create_user(clean_db, "X", "nope")
    with pytest.raises(repo.Invalid):
        repo.create_user(clean_db, "  ", "x@example.org")
    upd = repo.update_user(clean_db, user["id"], name="Anna")
    assert upd["name"] == "Anna" and upd["email"] == "ann@example.org"
    assert [u["id"] for u in repo.list_users(clean_db, search="anna")] == [user["id"]]
    assert repo.list_users(clean_db, search="zzz") == []
    with pytest.raises(repo.NotFound):
        repo.get_user(clean_db, 999999)


def test_delete_user_removes_video_files_inside_video_dir_only(clean_db, user, tmp_path):
    vd = tmp_path / "videos"
    (vd / "u").mkdir(parents=True)
    (vd / "u" / "a.webm").write_bytes(b"v")
    outside = tmp_path / "keep.txt"
    outside.write_text("x")
    with clean_db.cursor() as cur:
        cur.execute("INSERT INTO videos (user_id, path, started_at) VALUES (%s, 'u/a.webm', now())", (user["id"],))
    out = repo.delete_user(clean_db, user["id"], vd)
    assert out["videos_removed"] == 1 and not (vd / "u" / "a.webm").exists() and outside.exists()
    with pytest.raises(repo.NotFound):
        repo.delete_user(clean_db, user["id"], vd)


def test_gestures_and_devices(clean_db, user):
    g = repo.add_gesture(clean_db, user["id"], "fist", "close", [1, 0, 1], {"0": "flexors", 1: ""})
    assert g["channels_used"] == [0, 1] and g["channel_purposes"] == {"0": "flexors"}
    with pytest.raises(repo.Conflict):
        repo.add_gesture(clean_db, user["id"], "fist")
    with pytest.raises(repo.Invalid, match="REST"):
        repo.add_gesture(clean_db, user["id"], "rest")
    # nor the live decisions' "unsure" answer: an app could not tell that gesture from no decision
    from ml_model.postprocessing import UNKNOWN
    for name in ("unknown", " Unknown "):
        with pytest.raises(repo.Invalid, match=f"{UNKNOWN} is what live recognition answers when it is unsure"):
            repo.add_gesture(clean_db, user["id"], name)
    with pytest.raises(repo.Invalid, match=UNKNOWN):
        repo.update_gesture(clean_db, g["id"], name="UNKNOWN")
    assert [x["name"] for x in repo.list_gestures(clean_db, user["id"])] == ["fist"]
    with pytest.raises(repo.Invalid):
        repo.add_gesture(clean_db, user["id"], "x", channels_used=[16])
    assert repo.update_gesture(clean_db, g["id"], description="d")["channels_used"] == [0, 1]
    d = repo.register_device(clean_db, user["id"], 8, 200)
    assert len(bytes.fromhex(d["secret_key_hex"])) == 32
    d2 = repo.rotate_device_key(clean_db, d["id"])
    assert d2["secret_key_hex"] != d["secret_key_hex"]
    leg = repo.register_device(clean_db, user["id"], 4, 100, protocol="legacy")
    assert leg["secret_key_hex"] is None
    with pytest.raises(repo.Conflict, match="legacy"):
        repo.register_device(clean_db, user["id"], 4, 100, protocol="legacy")
    with pytest.raises(repo.Invalid):
        repo.rotate_device_key(clean_db, leg["id"])
    with pytest.raises(repo.Invalid):
        repo.register_device(clean_db, user["id"], 17, 100)
    with pytest.raises(repo.NotFound):
        repo.register_device(clean_db, 424242, 4, 100)
    assert "secret_key" not in repo.get_device(clean_db, d["id"])


def test_session_plan_and_job_lifecycle(clean_db, user):
    repo.add_gesture(clean_db, user["id"], "fist")
    repo.add_gesture(clean_db, user["id"], "open hand")
    dev = repo.register_device(clean_db, user["id"], 4, 500)
    plan = repo.plan_intervals(["fist", "open hand"], 2, 3, 2)
    assert [i["label"] for i in plan[:4]] == ["REST", "fist", "REST", "open hand"]
    assert plan[-1]["planned_end_ms"] == 2 * (2 * 3000 + 2 * 2000) + 2000
    with pytest.raises(repo.Invalid, match="gesture bank"):
        repo.create_session(clean_db, user["id"], dev["id"], ["pinch"], 1, 2, 2)
    s = repo.create_session(clean_db, user["id"], dev["id"], ["fist", "open hand"], 2, 3, 2)
    assert len(s["intervals"]) == len(plan)
    with pytest.raises(repo.Invalid, match="only completed"):
        repo.schedule_job(clean_db, user["id"], [s["id"]])
    repo.start_session(clean_db, s["id"])
    first = s["intervals"][0]
    import datetime as dt
    t0 = dt.datetime.now(dt.UTC)
    repo.mark_interval(clean_db, first["id"], t0, t0 + dt.timedelta(seconds=2))
    with pytest.raises(repo.Invalid, match="for that gesture give kind 'gesture'"):  # its samples would be REST
        repo.add_interval(clean_db, s["id"], "rest", "fist", 0, 0, 3000)
    redo = repo.add_interval(clean_db, s["id"], "gesture", "fist", 0, 0, 3000)
    assert redo["ordinal"] == len(plan)
    assert repo.add_interval(clean_db, s["id"], "rest", "rest", 3000, 3000, 5000)["label"] == "REST"
    repo.discard_interval(clean_db, first["id"])
    repo.end_session(clean_db, s["id"])
    with pytest.raises(repo.Conflict):
        repo.start_session(clean_db, s["id"])
    job = repo.schedule_job(clean_db, user["id"], [s["id"]], {"epochs": 5})
    assert job["status"] == "scheduled" and job["session_ids"] == [s["id"]]
    canceled = repo.cancel_job(clean_db, job["id"])
    assert canceled["status"] == "canceled"
    with pytest.raises(repo.Conflict, match="already canceled"):
        repo.cancel_job(clean_db, job["id"])
    assert [m["message"] for m in repo.job_logs(clean_db, job["id"])][-1] == "canceled before it started"
    with pytest.raises(repo.Invalid):
        repo.schedule_job(clean_db, user["id"], [])
    assert repo.latest_model(clean_db, user["id"]) is None
    assert repo.recent_predictions(clean_db, user["id"]) == []


def test_a_device_records_one_session_at_a_time(clean_db, user):
    """A second session started on a device while another records there (within its planned time) would label
    the same samples again; it is refused until the first ends or its plan runs out."""
    import datetime as dt
    repo.add_gesture(clean_db, user["id"], "fist")
    dev = repo.register_device(clean_db, user["id"], 4, 500.0)
    other_dev = repo.register_device(clean_db, user["id"], 4, 500.0)
    a, b, c = (repo.create_session(clean_db, user["id"], d["id"], ["fist"], 2, 5, 5) for d in (dev, dev, other_dev))
    repo.start_session(clean_db, a["id"])
    with pytest.raises(repo.Conflict, match=f"device {dev['id']} is already recording session {a['id']}"):
        repo.start_session(clean_db, b["id"])
    assert repo.get_session(clean_db, b["id"])["status"] == "planned"
    repo.start_session(clean_db, c["id"])  # another device: fine
    repo.start_session(clean_db, a["id"], at=None)  # the same session again is no conflict with itself
    repo.end_session(clean_db, a["id"], "aborted")
    assert repo.start_session(clean_db, b["id"])["status"] == "recording"
    # a session left recording whose plan ran out (its window closed) does not block the device
    repo.end_session(clean_db, b["id"], "aborted")
    stale = repo.create_session(clean_db, user["id"], dev["id"], ["fist"], 1, 1, 1)
    repo.start_session(clean_db, stale["id"], at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    fresh = repo.create_session(clean_db, user["id"], dev["id"], ["fist"], 1, 1, 1)
    # a start far ahead of the server's clock (year 3000 was taken) would hold the device until then
    with pytest.raises(repo.Invalid, match="is in the future"):
        repo.start_session(clean_db, fresh["id"], at=dt.datetime(3000, 1, 1, tzinfo=dt.UTC))
    assert repo.get_session(clean_db, fresh["id"])["status"] == "planned"
    assert repo.start_session(clean_db, fresh["id"])["status"] == "recording"


def test_videos_are_registered_with_safe_relative_paths(clean_db, user):
    import datetime as dt
    now = dt.datetime.now(dt.UTC)
    repo.add_gesture(clean_db, user["id"], "x")
    s = repo.create_session(clean_db, user["id"], None, ["x"], 1, 1, 1)
    v = repo.add_video(clean_db, user["id"], s["id"], "u1/s1.webm", now, frame_count=3, size=10)
    assert repo.list_videos(clean_db, user["id"], s["id"])[0]["id"] == v["id"]
    for bad in ("/etc/passwd", "../x.webm", ""):
        with pytest.raises(repo.Invalid):
            repo.add_video(clean_db, user["id"], None, bad, now)
    other = repo.create_user(clean_db, "Bob", "bob@example.org")
    with pytest.raises(repo.Invalid, match="another user"):
        repo.add_video(clean_db, other["id"], s["id"], "u2/a.webm", now)


def _completed_session(conn, user_id: int, device_id: int) -> dict:
    s = repo.create_session(conn, user_id, device_id, ["fist"], 1, 1, 1)
    repo.start_session(conn, s["id"])
    repo.end_session(conn, s["id"])
    return s


@pytest.mark.parametrize(("second", "says"), [
    ((8, 200), "different sample rates (session {a}: 1000 Hz, session {b}: 200 Hz)"),
    ((4, 1000), "different channel counts (session {a}: 8 channels, session {b}: 4 channels)"),
])
def test_a_job_over_sessions_of_different_sensor_setups_is_refused_when_scheduled(clean_db, user, second, says):
    """Scheduling accepted sessions of mixed sample rates or channel counts; the job then failed in the worker."""
    repo.add_gesture(clean_db, user["id"], "fist")
    a = _completed_session(clean_db, user["id"], repo.register_device(clean_db, user["id"], 8, 1000)["id"])
    b = _completed_session(clean_db, user["id"], repo.register_device(clean_db, user["id"], *second)["id"])
    jobs = len(repo.list_jobs(clean_db, user["id"]))
    with pytest.raises(repo.Invalid) as e:
        repo.schedule_job(clean_db, user["id"], [a["id"], b["id"]])
    assert says.format(a=a["id"], b=b["id"]) in str(e.value)
    assert repo.training_sessions_problem(clean_db, user["id"], [a["id"], b["id"]]) == str(e.value)
    assert len(repo.list_jobs(clean_db, user["id"])) == jobs
    c = _completed_session(clean_db, user["id"], repo.register_device(clean_db, user["id"], 8, 1000)["id"])
    assert repo.training_sessions_problem(clean_db, user["id"], [a["id"], c["id"]]) is None
    assert repo.schedule_job(clean_db, user["id"], [a["id"], c["id"]])["session_ids"] == [a["id"], c["id"]]


def test_a_nul_character_in_a_name_is_refused_naming_the_field(clean_db, user):
    """PostgreSQL text cannot hold NUL: psycopg2 raised a bare ValueError ('A string literal cannot contain NUL')
    that the UI showed as 'Something went wrong' and the REST API as a 500."""
    dev = repo.register_device(clean_db, user["id"], 8, 200)
    g = repo.add_gesture(clean_db, user["id"], "fist")
    cases = [
        ("user name", lambda: repo.create_user(clean_db, "A\x00b", "b@example.org")),
        ("user name", lambda: repo.update_user(clean_db, user["id"], name="A\x00")),
        ("email", lambda: repo.create_user(clean_db, "B", "b\x00@example.org")),
        ("notes", lambda: repo.update_user(clean_db, user["id"], notes="x\x00")),
        ("gesture name", lambda: repo.add_gesture(clean_db, user["id"], "pi\x00nch")),
        ("gesture name", lambda: repo.update_gesture(clean_db, g["id"], name="fi\x00st")),
        ("gesture description", lambda: repo.add_gesture(clean_db, user["id"], "pinch", description="\x00")),
        ("channel purpose", lambda: repo.add_gesture(clean_db, user["id"], "pinch", channel_purposes={"0": "\x00"})),
        ("device name", lambda: repo.register_device(clean_db, user["id"], 8, 200, name="arm\x00band")),
        ("session name", lambda: repo.create_session(clean_db, user["id"], dev["id"], ["fist"], 1, 1, 1,
                                                     name="s\x00")),
        ("search", lambda: repo.list_users(clean_db, search="a\x00")),
    ]
    for field, call in cases:
        with pytest.raises(repo.Invalid, match=f"^{field} must not contain a NUL character"):
            call()
    assert [u["name"] for u in repo.list_users(clean_db)] == ["Ann"]
    assert [x["name"] for x in repo.list_gestures(clean_db, user["id"])] == ["fist"]
    # any other text or JSON value: still a clear Invalid, never the driver's ValueError or a DataError
    for value in ("a\x00", psycopg2.extras.Json({"k": "\x00"})):
        with pytest.raises(repo.Invalid, match="^text must not contain a NUL character"), repo._tx(clean_db) as cur:
            cur.execute("SELECT %s::text::jsonb" if isinstance(value, psycopg2.extras.Json) else "SELECT %s", (value,))


def test_user_search_matches_percent_and_underscore_literally(clean_db):
    """'%' and '_' in the search box acted as LIKE wildcards: '_' found every user with a name of any letter there,
    '%' found everyone."""
    ids = {n: repo.create_user(clean_db, n, f"u{i}@example.org")["id"]
           for i, n in enumerate(["a_b", "axb", "100% sure", "back\\slash"])}

    def found(q):
        return {u["name"] for u in repo.list_users(clean_db, search=q)}

    assert found("a_b") == {"a_b"}
    assert found("_") == {"a_b"}
    assert found("%") == {"100% sure"}
    assert found("0% s") == {"100% sure"}
    assert found("\\") == {"back\\slash"}
    assert found("K\\S") == {"back\\slash"}  # still case-insensitive
    assert found("@EXAMPLE.org") == set(ids)


def test_a_user_may_register_so_many_devices(clean_db, user):
    """Anyone with a user API key could register devices in a loop, and the UDP server reloads every device every
    2 s for everyone. A user may have MAX_DEVICES_PER_USER; deleting one makes room; nobody else is limited by it."""
    import threading

    from semg import db
    ids = [repo.register_device(clean_db, user["id"], 8, 200.0)["id"] for _ in range(repo.MAX_DEVICES_PER_USER - 2)]
    # the last two places, asked for from two connections at once: exactly one each, never a third
    conns = [db.connect() for _ in range(3)]
    answers: list = []

    def register(conn):
        try:
            answers.append(repo.register_device(conn, user["id"], 8, 200.0)["id"])
        except repo.Conflict as e:
            answers.append(e)

    threads = [threading.Thread(target=register, args=(c,)) for c in conns]
    [t.start() for t in threads]
    [t.join() for t in threads]
    [c.close() for c in conns]
    refused = [a for a in answers if isinstance(a, repo.Conflict)]
    assert len(answers) == 3 and len(refused) == 1, answers
    assert f"at most {repo.MAX_DEVICES_PER_USER} devices" in str(refused[0])
    with pytest.raises(repo.Conflict):
        repo.register_device(clean_db, user["id"], 8, 200.0, protocol="legacy")
    other = repo.create_user(clean_db, "Other", "other-devices@example.org")
    assert repo.register_device(clean_db, other["id"], 8, 200.0)["id"]
    repo.delete_device(clean_db, ids[0])
    assert repo.register_device(clean_db, user["id"], 8, 200.0)["id"]
    with pytest.raises(repo.NotFound):
        repo.register_device(clean_db, 987654321, 8, 200.0)
    # together, one user's devices may send as much as one device at the highest rate and channel count
    fast = repo.create_user(clean_db, "Fast", "fast@example.org")
    assert repo.register_device(clean_db, fast["id"], repo.MAX_CHANNELS, 10_000.0)["id"]
    with pytest.raises(repo.Conflict, match=f"at most {repo.MAX_VALUES_PER_S_PER_USER} values/s"):
        repo.register_device(clean_db, fast["id"], 1, 1.0)
