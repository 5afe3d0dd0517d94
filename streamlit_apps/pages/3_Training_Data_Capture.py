"""Guided recording: a large cue (gesture, countdown, repetition X of Y), the webcam with the cue drawn on its
frames and recorded in sync with the signals, a live signal strip proving the device streams, redo-last-
repetition; interval times are stored as the cues happen (they are what training labels from). A session whose
page was reloaded (or closed) mid-way, or whose UI process died (its heartbeat in the database stopped), is
offered here to resume or stop, keeping what was recorded."""

import contextlib
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import capture
import charts
import data
import streamlit as st
import uikit as ui
from streamlit_webrtc import WebRtcMode, webrtc_streamer

ui.page_setup("Capture", ":material/videocam:")
st.title(":material/videocam: Training Data Capture")

SHARED = "capture_shared"
LAST = "capture_last_result"
GONE = "capture_run_deleted"
RESUMED = "capture_resumed_note"
BUSY = "capture_device_busy"
PAUSED = "capture_paused_by_user"  # the session id this window's user paused (not a reload's pause)
PAUSE_KEY = "P"  # the keyboard shortcut of Pause and of Resume (never shown together)
if SHARED not in st.session_state:  # one per browser session: the WebRTC thread holds on to it
    st.session_state[SHARED] = capture.CaptureShared()
shared: capture.CaptureShared = st.session_state[SHARED]


def start_session(user: dict, device: dict, gestures: list[str], reps: int, hold: float, rest: float,
                  name: str) -> bool:
    """Start recording; False (and says why) while the device already records a session, e.g. in another window:
    both sessions would label the same samples, each with its own gestures."""
    if busy := data.recording_on_device(device["id"]):
        st.error(f"Device #{device['id']} is already recording session #{busy['id']} (in another window, planned "
                 f"to end {ui.fmt_time(busy['planned_end'])}): a second session now would label the same signals "
                 "again. Stop that one, or start after it ends.", icon=":material/block:")
        return False
    session = data.create_session(user["id"], device["id"], gestures, reps, hold, rest, name)
    run = capture.CueRun.from_session(session, journal=data.IntervalJournal(session))
    now = time.time()
    data.start_session(session["id"], at=capture.utc(now), owner=run.owner)  # its first heartbeat
    run.start(now)
    run.beat_at = time.monotonic()
    # The recorder opens its file on the first frame, so a webcam started mid-session still records.
    path, _rel = data.video_path_for(user["id"], session["id"])
    shared.recorder.start(path)
    shared.run = run
    capture.register(shared)  # a reloaded page finds it there
    st.session_state.pop(LAST, None)
    return True


def in_video_dir(path: Path) -> str:
    """A recording's path as the videos table keeps it: relative to the video dir."""
    return path.resolve().relative_to(data.settings().video_dir.resolve()).as_posix()


def finish(run: capture.CueRun) -> None:
    """End the session (completed or aborted), close the video and register it."""
    # The last marks first (journalled, then stored): the session must not end before its intervals are.
    run.flush(data.SessionStore(run.session_id, run.owner))
    status = "completed" if run.state == "done" else "aborted"
    ends = [s.ended for s in run.steps if s.ended is not None]
    end = max(ends) if ends else time.time()
    session, ended_here = data.end_session_once(run.session_id, status, at=capture.utc(end), owner=run.owner)
    retry = shared.video is not None  # this window ended the session; registering its video failed
    if not ended_here:
        status = session["status"]
    note = "" if ended_here or retry else "It had already been closed in another window. "
    if not retry and (video := shared.recorder.stop()):
        shared.video = {**video, "path": in_video_dir(video["path"])}  # kept (and journalled) until it is registered
    if video := shared.video:
        data.record_video(session, video)
        shared.video = None
        note += f"Video saved ({video['frame_count']} frames, {ui.fmt_bytes(video['bytes'])})."
    elif shared.recorder.error:
        note += f"The video could not be saved ({ui.md(shared.recorder.error)})."
    else:
        note += "No video (the webcam was off)."
    st.session_state[LAST] = {"session_id": run.session_id, "status": status, "summary": run.summary(),
                              "note": note}
    shared.run = None
    capture.release(run.session_id, shared)


