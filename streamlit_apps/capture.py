"""The guided capture session's moving parts, kept free of Streamlit so they can be tested directly.

CueRun walks a session's intervals in server (wall-clock) time. Interval boundaries are computed from the
time each interval started plus its duration -- not from when the page happened to refresh -- so the times
stored in session_intervals (what training labels from) are exact, and the cue drawn on the video frames
(computed from the same object in the WebRTC thread) changes at exactly those instants.

Interval changes not yet stored are also appended to a Journal (on the server's disk) before the database
write is tried, so they outlive the browser session when the database is down (see semg.journal.IntervalJournal).

A run outlives the browser session showing it (a reload starts a new one): this process keeps every run by
session id (register/take_over), so another window of the user -- the reloaded page -- can take it over, pause
it where its old window stopped showing the cue, and resume or stop it, with its webcam recording.
A run also outlives its UI process (a crash, a restart): its window writes a heartbeat to the database about once
a second (where the run is in its plan included: CueRun.cursor), so another process can tell a dead run from one
live elsewhere and rebuild it from the database (CueRun.from_left) to resume or stop it.

VideoRecorder encodes the webcam frames (with the cue drawn on them) to WebM, stamping each frame with its
wall-clock arrival time, so video time t corresponds to server time started_at + t.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import av
from PIL import ImageDraw, ImageFont

log = logging.getLogger("semg.ui")

REST = "REST"
# A window ticks its run every 0.2 s (about once a second in a background tab): a run not ticked for this long
# has lost its window (reloaded, closed), and another window may take it over.
LEFT_AFTER_S = 4.0
# How often a window refreshes its run's heartbeat in the database (one UPDATE). A run whose heartbeat is
# LEFT_AFTER_S old (by the database's clock) has lost its window, whichever UI process it was in.
BEAT_EVERY_S = 1.0


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class IntervalStore(Protocol):
    """Where a run records what happened (the page passes one backed by semg.repo)."""

    def mark(self, interval_id: int, started_at: datetime, ended_at: datetime) -> None: ...
    def discard(self, interval_id: int) -> None: ...
    def extend(self, total_ms: int) -> None: ...  # the session now runs until total_ms after its start
    def add(self, kind: str, label: str, repetition: int, planned_start_ms: int, planned_end_ms: int) -> int: ...


class Journal(Protocol):
    """Where a run keeps its interval changes until they are stored (the page passes semg.journal.IntervalJournal)."""

    def save(self, pending: list[dict], new: int) -> None:
        """Make sure `pending` (the changes not stored yet, oldest first) is on disk when this returns; the
        last `new` of them were never passed before. Called on every flush, so it also shows the run alive."""

    def clear(self) -> None: ...  # everything passed is stored


def journal_record(op: tuple) -> dict:
    """A queued change as a self-describing JSON object (what the journal holds)."""
    if op[0] == "mark":
        return {"op": "mark", "interval_id": op[1], "started_at": utc(op[2]).isoformat(),
                "ended_at": utc(op[3]).isoformat()}
    if op[0] == "discard":
        return {"op": "discard", "interval_id": op[1]}
    return {"op": "extend", "total_ms": op[1]}


@dataclass
class Step:
    interval_id: int
    kind: str
    label: str
    repetition: int  # 0-based
    duration_s: float
    started: float | None = None  # wall-clock seconds
    ended: float | None = None
    discarded: bool = False
    interrupted: bool = False  # under way when the run's window went away: discarded, not redone by the user


@dataclass
class Cue:
    state: str  # 'waiting' | 'running' | 'paused' | 'done' | 'aborted'
    label: str = ""
    kind: str = "rest"
    remaining_s: float = 0.0
    repetition: int = 0  # 1-based, of the current or next gesture
    repetitions: int = 0
    next_label: str = ""
    progress: float = 0.0  # fraction of planned steps done

    @property
    def headline(self) -> str:
        if self.state == "done":
            return "Done!"
        if self.state == "aborted":
            return "Stopped"
        if self.state == "paused":
            return "Paused"
        if self.state == "waiting":
            return "Get ready"
        return "Rest" if self.kind == "rest" else self.label

    @property
    def spoken(self) -> str:
        """The cue for a screen reader: what to do now, without the countdown (it changes only when the cue does,
        so it is said once per interval, not every refresh)."""
        if self.state != "running":
            return self.headline
        if self.kind == "rest":
            return f"Rest. Next: {self.next_label}" if self.next_label else "Rest. Last rest"
        return f"{self.label}: hold, repetition {self.repetition} of {self.repetitions}"

    @property
    def subline(self) -> str:
        if self.state != "running":
            return ""
        if self.kind == "rest":
            nxt = f" · next: {self.next_label}" if self.next_label else " · last rest"
            return f"relax {self.remaining_s:0.1f} s{nxt}"
        return f"hold {self.remaining_s:0.1f} s · repetition {self.repetition} of {self.repetitions}"


@dataclass
class CueRun:
    session_id: int
    steps: list[Step]
    repetitions: int
    hold_s: float
    rest_s: float
    state: str = "waiting"
    index: int = 0
    t_start: float | None = None
    # ("mark", interval_id, started, ended) | ("discard", interval_id) | ("extend", total_ms), oldest first,
    # not yet written; the last _unjournaled of them are not in the journal yet either
    _unsaved: list[tuple] = field(default_factory=list, repr=False)
    _unjournaled: int = field(default=0, repr=False)
    journal: Journal | None = field(default=None, repr=False)
    journal_error: str | None = None  # why the last journal write failed (None once one succeeds)
    _redo: Step | None = field(default=None, repr=False)  # the inserted gesture of the redo under way
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    user_id: int | None = None
    name: str = ""
    seen_at: float | None = None  # when a window last showed its cue (the page's tick): see LEFT_AFTER_S
    paused_at: float | None = None  # when its window went away, while paused
    owner: str = field(default_factory=lambda: secrets.token_hex(8))  # names this run in the database
    beat_at: float | None = None  # time.monotonic() of the last heartbeat stored
    cursor_sent: dict | None = None  # the cursor the database holds

    def cursor(self) -> dict | None:
        """Where the run is in its plan, as the database keeps it (see from_left): the intervals still to run,
        in order (a redo or resume inserts some), from the one under way, when that one started, and whether
        the run is paused (then the first is the interval cut by the pause, to be done again)."""
        with self.lock:
            if self.state not in ("running", "paused"):
                return None
            return {"steps": [s.interval_id for s in self.steps[self.index:]],
                    "started": self.steps[self.index].started, "paused": self.state == "paused"}

    @classmethod
    def from_left(cls, session: dict, journal: Journal | None = None, owner: str | None = None) -> tuple[CueRun, float]:
        """The run of a session whose UI process died, rebuilt from what the database holds (its intervals with
        the times stored so far, and the run columns: cursor, run_seen_at), and when it was last seen: its last
        heartbeat, or the end of an interval it stored after that if later. The run is as it was then (running
        from the interval under way, or paused); pause() it at that time to cut that interval."""
        plan = session.get("plan") or {}
        rows = {i["id"]: i for i in session["intervals"]}
        cursor = session.get("run_cursor") or {}
        if cursor.get("steps"):
            ahead = [i for i in cursor["steps"] if i in rows]
        else:  # no redo or resume yet: the plan's order
            ahead = [i["id"] for i in sorted(session["intervals"], key=lambda i: i["ordinal"]) if not i["discarded"]]
        ahead_set = set(ahead)
        done = sorted((i for i in session["intervals"] if i["ended_at"] is not None and i["id"] not in ahead_set),
                      key=lambda i: i["started_at"])

        def step(i: dict) -> Step:
            s = Step(i["id"], i["kind"], i["label"], int(i["repetition"]),
                     (i["planned_end_ms"] - i["planned_start_ms"]) / 1000.0, discarded=i["discarded"])
            if i["ended_at"] is not None:
                s.started, s.ended = i["started_at"].timestamp(), i["ended_at"].timestamp()
            return s

        t_start = session["started_at"].timestamp()
        run = cls(session["id"], [step(i) for i in done] + [step(rows[i]) for i in ahead],
                  int(plan.get("repetitions", 1)), float(plan.get("hold_s", 1)), float(plan.get("rest_s", 1)),
                  index=len(done), t_start=t_start, journal=journal, user_id=session.get("user_id"),
                  name=session.get("name") or "")
        if owner is not None:
            run.owner = owner
        seen = session.get("run_seen_at")
        left_at = max([seen.timestamp() if seen is not None else t_start]
                      + [s.ended for s in run.steps if s.ended is not None])
        if cursor.get("paused") and run.index < len(run.steps):
            cut = run.steps[run.index]
            if cut.ended is not None:  # cut by a pause and not done again yet
                cut.interrupted = True
                run.state, run.paused_at = "paused", cut.ended
            else:  # paused before anything of it happened: nothing was cut, and nothing ran since
                cut.started = float(cursor["started"]) if cursor.get("started") is not None else left_at
                run.state, run.paused_at = "paused", cut.started
            return run, left_at
        started = float(cursor["started"]) if cursor.get("started") is not None else t_start
        while run.index < len(run.steps) and run.steps[run.index].ended is not None:  # stored after the cursor
            cut = run.steps[run.index]
            if cut.discarded and (run.index + 1 == len(run.steps) or run.steps[run.index + 1].ended is None):
                # the last interval stored, and discarded: cut by a pause whose heartbeat (cursor 'paused') never
                # reached the database -- it was down, its marks journalled. Paused there, to be done again,
                # not skipped as if it had run to its end
                cut.interrupted = True
                run.state, run.paused_at = "paused", cut.ended
                return run, left_at
            started = cut.ended
            run.index += 1
        if run.index < len(run.steps):
            run.state = "running"
            run.steps[run.index].started = started
        else:
            run.state = "done"
        return run, left_at

    def beat_due(self, now_monotonic: float) -> bool:
        return self.beat_at is None or now_monotonic - self.beat_at >= BEAT_EVERY_S

    @classmethod
    def from_session(cls, session: dict, journal: Journal | None = None) -> CueRun:
        plan = session.get("plan") or {}
        steps = [Step(i["id"], i["kind"], i["label"], int(i["repetition"]),
                      (i["planned_end_ms"] - i["planned_start_ms"]) / 1000.0)
                 for i in sorted(session["intervals"], key=lambda i: i["ordinal"]) if not i.get("discarded")]
        return cls(session["id"], steps, int(plan.get("repetitions", 1)), float(plan.get("hold_s", 1)),
                   float(plan.get("rest_s", 1)), journal=journal, user_id=session.get("user_id"),
                   name=session.get("name") or "")

    # -- time ----------------------------------------------------------------------------------------
    def start(self, now: float) -> None:
        with self.lock:
            self.state, self.index, self.t_start, self.seen_at = "running", 0, now, now
            self.steps[0].started = now

    def advance(self, now: float, store: IntervalStore) -> list[Step]:
        """Close every interval whose time is up (each ends exactly where the next starts); record them."""
        finished = self._close_due(now)
        self.flush(store)
        return finished

    def _close_due(self, now: float) -> list[Step]:
        """advance() without the database writes: the due intervals are closed and their marks queued."""
        finished = []
        with self.lock:
            while self.state == "running":
                cur = self.steps[self.index]
                end = cur.started + cur.duration_s
                if now < end:
                    break
                cur.ended = end
                finished.append(cur)
                self._queue(("mark", cur.interval_id, cur.started, end))
                self.index += 1
                if self.index >= len(self.steps):
                    self.state = "done"
                else:
                    self.steps[self.index].started = end
        return finished

    def _queue(self, *ops: tuple) -> None:
        """Queue interval changes for flush (the caller holds the lock)."""
        self._unsaved.extend(ops)
        self._unjournaled += len(ops)

    def _write_journal(self) -> None:
        """Hand the queued changes to the journal. A failing journal is logged and shown, and tried again by the
        next flush; it never stops the recording. (One thread flushes: the page's.)"""
        if self.journal is None:
            return
        with self.lock:
            self._unjournaled = min(self._unjournaled, len(self._unsaved))
            if not self._unsaved:
                return
            pending, new = [journal_record(op) for op in self._unsaved], self._unjournaled
        try:
            self.journal.save(pending, new)
        except Exception as e:  # noqa: BLE001 - whatever the disk says, the database write is still tried
            if self.journal_error is None:
                log.error("capture session %s: the interval journal cannot be written (%s: %s); changes not "
                          "yet stored are only in this browser session's memory", self.session_id,
                          type(e).__name__, e)
            self.journal_error = f"{type(e).__name__}: {e}"
            return
        with self.lock:
            self._unjournaled -= new
            self.journal_error = None

    def flush(self, store: IntervalStore) -> None:
        """Write the queued interval changes in order. A write that fails (database restart, timeout) stays
        queued with everything after it and is retried by the next call, so no finished interval is lost.
        Before any database write the changes go to the journal, so they also survive this browser session
        (and this process) while the database is down; the journal is cleared once all are stored."""
        self._write_journal()
        while True:
            with self.lock:
                if not self._unsaved:
                    return
                op = self._unsaved[0]
            if op[0] == "mark":
                store.mark(op[1], utc(op[2]), utc(op[3]))
            elif op[0] == "discard":
                store.discard(op[1])
            else:
                store.extend(op[1])
            with self.lock:
                if self._unsaved and self._unsaved[0] is op:  # not already popped by another flusher
                    self._unsaved.pop(0)
                if not self._unsaved and self.journal is not None:
                    self._unjournaled = 0
                    try:
                        self.journal.clear()
                    except Exception as e:  # noqa: BLE001 - all is stored; a left-over journal is replayed harmlessly
                        log.warning("capture session %s: the interval journal could not be cleared (%s: %s)",
                                    self.session_id, type(e).__name__, e)

    @property
    def redo_pending(self) -> bool:
        return self._redo is not None and self._redo.ended is None

    @property
    def unsaved(self) -> int:
        return len(self._unsaved)

    def cue(self, now: float) -> Cue:
        with self.lock:
            total = len(self.steps)
            if self.state == "paused":
                return Cue("paused", progress=self.index / total, repetitions=self.repetitions)
            if self.state != "running":
                return Cue(self.state, progress=1.0 if self.state == "done" else 0.0, repetitions=self.repetitions)
            cur = self.steps[self.index]
            remaining = max(0.0, cur.started + cur.duration_s - now)
            nxt = next((s for s in self.steps[self.index + 1:] if s.kind == "gesture"), None)
            rep = (cur.repetition if cur.kind == "gesture" else nxt.repetition if nxt else cur.repetition) + 1
            return Cue("running", cur.label, cur.kind, remaining, rep, self.repetitions,
                       nxt.label if (nxt and cur.kind == "rest") else "",
                       (self.index + 1 - remaining / max(cur.duration_s, 1e-6)) / total)

    def redo_last(self, now: float, store: IntervalStore) -> Step | None:
        """Discard the most recent gesture repetition (running or done) and do it again after a rest.

        The current interval is cut at `now` (a cut rest keeps its data; a cut gesture is the one discarded);
        then a fresh rest and the same gesture are inserted before the rest of the plan -- and, when cut in a
        rest, another rest after it, since the next planned interval is then a gesture (or the end). The
        session's planned length is extended by the time this adds.
        While a redo is under way (its gesture not yet done) another click does nothing: a double click must
        not throw away the good repetition before it.
        The new intervals are rows the database must add: while it is unreachable this raises (the store's
        error) and changes nothing; the intervals already due are closed and queued all the same."""
        self._close_due(now)
        with self.lock:
            target = None
            if self.state == "running" and not self.redo_pending:
                cur = self.steps[self.index]
                done_gestures = [s for s in self.steps[: self.index] if s.kind == "gesture" and not s.discarded]
                target = cur if cur.kind == "gesture" else (done_gestures[-1] if done_gestures else None)
            elapsed_ms = int((now - self.t_start) * 1000)
        if target is None:
            self.flush(store)  # the intervals that were due
            return None
        # The new rows first: if adding fails nothing has changed yet and the click can simply be repeated.
        plan = [("rest", REST, self.rest_s), ("gesture", target.label, self.hold_s)]
        if cur.kind == "rest":
            plan.append(("rest", REST, self.rest_s))
        new, at_ms = [], elapsed_ms
        for kind, label, dur in plan:
            ms = int(dur * 1000)
            new.append(Step(store.add(kind, label, target.repetition, at_ms, at_ms + ms), kind, label,
                            target.repetition, dur))
            at_ms += ms
        with self.lock:
            self._redo = new[1]
            if now > cur.started + 0.05:
                cur.ended = now
                # mark before discard: marking an interval clears its discarded flag
                self._queue(("mark", cur.interval_id, cur.started, now))
                self.steps[self.index + 1:self.index + 1] = new
                self.index += 1
            else:  # nothing happened in the current interval yet: replace it
                self.steps[self.index:self.index + 1] = new
            target.discarded = True
            self.steps[self.index].started = now
            # the rest of the plan now starts later: the session's planned end (which decides when another
            # window may offer to close it) moves with it
            end = now + sum(s.duration_s for s in self.steps[self.index:])
            self._queue(("discard", target.interval_id), ("extend", round((end - self.t_start) * 1000)))
        self.flush(store)
        return target

    def pause(self, at: float, store: IntervalStore) -> Step | None:
        """Its window stopped showing the cue at `at` (a reload, a closed tab): what was due by then is recorded;
        the interval under way is cut at `at` and discarded -- nobody saw its cue to the end, so what the hand
        did after is unknown -- and nothing more is recorded until resume() or abort(). Returns the cut interval
        (None when nothing of it had happened yet: it stays unrecorded). Paused even while the database is
        unreachable (the final flush raises; the changes wait in the queue/journal)."""
        self._close_due(at)
        with self.lock:
            if self.state != "running":
                return None
            self.state, self.paused_at = "paused", at
            cur = self.steps[self.index]
            cut = None
            if at > cur.started + 0.05:
                cur.ended, cur.discarded, cur.interrupted, cut = at, True, True, cur
                # mark before discard: marking an interval clears its discarded flag
                self._queue(("mark", cur.interval_id, cur.started, at), ("discard", cur.interval_id))
        self.flush(store)
        return cut

    def resume(self, now: float, store: IntervalStore) -> Step | None:
        """Go on from a pause at `now`: a rest to get ready, then the interrupted interval again when it was a
        gesture, then the rest of the plan; the session's planned length grows by the pause and the inserted
        intervals. Returns the interval under way at the pause. The new intervals are rows the database must
        add: while it is unreachable this raises (the store's error) and the run stays paused."""
        with self.lock:
            if self.state != "paused":
                return None
            cur = self.steps[self.index]
        plan = [("rest", REST, self.rest_s)]
        if cur.kind == "gesture":
            plan.append(("gesture", cur.label, cur.duration_s))
        new, at_ms = [], int((now - self.t_start) * 1000)
        for kind, label, dur in plan:
            ms = int(dur * 1000)
            new.append(Step(store.add(kind, label, cur.repetition, at_ms, at_ms + ms), kind, label, cur.repetition,
                            dur))
            at_ms += ms
        with self.lock:
            if self._redo is cur:  # the redo under way was interrupted: its repetition is the new one
                self._redo = new[-1]
            if cur.ended is not None:  # cut and discarded by pause(): the new intervals follow it
                self.steps[self.index + 1:self.index + 1] = new
                self.index += 1
            else:  # nothing of it was recorded: replaced
                self.steps[self.index:self.index + 1] = new
            self.steps[self.index].started = now
            self.state, self.paused_at, self.seen_at = "running", None, now
            end = now + sum(s.duration_s for s in self.steps[self.index:])
            self._queue(("extend", round((end - self.t_start) * 1000)))
        self.flush(store)
        return cur

    def held_ms(self, now: float) -> int | None:
        """While paused in a window still showing it: the session's planned length to keep (plan.total_ms), so
        that its device stays its own however long the pause -- were it resumed now (a rest, the cut gesture
        again, the rest of the plan), plus LEFT_AFTER_S, the time a window may go without showing it. None when
        not paused. (A run whose window went away keeps its plan: once that has run out its device is free.)"""
        with self.lock:
            if self.state != "paused" or self.t_start is None:
                return None
            cur = self.steps[self.index]
            left = self.rest_s + (cur.duration_s if cur.kind == "gesture" else 0.0)
            left += sum(s.duration_s for s in self.steps[self.index + 1:])
            return round((now + LEFT_AFTER_S + left - self.t_start) * 1000)

    def forget_unsaved(self) -> None:
        """Another window took the run over and cut it where this one was last seen: what this one has not
        stored yet is dropped, from the queue and from its journal, and never written."""
        with self.lock:
            self._unsaved.clear()
            self._unjournaled = 0
        if self.journal is not None:
            with contextlib.suppress(OSError):
                self.journal.clear()

    def abort(self, now: float, store: IntervalStore) -> None:
        """Stop here: the current interval is cut at ``now`` (a paused run ends where it was paused). The run is
        aborted even while the database is unreachable (then the final flush raises the store's error and the
        marks wait in the queue/journal)."""
        self._close_due(now)
        with self.lock:
            paused = self.state == "paused"
            if paused:
                self.state = "aborted"
        if paused:
            self.flush(store)
            return
        with self.lock:
            if self.state != "running":
                return
            cur = self.steps[self.index]
            self.state = "aborted"
            if now > cur.started + 0.05:
                cur.ended = now  # the session ends here, not at the last interval finished before
                self._queue(("mark", cur.interval_id, cur.started, now))
        self.flush(store)

    def summary(self) -> dict:
        with self.lock:
            done = [s for s in self.steps if s.ended is not None]
            return {"intervals": len(done), "gestures": sum(1 for s in done if s.kind == "gesture" and not s.discarded),
                    "redone": sum(1 for s in self.steps if s.discarded and not s.interrupted),
                    "interrupted": sum(1 for s in self.steps if s.interrupted), "planned": len(self.steps)}


# ---- webcam --------------------------------------------------------------------------------------------
_FONTS: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size: int) -> ImageFont.FreeTypeFont:
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def draw_cue(img, cue: Cue, recording: bool) -> None:
    """Draw the cue (and a REC mark) onto a PIL image in place."""
    d = ImageDraw.Draw(img)
    w, h = img.size
    big = max(18, h // 8)
    if cue.state == "running":
        color = (120, 120, 120) if cue.kind == "rest" else (220, 40, 40)
        d.rectangle([0, 0, w, big + h // 10], fill=(0, 0, 0))
        d.text((10, 4), cue.headline, font=_font(big), fill=color if cue.kind == "gesture" else (230, 230, 230))
        d.text((10, big + 6), cue.subline, font=_font(max(12, h // 22)), fill=(255, 255, 255))
        d.rectangle([0, h - 8, int(w * cue.progress), h], fill=(40, 160, 60))
    elif cue.state in ("done", "aborted", "paused"):
        d.text((10, 4), cue.headline, font=_font(big), fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    if recording:
        d.ellipse([w - 30, 10, w - 12, 28], fill=(230, 0, 0))
        d.text((w - 75, 10), "REC", font=_font(16), fill=(230, 0, 0))


class VideoRecorder:
    """WebM (VP8) writer fed from the WebRTC thread; frame timestamps are wall-clock offsets from the first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.path: Path | None = None
        self._container = None
        self._stream = None
        self.first: float | None = None
        self.last: float | None = None
        self.frames = 0
        self._last_pts = -1
        self.size: tuple[int, int] | None = None
        self.error: str | None = None

    @property
    def active(self) -> bool:
        return self.path is not None

    def start(self, path: Path) -> None:
        with self.lock:
            # People's webcam videos: only the platform's account may list or read them (umask is often 022)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path.parent, 0o700)
            self.path, self.first, self.last, self.frames, self._last_pts = path, None, None, 0, -1
            self._container = self._stream = None
            self.error = None

    def write(self, frame: av.VideoFrame, now: float) -> None:
        with self.lock:
            if self.path is None or self.error:
                return
            try:
                if self._container is None:
                    w, h = frame.width - frame.width % 2, frame.height - frame.height % 2
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))  # private file
                    # the file gets each cluster (1 s of frames) as soon as it is complete, not in 5 s / 32 KB lumps:
                    # a UI process killed mid-session leaves its video up to its last second, not an empty file
                    self._container = av.open(str(self.path), "w", format="webm",
                                              options={"flush_packets": "1", "cluster_time_limit": "1000"})
                    self._stream = self._container.add_stream("libvpx", rate=30)
                    self._stream.width, self._stream.height, self._stream.pix_fmt = w, h, "yuv420p"
                    self._stream.time_base = Fraction(1, 1000)
                    self._stream.bit_rate = 1_000_000
                    self._stream.codec_context.options = {"deadline": "realtime", "cpu-used": "8"}
                    self.first, self.size = now, (w, h)
                pts = max(int(round((now - self.first) * 1000)), self._last_pts + 1)
                out = frame.reformat(width=self.size[0], height=self.size[1], format="yuv420p")
                out.pts, out.time_base = pts, Fraction(1, 1000)
                for packet in self._stream.encode(out):
                    self._container.mux(packet)
                self._last_pts, self.last, self.frames = pts, now, self.frames + 1
            except Exception as e:  # noqa: BLE001 - a broken encoder must not kill the video stream
                self.error = f"{type(e).__name__}: {e}"

    def stop(self) -> dict | None:
        """Close the file; returns what the videos row needs, or None when no frame was recorded."""
        with self.lock:
            path, container, stream = self.path, self._container, self._stream
            self.path = self._container = self._stream = None
            if container is None:
                return None
            try:
                for packet in stream.encode():
                    container.mux(packet)
            finally:
                container.close()
            duration = (self.last or self.first) - self.first
            return {"path": path, "started_at": utc(self.first), "ended_at": utc(self.last or self.first),
                    "frame_count": self.frames, "fps": (self.frames - 1) / duration if duration > 0 else None,
                    "width": self.size[0], "height": self.size[1], "bytes": path.stat().st_size}


class CaptureShared:
    """Per-browser-session state the WebRTC thread reads: the running cue and the recorder."""

    def __init__(self) -> None:
        self.run: CueRun | None = None
        self.recorder = VideoRecorder()
        self.video: dict | None = None  # the finished run's recording until it is registered
        self.frames_seen = 0
        self.last_frame_at: float | None = None
        self._recent = deque(maxlen=30)
        self.taken_over: int | None = None  # the session whose run another window took from this one

    @property
    def camera_fps(self) -> float | None:
        """Frames per second reaching the server over the last ~30 frames (None when the camera is off)."""
        recent = list(self._recent)
        if len(recent) < 2 or time.time() - recent[-1] > 2:
            return None
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)

    def frame_callback(self, frame: av.VideoFrame) -> av.VideoFrame:
        now = time.time()
        self.frames_seen += 1
        self.last_frame_at = now
        self._recent.append(now)
        run = self.run
        cue = run.cue(now) if run is not None else Cue("waiting")
        img = frame.to_image()
        draw_cue(img, cue, self.recorder.active)
        out = av.VideoFrame.from_image(img)
        out.pts = frame.pts
        if frame.time_base is not None:
            out.time_base = frame.time_base
        self.recorder.write(out, now)
        return out


# ---- runs outliving their window -----------------------------------------------------------------------
_RUNS: dict[int, CaptureShared] = {}  # session id -> the browser session showing its run
_RUNS_LOCK = threading.Lock()


def register(shared: CaptureShared) -> None:
    with _RUNS_LOCK:
        _RUNS[shared.run.session_id] = shared


def release(session_id: int, shared: CaptureShared) -> None:
    """The run is over (or its session gone): no other window may take it over."""
    with _RUNS_LOCK:
        if _RUNS.get(session_id) is shared:
            del _RUNS[session_id]


def runs_of(user_id: int, exclude: CaptureShared) -> list[CueRun]:
    """The user's runs shown (or last shown) in other browser sessions than `exclude`."""
    with _RUNS_LOCK:
        return [sh.run for sh in _RUNS.values()
                if sh is not exclude and sh.run is not None and sh.run.user_id == user_id]


def take_over(session_id: int, shared: CaptureShared, now: float) -> float | None:
    """Move the session's run and its webcam recording to `shared` (this window) once its window has not shown
    it for LEFT_AFTER_S. Returns when that window last did (where the run is to be paused), or None when it is
    not there to take: finished, still shown elsewhere, or taken over by another window first."""
    with _RUNS_LOCK:
        old = _RUNS.get(session_id)
        run = old.run if old is not None else None
        if (old is None or old is shared or run is None or shared.run is not None
                or now - (run.seen_at or 0.0) < LEFT_AFTER_S):
            return None
        left_at, run.seen_at = run.seen_at or now, now
        # The recording goes along: this window's webcam writes on into the same file on the same clock, and the
        # old window's frame callback, were it still called, writes into an idle recorder.
        shared.recorder, old.recorder = old.recorder, VideoRecorder()
        shared.video, old.video = old.video, None
        shared.run, old.run, old.taken_over = run, None, session_id
        _RUNS[session_id] = shared
        return left_at
