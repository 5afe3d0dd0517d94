"""The capture clockwork writing to the real database (data.SessionStore), including a write that fails."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import capture
import data
import pytest
import ui_seed
from ui_checks import texts

from semg import repo
from semg.config import get_settings
from semg.embedded import free_port


class FlakyStore(data.SessionStore):
    """The real store, except that the next `fail` marks raise as if the database were restarting."""

    def __init__(self, session_id: int, fail: int = 0):
        super().__init__(session_id)
        self.fail = fail

    def mark(self, interval_id, started_at, ended_at):
        if self.fail:
            self.fail -= 1
            raise ConnectionError("database restarting")
        super().mark(interval_id, started_at, ended_at)


@pytest.fixture
def new_session(clean_db):
    base = ui_seed.seed_user(clean_db)

    def make(gestures=("fist", "open hand"), reps=2, hold=2.0, rest=2.0, t0=1000.0):
        s = data.create_session(base["user"]["id"], base["device"]["id"], list(gestures), reps, hold, rest)
        data.start_session(s["id"], at=capture.utc(t0))
        run = capture.CueRun.from_session(s)
        run.start(t0)
        return run, FlakyStore(s["id"])

    make.conn = clean_db
    make.user_id = base["user"]["id"]
    return make


def intervals(conn, session_id):
    return repo.get_session(conn, session_id)["intervals"]


def test_intervals_finished_while_the_database_failed_are_written_by_the_next_advance(new_session):
    run, store = new_session()
    store.fail = 1
    with pytest.raises(ConnectionError):
        run.advance(1004.5, store)  # REST 0-2 and fist 2-4 are both due; the first write fails
    run.advance(1004.7, store)
    ivs = intervals(new_session.conn, run.session_id)
    assert [(i["label"], i["started_at"] is not None) for i in ivs[:3]] == [
        ("REST", True), ("fist", True), ("REST", False)]
    assert ivs[1]["started_at"] == capture.utc(1002.0) and ivs[1]["ended_at"] == capture.utc(1004.0)
    run.advance(2000.0, store)
    assert run.state == "done" and run.unsaved == 0
    assert all(i["started_at"] is not None for i in intervals(new_session.conn, run.session_id))


def test_redo_and_stop_writes_survive_a_failed_mark(new_session):
    run, store = new_session()
    run.advance(1003.0, store)  # in fist (2-4)
    store.fail = 1
    with pytest.raises(ConnectionError):
        run.redo_last(1003.0, store)  # the cut fist's mark fails; its discard must wait for it
    run.advance(1003.1, store)
    fist = intervals(new_session.conn, run.session_id)[1]
    assert fist["discarded"] and fist["ended_at"] == capture.utc(1003.0)
    store.fail = 1
    with pytest.raises(ConnectionError):
        run.abort(1004.0, store)  # 1 s into the inserted rest
    run.advance(1004.1, store)
    rest = next(i for i in intervals(new_session.conn, run.session_id) if i["id"] == run.steps[run.index].interval_id)
    assert run.state == "aborted" and run.unsaved == 0
    assert (rest["started_at"], rest["ended_at"]) == (capture.utc(1003.0), capture.utc(1004.0))


def test_stop_and_redo_while_the_database_is_down(new_session, settings, point_ui_at):
    run, _ = new_session()  # REST 0-2, fist 2-4, REST 4-6, open hand 6-8, ...
    store = data.SessionStore(run.session_id)
    run.advance(1001.0, store)
    steps = [(s.interval_id, s.discarded) for s in run.steps]
    point_ui_at(free_port())
    with pytest.raises(data.Unavailable):  # a redo needs new rows: it changes nothing (REST 0-2 is due, queued)
        run.redo_last(1003.0, store)
    assert [(s.interval_id, s.discarded) for s in run.steps] == steps and run.state == "running"
    assert run.unsaved == 1
    with pytest.raises(data.Unavailable):  # Stop stops, database or not
        run.abort(1003.5, store)
    assert run.state == "aborted" and run.unsaved == 2
    point_ui_at(settings.postgres_port)
    run.advance(1010.0, store)  # the next tick, the database back: the cut is stored, nothing after it
    assert run.unsaved == 0
    ivs = intervals(new_session.conn, run.session_id)
    assert [(i["label"], i["started_at"], i["ended_at"]) for i in ivs[:3]] == [
        ("REST", capture.utc(1000.0), capture.utc(1002.0)), ("fist", capture.utc(1002.0), capture.utc(1003.5)),
        ("REST", None, None)]
    assert all(i["started_at"] is None for i in ivs[2:])


def start_on_page(page, user_id, hold=20.0, rest=0.5, gestures=("fist",), reps=1):
    at = page("capture", user_id=user_id)
    at.run()
    at.multiselect(key="capture_gestures").set_value(list(gestures))
    at.number_input(key="capture_reps").set_value(reps)
    at.number_input(key="capture_hold").set_value(hold)
    at.number_input(key="capture_rest").set_value(rest)
    at.button(key="capture_start").click()
    at.run()
    return at, at.session_state["capture_shared"].run


def test_stopping_mid_gesture_ends_the_session_after_the_cut_interval(page, seeded):
    at, run = start_on_page(page, seeded["user"]["id"])
    time.sleep(1.0)  # into the 20 s fist
    at.button(key="abort").click()
    at.run()
    s = repo.get_session(seeded["conn"], run.session_id)
    fist = next(i for i in s["intervals"] if i["label"] == "fist")
    assert s["status"] == "aborted" and fist["ended_at"] is not None
    assert s["ended_at"] >= fist["ended_at"]
    assert at.session_state["capture_last_result"]["summary"]["intervals"] == 2


def cues(run, store, times):
    out = []
    for t in times:
        run.advance(t, store)
        out.append(run.cue(t).headline)
    return out


def test_redo_in_a_rest_puts_a_rest_before_and_after_the_redone_gesture(new_session):
    run, store = new_session()  # REST 0-2, fist 2-4, REST 4-6, open hand 6-8, ...
    run.advance(1005.0, store)
    assert run.redo_last(1005.0, store).label == "fist"
    # cut rest 4-5, REST 5-7, fist 7-9, REST 9-11, open hand 11-13
    assert cues(run, store, [1006.0, 1008.0, 1010.0, 1012.0]) == ["Rest", "fist", "Rest", "open hand"]
    ivs = sorted((i for i in intervals(new_session.conn, run.session_id) if i["started_at"] and not i["discarded"]),
                 key=lambda i: i["started_at"])[1:]  # from the cut rest on (the discarded fist leaves a gap)
    assert [i["label"] for i in ivs] == ["REST", "REST", "fist", "REST"]
    for a, b in zip(ivs, ivs[1:], strict=False):
        assert a["ended_at"] == b["started_at"]


def test_redo_in_the_final_rest_does_not_end_the_session_on_a_gesture(new_session):
    run, store = new_session(gestures=("fist",), reps=1)  # REST 0-2, fist 2-4, REST 4-6
    run.advance(1005.0, store)
    run.redo_last(1005.0, store)
    run.advance(2000.0, store)
    kept = [i for i in intervals(new_session.conn, run.session_id) if i["started_at"] and not i["discarded"]]
    assert run.state == "done" and kept[-1]["kind"] == "rest" and kept[-2]["label"] == "fist"


def test_a_double_click_on_redo_keeps_the_good_repetition_before_it(new_session):
    run, store = new_session()
    run.advance(1007.0, store)  # fist done well (2-4), now in open hand (6-8)
    assert run.redo_last(1007.0, store).label == "open hand"
    assert run.redo_last(1007.3, store) is None and run.redo_pending
    fist = next(i for i in intervals(new_session.conn, run.session_id) if i["label"] == "fist")
    assert not fist["discarded"]
    run.advance(1007.0 + 2 + 2, store)  # the redone open hand is over: Redo works again
    assert not run.redo_pending and run.redo_last(1011.5, store).label == "open hand"


def test_a_session_recording_in_another_window_is_not_offered_for_closing(page, seeded):
    conn, uid = seeded["conn"], seeded["user"]["id"]
    _tab1, run = start_on_page(page, uid)
    run.seen_at = time.time() + 60  # its window goes on ticking, however slowly this machine runs the test
    left = repo.create_session(conn, uid, seeded["device"]["id"], ["fist"], 1, 1.0, 1.0, "left behind")
    repo.start_session(conn, left["id"], datetime.now(UTC) - timedelta(hours=1))
    tab2 = page("capture", user_id=uid)
    tab2.run()
    keys = {b.key for b in tab2.button}
    assert f"close_{run.session_id}" not in keys and f"close_{left['id']}" in keys
    assert any(f"#{run.session_id}" in c.value and "is recording" in c.value for c in tab2.caption)


def test_the_recording_window_still_finishes_a_session_closed_elsewhere(page, seeded):
    conn, uid = seeded["conn"], seeded["user"]["id"]
    tab1, run = start_on_page(page, uid, hold=0.5, rest=0.5)
    repo.end_session(conn, run.session_id, "aborted")  # what 'Close it' in another window does
    time.sleep(1.8)  # the plan (1.5 s) is over
    for _ in range(3):
        tab1.run()
    assert not tab1.error
    assert tab1.session_state["capture_shared"].run is None
    assert not tab1.session_state["capture_shared"].recorder.active
    assert tab1.session_state["capture_last_result"]["status"] == "aborted"
    assert all(i["started_at"] is not None for i in repo.get_session(conn, run.session_id)["intervals"])


def test_picking_another_user_during_a_run_keeps_the_runs_device_on_the_strip(page, seeded):
    conn, uid = seeded["conn"], seeded["user"]["id"]
    bob = ui_seed.seed_user(conn, name="Bob", email="bob@example.org")
    ui_seed.seed_samples(conn, bob["user"]["id"], bob["device"]["id"], datetime.now(UTC) - timedelta(seconds=3), 3000)
    at, run = start_on_page(page, uid)
    at.selectbox(key="semg_user_pick").set_value(bob["user"]["id"])
    at.run()
    strip = [c.value for c in at.caption if "device #" in c.value]
    assert strip and all(f"device #{seeded['device']['id']} " in c for c in strip)
    assert any("Ada Lovelace" in i.value and f"#{run.session_id}" in i.value for i in at.info)
    assert at.button(key="abort")  # the run is still shown and can be stopped


def test_after_a_redo_close_it_waits_for_the_redo_extended_end(page, new_session):
    """A redo adds time: another window must not offer 'Close it' once the original plan is over while the
    session is still recording the redone repetition and the rest of the plan."""
    t0 = float(int(time.time()) - 65)
    run, store = new_session(gestures=("fist",), reps=1, hold=20.0, rest=20.0, t0=t0)  # REST 0-20 fist 20-40 REST 40-60
    run.advance(t0 + 50, store)
    assert run.redo_last(t0 + 50, store).label == "fist"  # REST 40-50 (cut), REST 50-70, fist 70-90, REST 90-110
    tab2 = page("capture", user_id=new_session.user_id)
    tab2.run()
    assert not tab2.exception
    assert f"close_{run.session_id}" not in {b.key for b in tab2.button}
    assert any(f"#{run.session_id}" in c.value and "is recording" in c.value for c in tab2.caption)
    s = data.get_session(run.session_id)
    assert data.planned_end(s) == capture.utc(t0 + 110)  # 45 s from now; the original plan ended 5 s ago
    run.advance(t0 + 200, store)
    assert run.state == "done" and run.steps[-1].ended == t0 + 110


# ---- the interval journal: labels recorded while the database is down outlive the window and the process
def journals(settings):
    d = settings.state_dir / "capture-journal"
    return sorted(d.glob("*.jsonl")) if d.is_dir() else []


def went_quiet(journal, seconds=60):
    """As if the journal's run had not ticked for a minute (its window closed, its process killed)."""
    t = time.time() - seconds
    os.utime(journal, (t, t))