def session_deleted(session_id: int) -> bool:
    """The session no longer exists (deleted with its user in another window); False when it cannot be told."""
    try:
        data.get_session(session_id)
    except data.NotFound:
        return True
    except data.Unavailable:  # the database is down: the run goes on and its times wait in the journal
        pass
    return False


def end_deleted_run(run: capture.CueRun) -> None:
    """The run's session was deleted with its user elsewhere: stop the cue and the recording, and keep nothing of
    it (the video file, the journal of interval times that have no rows to go to any more)."""
    shared.run = None
    capture.release(run.session_id, shared)
    path = shared.recorder.path
    with contextlib.suppress(OSError):  # its file was usually removed with the user already
        shared.recorder.stop()
    if shared.video is not None:  # a finished recording whose registration had failed: nothing to register to
        video, shared.video = shared.video, None
        path = data.settings().video_dir / video["path"]
        if video.get("journal") is not None:
            video["journal"].unlink(missing_ok=True)
    if path is not None:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # the deleted user's recording folder, when nothing else is in it
    if run.journal is not None:
        run.journal.clear()
    st.session_state.pop(LAST, None)
    st.session_state[GONE] = (f"Session #{run.session_id} was deleted (its user was deleted in another window), "
                              "so the recording stopped and nothing of it was kept.")


def beat(run: capture.CueRun, force: bool = False) -> str:
    """The run's heartbeat, at most every capture.BEAT_EVERY_S unless `force` (its plan just changed): 'ok',
    'lost' (another window took it over), 'ended', 'down' (the database is unreachable: the run goes on, and
    as nobody can take it over meanwhile it is not lost), or 'skip' (not due)."""
    if not force and not run.beat_due(time.monotonic()):
        return "skip"
    cursor = run.cursor()
    rec = shared.recorder
    video = None
    if rec.path is not None:
        video = {"path": in_video_dir(rec.path),
                 "started_at": capture.utc(rec.first).isoformat() if rec.first is not None else None}
    try:
        result = data.run_heartbeat(run.session_id, run.owner, capture.utc(run.seen_at or time.time()), video,
                                    cursor if cursor != run.cursor_sent else None)
    except data.Unavailable:
        return "down"
    run.beat_at = time.monotonic()
    if result == "ok":
        run.cursor_sent = cursor
    return result


def let_go(run: capture.CueRun) -> None:
    """Another window (of another UI process) took the run over: this one stops the cue and writes nothing more
    of it -- its changes not stored yet are dropped, the new window cut the run where this one was last seen.
    The webcam file is closed and registered (unless the other window did already)."""
    shared.run = None
    capture.release(run.session_id, shared)
    run.forget_unsaved()
    with contextlib.suppress(OSError):
        video = shared.recorder.stop()
        if video:
            with contextlib.suppress(data.Unavailable, data.RepoError):  # journalled: registered later
                data.record_video(data.get_session(run.session_id), {**video, "path": in_video_dir(video["path"])})
    shared.taken_over = run.session_id


@st.fragment(run_every=0.2)
def run_view() -> None:
    with ui.guard():
        run = shared.run
        if run is None:
            st.rerun(scope="app")
        try:
            tick(run)
        except data.RunTakenOver:  # taken over while this tick ran (its process stalled after the heartbeat)
            let_go(run)
            st.rerun(scope="app")
        except data.NotFound:
            if not session_deleted(run.session_id):
                raise
            end_deleted_run(run)
            st.rerun(scope="app")


