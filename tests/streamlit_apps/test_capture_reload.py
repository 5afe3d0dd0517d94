"""A capture page reloaded mid-session (a new browser session in the same UI process): the run is found, paused
where its old window stopped showing the cue, and resumed or stopped -- nothing recorded is lost, the interval
under way is not trained on with a label nobody saw through, and the webcam video is kept."""

from __future__ import annotations

import time

import av
import capture
import data
import pytest
from test_capture_store import cues, new_session, point_ui_at, record_frames, start_on_page  # noqa: F401 - fixtures
from ui_checks import texts

from semg import repo
from semg.embedded import free_port


@pytest.fixture
def left_at_once(monkeypatch):
    """A window is taken for gone as soon as it has not ticked (instead of after LEFT_AFTER_S): a reload."""
    monkeypatch.setattr(capture, "LEFT_AFTER_S", 0.0)


def reload_page(page, uid):
    """The same page opened again in a new browser session (what a reload is to the server)."""
    tab = page("capture", user_id=uid)
    tab.run()
    assert not tab.exception, tab.exception
    return tab


def trained_on(session):
    """The intervals training reads: recorded and not discarded."""
    return sorted((i for i in session["intervals"] if i["started_at"] is not None and not i["discarded"]),
                  key=lambda i: i["started_at"])


def frame_count(path):
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_a_reloaded_page_offers_the_left_session_and_stop_now_keeps_what_was_recorded(page, seeded, left_at_once):
    conn, uid = seeded["conn"], seeded["user"]["id"]
    tab1, run = start_on_page(page, uid, hold=20.0, rest=0.5)  # REST 0-0.5, fist 0.5-20.5, REST 20.5-21
    record_frames(tab1.session_state["capture_shared"], 4)
    time.sleep(1.0)  # into the fist
    tab1.run()  # the last tick before the reload
    left_at = run.seen_at
    assert run.steps[run.index].label == "fist"

    tab2 = reload_page(page, uid)
    sid = run.session_id
    assert f"Session #{sid}" in texts(tab2) and "reloaded or closed" in texts(tab2)
    tab2.button(key=f"stop_left_{sid}").click()
    tab2.run()
    assert not tab2.exception, tab2.exception
    shared2 = tab2.session_state["capture_shared"]
    assert shared2.run is None and not shared2.recorder.active

    s = repo.get_session(conn, sid)
    assert s["status"] == "aborted" and s["ended_at"] == capture.utc(left_at)
    rest0, fist, rest1 = sorted(s["intervals"], key=lambda i: i["ordinal"])
    assert (rest0["started_at"], rest0["ended_at"], rest0["discarded"]) == (
        capture.utc(run.t_start), capture.utc(run.t_start + 0.5), False)
    # the interrupted fist keeps its times for the record but is not trained on; nothing after it is labelled
    assert fist["discarded"] and (fist["started_at"], fist["ended_at"]) == (capture.utc(run.t_start + 0.5),
                                                                            capture.utc(left_at))
    assert rest1["started_at"] is None
    assert [i["id"] for i in trained_on(s)] == [rest0["id"]]

    [video] = repo.list_videos(conn, uid, sid)
    path = data.settings().video_dir / video["path"]
    assert video["frame_count"] == 4 and video["bytes"] == path.stat().st_size > 0
    assert frame_count(path) == 4  # a finished, playable file, not the 0-byte one left open before
    last = tab2.session_state["capture_last_result"]
    assert last["status"] == "aborted" and "Video saved (4 frames" in last["note"]
    assert "1 interval(s) under way when it was paused or its page was left are not trained on" in texts(tab2)
    assert tab2.button(key="capture_start")  # the device is free for the next session

    tab1.run()  # the old window, were it still there, lets go of the run
    assert not tab1.exception and tab1.session_state["capture_shared"].run is None
    assert f"Session #{sid} goes on in another window" in texts(tab1)


def test_resume_after_a_reload_redoes_the_interrupted_gesture_and_finishes_the_plan(page, seeded, left_at_once):
    conn, uid = seeded["conn"], seeded["user"]["id"]
    # REST 0-0.5, fist 0.5-3.5, REST 3.5-4.0: the fist is long enough to be under way when a busy machine
    # (CI's, running other tests) has drawn the page (a 1 s fist had ended by then once)
    hold = 3.0
    tab1, run = start_on_page(page, uid, hold=hold, rest=0.5)
    record_frames(tab1.session_state["capture_shared"], 3)
    time.sleep(max(0.0, run.t_start + 0.8 - time.time()))
    tab1.run()
    left_at = run.seen_at
    assert run.steps[run.index].label == "fist"

    tab2 = reload_page(page, uid)
    sid = run.session_id
    tab2.button(key=f"resume_left_{sid}").click()
    tab2.run()
    assert not tab2.exception, tab2.exception
    shared2 = tab2.session_state["capture_shared"]
    assert shared2.run is run and run.state == "running"
    assert f"Session #{sid} resumed" in texts(tab2) and "same file" in texts(tab2)
    assert tab2.button(key="abort") and tab2.button(key="redo")
    resumed_at = run.steps[run.index].started
    assert run.cue(resumed_at + 0.1).headline == "Rest"  # a rest to get ready first
    record_frames(shared2, 2)  # the webcam turned on again in the new window

    time.sleep(max(0.0, resumed_at + 0.5 + hold + 0.5 + 0.3 - time.time()))  # the rest of the plan
    tab2.run()
    assert not tab2.exception, tab2.exception
    assert shared2.run is None and tab2.session_state["capture_last_result"]["status"] == "completed"

    s = repo.get_session(conn, sid)
    assert s["status"] == "completed"
    assert [i["label"] for i in trained_on(s)] == ["REST", "REST", "fist", "REST"]
    cut = next(i for i in s["intervals"] if i["discarded"])
    assert cut["label"] == "fist" and cut["ended_at"] == capture.utc(left_at)
    # nothing between the reload and the resume is trained on, and the resumed part runs without gaps
    kept = trained_on(s)
    assert kept[0]["ended_at"] <= capture.utc(left_at) and kept[1]["started_at"] == capture.utc(resumed_at)
    for a, b in zip(kept[1:], kept[2:], strict=False):
        assert a["ended_at"] == b["started_at"]
    assert kept[-1]["ended_at"] == s["ended_at"]
    assert abs((data.planned_end(s) - s["ended_at"]).total_seconds()) < 0.001  # the plan is kept in whole ms
    [video] = repo.list_videos(conn, uid, sid)  # one video, from both windows, on one clock
    assert video["frame_count"] == 5 and frame_count(data.settings().video_dir / video["path"]) == 5