@pytest.fixture
def point_ui_at(monkeypatch, settings):
    """point_ui_at(port) switches the UI's database port (where nothing listens = the database is down);
    the real one is back after the test, whatever happened."""
    def switch(port):
        monkeypatch.setenv("POSTGRES_PORT", str(port))
        get_settings.cache_clear()

    yield switch
    monkeypatch.undo()
    get_settings.cache_clear()


def test_labels_of_a_window_closed_while_the_database_was_down_are_stored_by_the_next_page_load(
        page, seeded, settings, point_ui_at):
    conn, uid, db_port = seeded["conn"], seeded["user"]["id"], settings.postgres_port
    _tab1, run = start_on_page(page, uid, hold=20.0, rest=0.5)  # REST 0-0.5, fist 0.5-20.5, REST 20.5-21
    t = run.t_start
    run.advance(t + 5, data.SessionStore(run.session_id))  # stored at once: nothing left in a journal
    assert journals(settings) == []
    flaky = FlakyStore(run.session_id, fail=1)
    with pytest.raises(ConnectionError):  # the redo's new rows are added, then the database goes away
        run.redo_last(t + 5, flaky)  # fist cut 0.5-5 (discarded), REST 5-5.5, fist 5.5-25.5, REST 25.5-26
    point_ui_at(free_port())
    with pytest.raises(data.Unavailable):
        run.advance(t + 100, data.SessionStore(run.session_id))  # what the window's next tick does
    assert run.state == "done" and run.unsaved == 6
    [journal] = journals(settings)
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600
    assert data.replay_interval_journals()["live"] == 1  # the window is open: its run stores them itself
    kept = journal.read_bytes()

    # the window is closed while the database is down: its run is no longer ticking
    went_quiet(journal)
    point_ui_at(db_port)
    tab2 = page("capture", user_id=uid)
    tab2.run()
    assert not tab2.exception
    s = repo.get_session(conn, run.session_id)
    ivs = sorted(s["intervals"], key=lambda i: i["ordinal"])
    assert len(ivs) == 5 and all(i["started_at"] is not None for i in ivs)
    by_ord = {i["ordinal"]: i for i in ivs}
    cut = by_ord[1]
    assert cut["discarded"] and (cut["started_at"], cut["ended_at"]) == (capture.utc(t + 0.5), capture.utc(t + 5))
    kept_spans = [(i["label"], i["started_at"], i["ended_at"]) for i in ivs if not i["discarded"]]
    assert sorted(kept_spans, key=lambda x: x[1]) == [
        ("REST", capture.utc(t), capture.utc(t + 0.5)), ("REST", capture.utc(t + 5), capture.utc(t + 5.5)),
        ("fist", capture.utc(t + 5.5), capture.utc(t + 25.5)), ("REST", capture.utc(t + 25.5), capture.utc(t + 26))]
    assert data.planned_end(s) == capture.utc(t + 26)
    assert journals(settings) == []
    assert any("Stored 6" in str(x.value) for x in tab2.toast)

    # replaying the same journal again (a crash after storing, before clearing) changes nothing, adds nothing
    journal.write_bytes(kept)
    went_quiet(journal)
    again = data.replay_interval_journals()
    assert (again["stored"], again["files"]) == (6, 1) and journals(settings) == []
    assert repo.get_session(conn, s["id"]) == s
    # and if the first window comes back after all (a reconnect), its own run stores the same: no change
    run.flush(data.SessionStore(run.session_id))
    assert run.unsaved == 0 and journals(settings) == []
    assert repo.get_session(conn, s["id"]) == s