def tick(run: capture.CueRun) -> None:
    """One refresh of the running session: store what is due, the Redo/Stop buttons, the cue; finish at the end."""
    run.seen_at = time.time()  # this window shows the cue: no other window may take the run over
    beaten = beat(run)
    if beaten == "lost":
        let_go(run)
        st.rerun(scope="app")
    store = data.SessionStore(run.session_id, run.owner)  # refused once another window took the run over
    if beaten == "ok" and (held := run.held_ms(time.time())) is not None:
        # paused for as long as the user needs: the plan's end would pass meanwhile, and with it the device
        # would be free for a new session, which this one could then not resume over
        with contextlib.suppress(data.Unavailable):
            store.extend(held)
    try:
        run.advance(time.time(), store)
    except data.Unavailable:  # the cue goes on; the times wait in memory and in the journal
        kept = ("They are kept on the server and stored when the database is back, even if this window is "
                "closed." if run.journal_error is None else "")
        st.warning(f"The database is not reachable: {run.unsaved} interval time(s) wait to be stored and the "
                   f"session goes on. {kept}", icon=":material/power_off:")
    if run.journal_error:
        st.error(f"Interval times cannot be saved on the server ({ui.md(run.journal_error)}): keep this window open "
                 "until the database stores them.")
    if run.state == "paused":
        paused_view(run, store)
    c0, c1, c2 = st.columns(3) if run.state == "running" else (None, None, None)
    # Paused in the click's callback, before this refresh draws anything: it shows the paused run at once, with no
    # rerun of the whole page, which cannot load while the database is down (this fragment goes on meanwhile).
    if c0:
        # one key (P pauses, P resumes): the hand with the armband is busy, and after a click on Pause the
        # keyboard focus falls back to the top of the page, far from Resume
        c0.button("Pause", key="pause", width="stretch", icon=":material/pause:", on_click=pause_now, args=(run,),
                  shortcut=PAUSE_KEY,
                  help=f"Stops the cue until you press Resume (or the {PAUSE_KEY} key again): take as long as you "
                       "need. The repetition under way is left out of training and done again after a rest")
    if c1 and c1.button("Redo last repetition", key="redo", width="stretch", icon=":material/replay:",
                 help="Throws the last gesture repetition away and does it again after a short rest"):
        try:
            redone = run.redo_last(time.time(), store)
            beat(run, force=True)  # the plan changed: another process resuming the run must know
            # a refused redo stays 10 s: the hand is busy holding a gesture, and nothing on the page says so
            st.toast(f"Redoing {ui.md(redone.label)} (repetition {redone.repetition + 1})" if redone
                     else "Already redoing: finish that repetition first" if run.redo_pending
                     else "Nothing to redo yet", duration="short" if redone else "long")
        except data.Unavailable:  # nothing changed: the redo's new intervals need the database
            st.toast("A redo needs the database, which is not reachable: try again when it is back",
                     icon=":material/power_off:", duration="long")
    if c2 and c2.button("Stop session", key="abort", width="stretch", icon=":material/stop:"):
        try:
            run.abort(time.time(), store)
        except data.Unavailable:  # stopped all the same; the cut interval's time waits in the journal
            pass
    cue = run.cue(time.time())
    holding = cue.kind == "gesture" and cue.state == "running"
    # the grey of rest/pause frames the cue; its text, in the theme's colour, is read on the dark theme too (2.5:1)
    ui.big_cue(cue.headline, cue.subline, color="#d62728" if holding else "#555555", size_rem=5.0,
               text_color=None if holding else "inherit")
    ui.announce(cue.spoken)  # the cue is a picture to a screen reader otherwise: said once as it changes
    st.progress(min(1.0, max(0.0, cue.progress)), text=f"session #{run.session_id}")
    if run.state in ("done", "aborted"):
        try:
            finish(run)
        except data.Unavailable:  # tried again on the next tick; the interval times are journalled
            st.warning("The session has ended; it is closed (and its video registered) as soon as the "
                       "database is reachable again.", icon=":material/power_off:")
            return
        st.rerun(scope="app")


def pause_now(run: capture.CueRun) -> None:
    """The Pause button: the interval under way is cut, discarded and done again after Resume."""
    # paused all the same: the cut interval's time is journalled (database down), or the window that took the run
    # over cut it where this one was last seen (the next heartbeat lets go of it)
    with contextlib.suppress(data.Unavailable, data.RunTakenOver):
        run.pause(time.time(), data.SessionStore(run.session_id, run.owner))
    st.session_state[PAUSED] = run.session_id
    with contextlib.suppress(data.RunTakenOver):
        beat(run, force=True)  # the plan changed: another process resuming the run must know


