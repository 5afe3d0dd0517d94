"""The capture clockwork writing to the real database (data.SessionStore), including a write that fails."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import capture
import data
import pytest
import ui_seed

from semg import repo


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