def test_labels_of_a_ui_process_killed_while_the_database_was_down_are_stored_by_the_next_process(
        new_session, settings):
    run, _store = new_session(gestures=("fist",), reps=1, hold=2.0, rest=2.0, t0=1000.0)
    session = data.get_session(run.session_id)
    script = textwrap.dedent(f"""
        import os, signal
        import capture, data
        from semg.config import get_settings
        session = data.get_session({run.session_id})
        run = capture.CueRun.from_session(session, journal=data.IntervalJournal(session))
        run.start(1000.0)
        os.environ["POSTGRES_PORT"] = "{free_port()}"  # the database goes away
        get_settings.cache_clear()
        try:
            run.advance(1010.0, data.SessionStore(run.session_id))
        except data.Unavailable:
            print("unsaved", run.unsaved, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # the UI server dies with them
    """)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "streamlit_apps")])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "unsaved 3", out.stderr
    [journal] = journals(settings)
    assert all(i["started_at"] is None for i in data.get_session(run.session_id)["intervals"])
    went_quiet(journal)  # the UI server is restarted a while later

    done = data.replay_interval_journals()  # this process is the next UI process
    assert (done["stored"], done["files"], done["bad_lines"]) == (3, 1, 0)
    ivs = data.get_session(run.session_id)["intervals"]
    assert [(i["started_at"], i["ended_at"]) for i in ivs] == [
        (capture.utc(1000.0), capture.utc(1002.0)), (capture.utc(1002.0), capture.utc(1004.0)),
        (capture.utc(1004.0), capture.utc(1006.0))]
    assert len(ivs) == len(session["intervals"])
    assert journals(settings) == []