def video_note() -> str:
    """What becomes of the webcam video of a run taken over from a window that went away."""
    rec = shared.recorder
    if rec.error:
        return f"Its webcam video could not be recorded ({ui.md(rec.error)})."
    if not rec.active:
        return "It has no webcam video."
    if rec.frames:
        return ("Its webcam video so far is kept; after resuming, press START on the webcam and the video goes on "
                "in the same file (the time away shows as a still picture).")
    return "No webcam video was recorded before; after resuming, press START on the webcam to record the rest."


def device_taken(run: capture.CueRun) -> str | None:
    """Why the run cannot go on now: another session records on its device (within its planned time). Once a
    run's planned end has passed while nobody showed it (its window or its process went away), its device is
    free for a new session; going on with it then would label the same samples twice, each session with its
    own gestures -- what start_session() refuses. None when it may go on (or when that cannot be told: the
    resume needs the database anyway)."""
    with contextlib.suppress(data.RepoError, data.Unavailable):
        device_id = data.get_session(run.session_id)["device_id"]
        if device_id is not None and (busy := data.recording_on_device(device_id, exclude=run.session_id)):
            return (f"Device #{device_id} is recording session #{busy['id']} now (planned to end "
                    f"{ui.fmt_time(busy['planned_end'])}): going on with this one would label the same signals "
                    "twice. Stop that session first to resume this one, or stop this one and keep what was "
                    "recorded.")
    return None


def paused_view(run: capture.CueRun, store: data.SessionStore) -> None:
    """A run taken over after its window went away (a reload): go on, or stop and keep what was recorded."""
    cut = run.steps[run.index]
    left_out = (f" The {ui.md(cut.label) if cut.kind == 'gesture' else 'rest'} under way then is left out of training"
                + (" and done again when you resume." if cut.kind == "gesture" else ".") if cut.interrupted else "")
    if st.session_state.get(PAUSED) == run.session_id:
        st.info(f"Paused at {ui.fmt_time(capture.utc(run.paused_at))}: take as long as you need, nothing is "
                f"recorded until you press Resume.{left_out}", icon=":material/pause_circle:")
    else:
        st.warning(f"Paused where the page was left ({ui.fmt_time(capture.utc(run.paused_at))}): everything "
                   f"recorded until then is kept.{left_out} {video_note()}", icon=":material/pause_circle:")
    busy = st.empty()
    if why := st.session_state.get(BUSY):
        busy.error(why, icon=":material/block:")
    c1, c2 = st.columns([2, 3])  # room for the long label
    if c1.button("Resume", key="resume", type="primary", width="stretch", icon=":material/play_arrow:",
                 shortcut=PAUSE_KEY, help="Goes on after a rest, from the interval that was under way"):
        if why := device_taken(run):  # still paused: nothing changed
            st.session_state[BUSY] = why
            busy.error(why, icon=":material/block:")
            return
        st.session_state.pop(BUSY, None)
        try:
            run.resume(time.time(), store)
        except data.Unavailable:  # still paused: nothing changed
            st.toast("Resuming needs the database, which is not reachable: try again when it is back",
                     icon=":material/power_off:", duration="long")
        else:
            beat(run, force=True)
            by_user = st.session_state.pop(PAUSED, None) == run.session_id  # its webcam went on meanwhile
            st.session_state[RESUMED] = f"Session #{run.session_id} resumed." + ("" if by_user else f" {video_note()}")
            st.rerun(scope="app")
    if c2.button("Stop now and keep what was recorded", key="stop_left", width="stretch", icon=":material/stop:"):
        st.session_state.pop(BUSY, None)
        with contextlib.suppress(data.Unavailable):  # stopped all the same; the marks wait in the journal
            run.abort(time.time(), store)


