"""The UI process dies mid-session (a crash, a restart): its run's memory is gone, but its heartbeat in the
database stops, so the next process (a fresh page, with this module's run registry emptied) offers the session
to resume or stop -- rebuilt from what the database holds -- with the same guarantees as after a reload; a run
whose heartbeat is fresh (live in another process) is left alone, and only one window can take a run over."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import capture
import data
import psycopg2.extras
import pytest
from test_capture_reload import trained_on
from test_capture_store import point_ui_at, start_on_page  # noqa: F401 - fixture
from ui_checks import texts

from semg import db, repo
from semg.embedded import free_port

LEFT_S = 1.0


@pytest.fixture(autouse=True)
def quick_to_leave(monkeypatch):
    """A heartbeat 1 s old (not 4) is a dead run's: the tests wait less; the judgement is the same."""
    monkeypatch.setattr(capture, "LEFT_AFTER_S", LEFT_S)


def process_dies():
    """The UI process ends: every run it held in memory is gone (its windows never tick again)."""
    capture._RUNS.clear()


def next_process_page(page, uid):
    """The capture page as the restarted UI process first shows it."""
    tab = page("capture", user_id=uid)
    tab.run()
    assert not tab.exception, tab.exception
    return tab


def last_beat(run, tab):
    """One more tick of the run's window, which refreshes its heartbeat; returns when it showed the cue."""
    run.beat_at = None  # due now
    tab.run()
    assert not tab.exception, tab.exception
    return run.seen_at


def wait_until_stale():
    time.sleep(LEFT_S + 0.3)


def test_stop_after_a_restart_keeps_what_was_recorded_and_leaves_out_the_interval_under_way(page, seeded):
    conn, uid = seeded["conn"], seeded["user"]["id"]
    tab1, run = start_on_page(page, uid, hold=20.0, rest=0.5)  # REST 0-0.5, fist 0.5-20.5, REST 20.5-21
    sid = run.session_id
    time.sleep(1.0)  # into the fist
    left_at = last_beat(run, tab1)
    process_dies()
    wait_until_stale()

    tab2 = next_process_page(page, uid)
    assert f"Session #{sid}" in texts(tab2) and "the program showing it ended" in texts(tab2)
    assert "Close it" not in texts(tab2)  # before heartbeats, only this was offered (after the planned end)
    tab2.button(key=f"stop_left_{sid}").click()
    tab2.run()
    assert not tab2.exception, tab2.exception
    assert tab2.session_state["capture_shared"].run is None

    s = repo.get_session(conn, sid)
    assert s["status"] == "aborted" and s["ended_at"] == capture.utc(left_at)
    rest0, fist, rest1 = sorted(s["intervals"], key=lambda i: i["ordinal"])
    assert (rest0["started_at"], rest0["ended_at"]) == (capture.utc(run.t_start), capture.utc(run.t_start + 0.5))
    # cut where the dead process last beat, kept for the record, not trained on; nothing after it is labelled
    assert fist["discarded"] and (fist["started_at"], fist["ended_at"]) == (capture.utc(run.t_start + 0.5),
                                                                            capture.utc(left_at))
    assert rest1["started_at"] is None
    assert [i["id"] for i in trained_on(s)] == [rest0["id"]]
    assert "1 interval(s) under way when it was paused or its page was left are not trained on" in texts(tab2)


