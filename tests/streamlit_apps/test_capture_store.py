"""The capture clockwork writing to the real database (data.SessionStore), including a write that fails."""

from __future__ import annotations

import time

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