def take_over_left(session_id: int, resume: bool) -> None:
    """Take the run whose window went away into this window, pause it where that window stopped showing its cue,
    then resume it or stop it."""
    left_at = capture.take_over(session_id, shared, time.time())
    if left_at is None:
        st.toast(f"Session #{session_id} is shown in another window again, or has ended.", duration="long")
        st.rerun(scope="app")
    run = shared.run
    if beat(run, force=True) == "lost":  # a window of another UI process has taken it meanwhile
        let_go(run)
        shared.taken_over = None
        st.toast(f"Session #{session_id} was taken over in another window.", duration="long")
        st.rerun(scope="app")
    pause_and_go_on(run, left_at, resume)


def pause_and_go_on(run: capture.CueRun, left_at: float, resume: bool, note: str = "") -> None:
    """A run taken over into this window: paused where it was last seen, then resumed or stopped."""
    session_id = run.session_id
    store = data.SessionStore(session_id, run.owner)
    with contextlib.suppress(data.Unavailable):  # paused all the same; the marks wait in the journal
        run.pause(left_at, store)
    beat(run, force=True)
    if resume and (why := device_taken(run)):  # it stays paused here, with both choices and why
        st.session_state[BUSY] = why
    elif resume:
        try:
            run.resume(time.time(), store)
            beat(run, force=True)
            st.session_state[RESUMED] = f"Session #{session_id} resumed. {note or video_note()}"
        except data.Unavailable:  # it stays paused here, with both choices
            st.toast("Resuming needs the database, which is not reachable: try again when it is back",
                     icon=":material/power_off:", duration="long")
    else:
        with contextlib.suppress(data.Unavailable):
            run.abort(time.time(), store)
    st.rerun(scope="app")


@st.fragment(run_every=1.0)
def left_runs(user_id: int, sessions: dict[int, dict]) -> None:
    """This user's sessions whose run is in another window: left alone while that window shows it; offered to
    resume or stop once it has not for capture.LEFT_AFTER_S (the page was reloaded or closed)."""
    with ui.guard():
        now = time.time()
        for run in capture.runs_of(user_id, exclude=shared):
            if (s := sessions.get(run.session_id)) is None:
                continue
            left_s = now - (run.seen_at or 0.0)
            if left_s < capture.LEFT_AFTER_S:
                st.caption(f"Session #{s['id']} '{ui.md(s['name'])}' is recording in another window (planned to end "
                           f"{ui.fmt_time(data.planned_end(s))}).")
                continue
            done = run.summary()
            st.warning(f"Session #{s['id']} '{ui.md(s['name'])}' stopped showing its cue at "
                       f"{ui.fmt_time(capture.utc(run.seen_at or now))} (its page was reloaded or closed): "
                       f"{done['gestures']} gesture repetition(s) are recorded. Go on from where it stopped, or stop "
                       "now and keep what was recorded; the interval under way then is left out of training.",
                       icon=":material/restart_alt:")
            c1, c2 = st.columns([2, 3])  # room for the long label
            if c1.button("Resume", key=f"resume_left_{s['id']}", type="primary", width="stretch",
                         icon=":material/play_arrow:", help="Goes on after a rest, from the interval under way"):
                take_over_left(s["id"], resume=True)
            if c2.button("Stop now and keep what was recorded", key=f"stop_left_{s['id']}", width="stretch",
                         icon=":material/stop:"):
                take_over_left(s["id"], resume=False)


def take_over_dead(session_id: int, info: dict, resume: bool) -> None:
    """Take over the run of a session whose UI process died (its heartbeat stopped): claimed in the database
    (only one window can), rebuilt from what is stored there, paused where it was last seen, then resumed or
    stopped."""
    owner = secrets.token_hex(8)
    taken = data.take_over_run(session_id, info["run_owner"], info["heartbeat_at"], owner, capture.LEFT_AFTER_S)
    if taken is None:
        st.toast(f"Session #{session_id} is going on in another window again, or was taken over there.",
                 duration="long")
        st.rerun(scope="app")
    # What the dead run had journalled but not stored (the database was down) first: the run goes on from that.
    data.replay_interval_journals(session_id=session_id)
    session = {**taken, "intervals": data.get_session(session_id)["intervals"]}
    run, left_at = capture.CueRun.from_left(session, journal=data.IntervalJournal(session), owner=owner)
    try:
        note = data.keep_left_video(session)
    except data.Unavailable:  # its registration is journalled: stored by a later page load
        note = "Its webcam video until then is kept."
    run.seen_at = time.time()
    shared.run = run
    capture.register(shared)
    if resume:  # the dead process's file cannot be continued: the rest goes to a new one
        shared.recorder.start(data.video_path_for(run.user_id, session_id)[0])
        note += " Press START on the webcam to record the rest."
    pause_and_go_on(run, left_at, resume, note)