def test_a_session_still_shown_in_its_window_is_not_offered(page, seeded):
    uid = seeded["user"]["id"]
    tab1, run = start_on_page(page, uid)
    run.seen_at = time.time() + 60  # its window goes on ticking throughout this test
    tab2 = reload_page(page, uid)
    assert f"resume_left_{run.session_id}" not in {b.key for b in tab2.button}
    assert any(f"#{run.session_id}" in c.value and "recording in another window" in c.value for c in tab2.caption)
    assert capture.take_over(run.session_id, tab2.session_state["capture_shared"], time.time()) is None
    assert tab1.session_state["capture_shared"].run is run


def test_only_one_window_takes_a_left_run_over(page, seeded):
    uid = seeded["user"]["id"]
    tab1, run = start_on_page(page, uid)
    left_at = run.seen_at
    a, b = capture.CaptureShared(), capture.CaptureShared()
    later = left_at + capture.LEFT_AFTER_S + 1
    assert capture.take_over(run.session_id, a, later) == left_at
    assert capture.take_over(run.session_id, b, later + 0.1) is None  # a shows it now
    assert a.run is run and b.run is None and tab1.session_state["capture_shared"].run is None


def test_a_resume_while_the_database_is_down_keeps_the_run_paused(new_session, settings, point_ui_at):  # noqa: F811
    run, _ = new_session()  # REST 0-2, fist 2-4, REST 4-6, open hand 6-8, ...
    store = data.SessionStore(run.session_id)
    cut = run.pause(1003.0, store)
    assert cut.label == "fist" and run.state == "paused"
    assert run.cue(1010.0).headline == "Paused"
    run.advance(1010.0, store)  # ticks of a paused run record nothing
    steps = [(s.interval_id, s.started) for s in run.steps]
    point_ui_at(free_port())
    with pytest.raises(data.Unavailable):
        run.resume(1020.0, store)
    assert run.state == "paused" and [(s.interval_id, s.started) for s in run.steps] == steps
    point_ui_at(settings.postgres_port)
    assert run.resume(1030.0, store) is cut
    # REST 1030-1032, fist again 1032-1034, then the plan: REST, open hand, ...
    assert cues(run, store, [1031.0, 1033.0, 1035.0, 1037.0]) == ["Rest", "fist", "Rest", "open hand"]
    run.advance(2000.0, store)
    s = data.get_session(run.session_id)
    kept = trained_on(s)
    assert run.state == "done" and [i["label"] for i in kept].count("fist") == 2  # repetitions 1 and 2
    assert kept[0]["ended_at"] == capture.utc(1002.0) and kept[1]["started_at"] == capture.utc(1030.0)
    assert data.planned_end(s) == kept[-1]["ended_at"]


def test_a_run_taken_over_but_not_resumed_stays_paused_with_both_choices(page, seeded):
    """Taken over, but Resume could not add its intervals (the database was down): the new window shows the run
    paused -- nothing recorded meanwhile -- with Resume and Stop now."""
    conn, uid = seeded["conn"], seeded["user"]["id"]
    tab1, run = start_on_page(page, uid, hold=20.0, rest=0.5)
    time.sleep(1.0)
    tab1.run()  # its last tick, in the fist
    tab2 = reload_page(page, uid)
    shared2 = tab2.session_state["capture_shared"]
    left_at = capture.take_over(run.session_id, shared2, run.seen_at + capture.LEFT_AFTER_S + 1)
    run.pause(left_at, data.SessionStore(run.session_id))
    tab2.run()
    assert not tab2.exception, tab2.exception
    assert "Paused where the page was left" in texts(tab2) and "done again when you resume" in texts(tab2)
    assert {"resume", "stop_left"} <= {b.key for b in tab2.button} and "abort" not in {b.key for b in tab2.button}
    tab2.button(key="stop_left").click()
    tab2.run()
    assert not tab2.exception, tab2.exception
    s = repo.get_session(conn, run.session_id)
    assert s["status"] == "aborted" and s["ended_at"] == capture.utc(left_at)
    assert [i["label"] for i in trained_on(s)] == ["REST"] and shared2.run is None
