"""The capture page's Pause button (a user's pause, the window still showing the run): while the database is
down, and for longer than the session's plan."""

from __future__ import annotations

import time

import capture
import data
from test_capture_store import start_on_page
from ui_checks import assert_clean, texts

from semg import repo


def test_pause_while_the_database_is_down_keeps_the_paused_run_on_the_page(page, seeded, monkeypatch):
    """The running cue is a fragment refreshed on its own, so it goes on while the database is down; the page
    around it cannot load then. Pause reran the whole page: with the database down it showed only 'database not
    reachable', without the paused run, its Resume or Stop, or any refresh, until the user reloaded it. (The
    test harness reruns the whole page at every run, so the database is down for the run's writes only and the
    whole-page rerun is what is looked for.)"""
    import streamlit as st

    conn, uid = seeded["conn"], seeded["user"]["id"]
    at, run = start_on_page(page, uid, hold=20.0, rest=0.5)  # REST 0-0.5, fist 0.5-20.5, REST 20.5-21
    time.sleep(1.0)  # into the fist
    at.run()
    reruns, rerun = [], st.rerun
    monkeypatch.setattr(st, "rerun", lambda *a, **k: (reruns.append(k.get("scope", "app")), rerun(*a, **k)))
    for write in ("mark_interval", "discard_interval", "run_heartbeat"):
        monkeypatch.setattr(data, write, unavailable)
    at.button(key="pause").click()
    at.run()
    assert_clean(at)
    assert "app" not in reruns  # the page around the cue cannot load without the database
    assert run.state == "paused" and run.unsaved == 2  # the cut fist's mark and discard wait in the journal
    assert at.button(key="resume") and at.button(key="stop_left"), texts(at)  # the paused run, at once
    assert "The database is not reachable" in texts(at)
    monkeypatch.undo()
    at.run()
    at.button(key="resume").click()
    at.run()
    assert_clean(at)
    assert run.state == "running"
    fist = next(i for i in repo.get_session(conn, run.session_id)["intervals"] if i["label"] == "fist")
    assert fist["discarded"] and fist["ended_at"] == capture.utc(run.steps[1].ended)


def unavailable(*_a, **_k):
    raise data.Unavailable("The database is not reachable")


def test_a_pause_longer_than_the_plan_keeps_the_device_for_the_paused_session(page, seeded):
    """A session's device is free for a new session once the session's planned end has passed (its window went
    away). A user's pause did not move that end: a pause longer than what was left of the plan let another
    window start a session on the same armband, and the paused one could then not be resumed (only stopped),
    although the page said to take as long as needed."""
    conn, uid = seeded["conn"], seeded["user"]["id"]
    at, run = start_on_page(page, uid, hold=1.0, rest=0.5)  # REST 0-0.5, fist 0.5-1.5, REST 1.5-2
    time.sleep(0.8)  # into the fist
    at.run()
    at.button(key="pause").click()
    at.run()
    assert run.state == "paused"
    for _ in range(8):  # 4 s: the plan would have ended long ago; the window shows the paused run meanwhile
        time.sleep(0.5)
        at.run()
        assert_clean(at)
    other = page("capture", user_id=uid)
    other.run()
    other.multiselect(key="capture_gestures").set_value(["fist"])
    other.button(key="capture_start").click()
    other.run()
    assert_clean(other)
    assert other.session_state["capture_shared"].run is None and "is already recording session" in texts(other)
    at.button(key="resume").click()
    at.run()
    assert_clean(at)
    assert run.state == "running"
    s = repo.get_session(conn, run.session_id)
    resumed_fist = run.steps[run.index + 1]
    assert resumed_fist.label == "fist" and resumed_fist.repetition == 0
    cur = run.steps[run.index]  # the rest before the fist again; the plan's end is still after all of it
    assert s["plan"]["total_ms"] / 1000 >= cur.started + sum(x.duration_s for x in run.steps[run.index:]) - run.t_start


def test_a_pause_the_database_never_heard_of_is_done_again_after_a_restart(page, seeded, monkeypatch):
    """Pause while the database is down: the cut fist's mark and discard wait in the journal, and the heartbeat
    saying the run is paused cannot be stored. The UI process then dies, the database comes back, and the next
    process takes the run over: the journal is stored first, and the run was rebuilt as running from the interval
    after the cut fist (the cursor still said running, and the fist had an end), so the fist was never done
    again: the session completed without it."""
    conn, uid = seeded["conn"], seeded["user"]["id"]
    monkeypatch.setattr(capture, "LEFT_AFTER_S", 1.0)
    at, run = start_on_page(page, uid, hold=3.0, rest=0.5)  # REST 0-0.5, fist 0.5-3.5, REST 3.5-4
    time.sleep(1.0)  # into the fist
    run.beat_at = None
    at.run()  # its last heartbeat: running, in the fist
    for write in ("mark_interval", "discard_interval", "run_heartbeat"):
        monkeypatch.setattr(data, write, unavailable)
    at.button(key="pause").click()
    at.run()
    assert run.state == "paused" and run.unsaved == 2
    capture._RUNS.clear()  # the process dies
    monkeypatch.undo()
    monkeypatch.setattr(capture, "LEFT_AFTER_S", 1.0)
    time.sleep(1.3)
    tab = page("capture", user_id=uid)
    tab.run()
    assert_clean(tab)
    tab.button(key=f"resume_left_{run.session_id}").click()
    tab.run()
    assert_clean(tab)
    again = tab.session_state["capture_shared"].run
    deadline = time.time() + 10
    while again.state == "running" and time.time() < deadline:
        time.sleep(0.2)
        tab.run()
    tab.run()
    s = repo.get_session(conn, run.session_id)
    assert s["status"] == "completed"
    kept = sorted((i for i in s["intervals"] if i["started_at"] is not None and not i["discarded"]),
                  key=lambda i: i["started_at"])
    assert [(i["label"], i["repetition"]) for i in kept if i["kind"] == "gesture"] == [("fist", 0)]
    cut = next(i for i in s["intervals"] if i["label"] == "fist" and i["discarded"])
    assert all(i["started_at"] >= cut["ended_at"] for i in kept[1:])
    for a, b in zip(kept, kept[1:], strict=False):
        assert a["ended_at"] <= b["started_at"]