def test_corrupt_journal_lines_are_logged_and_kept_aside_and_never_block_the_rest(new_session, settings, caplog):
    run, _store = new_session(gestures=("fist",), reps=1, hold=2.0, rest=2.0)
    session = data.get_session(run.session_id)
    rest0, fist, rest1 = (i["id"] for i in session["intervals"])
    good = {"v": 1, "session_id": session["id"], "session_created_at": session["created_at"].isoformat()}

    def line(**kw):
        return json.dumps({**good, **kw})

    mark = {"op": "mark", "started_at": "2026-01-01T10:00:00+00:00", "ended_at": "2026-01-01T10:00:02+00:00"}
    d = settings.state_dir / "capture-journal"
    d.mkdir(exist_ok=True)
    (d / "a-older.jsonl").write_text("\n".join([
        line(**mark, interval_id=rest0),
        "{not json",
        line(op="mark", interval_id=fist, started_at="yesterday", ended_at="2026-01-01T10:00:04+00:00"),
        line(op="explode", interval_id=fist),
        line(**mark, interval_id=999999),  # not an interval of this session
        line(op="discard", interval_id=rest1),
        '{"v": 1, "session_id": 1, "op": "disc',  # torn by a crash mid-write
    ]))
    went_quiet(d / "a-older.jsonl", seconds=120)
    (d / "b-newer.jsonl").write_text(
        line(op="mark", interval_id=fist, started_at="2026-01-01T10:00:02+00:00",
             ended_at="2026-01-01T10:00:04+00:00") + "\n"
        + json.dumps({**good, "session_created_at": "2020-01-01T00:00:00+00:00", "op": "discard",
                      "interval_id": fist}) + "\n")  # same id, but another session (database recreated)
    went_quiet(d / "b-newer.jsonl")
    with caplog.at_level(logging.WARNING, logger="semg.ui"):
        done = data.replay_interval_journals()
    assert (done["stored"], done["dropped"], done["bad_lines"], done["files"]) == (3, 2, 4, 2)
    ivs = {i["id"]: i for i in data.get_session(session["id"])["intervals"]}
    assert ivs[rest0]["ended_at"] == datetime(2026, 1, 1, 10, 0, 2, tzinfo=UTC)
    assert ivs[fist]["started_at"] == datetime(2026, 1, 1, 10, 0, 2, tzinfo=UTC) and not ivs[fist]["discarded"]
    assert ivs[rest1]["discarded"]
    corrupt = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(corrupt) == 5 and any("line 2 skipped" in m and "not JSON" in m for m in corrupt)
    assert any("no longer exists" in r.getMessage() for r in caplog.records)
    assert journals(settings) == []
    rejected = (d / "a-older.rejected").read_text().splitlines()
    assert rejected[0] == "{not json" and len(rejected) == 4