@st.fragment(run_every=1.0)
def other_process_runs(user_id: int, sessions: dict[int, dict]) -> None:
    """This user's recording sessions whose run is not in this UI process: left alone while their heartbeat in
    the database is fresh (recording in another window, maybe of another UI process); offered to resume or stop
    once it is capture.LEFT_AFTER_S old by the database's clock (the process showing it died or restarted)."""
    with ui.guard():
        runs = data.recording_runs(user_id)
        here = {r.session_id for r in capture.runs_of(user_id, shared)}
        for sid, s in sessions.items():
            if (info := runs.get(sid)) is None or sid in here:
                continue  # ended meanwhile, or taken into this process
            if info["heartbeat_age_s"] < capture.LEFT_AFTER_S:
                st.caption(f"Session #{sid} '{ui.md(s['name'])}' is recording in another window (planned to end "
                           f"{ui.fmt_time(data.planned_end(s))}).")
                continue
            seen = info["run_seen_at"] or s["started_at"]
            st.warning(f"Session #{sid} '{ui.md(s['name'])}' stopped at {ui.fmt_time(seen)}: the program showing it ended "
                       "(the UI was restarted, or crashed). Everything recorded until then is kept. Go on from where "
                       "it stopped, or stop now; the interval under way then is left out of training.",
                       icon=":material/restart_alt:")
            c1, c2 = st.columns([2, 3])  # room for the long label
            if c1.button("Resume", key=f"resume_left_{sid}", type="primary", width="stretch",
                         icon=":material/play_arrow:", help="Goes on after a rest, from the interval under way"):
                take_over_dead(sid, info, resume=True)
            if c2.button("Stop now and keep what was recorded", key=f"stop_left_{sid}", width="stretch",
                         icon=":material/stop:"):
                take_over_dead(sid, info, resume=False)


def setup_view(user: dict, devices: list[dict], gestures: list[dict]) -> dict:
    """The session settings; returns the chosen device."""
    by_id = {d["id"]: d for d in devices}
    device = by_id[st.selectbox("Device", list(by_id), key="capture_device",
                                format_func=lambda i: f"#{i} {by_id[i]['name']} ({by_id[i]['channel_count']} ch, "
                                                      f"{float(by_id[i]['sample_rate_hz']):g} Hz)")]
    names = [g["name"] for g in gestures]
    chosen = st.multiselect("Gestures", names, default=names[: min(len(names), 4)], key="capture_gestures")
    c1, c2, c3 = st.columns(3)
    reps = c1.number_input("Repetitions", 1, 50, 5, key="capture_reps")
    hold = c2.number_input("Hold (s)", 0.5, 60.0, 3.0, step=0.5, key="capture_hold")
    rest = c3.number_input("Rest (s)", 0.5, 60.0, 3.0, step=0.5, key="capture_rest")
    name = st.text_input("Session name", value="", placeholder="optional, e.g. 'morning, armband on left forearm'",
                         key="capture_name")
    if not chosen:
        st.info("Choose at least one gesture.")
        return device
    plan = data.plan_intervals(chosen, int(reps), float(hold), float(rest))
    total = plan[-1]["planned_end_ms"] / 1000
    st.caption(f"{len(plan)} intervals, {int(reps) * len(chosen)} gesture repetitions, "
               f"{int(total // 60)} min {total % 60:.0f} s. Each gesture is held {hold:g} s after a {rest:g} s rest.")
    reaction_s, window_s = data.training_cue_timing_s()
    shortest = reaction_s + window_s
    if min(hold, rest) < shortest:
        st.warning(f"{'Holds' if hold < shortest else 'Rests'} shorter than {shortest:g} s give no training data: "
                   f"the first {reaction_s:g} s after each cue are skipped (you are still moving) and a window is "
                   f"{window_s:g} s. "
                   f"Training would fail naming the {'gesture' if hold < shortest else 'rest'}; hold at least "
                   "1 s.", icon=":material/timer:")
    activity = next((d for d in data.device_activity(user["id"]) if d["id"] == device["id"]), None)
    if activity and not activity["streaming"]:
        st.warning("This device is not streaming, so the session would record no signals. Check the live strip "
                   "on the right before starting.")
    if st.button("Start session", type="primary", key="capture_start", icon=":material/play_arrow:"):
        if start_session(user, device, chosen, int(reps), float(hold), float(rest),
                         name or f"{', '.join(chosen)} x{int(reps)}"):
            st.rerun()
    return device


