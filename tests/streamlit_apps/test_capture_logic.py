"""The capture session's clockwork and recorder, without Streamlit or a database."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta

import av
import capture
import numpy as np
import pytest
import views

from semg import repo


class FakeStore:
    def __init__(self):
        self.marks, self.discards, self.added, self.next_id = {}, [], [], 1000
        self.total_ms = None

    def extend(self, total_ms):
        self.total_ms = total_ms

    def mark(self, interval_id, started_at, ended_at):
        self.marks[interval_id] = (started_at.timestamp(), ended_at.timestamp())

    def discard(self, interval_id):
        self.discards.append(interval_id)

    def add(self, kind, label, repetition, planned_start_ms, planned_end_ms):
        self.next_id += 1
        self.added.append((self.next_id, kind, label, repetition))
        return self.next_id


def session(gestures=("fist", "open hand"), reps=2, hold=2.0, rest=1.0):
    plan = repo.plan_intervals(list(gestures), reps, hold, rest)
    return {"id": 1, "plan": {"repetitions": reps, "hold_s": hold, "rest_s": rest},
            "intervals": [{**p, "id": p["ordinal"] + 1, "discarded": False} for p in plan]}


def test_intervals_are_recorded_back_to_back_at_their_planned_lengths_whatever_the_polling():
    run, store = capture.CueRun.from_session(session()), FakeStore()
    run.start(100.0)
    for now in (100.3, 101.9, 105.5, 111.0, 200.0):  # irregular page refreshes
        run.advance(now, store)
    assert run.state == "done"
    spans = [store.marks[i] for i in sorted(store.marks)]
    assert spans[0][0] == 100.0
    for (a0, a1), (b0, _) in zip(spans, spans[1:], strict=False):
        assert a1 == b0
    assert [round(b - a, 6) for a, b in spans] == [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0]


def test_cue_says_what_to_do_and_which_repetition():
    run = capture.CueRun.from_session(session())
    run.start(0.0)
    rest = run.cue(0.25)
    assert (rest.headline, rest.next_label, rest.repetition) == ("Rest", "fist", 1)
    assert "next: fist" in rest.subline
    run.advance(1.5, FakeStore())
    hold = run.cue(1.5)
    assert hold.headline == "fist" and hold.subline == "hold 1.5 s · repetition 1 of 2"
    assert 0 < hold.progress < 1


def test_redo_during_a_gesture_discards_it_and_inserts_rest_and_the_gesture_again():
    run, store = capture.CueRun.from_session(session(reps=1)), FakeStore()
    run.start(0.0)
    run.redo_last(1.5, store)  # half-way through the first fist
    assert store.discards == [2]
    assert store.marks[2] == (1.0, 1.5)
    assert [(k, lbl) for _, k, lbl, _ in store.added] == [("rest", "REST"), ("gesture", "fist")]
    assert run.cue(1.6).headline == "Rest"
    run.advance(1.5 + 1.0 + 0.01, store)
    assert run.cue(2.6).headline == "fist"


def test_redo_during_a_rest_repeats_the_previous_gesture_and_keeps_the_rest_data():
    run, store = capture.CueRun.from_session(session(reps=1)), FakeStore()
    run.start(0.0)
    run.advance(3.5, store)  # fist done (1..3), now resting
    target = run.redo_last(3.5, store)
    assert target.label == "fist" and store.discards == [2]
    assert store.marks[3] == (3.0, 3.5)  # the cut rest is still good rest data
    run.advance(100, store)
    assert run.state == "done" and run.summary()["redone"] == 1


@pytest.mark.parametrize("redo_at", [1.0, 1.5, 3.5, 3.0], ids=["gesture-start", "mid-gesture", "mid-rest",
                                                             "rest-start"])
def test_after_a_redo_the_stored_planned_length_is_when_the_session_really_ends(redo_at):
    run, store = capture.CueRun.from_session(session(reps=1)), FakeStore()  # REST 0-1 fist 1-3 REST 3-4 ...
    run.start(10.0)
    run.advance(10.0 + redo_at, store)
    run.redo_last(10.0 + redo_at, store)
    run.advance(1000.0, store)
    assert run.state == "done"
    assert store.total_ms == round((run.steps[-1].ended - 10.0) * 1000)


def test_nothing_to_redo_before_the_first_gesture_and_abort_keeps_what_was_done():
    run, store = capture.CueRun.from_session(session()), FakeStore()
    run.start(0.0)
    assert run.redo_last(0.5, store) is None
    run.abort(2.0, store)
    assert run.state == "aborted" and store.marks == {1: (0.0, 1.0), 2: (1.0, 2.0)}


def test_recorder_writes_a_playable_webm_stamped_in_wall_time(tmp_path):
    shared = capture.CaptureShared()
    run = capture.CueRun.from_session(session())
    shared.run = run
    run.start(1000.0)
    shared.recorder.start(tmp_path / "v" / "s.webm")
    for i in range(30):
        frame = av.VideoFrame.from_ndarray(np.full((240, 320, 3), i * 8, np.uint8), format="rgb24")
        frame.pts = i
        out = shared.frame_callback(frame)
        assert (out.width, out.height) == (320, 240)
    info = shared.recorder.stop()
    assert info["frame_count"] == 30 and info["bytes"] > 0 and info["path"].exists()
    with av.open(str(info["path"])) as c:
        frames = sum(1 for _ in c.decode(video=0))
    assert frames == 30
    assert shared.recorder.stop() is None  # idempotent


def test_recordings_are_private_to_the_platform_account(tmp_path):
    """Webcam videos of people are theirs: another account on the machine may neither read them nor list a
    user's recordings, whatever the umask the services run under (supervisord's is 022)."""
    old = os.umask(0o022)
    try:
        rec = capture.VideoRecorder()
        folder = tmp_path / "videos" / "user1"
        rec.start(folder / "s.webm")
        for i in range(3):
            rec.write(av.VideoFrame.from_ndarray(np.full((64, 64, 3), i, np.uint8), format="rgb24"), 1000.0 + i)
        info = rec.stop()
    finally:
        os.umask(old)
    assert stat.S_IMODE(info["path"].stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_webvtt_labels_are_relative_to_the_first_frame():
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ivs = [{"label": "REST", "repetition": 0, "started_at": t0, "ended_at": t0 + timedelta(seconds=2)},
           {"label": "fist", "repetition": 0, "started_at": t0 + timedelta(seconds=2),
            "ended_at": t0 + timedelta(seconds=4.5), "discarded": True}]
    vtt = views.webvtt(ivs, t0 + timedelta(seconds=1))
    assert vtt.startswith("WEBVTT")
    assert "00:00:00.000 --> 00:00:01.000\nrest" in vtt
    assert "00:00:01.000 --> 00:00:03.500\n[discarded] fist · rep 1" in vtt


@pytest.mark.parametrize("ok,color", [(True, "green"), (False, "red"), (None, "gray")])
def test_status_badges_render_without_emoji(ok, color):
    import uikit
    assert uikit.badge(ok, "API").startswith(f":{color}-badge[")