def test_resume_after_a_restart_continues_the_plan_from_the_database_even_after_a_redo(page, seeded):
    """The order of what is left (a redo inserted intervals) is not in the ordinals: it comes from the
    heartbeat's cursor. Every planned repetition ends up recorded exactly once."""
    conn, uid = seeded["conn"], seeded["user"]["id"]
    # REST 0-1, fist#0 1-3, REST 3-4, fist#1 4-6, REST 6-7
    tab1, run = start_on_page(page, uid, hold=2.0, rest=1.0, reps=2)
    sid = run.session_id
    time.sleep(max(0.0, run.t_start + 3.4 - time.time()))
    tab1.button(key="redo").click()  # in the rest after fist#0: fist#0 is done again after a rest
    tab1.run()
    assert not tab1.exception, tab1.exception
    redo_gesture = next(s for s in run.steps[run.index:] if s.kind == "gesture")
    time.sleep(max(0.0, run.steps[run.index].started + 1.0 + 0.5 - time.time()))  # into the redo's fist#0
    left_at = last_beat(run, tab1)
    assert run.steps[run.index] is redo_gesture
    process_dies()
    wait_until_stale()

    tab2 = next_process_page(page, uid)
    tab2.button(key=f"resume_left_{sid}").click()
    tab2.run()
    assert not tab2.exception, tab2.exception
    new = tab2.session_state["capture_shared"].run
    assert new is not None and new is not run and new.state == "running"
    assert f"Session #{sid} resumed" in texts(tab2)
    resumed_at = new.steps[new.index].started
    assert new.cue(resumed_at + 0.1).headline == "Rest"
    assert [s.label for s in new.steps[new.index:]] == ["REST", "fist", "REST", "fist", "REST"]
    # the rest of the plan: REST 1, fist#0 2, REST 1, fist#1 2, REST 1
    deadline = resumed_at + 7.0 + 0.3
    for _ in range(40):
        time.sleep(max(0.0, min(deadline - time.time(), 1.0)))
        tab2.run()
        assert not tab2.exception, tab2.exception
        if tab2.session_state["capture_shared"].run is None:
            break
    assert tab2.session_state["capture_last_result"]["status"] == "completed"

    s = repo.get_session(conn, sid)
    kept = trained_on(s)
    assert s["status"] == "completed"
    assert sorted((i["label"], i["repetition"]) for i in kept if i["kind"] == "gesture") == [("fist", 0), ("fist", 1)]
    cut = next(i for i in s["intervals"] if i["id"] == redo_gesture.interval_id)
    assert cut["discarded"] and cut["ended_at"] == capture.utc(left_at)
    for a, b in zip(kept, kept[1:], strict=False):  # no two labels on the same samples
        assert a["ended_at"] <= b["started_at"]
    assert kept[-1]["ended_at"] == s["ended_at"]
    assert not any(i["started_at"] is None and not i["discarded"] for i in s["intervals"])  # nothing left out


def test_a_run_with_a_fresh_heartbeat_in_another_process_is_not_offered(page, seeded, monkeypatch):
    conn, uid = seeded["conn"], seeded["user"]["id"]
    tab1, run = start_on_page(page, uid)
    sid = run.session_id
    process_dies()  # as seen from this process: the run lives in another one, whose window goes on ticking
    wait_until_stale()
    # Fresh from here on means beaten within 30 s, not 1: the rest of tab1's refresh and tab2's first load took
    # over 1 s in a loaded CI run, so the beat had aged into 'left' and tab2 rightly offered the run.
    fresh_s = 30.0
    monkeypatch.setattr(capture, "LEFT_AFTER_S", fresh_s)
    last_beat(run, tab1)
    tab2 = next_process_page(page, uid)
    assert f"resume_left_{sid}" not in {b.key for b in tab2.button}
    assert any(f"#{sid}" in c.value and "recording in another window" in c.value for c in tab2.caption)
    info = repo.recording_runs(conn, uid)[sid]
    assert info["run_owner"] == run.owner and info["heartbeat_age_s"] < fresh_s
    assert repo.take_over_run(conn, sid, info["run_owner"], info["heartbeat_at"], "intruder", fresh_s) is None
    assert repo.recording_runs(conn, uid)[sid]["run_owner"] == run.owner
    last_beat(run, tab1)
    assert tab1.session_state["capture_shared"].run is run and run.state == "running"