def unfinished(user: dict) -> None:
    current = shared.run.session_id if shared.run else None
    stale = [s for s in data.list_sessions(user["id"]) if s["status"] in ("planned", "recording")
             and s["id"] != current]
    # runs of this process whose window is elsewhere or gone: shown (and offered to resume or stop) by left_runs
    with_run = {r.session_id for r in capture.runs_of(user["id"], exclude=shared)}
    if left := {s["id"]: s for s in stale if s["id"] in with_run and s["status"] == "recording"}:
        left_runs(user["id"], left)
    stale = [s for s in stale if s["id"] not in left]
    # recording with a heartbeat (not a session from before heartbeats): its run's liveness is in the database
    runs = data.recording_runs(user["id"])
    if elsewhere := {s["id"]: s for s in stale if s["status"] == "recording"
                     and runs.get(s["id"], {}).get("heartbeat_age_s") is not None}:
        other_process_runs(user["id"], elsewhere)
    stale = [s for s in stale if s["id"] not in elsewhere]
    now = datetime.now(UTC)
    for s in stale:
        end = data.planned_end(s)
        if s["status"] == "recording" and end is not None and end > now:
            # probably still being recorded in another window: closing it there would cut it short
            st.caption(f"Session #{s['id']} '{ui.md(s['name'])}' is recording (planned to end {ui.fmt_time(end)}).")
            continue
        c1, c2 = st.columns([3, 1], vertical_alignment="center")
        c1.caption(f"Session #{s['id']} '{ui.md(s['name'])}' was left {s['status']} (started "
                   f"{ui.fmt_time(s['started_at'])}); its recorded intervals stay usable.")
        if c2.button("Close it", key=f"close_{s['id']}"):
            data.end_session(s["id"], "aborted")
            ui.focus_after_rerun("Close it", "Training Data Capture")  # the next one left open, or the page
            st.rerun()


def _webrtc_available() -> bool:
    """WebRTC needs the real Streamlit server (the script test harness only has a stand-in runtime)."""
    from streamlit.runtime import Runtime

    return Runtime.exists() and type(Runtime.instance()) is Runtime


def camera() -> None:
    st.markdown("**Webcam** (optional: the video helps you check the labels later)")
    if not _webrtc_available():
        st.caption("The webcam needs the Streamlit server (streamlit run).")
        return
    ctx = webrtc_streamer(
        key="capture-webcam",
        mode=WebRtcMode.SENDRECV,
        rtc_configuration={"iceServers": []},  # local connection only: no STUN server is reachable
        # 320x240 keeps decode + cue drawing + recording + send-back affordable on a small machine
        media_stream_constraints={"video": {"width": {"ideal": 320}, "height": {"ideal": 240},
                                            "frameRate": {"ideal": 15}}, "audio": False},
        video_frame_callback=shared.frame_callback,
        async_processing=True,
    )
    playing = bool(ctx and ctx.state.playing)
    if not playing:
        st.caption("Press START to turn the webcam on: this session's video records once it is on." if shared.run
                   else "Press START to turn the webcam on before starting the session.")
    elif shared.recorder.active:
        st.caption(":red[:material/radio_button_checked:] recording: the cue is drawn on every frame")
    else:
        st.caption("Camera on; recording starts with the session.")