def test_a_late_replay_of_a_mark_does_not_undo_a_redo_stored_meanwhile(new_session, settings):
    run, store = new_session()
    run.advance(1003.0, store)
    run.redo_last(1003.0, store)  # the fist (2-4) is cut at 3 and discarded, all stored
    session = data.get_session(run.session_id)
    fist = next(i for i in session["intervals"] if i["label"] == "fist")
    assert fist["discarded"]
    d = settings.state_dir / "capture-journal"
    d.mkdir(exist_ok=True)
    (d / "old.jsonl").write_text(json.dumps({  # a stale journal holding only the fist's mark
        "v": 1, "session_id": session["id"], "session_created_at": session["created_at"].isoformat(), "op": "mark",
        "interval_id": fist["id"], "started_at": capture.utc(1002.0).isoformat(),
        "ended_at": capture.utc(1003.0).isoformat()}) + "\n")
    went_quiet(d / "old.jsonl")
    assert data.replay_interval_journals()["stored"] == 1
    assert data.get_session(run.session_id) == session


def delete_user_on_page(page, uid):
    """Delete the user through the User Management page (as another browser window would); returns that page."""
    users = page("users", user_id=uid)
    users.run()
    users.button(key="ask_delete").click()
    users.run()
    users.button(key="confirm_delete").click()
    users.run()
    assert not users.exception and not users.error
    return users