def test_of_two_concurrent_take_overs_exactly_one_wins(page, seeded, settings):
    uid = seeded["user"]["id"]
    tab1, run = start_on_page(page, uid)
    sid = run.session_id
    process_dies()
    wait_until_stale()
    info = repo.recording_runs(seeded["conn"], uid)[sid]
    conns = [db.connect(settings) for _ in range(2)]
    barrier, won = threading.Barrier(2, timeout=30), [None, None]

    def take(k):
        barrier.wait()
        won[k] = repo.take_over_run(conns[k], sid, info["run_owner"], info["heartbeat_at"], f"window{k}", LEFT_S)

    try:
        threads = [threading.Thread(target=take, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for c in conns:
            c.close()
    assert sum(w is not None for w in won) == 1
    winner = f"window{0 if won[0] is not None else 1}"
    assert repo.recording_runs(seeded["conn"], uid)[sid]["run_owner"] == winner


def test_a_window_offered_a_run_another_window_took_first_takes_nothing(page, seeded):
    conn, uid = seeded["conn"], seeded["user"]["id"]
    tab1, run = start_on_page(page, uid, hold=20.0, rest=0.5)
    sid = run.session_id
    time.sleep(1.0)
    last_beat(run, tab1)
    process_dies()
    wait_until_stale()
    tab2, tab3 = next_process_page(page, uid), next_process_page(page, uid)  # both offer it
    tab2.button(key=f"resume_left_{sid}").click()
    tab2.run()
    tab3.button(key=f"stop_left_{sid}").click()  # it saw the dead heartbeat, tab2 has replaced it meanwhile
    tab3.run()
    assert not tab2.exception and not tab3.exception
    won = tab2.session_state["capture_shared"].run
    assert won is not None and won.state == "running"
    assert tab3.session_state["capture_shared"].run is None
    s = repo.get_session(conn, sid)
    assert s["status"] == "recording" and repo.recording_runs(conn, uid)[sid]["run_owner"] == won.owner


def test_the_database_down_makes_no_live_run_look_dead(page, seeded, settings, point_ui_at, monkeypatch):  # noqa: F811
    conn, uid = seeded["conn"], seeded["user"]["id"]
    tab1, run = start_on_page(page, uid, hold=20.0, rest=0.5)
    sid = run.session_id
    point_ui_at(free_port())  # the database goes away, longer than a heartbeat may be missing
    for _ in range(3):
        wait_until_stale()
        # what the window's tick does meanwhile (the page around it cannot load without the database)
        with pytest.raises(data.Unavailable):
            data.run_heartbeat(sid, run.owner, capture.utc(time.time()))
        with contextlib.suppress(data.Unavailable):  # the intervals due wait in memory and the journal
            run.advance(time.time(), data.SessionStore(sid))
    assert run.state == "running"
    process_dies()  # as seen from the next page: the run is in another process
    tab2 = next_process_page(page, uid)  # offers nothing: the database (and so the heartbeat) cannot be read
    assert f"resume_left_{sid}" not in {b.key for b in tab2.button}
    point_ui_at(settings.postgres_port)
    monkeypatch.setattr(capture, "LEFT_AFTER_S", 30.0)  # fresh: not 1 s, which a loaded machine can pass by the load
    last_beat(run, tab1)  # the first tick with the database back beats again
    tab2 = next_process_page(page, uid)
    assert f"resume_left_{sid}" not in {b.key for b in tab2.button}
    assert any(f"#{sid}" in c.value and "recording in another window" in c.value for c in tab2.caption)
    assert repo.recording_runs(conn, uid)[sid]["run_owner"] == run.owner


def test_a_window_whose_run_was_taken_over_while_it_could_not_reach_the_database_stops_there(
        page, seeded, settings, point_ui_at):  # noqa: F811
    """Its process was cut off from the database (not dead) and another process took the run over: once it
    reaches the database again it learns so, stops, and writes nothing of what it did meanwhile."""
    conn, uid = seeded["conn"], seeded["user"]["id"]
    tab1, run = start_on_page(page, uid, hold=1.0, rest=0.5)  # REST 0-0.5, fist 0.5-1.5, REST 1.5-2
    sid = run.session_id
    point_ui_at(free_port())
    wait_until_stale()
    info = repo.recording_runs(conn, uid)[sid]  # another process, which reaches the database
    assert repo.take_over_run(conn, sid, info["run_owner"], info["heartbeat_at"], "other", LEFT_S) is not None
    time.sleep(max(0.0, run.t_start + 2.2 - time.time()))
    with pytest.raises(data.Unavailable):  # its window's tick: the plan is over, its three intervals queued
        run.advance(time.time(), data.SessionStore(sid))
    assert run.unsaved == 3
    point_ui_at(settings.postgres_port)
    last_beat(run, tab1)
    assert tab1.session_state["capture_shared"].run is None
    assert f"Session #{sid} goes on in another window" in texts(tab1)
    s = repo.get_session(conn, sid)
    assert s["status"] == "recording" and all(i["started_at"] is None for i in s["intervals"])


def test_a_session_recorded_before_heartbeats_is_closed_as_before(page, seeded):
    conn, uid = seeded["conn"], seeded["user"]["id"]
    tab1, run = start_on_page(page, uid, hold=0.5, rest=0.5)
    sid = run.session_id
    process_dies()
    with conn.cursor() as cur:  # what the migration leaves on a session recorded by the old code
        cur.execute("""UPDATE capture_sessions SET run_owner = NULL, heartbeat_at = NULL, run_seen_at = NULL,
                       run_cursor = NULL, run_video = NULL WHERE id = %s""", (sid,))
    conn.commit()
    time.sleep(max(0.0, run.t_start + 1.6 - time.time()))  # after its planned end
    tab2 = next_process_page(page, uid)
    assert f"resume_left_{sid}" not in {b.key for b in tab2.button}
    tab2.button(key=f"close_{sid}").click()
    tab2.run()
    assert not tab2.exception, tab2.exception
    assert repo.get_session(conn, sid)["status"] == "aborted"


def killed_while_recording(session, path, frames):
    """A UI process records `frames` webcam frames of the session into `path`, beats, and is killed (SIGKILL)."""
    script = textwrap.dedent(f"""
        import os, signal, time
        import av, numpy as np
        import capture, data
        from pathlib import Path
        rec = capture.VideoRecorder()
        rec.start(Path({str(path)!r}))
        for i in range({frames}):
            rec.write(av.VideoFrame.from_ndarray(np.full((240, 320, 3), i * 6 % 256, np.uint8), format="rgb24"),
                      time.time())
            time.sleep(0.05)  # 2 s of video
        video = {{"path": {path.relative_to(data.settings().video_dir).as_posix()!r},
                  "started_at": capture.utc(rec.first).isoformat() if rec.first else None}}
        print(data.run_heartbeat({session['id']}, {session['run_owner']!r}, capture.utc(time.time()), video),
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "streamlit_apps")])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL and out.stdout.strip() == "ok", out.stderr


def readable_frames(path):
    """Frames that decode from a file its writer never finished (no end: decoding stops at end of file)."""
    import av
    n = 0
    with contextlib.suppress(av.error.EOFError), av.open(str(path)) as c:
        for _ in c.decode(video=0):
            n += 1
    return n


@pytest.mark.parametrize("frames", [40, 0])
def test_the_webcam_file_of_a_dead_process_is_kept_as_it_is(page, seeded, frames):
    """Its writer is gone (the file may be cut off): registered as it is when it holds anything, with the frames
    that decode; an empty file goes. After a resume a new file records the rest."""
    conn, uid = seeded["conn"], seeded["user"]["id"]
    tab1, run = start_on_page(page, uid, hold=20.0, rest=0.5)
    sid = run.session_id
    path = tab1.session_state["capture_shared"].recorder.path
    process_dies()
    if frames:
        killed_while_recording(repo.get_session(conn, sid) | repo.recording_runs(conn, uid)[sid], path, frames)
    else:  # the process died with its file created and nothing written to it yet
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        with conn.cursor() as cur:
            cur.execute("UPDATE capture_sessions SET run_video = %s WHERE id = %s",
                        (psycopg2.extras.Json({"path": path.relative_to(data.settings().video_dir).as_posix(),
                                               "started_at": None}), sid))
        conn.commit()
    size = path.stat().st_size
    wait_until_stale()

    tab2 = next_process_page(page, uid)
    tab2.button(key=f"resume_left_{sid}").click()
    tab2.run()
    assert not tab2.exception, tab2.exception
    videos = repo.list_videos(conn, uid, sid)
    if frames:
        [video] = videos
        assert path.is_file() and video["bytes"] == size > 0
        readable = readable_frames(path)
        assert 0 < readable <= frames and video["frame_count"] == readable
        assert "kept as it was written" in texts(tab2)
    else:
        assert videos == [] and not path.exists()
    shared2 = tab2.session_state["capture_shared"]
    assert shared2.recorder.active and shared2.recorder.path != path  # the rest goes to a new file


def stalled_in_the_fist(page, seeded):
    """A run whose window's process stalls in its fist (REST 0-0.5, fist 0.5-1.5, REST 1.5-2) until its plan is
    over by its own clock; the next process's capture page. (conn, uid, tab1, run, sid, left_at, tab2)."""
    conn, uid = seeded["conn"], seeded["user"]["id"]
    tab1, run = start_on_page(page, uid, hold=1.0, rest=0.5)
    time.sleep(max(0.0, run.t_start + 0.8 - time.time()))  # into the fist
    left_at = last_beat(run, tab1)
    process_dies()  # as seen from the next process; tab1's process is only stalled
    wait_until_stale()
    time.sleep(max(0.0, run.t_start + 2.2 - time.time()))  # by its own clock the plan is over
    return conn, uid, tab1, run, run.session_id, left_at, next_process_page(page, uid)


def test_a_stalled_window_whose_run_was_taken_over_and_stopped_writes_nothing_more(page, seeded):
    """Its process stalled (SIGSTOP, swapped out) past LEFT_AFTER_S, another process took the run over and
    stopped it. The stalled window's heartbeat said 'ended' (the session is no longer recording), not 'lost',
    and its tick went on: it ran its plan on, marking the interval the take-over cut (which clears its
    discarded flag) and the ones after it, in a session that ended before them. It must let go: the session is
    another run's. (A session closed elsewhere while still this run's is recorded on: test_capture_store.)"""
    conn, uid, tab1, run, sid, left_at, tab2 = stalled_in_the_fist(page, seeded)
    tab2.button(key=f"stop_left_{sid}").click()
    tab2.run()
    assert not tab2.exception, tab2.exception
    stopped = repo.get_session(conn, sid)
    assert stopped["status"] == "aborted"

    tab1.run()  # the stalled process wakes up: its window's next tick
    assert not tab1.exception, tab1.exception
    assert tab1.session_state["capture_shared"].run is None
    s = repo.get_session(conn, sid)
    rest0, fist, rest1 = sorted(s["intervals"], key=lambda i: i["ordinal"])
    assert fist["discarded"] and fist["ended_at"] == capture.utc(left_at)
    assert rest1["started_at"] is None
    assert (s["status"], s["ended_at"]) == ("aborted", stopped["ended_at"])
    assert [i["id"] for i in trained_on(s)] == [rest0["id"]]
    assert f"Session #{sid} goes on in another window" in texts(tab1)  # it let go of it


def test_a_window_stalled_between_its_heartbeat_and_its_writes_writes_nothing_once_taken_over(page, seeded):
    """Its process stalled in the middle of a tick -- after the heartbeat, before the interval writes (a
    SIGSTOP, a swap storm, a database call that hung) -- for longer than LEFT_AFTER_S, and another process took
    the run over and resumed it. When it wakes up it finishes that tick: its writes must be refused (the
    session's run_owner is no longer its own), not run its plan on -- marking the interval the take-over cut
    (clearing its discarded flag), labelling samples of the new run's time, and completing the session under
    the new run."""
    conn, uid, tab1, run, sid, left_at, tab2 = stalled_in_the_fist(page, seeded)
    tab2.button(key=f"resume_left_{sid}").click()
    tab2.run()
    assert not tab2.exception, tab2.exception
    new = tab2.session_state["capture_shared"].run
    assert new is not None and new.state == "running"

    run.beat_at = time.monotonic()  # the stalled tick had beaten just before it stopped
    tab1.run()  # it wakes up and goes on with that tick
    assert not tab1.exception, tab1.exception
    assert tab1.session_state["capture_shared"].run is None
    assert f"Session #{sid} goes on in another window" in texts(tab1)
    s = repo.get_session(conn, sid)
    assert s["status"] == "recording" and repo.recording_runs(conn, uid)[sid]["run_owner"] == new.owner
    fist = next(i for i in s["intervals"] if i["ordinal"] == 1)
    assert fist["discarded"] and fist["ended_at"] == capture.utc(left_at)
    rest1 = next(i for i in s["intervals"] if i["ordinal"] == 2)
    assert rest1["started_at"] is None  # the new run's to record


def test_a_dead_run_is_not_resumed_over_a_session_recording_on_its_device_since(page, seeded):
    """Once a dead run's planned end has passed, its device is free for a new session (start_session refuses
    only within a recording session's planned time). Resuming the dead run then recorded two sessions on the
    device at once: both label the same samples, each with its own gestures. It stays paused with both choices
    and says why, until that session ends."""
    conn, uid = seeded["conn"], seeded["user"]["id"]
    tab1, run = start_on_page(page, uid, hold=0.5, rest=0.5)  # REST 0-0.5, fist 0.5-1, REST 1-1.5
    sid = run.session_id
    time.sleep(max(0.0, run.t_start + 0.7 - time.time()))  # into the fist
    last_beat(run, tab1)
    process_dies()
    time.sleep(max(0.0, run.t_start + 1.8 - time.time(), LEFT_S + 0.3))  # stale, and past its planned end

    tab2, other = start_on_page(page, uid)  # a new session on the same device, in another window
    assert other is not None and other.session_id != sid
    tab3 = next_process_page(page, uid)
    tab3.button(key=f"resume_left_{sid}").click()
    tab3.run()
    assert not tab3.exception, tab3.exception
    mine = tab3.session_state["capture_shared"].run
    assert mine is not None and mine.state == "paused"  # taken over, not recording over the other session
    assert f"recording session #{other.session_id} now" in texts(tab3)
    assert repo.get_session(conn, sid)["plan"]["total_ms"] == 1500  # not extended: no time was added
    tab3.button(key="resume").click()  # the paused window's own Resume: the same
    tab3.run()
    assert not tab3.exception, tab3.exception
    assert mine.state == "paused" and f"recording session #{other.session_id} now" in texts(tab3)

    tab2.button(key="abort").click()  # that session ends: this one may go on
    tab2.run()
    assert repo.get_session(conn, other.session_id)["status"] == "aborted"
    tab3.button(key="resume").click()
    tab3.run()
    assert not tab3.exception, tab3.exception
    assert mine.state == "running" and f"Session #{sid} resumed" in texts(tab3)
    assert "recording session #" not in texts(tab3)


def test_a_run_paused_before_its_next_interval_began_is_rebuilt_paused_after_another_restart(page, seeded):
    """A run taken over from a dead process is paused where it was last seen; when that is where an interval
    ended (stored after the last heartbeat), nothing of the next one has happened and the pause cuts nothing.
    While it stays paused (its device records another session, or the database is down) its heartbeat goes on,
    cursor 'paused'. If this process dies too, the next one must rebuild it paused -- not running from that
    interval's start until where the paused window was last seen, which marked the intervals of the whole
    pause as recorded, labelling samples nobody was cued for."""
    conn, uid = seeded["conn"], seeded["user"]["id"]
    # a 3 s hold: the tick at 0.6 s must run before fist ends (at 1.5 s, a busy machine's page run ended it too)
    tab1, run = start_on_page(page, uid, hold=3.0, rest=0.5)  # REST 0-0.5, fist 0.5-3.5, REST 3.5-4
    sid = run.session_id
    time.sleep(max(0.0, run.t_start + 0.3 - time.time()))
    last_beat(run, tab1)  # run_seen_at 0.3
    time.sleep(max(0.0, run.t_start + 0.6 - time.time()))
    run.beat_at = time.monotonic()  # a tick between heartbeats: it stores REST 0-0.5, no heartbeat
    tab1.run()
    assert not tab1.exception, tab1.exception
    assert repo.get_session(conn, sid)["intervals"][0]["ended_at"] == capture.utc(run.t_start + 0.5)
    process_dies()
    time.sleep(max(0.0, run.t_start + 4.2 - time.time()))  # stale, and past its planned end

    _tab2, other = start_on_page(page, uid)  # its device records another session meanwhile
    tab3 = next_process_page(page, uid)
    tab3.button(key=f"resume_left_{sid}").click()
    tab3.run()
    assert not tab3.exception, tab3.exception
    paused = tab3.session_state["capture_shared"].run
    assert paused is not None and paused.state == "paused"
    time.sleep(0.5)
    last_beat(paused, tab3)  # paused, seen later and later
    process_dies()  # this process dies too
    wait_until_stale()

    tab4 = next_process_page(page, uid)
    tab4.button(key=f"stop_left_{sid}").click()
    tab4.run()
    assert not tab4.exception, tab4.exception
    s = repo.get_session(conn, sid)
    assert s["status"] == "aborted"
    rest0, fist, rest1 = sorted(s["intervals"], key=lambda i: i["ordinal"])
    assert fist["started_at"] is None and rest1["started_at"] is None  # never cued after the first death
    assert [i["id"] for i in trained_on(s)] == [rest0["id"]]
    assert s["ended_at"] <= capture.utc(run.t_start + 0.6)
    assert repo.get_session(conn, other.session_id)["status"] == "recording"