@st.fragment(run_every=1.0)
def signal_strip(user_id: int, device: dict) -> None:
    with ui.guard():
        activity = next((d for d in data.device_activity(user_id) if d["id"] == device["id"]), None)
        if activity is None:
            st.warning("This device no longer exists.")
            return
        if (fps := shared.camera_fps) is not None:
            st.caption(f":material/videocam: webcam {fps:.0f} frames/s" + (" (low: close other programs)"
                                                                            if fps < 5 else ""))
        if activity["streaming"]:
            st.caption(f":green[:material/sensors:] device #{device['id']} streaming ~{activity['measured_rate_hz']:.0f} Hz "
                       f"(expected {float(device['sample_rate_hz']):g} Hz)")
        else:
            st.warning(f"Device #{device['id']} is not streaming (last sample: "
                       f"{ui.fmt_ago(activity['last_sample_at'], activity['now'])}). Power the armband on, check its "
                       "Wi-Fi, and that arduino_secrets.h holds this device's id and key.", icon=":material/sensors_off:")
        now = datetime.now(UTC)
        sig = data.signal(device["id"], now - timedelta(seconds=4), now, max_points=600)
        if not sig.empty:
            sig.frame["t"] = sig.frame["t"] - 4.0
            fig = charts.signal_figure(sig.frame, stacked=False, x_title="seconds ago")
            fig.update_layout(height=220, showlegend=False)
            st.plotly_chart(fig, key="capture_strip", config={"displayModeBar": False})


def running_page(user: dict) -> None:
    """The run belongs to the user and device it was started for, whichever user is picked meanwhile."""
    session = data.get_session(shared.run.session_id)
    owner, device_id = session["user_id"], session["device_id"]
    device = next((d for d in data.list_devices(owner) if d["id"] == device_id), {"id": device_id})
    left, right = st.columns([3, 2], gap="large")
    with left:
        if owner != user["id"]:
            st.info(f"Recording session #{session['id']} for **{ui.md(data.get_user(owner)['name'])}**: the cue, the "
                    "webcam and the live strip are theirs until it ends.", icon=":material/person:")
        if note := st.session_state.pop(RESUMED, None):
            st.info(note, icon=":material/play_arrow:")
        run_view()
    with right:
        camera()
        signal_strip(owner, device)


def page() -> None:
    if shared.run is not None and session_deleted(shared.run.session_id):
        end_deleted_run(shared.run)
    if gone := st.session_state.pop(GONE, None):
        st.warning(gone, icon=":material/person_off:")
    if (moved := shared.taken_over) is not None:
        shared.taken_over = None
        st.info(f"Session #{moved} goes on in another window (this one had stopped showing its cue).",
                icon=":material/open_in_new:")
    user = ui.pick_user()
    if not user:
        return
    if shared.run is not None:
        running_page(user)
        return
    gestures = data.list_gestures(user["id"])
    devices = data.list_devices(user["id"])
    if not gestures or not devices:
        need = [x for x, ok in (("add gestures", gestures), ("register a device", devices)) if not ok]
        st.info(f"Before recording, {' and '.join(need)} on the **Gesture Management** page.")
        return
    left, right = st.columns([3, 2], gap="large")
    with left:
        if last := st.session_state.get(LAST):
            s = last["summary"]
            left_out = (f"{s['interrupted']} interval(s) under way when it was paused or its page was left are not trained on. "
                        if s.get("interrupted") else "")
            (st.success if last["status"] == "completed" else st.warning)(
                f"Session #{last['session_id']} {last['status']}: {s['gestures']} gesture repetitions recorded, "
                f"{s['redone']} redone. {left_out}{last['note']} Next: check its quality and train on "
                "**Kickoff Training**.")
            with contextlib.suppress(data.RepoError):  # deleted meanwhile: nothing to check
                quality = data.session_quality(data.get_session(last["session_id"]))
                if problem := ui.signal_problem(last["session_id"], quality):
                    st.warning(problem, icon=":material/sensors_off:")
        unfinished(user)
        device = setup_view(user, devices, gestures)
    with right:
        camera()
        signal_strip(user["id"], device)


with ui.guard():
    page()