def test_deleting_a_user_removes_the_video_of_a_capture_whose_window_closed(page, seeded, settings):
    """A capture whose window closes before the session ends never registers its video: deleting the user
    removed only registered videos, so the webcam recording of them stayed on disk."""
    import av
    import numpy as np
    conn, uid = seeded["conn"], seeded["user"]["id"]
    bob = ui_seed.seed_user(conn, name="Bob", email="bob@example.org")["user"]
    keep = settings.video_dir / repo.user_video_folder(bob["id"]) / "kept.webm"
    keep.parent.mkdir(parents=True, exist_ok=True)
    keep.write_bytes(b"webm")
    at, _run = start_on_page(page, uid)
    shared = at.session_state["capture_shared"]
    for i in range(3):
        shared.frame_callback(av.VideoFrame.from_ndarray(np.full((240, 320, 3), i * 8, np.uint8), format="rgb24"))
    video = shared.recorder.path
    assert video.is_file() and video.parent.name == f"user{uid}"
    del at, shared  # the window is closed mid-session
    # (earlier tests may have left recordings of another "user 1" here: ids restart with each clean database)
    in_folder = sum(1 for f in video.parent.iterdir() if f.is_file())

    users = delete_user_on_page(page, uid)
    assert f"{in_folder} video file(s) removed" in users.success[0].value
    assert not video.exists() and not video.parent.exists()
    assert keep.is_file(), "another user's video was removed"


@pytest.fixture
def video_insert_dies_once(clean_db):
    """The next INSERT INTO videos loses its connection (as in a database restart); the ones after work."""
    with clean_db, clean_db.cursor() as cur:
        cur.execute("""CREATE SEQUENCE test_video_insert_dies;
                       CREATE FUNCTION test_video_insert_dies() RETURNS trigger LANGUAGE plpgsql AS $$
                       BEGIN
                           IF nextval('test_video_insert_dies') = 1 THEN
                               PERFORM pg_terminate_backend(pg_backend_pid());
                           END IF;
                           RETURN NEW;
                       END $$;
                       CREATE TRIGGER test_video_insert_dies BEFORE INSERT ON videos
                           FOR EACH ROW EXECUTE FUNCTION test_video_insert_dies()""")
    yield
    with clean_db, clean_db.cursor() as cur:
        cur.execute("""DROP TRIGGER IF EXISTS test_video_insert_dies ON videos;
                       DROP FUNCTION IF EXISTS test_video_insert_dies(); DROP SEQUENCE IF EXISTS test_video_insert_dies""")


