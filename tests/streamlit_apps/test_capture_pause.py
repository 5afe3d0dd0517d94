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