def record_frames(shared, n=3):
    import av
    import numpy as np
    for i in range(n):
        shared.frame_callback(av.VideoFrame.from_ndarray(np.full((240, 320, 3), i * 8, np.uint8), format="rgb24"))


def finish_with_a_failed_video_write(page, seeded):
    """A 1.5 s session with webcam frames whose end registers its video while the database connection dies."""
    at, run = start_on_page(page, seeded["user"]["id"], hold=0.5, rest=0.5)
    shared = at.session_state["capture_shared"]
    record_frames(shared)
    video = shared.recorder.path
    time.sleep(1.8)  # the plan (1.5 s) is over
    at.run()  # this tick ends the session; registering its video fails
    assert any("as soon as the database" in w.value for w in at.warning), [w.value for w in at.warning]
    assert repo.get_session(seeded["conn"], run.session_id)["status"] == "completed"
    return at, run, video


def test_a_video_whose_registration_failed_is_registered_by_the_next_tick(page, seeded, video_insert_dies_once):
    conn = seeded["conn"]
    at, run, video = finish_with_a_failed_video_write(page, seeded)
    at.run()  # the database is back
    assert not at.exception and at.session_state["capture_shared"].run is None
    [row] = repo.list_videos(conn, seeded["user"]["id"], run.session_id)
    assert row["frame_count"] == 3 and video.is_file()
    assert video.resolve() == (data.settings().video_dir / row["path"]).resolve()
    assert "Video saved (3 frames" in at.session_state["capture_last_result"]["note"]
    assert journals(data.settings()) == []


def test_a_video_waiting_to_be_registered_is_dropped_when_its_user_is_deleted(page, seeded, settings,
                                                                              video_insert_dies_once):
    """The session ended but registering its video failed; then its user is deleted in another window: the
    window ends the run keeping nothing, and the next session in it does not take the old video as its own."""
    conn = seeded["conn"]
    at, run, video = finish_with_a_failed_video_write(page, seeded)
    repo.delete_user(conn, seeded["user"]["id"])
    at.run()
    assert not at.exception
    shared = at.session_state["capture_shared"]
    assert shared.run is None and shared.video is None
    assert not video.exists() and journals(settings) == []
    assert any(f"Session #{run.session_id} was deleted" in w.value for w in at.warning)


def test_a_video_whose_registration_failed_is_registered_after_its_window_closed(page, seeded, settings,
                                                                               video_insert_dies_once):
    """The window (or the UI process) is gone before it could try again: the file stayed on disk with nothing
    pointing to it, so review never showed it and deleting the user left it behind."""
    conn = seeded["conn"]
    at, run, video = finish_with_a_failed_video_write(page, seeded)
    del at  # the window is closed
    [journal] = journals(settings)
    kept = journal.read_bytes()
    went_quiet(journal)
    assert data.replay_interval_journals()["stored"] == 1  # the next page load (or job) does it
    [row] = repo.list_videos(conn, seeded["user"]["id"], run.session_id)
    assert row["frame_count"] == 3 and video.resolve() == (settings.video_dir / row["path"]).resolve()
    assert journals(settings) == []
    # replaying it again (a crash after storing, before removing the journal) registers nothing more
    journal.write_bytes(kept)
    went_quiet(journal)
    assert data.replay_interval_journals()["files"] == 1
    assert len(repo.list_videos(conn, seeded["user"]["id"], run.session_id)) == 1


@pytest.mark.parametrize("webcam_on_before", [True, False])
def test_a_capture_whose_user_is_deleted_in_another_window_ends_cleanly(page, seeded, settings, webcam_on_before):
    """The capture window of a user deleted elsewhere kept its run and its recorder (writing to a deleted file,
    or creating a new video of the deleted user when the webcam came on later) and, once another user was
    picked, showed only 'session N not found' on every load."""
    import av
    import numpy as np
    conn, uid = seeded["conn"], seeded["user"]["id"]
    bob = ui_seed.seed_user(conn, name="Bob", email="bob@example.org")["user"]
    at, run = start_on_page(page, uid)
    shared = at.session_state["capture_shared"]

    def frames(n=3):
        for i in range(n):
            shared.frame_callback(av.VideoFrame.from_ndarray(np.full((240, 320, 3), i * 8, np.uint8),
                                                             format="rgb24"))

    if webcam_on_before:
        frames()
    folder = settings.video_dir / repo.user_video_folder(uid)
    delete_user_on_page(page, uid)  # another window deletes the user
    frames()  # the webcam goes on sending
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert f"Session #{run.session_id} was deleted" in texts(at)
    assert shared.run is None and not shared.recorder.active
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())
    assert not [j for j in journals(settings) if f"session{run.session_id}-" in j.name]
    frames()  # later frames record nothing
    assert not folder.exists() or not any(folder.iterdir())

    at.button(key="semg_user_pick_continue").click()
    at.run()
    at.selectbox(key="semg_user_pick").set_value(bob["id"])
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.button(key="capture_start")  # a new session can be recorded


def test_a_capture_tick_that_finds_its_session_deleted_ends_the_run(page, seeded, settings):
    """The running cue (a fragment refreshed on its own, without the page around it) found its intervals gone
    and showed 'interval N not found' on every tick. Here the user is deleted while the tick stores a mark:
    the deletion commits only once that mark waits on its rows, after the page's own check has passed."""
    import contextlib
    import threading

    from semg import db
    conn, uid = seeded["conn"], seeded["user"]["id"]
    at, run = start_on_page(page, uid, rest=0.5)
    time.sleep(0.8)  # the first rest is due: the next tick stores its mark
    deleting = db.connect()
    waited = threading.Event()

    def delete_when_the_mark_waits():
        with contextlib.closing(deleting):
            with deleting.cursor() as cur:
                cur.execute("DELETE FROM users WHERE id = %s", (uid,))  # not committed yet: rows locked
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not waited.is_set():
                with conn.cursor() as cur:
                    cur.execute("""SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'
                                   AND query LIKE 'UPDATE session_intervals%%'""")
                    if cur.fetchone()[0]:
                        waited.set()

                time.sleep(0.05)
            deleting.commit()

    t = threading.Thread(target=delete_when_the_mark_waits)
    t.start()
    at.run()
    t.join(35)
    assert waited.is_set(), "the tick never stored a mark"
    assert not at.exception and not [e.value for e in at.error], [e.value for e in at.error]
    assert at.session_state["capture_shared"].run is None
    assert not [j for j in journals(settings) if f"session{run.session_id}-" in j.name]
    assert f"Session #{run.session_id} was deleted" in texts(at)  # the page it reran says so


def test_a_journal_left_before_the_clock_stepped_back_is_replayed(new_session, settings):
    """The host clock stepped back (NTP correcting it) after a window closed with labels in its journal: the
    file's mtime is then ahead of the clock, it was taken for a live run's for as long as the step (an hour
    here), and training jobs read the session without those labels meanwhile. Its run would have touched it
    since (every tick), so it is replayed."""
    run, _store = new_session(gestures=("fist",), reps=1, hold=2.0, rest=2.0)
    session = data.get_session(run.session_id)
    rest0 = session["intervals"][0]["id"]
    d = settings.state_dir / "capture-journal"
    d.mkdir(exist_ok=True)
    journal = d / "stepped.jsonl"
    journal.write_text(json.dumps({
        "v": 1, "session_id": session["id"], "session_created_at": session["created_at"].isoformat(), "op": "mark",
        "interval_id": rest0, "started_at": "2026-01-01T10:00:00+00:00",
        "ended_at": "2026-01-01T10:00:02+00:00"}) + "\n")
    went_quiet(journal, seconds=-3600)  # last touched "an hour from now" on the stepped-back clock
    done = data.replay_interval_journals()
    assert (done["stored"], done["live"]) == (1, 0)
    ivs = {i["id"]: i for i in data.get_session(session["id"])["intervals"]}
    assert ivs[rest0]["ended_at"] == datetime(2026, 1, 1, 10, 0, 2, tzinfo=UTC)
    assert journals(settings) == []
